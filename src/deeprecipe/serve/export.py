"""Export a trained run to ONNX or TorchScript, then prove the file computes what PyTorch computes.

What goes in comes from the family's hook `export_example(model, spec, batch) -> dict` (deeprecipe/family.py):
    inputs:  {name: example tensor}           (required; the first axis is the batch)
    module:  the nn.Module to export           (default: the model; a GAN gives its generator)
    outputs: [names of the outputs]            (default: output, output1, ...)
    dynamic: {input name: {axis: axis name}}   (default: {0: "batch"} on every input)

Files: ONNX writes one self-contained model.onnx while the weights fit in it (protobuf's 2 GB limit; small models),
and model.onnx plus model.onnx.data (weights beside it: copy both) only beyond that; the summary's `files` and the
printed line name every file written, with the summary model.json itself.

Parity: after writing the file, both the exported model and PyTorch run on fresh inputs of another batch size
(so the dynamic batch axis is exercised too) and the export fails unless every output satisfies
|exported - torch| <= atol + rtol * |torch| (fp32 on the CPU; defaults atol 1e-4, rtol 1e-3).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from deeprecipe.core import UserError
from deeprecipe.engine.checkpoint import model_weights

ATOL, RTOL = 1e-4, 1e-3
ONNX_INLINE_BYTES = 1_800_000_000  # weights up to this stay inside the .onnx (a protobuf holds at most 2 GB)
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


class TensorsOnly(nn.Module):
    """Calls the module and keeps only tensor outputs: a language model's (logits, None) becomes logits."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *inputs: torch.Tensor):
        out = self.module(*inputs)
        if isinstance(out, (tuple, list)):
            out = tuple(t for t in out if isinstance(t, torch.Tensor))
            return out[0] if len(out) == 1 else out
        return out


def example(family, model: nn.Module, spec, batch: int) -> dict:
    """The family's export_example with the defaults filled in (module: the model; axis 0 of every input dynamic)."""
    ex = dict(family.export_example(model, spec, batch))
    ex.setdefault("module", model)
    ex.setdefault("dynamic", {name: {0: "batch"} for name in ex["inputs"]})
    return ex


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def export_onnx(module: nn.Module, ex: dict, path: Path) -> list[Path]:
    """Write `path` (and `path`.data when the weights do not fit in one file); returns the files written."""
    from torch.export import Dim

    weights = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # an earlier export's weights must not pass for this file's

    names = list(ex["inputs"])
    dims: dict[str, Dim] = {}
    shapes = tuple(
        {ax: dims.setdefault(n, Dim(n, min=1)) for ax, n in ex["dynamic"].get(name, {}).items()} for name in names
    )
    out_names = ex.get("outputs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(ex["inputs"].values()),
            str(path),
            input_names=names,
            output_names=out_names,
            dynamic_shapes=(shapes,),  # one entry: TensorsOnly.forward takes *inputs
            dynamo=True,
            external_data=weights > ONNX_INLINE_BYTES,
            verbose=False,
        )
    return [path, data] if data.exists() else [path]


def run_onnx(path: Path, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]


def export_torchscript(module: nn.Module, ex: dict, path: Path) -> list[Path]:
    with warnings.catch_warnings():  # tracing is deprecated upstream but remains the way to get a .pt for C++
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, tuple(ex["inputs"].values()), check_trace=False)
        traced.save(str(path))
    return [path]


def run_torchscript(path: Path, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return _as_list(m(*inputs.values()))


def export_run(
    run: str,
    family,
    model: nn.Module,
    spec,
    fmt: str = "onnx",
    out: str | None = None,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> dict:
    """Export the model of run folder `run` (loaded on the CPU) to `out` (default RUN/export/model.onnx|.pt) and
    check parity; returns the summary."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    model.float().eval()
    ex = example(family, model, spec, batch=2)
    module = TensorsOnly(ex["module"]).eval()
    path = Path(out) if out else Path(run) / "export" / f"model{FORMATS[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        files = (export_onnx if fmt == "onnx" else export_torchscript)(module, ex, path)
    except UserError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{fmt} export of {run} failed: {msg}") from e
    # parity on fresh inputs with another batch size (the dynamic axis)
    check = example(family, model, spec, batch=3)["inputs"]
    with torch.no_grad():
        want = [t.float() for t in _as_list(module(*check.values()))]
    got = (run_onnx if fmt == "onnx" else run_torchscript)(path, check)
    if len(got) != len(want):
        raise UserError(f"exported {path} returns {len(got)} outputs, PyTorch {len(want)}")
    diff = 0.0
    for g, w in zip(got, want):
        g = g.float()
        if g.shape != w.shape:
            raise UserError(f"exported {path}: output shape {list(g.shape)} != PyTorch {list(w.shape)}")
        diff = max(diff, float((g - w).abs().max()))
        if not torch.allclose(g, w, atol=atol, rtol=rtol):
            raise UserError(
                f"exported {path} differs from PyTorch: max |diff| {diff:.3g} exceeds "
                f"atol {atol:g} + rtol {rtol:g} * |torch| (the file is kept for inspection)"
            )
    about = model_weights(Path(run), load=False)[1]  # the weights load_run loaded
    summary = {
        "file": str(path),
        "files": [str(f) for f in [*files, path.with_suffix(".json")]],  # every file written, this summary last
        "format": fmt,
        "task": family.name,
        "weights": about.text,
        "step": about.step,
        "inputs": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in check.items()},
        "dynamic": {n: {str(a): d for a, d in axes.items()} for n, axes in ex["dynamic"].items()},
        "outputs": ex.get("outputs") or [f"output{i}" for i in range(len(want))],
        "max_abs_diff": diff,
        "atol": atol,
        "rtol": rtol,
        "class_names": spec.class_names,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "preprocess": "float image in [0, 1], minus mean, divided by std, per channel" if spec.mean else "",
    }
    path.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return summary
