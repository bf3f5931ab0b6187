"""Image-to-image on files and uploads: predict writes OUT/<stem>_<mode>.png per file, serve adds the mode's
endpoint. What differs between the modes (how a file or an upload is read, which net call answers it, the
endpoint) is the mode's entry in modes.py; the calls are here:

    enhance     sr: the bicubic up-sampling of a low-res image through G, on tiles (`tiled`) so any size fits and
                the answer is exactly the whole image's
    inpaint     inpaint: the image with the white pixels of its mask filled (the rest kept as it was)
    translate   label2image (a label PNG of class ids), paired, unpaired (an image)
(No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time.)
"""

from collections.abc import Awaitable, Callable
from pathlib import Path

import torch
import torch.nn as nn

import deeprecipe.families.img2img.degrade as degrade  # the module: the package's __init__ imports this one
from deeprecipe.config import Config
from deeprecipe.core import DataSpec, UserError
from deeprecipe.data import image_ops
from deeprecipe.family import PredictOptions, ServeContext
from deeprecipe.runtime import Runtime

TILE = 256  # predict and serve run sr on tiles that keep blocks of this size (output pixels): any size works
MAX_SIDE = 1024  # inpaint and translate answer at most this long side (sr: the input's long side)


def predict(
    model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: PredictOptions, mode
) -> list[dict]:
    """Each file -> OUT/<stem>_<mode>.png: sr enlarges the file by the scale (tiled, any size); inpaint fills
    the white pixels of <stem>_mask.png next to the file; label2image draws the scene of a label PNG (class
    ids); paired and unpaired translate the image. `mode`: the spec's mode in modes.MODES."""
    from torchvision.io import write_png

    out_dir = Path(opts.out or "predictions")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for f in files:
        out = mode.run(model, spec, rt, *mode.read(f, spec))
        dest = out_dir / f"{Path(f).stem}_{spec.extra['mode']}.png"
        write_png(out, str(dest))
        h, w = out.shape[-2:]
        results.append({"file": f, "out": str(dest), "size": [w, h], "text": f"{f} -> {dest} ({w}x{h})"})
    return results


def serve(ctx: ServeContext, mode) -> None:
    """The endpoint of the model's mode (`mode`: its entry in modes.MODES): POST /enhance (sr), /inpaint (image,
    mask: white = fill, the image's size; both scaled down alike past MAX_SIDE; without a mask a centred box of
    the training hole fraction is cut), /translate-image (label2image: a label PNG; paired, unpaired: an image).
    The answer: the output PNG (base64) as `overlay` (the page shows it next to the upload) and `image`, and its
    size. The page's /inpaint widget (kind mask) paints the mask over the uploaded image and shows before and
    after. One request at a time on the model: tiles and sizes vary, so requests are not batched together."""

    async def go(*args) -> dict:
        out = await ctx.locked(mode.run, ctx.model, ctx.spec, ctx.rt, *args, bad=400)
        b64 = image_ops.png_base64(out)
        h, w = out.shape[-2:]
        return {"text": f"{w}x{h}", "image": b64, "overlay": b64, "size": [w, h]}

    mode.endpoint(ctx, go)


# ------------------------------------------------------------------------------------------ a file -> run's arguments


def read_low_res(path: str, spec: DataSpec) -> tuple:
    """sr: (the image, its name for errors)."""
    return image_ops.read(path, spec.in_channels), path


def read_with_mask(path: str, spec: DataSpec) -> tuple:
    """inpaint: (the image, the hole of <stem>_mask.png next to it)."""
    p = Path(path)
    mask_file = p.with_name(f"{p.stem}_mask.png")
    if not mask_file.is_file():
        raise UserError(f"{path}: inpaint needs its mask {mask_file} (white = the pixels to fill)")
    img = image_ops.read(path, spec.in_channels)
    return img, read_mask(mask_file, tuple(img.shape[-2:]))


def read_label_map(path: str, spec: DataSpec) -> tuple:
    """label2image: (the label map (H, W),)."""
    return (read_labels(path, spec),)


def read_a(path: str, spec: DataSpec) -> tuple:
    """paired, unpaired: (the image with A's channels,)."""
    return (image_ops.read(path, int(spec.extra["channels_a"])),)


# ------------------------------------------------------------------------------------------ endpoints

Go = Callable[..., Awaitable[dict]]  # go(*run's arguments) -> the answer of an image endpoint


def serve_enhance(ctx: ServeContext, go: Go) -> None:
    from fastapi import File, UploadFile

    spec = ctx.spec

    @ctx.router.post("/enhance", summary=f"Enlarge an image x{spec.extra['scale']} (super-resolution)")
    async def enhance_endpoint(image: UploadFile = File(..., description="the low-res image")):
        return await go(await ctx.read_image(image, channels=spec.in_channels, size=(0, 0)))

    ctx.widget("/enhance", "image", f"Enlarge an image x{spec.extra['scale']}")


def serve_inpaint(ctx: ServeContext, go: Go) -> None:
    from fastapi import File, HTTPException, UploadFile

    spec = ctx.spec

    @ctx.router.post("/inpaint", summary="Fill the white pixels of the mask in the image")
    async def inpaint_endpoint(
        image: UploadFile = File(..., description="the image"),
        mask: UploadFile | None = File(None, description="white = the pixels to fill (same size)"),
    ):
        img = await ctx.read_image(image, size=(0, 0))
        if mask is None:
            hole = centre_box(img.shape[-2:], spec.extra["hole_fraction"])
        else:
            m = await ctx.read_image(mask, channels=1, size=(0, 0))
            try:  # sizes compared as sent, then both scaled down alike
                mask_of(m, tuple(img.shape[-2:]), mask.filename or "mask")
            except UserError as e:
                raise HTTPException(400, str(e)) from None
            hole = mask_of(image_ops.fit_long_side(m, MAX_SIDE), None, "")
        return await go(image_ops.fit_long_side(img, MAX_SIDE), hole)

    ctx.widget("/inpaint", "mask", "Fill what you paint over an image")


def serve_label_map(ctx: ServeContext, go: Go) -> None:
    from fastapi import File, HTTPException, UploadFile

    @ctx.router.post("/translate-image", summary="Translate an image (label2image: a PNG of class ids)")
    async def translate_endpoint(image: UploadFile = File(..., description="the image")):
        raw = await ctx.read_image(image, channels=1, size=(0, 0), max_side=0)
        try:
            labels = check_labels(raw[0], ctx.spec, image.filename or "labels")
        except UserError as e:
            raise HTTPException(400, str(e)) from None
        return await go(labels)

    ctx.widget("/translate-image", "image", "Translate an image")


def serve_translate(ctx: ServeContext, go: Go) -> None:
    from fastapi import File, UploadFile

    channels = int(ctx.spec.extra["channels_a"])

    @ctx.router.post("/translate-image", summary="Translate an image (label2image: a PNG of class ids)")
    async def translate_endpoint(image: UploadFile = File(..., description="the image")):
        return await go(await ctx.read_image(image, channels=channels, size=(0, 0), max_side=MAX_SIDE))

    ctx.widget("/translate-image", "image", "Translate an image")


# ------------------------------------------------------------------------------------------ the net's answers


@torch.no_grad()
def enhance(model: nn.Module, spec: DataSpec, rt: Runtime, lr: torch.Tensor, where: str = "the image") -> torch.Tensor:
    """A low-res image uint8 (C, h, w) -> the image `scale` times larger, uint8 (C, h*s, w*s), made in tiles."""
    s = int(spec.extra["scale"])
    h, w = lr.shape[-2:]
    if min(h, w) < 2:
        raise UserError(f"{where} is {w}x{h}: too small to enlarge (at least 2x2 pixels)")
    if h * w * s * s > image_ops.MAX_PIXELS:
        raise UserError(f"{where} is {w}x{h}: x{s} would be over {image_ops.MAX_PIXELS} pixels, send a smaller image")
    model.eval()
    x = degrade.enlarge(degrade.unit(lr[None].to(rt.device)), s)  # (1, C, H, W)
    return _to_uint8(tiled(model, x, rt))


def tiled(model: nn.Module, x: torch.Tensor, rt: Runtime, tile: int = TILE) -> torch.Tensor:
    """model(x) of a (1, C, H, W) input, computed on tiles so any size fits in memory, and exactly the whole
    image's answer: each tile keeps a block of about `tile` pixels a side, starts on a multiple of the net's size
    multiple (so its poolings see the same pixel grid) and reaches past its block by the net's reach (so every
    kept pixel sees what it would see in the whole image; the image's own borders are borders in both)."""
    H, W = x.shape[-2:]
    m = model.multiple
    reach = -(-model.reach // m) * m  # a multiple of m, so every window starts on the grid
    step = max(m, tile // m * m)
    if H <= step + reach and W <= step + reach:
        with rt.autocast():
            return model(x).float()
    out = torch.zeros(1, model.out_channels, H, W, device=x.device)
    for top in range(0, H, step):
        for left in range(0, W, step):
            t0, l0 = max(0, top - reach), max(0, left - reach)
            t1, l1 = min(H, top + step + reach), min(W, left + step + reach)
            with rt.autocast():
                y = model(x[..., t0:t1, l0:l1]).float()
            bh, bw = min(step, H - top), min(step, W - left)
            out[..., top : top + bh, left : left + bw] = y[..., top - t0 : top - t0 + bh, left - l0 : left - l0 + bw]
    return out


@torch.no_grad()
def inpaint(model: nn.Module, spec: DataSpec, rt: Runtime, img: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Image uint8 (C, H, W) and hole (H, W) in {0, 1} -> the image with the hole filled, uint8."""
    model.eval()
    x = degrade.unit(img[None].to(rt.device))
    m = hole[None, None].float().to(rt.device)
    with rt.autocast():
        out = model(torch.cat([x * (1 - m), m], 1)).float()
    return _to_uint8(out)


@torch.no_grad()
def translate(model: nn.Module, spec: DataSpec, rt: Runtime, x: torch.Tensor) -> torch.Tensor:
    """An image uint8 (C, H, W) (label2image: labels (H, W)) -> the translated image uint8 (C, H, W)."""
    model.eval()
    x = x[None].to(rt.device)
    inp = degrade.one_hot(x, spec.num_classes) if x.dim() == 3 else degrade.unit(x)  # labels (1, H, W): one-hot
    with rt.autocast():
        return _to_uint8(model(inp).float())


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def mask_of(m: torch.Tensor, size: tuple[int, int] | None, where: str) -> torch.Tensor:
    """A mask image uint8 (1, h, w) -> hole (H, W) in {0, 1} (white, >= 128, = fill); its size must be `size`
    (None: any)."""
    if size is not None and tuple(m.shape[-2:]) != tuple(size):
        raise UserError(
            f"{where}: the mask is {m.shape[-1]}x{m.shape[-2]} but the image is {size[1]}x{size[0]}: "
            "a mask must have its image's size"
        )
    return (m[0] >= 128).float()


def read_mask(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """A mask file (gray or colour: white = fill) -> hole (H, W) checked against the image size."""
    from deeprecipe.core import DataError

    try:
        m = image_ops.read(path, 1)
    except (DataError, UserError) as e:
        raise UserError(f"{path}: not a readable mask image ({e})") from None
    return mask_of(m, size, str(path))


def centre_box(size: tuple[int, int], fraction: float) -> torch.Tensor:
    H, W = size
    h, w = max(1, round(H * fraction**0.5)), max(1, round(W * fraction**0.5))
    hole = torch.zeros(H, W)
    hole[(H - h) // 2 : (H - h) // 2 + h, (W - w) // 2 : (W - w) // 2 + w] = 1
    return hole


def check_labels(lab: torch.Tensor, spec: DataSpec, where: str) -> torch.Tensor:
    """A label map (H, W) of class ids (255 = none): every id must be a class."""
    k = spec.num_classes
    bad = (lab >= k) & (lab != 255)
    if bad.any():
        raise UserError(f"{where}: label id {int(lab[bad][0])} is not one of the {k} classes (0..{k - 1}, 255 = none)")
    return lab


def read_labels(path: str, spec: DataSpec) -> torch.Tensor:
    raw = image_ops.read(path, 0)
    if raw.shape[0] != 1:
        raise UserError(f"{path}: a label map is a one-channel PNG of class ids, this one has {raw.shape[0]} channels")
    return check_labels(raw[0], spec, path)
