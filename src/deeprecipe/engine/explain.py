"""Attributions for `deeprecipe explain` (Captum), their overlays, and the saliency sanity check.

What a family's explain hook shares: `image_attribution` (Integrated Gradients, Grad-CAM on the last conv block
before the head, occlusion) of a scalar output per example, `overlay` (the heat map over the image, as PNG bytes
through data/image_ops), and `sanity`: the map must depend on the weights (Adebayo et al. 2018, "Sanity checks
for saliency maps": the parametrised layers re-initialised cascading from the head down, the map's Spearman rank
correlation with the model's measured; above `SANITY_THRESHOLD` with every layer randomised it is "uninformative")
and must tell the model apart from untrained copies of itself (its distance to their maps larger than theirs to
each other), so that the map of a network that learnt nothing is flagged too.

Everything here runs on a copy of the model with in-place activations turned off (Captum's layer hooks need the
layer's output unmodified); the caller's model is never changed. Hooks never print: results are returned.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from deeprecipe.core import UserError

IMAGE_METHODS = ("ig", "gradcam", "occlusion")
METHODS = (*IMAGE_METHODS, "attention")  # attention: a translation model's decoder-to-source attention
SANITY_THRESHOLD = 0.5  # rank correlation with every layer randomised above this: "uninformative"
SANITY_COPIES = 12  # independent re-initialisations the model's map is compared with (sanity, question 2)
IG_STEPS = 32


def check_method(method: str, allowed: tuple[str, ...] = IMAGE_METHODS, what: str = "this task") -> str:
    """The method to run: `method`, or "" for the family's default (the first it allows)."""
    if method and method not in allowed:
        raise UserError(f"explain --method {method}: {what} takes {', '.join(allowed)}")
    return method or allowed[0]


def safe_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode whose activations are not in place (the original is untouched)."""
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if getattr(mod, "inplace", False) is True:
            mod.inplace = False
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def param_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules holding parameters of their own (conv, linear, norm, embedding, ...), in registration order."""
    return [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def last_conv(model: nn.Module) -> nn.Conv2d:
    """The last nn.Conv2d before the head (the last parametrised layer, which may itself be a 1x1 conv)."""
    layers = param_layers(model)[:-1]
    convs = [m for _, m in layers if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError("explain --method gradcam needs a conv layer before the head; this model has none")
    return convs[-1]


def cam_layer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The layer Grad-CAM looks at: the module that last produces a feature map (a 4-D output with more than one
    position) before the head (the last parametrised layer) runs, called once in the forward pass. That is the
    rectified output of the last conv block (conv -> norm -> ReLU, a residual block, a U-Net's last decoder
    block), as Selvaraju et al. take it: the conv layer's own output comes before its norm and ReLU, and its
    gradient-weighted sum is mostly negative, which Grad-CAM's ReLU empties."""
    last_conv(model)  # an MLP has no feature map: a one-line error
    head = param_layers(model)[-1][1]
    calls: dict[nn.Module, int] = {}
    maps: list[nn.Module] = []
    head_started = []

    def seen(module, args, out):
        calls[module] = calls.get(module, 0) + 1
        if not head_started and isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[-2:].numel() > 1:
            maps.append(module)

    hooks = [m.register_forward_hook(seen) for m in model.modules() if m is not model and m is not head]
    hooks.append(head.register_forward_pre_hook(lambda *_: head_started.append(True)))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    once = [m for m in maps if calls[m] == 1]
    if not once:
        raise UserError("explain --method gradcam needs a feature map before the head; this model makes none")
    return once[-1]


def image_attribution(
    forward: Callable, model: nn.Module, x: torch.Tensor, target, method: str, baseline: torch.Tensor, layer: str = ""
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attributions of forward(x)[:, target] (target None: forward returns (B,)) to x (B, C, H, W):
    a map (B, H, W) at the input's size (IG: summed over channels, signed; Grad-CAM at cam_layer, or at the
    submodule named `layer` for a model with several heads: non-negative, upsampled; occlusion: the drop of the
    output when a window is blanked to `baseline`), and IG's convergence delta (B,) (sum of attributions -
    (f(x) - f(baseline))), else None."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion

    x = x.detach().float().contiguous()
    baseline = baseline.expand_as(x).contiguous()
    if method == "ig":
        attr, delta = IntegratedGradients(forward).attribute(
            x, baselines=baseline, target=target, n_steps=IG_STEPS, return_convergence_delta=True
        )
        return attr.sum(1).detach(), delta.detach()
    if method == "gradcam":
        at = model.get_submodule(layer) if layer else cam_layer(model, x)
        cam = LayerGradCam(forward, at).attribute(x, target=target, relu_attributions=True)
        up = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")  # (B, 1, H, W)
        return up[:, 0].clamp_min(0).detach(), None
    if method == "occlusion":
        C, H, W = x.shape[1:]
        k = max(2, round(min(H, W) / 7))
        attr = Occlusion(forward).attribute(
            x,
            sliding_window_shapes=(C, k, k),
            strides=(C, max(1, k // 2), max(1, k // 2)),
            baselines=baseline,
            target=target,
        )
        return attr.sum(1).detach(), None
    check_method(method)
    raise AssertionError


def heat(attr: torch.Tensor, method: str) -> torch.Tensor:
    """A map (H, W) -> [0, 1] for the eye: |IG| (evidence for or against), others as they are (clamped at 0 for
    occlusion: the windows whose removal lowers the score)."""
    a = attr.abs() if method == "ig" else attr.clamp_min(0)
    return a / a.max() if a.max() > 0 else a


def overlay_image(image: torch.Tensor, attr: torch.Tensor, method: str) -> torch.Tensor:
    """uint8 image (C, H, W) and its map (H, W) -> the image and the heat map over it, side by side: floats in
    [0, 1] (3, H, W + W // 16 + W) (a thin white gap between them)."""
    import matplotlib

    img = image.float().cpu() / 255
    img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
    h = heat(attr.float().cpu(), method)
    colour = torch.from_numpy(matplotlib.colormaps["jet"](h.numpy())[..., :3]).permute(2, 0, 1).float()
    a = 0.6 * h[None]
    mixed = (1 - a) * img + a * colour
    return torch.cat([img, torch.ones(3, img.shape[1], max(1, img.shape[2] // 16)), mixed.clamp(0, 1)], 2)


def overlay(image: torch.Tensor, attr: torch.Tensor, method: str, size: int = 256) -> bytes:
    """overlay_image as PNG bytes (through data/image_ops), scaled so the long side is about `size` pixels."""
    from deeprecipe.data import image_ops

    both = overlay_image(image, attr, method)
    scale = max(1, size // max(both.shape[-2:]))
    big = torch.nn.functional.interpolate(both[None], scale_factor=scale, mode="nearest")[0]
    return image_ops.png(big)


def out_path(file: str, method: str, out: Path | None, suffix: str = "") -> Path:
    """Where the overlay of `file` goes: --out DIR/<stem>.<method>.png, else next to the input file."""
    p = Path(file)
    folder = Path(out) if out else p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{p.stem}.{method}{suffix}.png"


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of |a| and |b| (ties get their mean rank). Two constant maps are the same map
    (1.0); one constant and one not share no order (0.0)."""
    from scipy.stats import spearmanr

    a, b = a.detach().abs().flatten().double().cpu().numpy(), b.detach().abs().flatten().double().cpu().numpy()
    ca, cb = a.max() - a.min() <= 1e-12 * max(1.0, abs(a).max()), b.max() - b.min() <= 1e-12 * max(1.0, abs(b).max())
    if ca or cb:
        return 1.0 if ca and cb else 0.0
    return float(spearmanr(a, b).statistic)


def _reinit(module: nn.Module, gen: torch.Generator) -> None:
    """Fresh random weights for one layer's own parameters (reset_parameters when it has one)."""
    if hasattr(module, "reset_parameters"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            module.reset_parameters()
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)):
            with torch.no_grad():  # a norm reset to identity would change nothing: give it random scale and shift
                for p in module.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=gen).to(p))
        return
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.copy_((torch.randn(p.shape, generator=gen) * 0.1).to(p))


def _fresh(model: nn.Module, seed: int) -> nn.Module:
    """A copy of `model` with every parametrised layer back at its own initialisation (reset_parameters, norms
    to identity with fresh running statistics), drawn from `seed`: the model as it was before it learnt."""
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for _, mod in param_layers(m):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
            else:
                with torch.no_grad():
                    for p in mod.parameters(recurse=False):
                        p.copy_(torch.randn_like(p) * 0.1)
    return m


def _loo_distance(x: torch.Tensor, others: list[torch.Tensor]) -> float:
    """The median L2 distance from map x to each of `others`."""
    d = sorted(float((x.float() - o.float()).norm()) for o in others)
    return (d[(len(d) - 1) // 2] + d[len(d) // 2]) / 2


def sanity(
    model: nn.Module,
    attribute: Callable[[nn.Module], torch.Tensor],
    seed: int = 0,
    max_steps: int = 12,
    copies: int = SANITY_COPIES,
) -> dict:
    """The saliency sanity check. `attribute(model) -> map` computes the attribution being judged on a model (the
    same inputs and target each time). Two questions, both must be answered yes for "informative":

    1. Does the map's *shape* depend on the weights? (Adebayo et al.'s model-parameter randomisation.) Layers are
       re-initialised cascading from the head (grouped into at most `max_steps` steps) and the Spearman rank
       correlation with the model's map measured after each step; above SANITY_THRESHOLD with every layer
       randomised, the map is the input's or the architecture's (gradient x input on digits), not the model's.
    2. Does the map tell the model apart from an untrained one? A network that learnt nothing also passes 1 (its
       map changes when its random weights are redrawn), so the map is compared with those of `copies`
       independent re-initialisations of the same network (each layer's own init, as before training): if the
       model is itself such a draw, its map is exchangeable with theirs, and its median L2 distance to the
       others is distributed like each copy's median distance to all the other maps (the model's included). The
       map counts as distinguishable when its distance exceeds every copy's (a rank test: an untrained network
       passes with probability at most 1 / (copies + 1)). The distance keeps the map's units, so a learnt class
       evidence, large and shaped, stands out, while random networks' maps are small and differ among themselves.

    Returns {"layers": names randomised at each cascade step, "similarity": Spearman correlation with the model's
    map after each step, "final": the last, "threshold", "distance": the model map's median distance to the
    re-initialised maps, "null": the largest of the copies' own (the bar it must clear), "ratio" (distance /
    null: above 1 distinguishable), "verdict": "informative" | "uninformative", "why" (empty when informative)}."""
    m = safe_copy(model)
    gen = torch.Generator().manual_seed(seed)
    trained = attribute(m).detach()
    fresh = [attribute(safe_copy(_fresh(model, seed * 1000 + 1 + k))).detach() for k in range(copies)]
    distance = _loo_distance(trained, fresh)
    every = [trained, *fresh]  # each copy's statistic over all the other maps, the model's included: exchangeable
    null = max(_loo_distance(f, every[: k + 1] + every[k + 2 :]) for k, f in enumerate(fresh)) if copies else 0.0
    layers = list(reversed(param_layers(m)))
    n = max(1, -(-len(layers) // max_steps))  # layers per step
    steps = [layers[i : i + n] for i in range(0, len(layers), n)]
    names, sims = [], []
    for group in steps:
        for _, mod in group:
            _reinit(mod, gen)
        names.append(",".join(name or "(model)" for name, _ in group))
        sims.append(round(spearman(trained, attribute(m)), 4))
    final = sims[-1] if sims else 1.0
    why = []
    if final > SANITY_THRESHOLD:
        why.append(f"its ranking survives randomising every layer (rank correlation {final:.2f})")
    if not distance > null:
        why.append(
            f"it is no farther from untrained networks' maps than they are from each other ({distance:.3g}"
            f" vs {null:.3g})"
        )
    return {
        "layers": names,
        "similarity": sims,
        "final": final,
        "threshold": SANITY_THRESHOLD,
        "distance": round(distance, 6),
        "null": round(null, 6),
        "ratio": round(distance / null, 4) if null > 0 else float("inf") if distance > 0 else 0.0,
        "verdict": "uninformative" if why else "informative",
        "why": "; ".join(why),
    }


def sanity_plot(result: dict, path: Path, title: str) -> None:
    """Similarity to the trained attribution after each cascading randomisation step (head first)."""
    from deeprecipe.engine import plots

    fig, ax = plots.plt.subplots(figsize=(max(4, 0.5 * len(result["layers"]) + 2), 3.2))
    xs = list(range(1, len(result["similarity"]) + 1))
    ax.plot(xs, result["similarity"], marker="o")
    ax.axhline(result["threshold"], color="red", linestyle="--", linewidth=1, label="uninformative above")
    ax.set_xticks(xs)
    ax.set_xticklabels(result["layers"], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("Spearman rank correlation")
    ax.set_xlabel("randomised down to (head first)")
    ax.set_title(f"{title}: {result['verdict']}", fontsize=9)
    ax.legend(fontsize=7)
    plots.save_figure(fig, Path(path))


def image_explanation(
    model: nn.Module,
    image: torch.Tensor,
    x: torch.Tensor,
    baseline: torch.Tensor,
    forward_of: Callable[[nn.Module], Callable],
    target: int | None,
    method: str,
    with_sanity: bool = False,
    layer: str = "",
) -> dict:
    """One image's explanation, in memory: the map of `method` for forward_of(model)(x)[:, target] (target None:
    forward returns (B,)) and its overlay over `image` (uint8 (C, H, W), the picture the net saw); `layer`: as
    image_attribution's. What both `explain` (then save_explanation writes the overlay) and the served /explain
    run, so they agree.
    Returns {"method", "map" (H, W), "png" (overlay bytes), "delta" (IG only), "sanity" (with_sanity)}."""
    m = safe_copy(model)
    dev = next(m.parameters()).device

    def attribute(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.enable_grad():
            return image_attribution(forward_of(net), net, x.to(dev), target, method, baseline.to(dev), layer)

    attr, delta = attribute(m)
    res = {"method": method, "map": attr[0].cpu(), "png": overlay(image, attr[0], method)}
    if delta is not None:
        res["delta"] = float(delta.flatten()[0])
    if with_sanity:
        res["sanity"] = sanity(m, lambda net: attribute(net)[0])
    return res


def save_explanation(res: dict, file: str, out: Path | None) -> dict:
    """An image_explanation of input `file` to disk: its overlay ("png", taken out) written to out_path, and its
    sanity result plotted next to it. Returns the result with "out" (and "sanity_plot") added."""
    method = res["method"]
    path = out_path(file, method, out)
    path.write_bytes(res.pop("png"))
    res = {"method": method, "out": str(path)} | res
    if "sanity" in res:
        res["sanity_plot"] = str(out_path(file, method, out, ".sanity"))
        sanity_plot(res["sanity"], Path(res["sanity_plot"]), f"{Path(file).name}, {method}")
    return res


def token_attribution(net: nn.Module, ids: torch.Tensor, target: int, baseline_id: int) -> tuple[torch.Tensor, float]:
    """Integrated Gradients of net(ids)[:, target] at the output of the net's first nn.Embedding (the token
    embedding), from a text of `baseline_id` tokens: a score per token (T,) (summed over the embedding) and the
    convergence delta."""
    from captum.attr import LayerIntegratedGradients

    emb = next((m for m in net.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise UserError("explain needs a token embedding (nn.Embedding) in the model; this one has none")
    ids = ids.long()
    with torch.enable_grad():
        attr, delta = LayerIntegratedGradients(lambda t: net(t).float(), emb).attribute(
            ids,
            baselines=torch.full_like(ids, baseline_id),
            target=target,
            n_steps=2 * IG_STEPS,
            return_convergence_delta=True,
        )
    return attr.sum(-1)[0].detach(), float(delta.flatten()[0])


def token_explanation(
    net: nn.Module, file: str, ids: list[int], target: int, baseline_id: int, decode, with_sanity: bool, out
) -> dict:
    """A text's explanation (a text classifier's class, a language model's next token): token_attribution of
    net(ids)[:, target], {"tokens": [(token, score), ...] in text order, "delta", "top" (the 5 strongest, as
    text)}, and with_sanity the randomisation check ("sanity", "sanity_plot" next to `file` or in `out`)."""
    x = torch.tensor([ids], device=next(net.parameters()).device)
    scores, delta = token_attribution(net, x, target, baseline_id)
    tokens = [[decode([i]), round(float(v), 5)] for i, v in zip(ids, scores)]
    top = sorted(tokens, key=lambda ts: -abs(ts[1]))[:5]
    r = {"tokens": tokens, "delta": delta, "top": " ".join(f"{w!r} {v:+.3f}" for w, v in top)}
    if with_sanity:
        r["sanity"] = sanity(net, lambda n: token_attribution(n, x, target, baseline_id)[0])
        r["sanity_plot"] = str(out_path(file, "ig", out, ".sanity"))
        sanity_plot(r["sanity"], Path(r["sanity_plot"]), f"{Path(file).name}, ig")
    return r
