"""The one image path: decode, resize, normalise and encode, for data sets, predict and serve alike.

Every image that enters deeprecipe (a training file, a file given to `predict`, an upload to the server) is
decoded here by Pillow after its header is checked against a pixel limit (a small PNG can claim a huge size),
converted to the asked channels, and resized with the same antialiased bilinear filter, so a served answer and a
predicted one are the same for the same file. Images are uint8 (C, H, W) until `normalize` turns a batch into
the floats a net sees.
"""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from deeprecipe.core import DataError, DataSpec

MAX_PIXELS = 4096 * 4096  # the largest image decoded (16 Mpixel)
EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageError(DataError):
    """An image that cannot be used; `status` is the HTTP status the server answers with (400, or 413: too big)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode(data: bytes, channels: int = 0, where: str = "image", max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Bytes of an image file -> uint8 (C, H, W). channels: 1 gray, 3 RGB, 0 as stored (alpha dropped)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: the check below is the one that counts
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only: check the size before decoding
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{where}: image is {w}x{h} pixels; the limit is {max_pixels} pixels", 413)
            mode = {1: "L", 3: "RGB"}.get(channels) or ("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            im = im.convert(mode)
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, -1).permute(2, 0, 1)
    except ImageError:
        raise
    except Image.DecompressionBombError:  # Pillow refuses to open more than 2 * MAX_IMAGE_PIXELS: too big as well
        raise ImageError(
            f"{where}: image has more than {2 * Image.MAX_IMAGE_PIXELS} pixels; the limit is {max_pixels} pixels", 413
        ) from None
    except Exception as e:  # Pillow raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ImageError(f"{where}: the file could not be decoded as an image ({type(e).__name__})") from None
    return x.contiguous()


def read(path: str | Path, channels: int = 0, size: int | tuple[int, int] = 0) -> torch.Tensor:
    """One image file -> uint8 (C, H, W), resized to `size` (an int is a square; 0 keeps its size)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read image {path}: {e.strerror or type(e).__name__}") from None
    try:
        x = decode(data, channels, f"image {path}")
    except ImageError as e:  # a data set's file: say so, and what to do
        raise ImageError(f"cannot read {e} (remove or replace the file)", e.status) from None
    return resize(x, size)


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """uint8 (C, H, W) or (B, C, H, W) -> the same at `size` (antialiased bilinear); 0 or the same size: unchanged."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if not size[0] or tuple(x.shape[-2:]) == size:
        return x
    out = F.interpolate(x[None].float() if x.ndim == 3 else x.float(), size=size, mode="bilinear", antialias=True)
    out = out.round().clamp(0, 255).to(torch.uint8)
    return out[0] if x.ndim == 3 else out


INK = 0.25  # a pixel is ink when it differs from the background by a quarter of the image's largest difference


def _ink_box(ink: torch.Tensor) -> tuple[slice, slice] | None:
    """Rows and columns of the bounding box of the ink mask (H, W); None when there is no ink."""
    rows, cols = ink.any(1).nonzero().flatten(), ink.any(0).nonzero().flatten()
    if not len(rows):
        return None
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def ink_extent(x: torch.Tensor) -> float:
    """The typical share of the frame the ink's bounding box fills (long side), over uint8 images (N, C, H, W) of
    light ink on black: what `as_ink` scales a user's drawing to (about 0.7 for MNIST's 20 px in 28)."""
    g = x.float().amax(1)  # (N, H, W)
    fracs = []
    for img in g[: min(len(g), 2000)]:
        box = _ink_box(img > INK * img.max()) if img.max() > 0 else None
        if box is not None:
            fracs.append(max((box[0].stop - box[0].start) / g.shape[1], (box[1].stop - box[1].start) / g.shape[2]))
    return round(float(torch.tensor(fracs).median()), 3) if fracs else 1.0


def as_ink(x: torch.Tensor, size: tuple[int, int], extent: float) -> torch.Tensor:
    """A user's picture uint8 (C, H, W) -> the form of ink data sets (digits, MNIST): light ink on black (a light
    background is inverted), the contrast stretched, cropped to the ink, padded to a centred square whose long
    side the ink fills to `extent`, resized to `size`. An image already in that form (at `size`, on a dark
    background: a file of the data set itself) is used as it is."""
    g = x.float().mean(0)
    background = torch.cat([g[0], g[-1], g[:, 0], g[:, -1]]).median()
    if tuple(x.shape[-2:]) == tuple(size) and background < 128:
        return x
    ink = (g - background).abs()  # light ink on dark, or dark ink on light: the same after this
    if ink.max() < 1:  # a blank picture: nothing to crop to
        return resize(x, size)
    ink = ink / ink.max()
    rows, cols = _ink_box(ink > INK)
    crop = ink[rows, cols]
    side = max(1, round(max(crop.shape) / max(extent, 1e-3)))
    canvas = torch.zeros(max(side, crop.shape[0]), max(side, crop.shape[1]))
    top, left = (canvas.shape[0] - crop.shape[0]) // 2, (canvas.shape[1] - crop.shape[1]) // 2
    canvas[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    out = resize((canvas * 255).round().to(torch.uint8)[None], size)
    return out.expand(x.shape[0], -1, -1).contiguous()


def for_model(x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """A user's image (C, H, W) as the training images were made, at the spec's size: what predict and serve feed
    a classifier. An ink data set (spec.extra["ink_extent"]: digits, MNIST) gets `as_ink`; others a resize."""
    extent = spec.extra.get("ink_extent")
    return as_ink(x, tuple(spec.image_size), extent) if extent else resize(x, tuple(spec.image_size))


def fit_long_side(x: torch.Tensor, max_side: int) -> torch.Tensor:
    """Scale (C, H, W) down so that its long side is at most `max_side` (0: unchanged)."""
    h, w = x.shape[-2:]
    if not max_side or max(h, w) <= max_side:
        return x
    return resize(x, (max(1, round(h * max_side / max(h, w))), max(1, round(w * max_side / max(h, w)))))


def normalize(x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """uint8 images (B, C, ...) -> floats standardized by the spec's per-channel mean/std: the train split's, or
    those of a net's pretrained weights (models/pretrained.py follow_weights). Gray images (C = 1) under a
    three-channel mean/std come out as (B, 3, ...), the gray image in every channel (broadcasting)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = torch.tensor(spec.mean, device=x.device).view(shape)
    std = torch.tensor(spec.std, device=x.device).view(shape)
    return (x.float() / 255 - mean) / std


def denormalize(x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """Inverse of normalize, to [0, 1]: for looking at a batch exactly as the net saw it."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = torch.tensor(spec.mean, device=x.device).view(shape)
    std = torch.tensor(spec.std, device=x.device).view(shape)
    return (x.float() * std + mean).clamp(0, 1)


def png(img: torch.Tensor) -> bytes:
    """(C, H, W) uint8, or float in [0, 1] -> PNG bytes."""
    from PIL import Image

    if img.dtype != torch.uint8:
        img = (img.float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = img.cpu().permute(1, 2, 0).numpy()  # (H, W, C)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def png_base64(img: torch.Tensor) -> str:
    """An image as a base64 PNG (overlays and samples in JSON)."""
    return base64.b64encode(png(img)).decode()
