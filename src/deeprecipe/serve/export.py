"""Export a trained run to ONNX or a torch.export program (.pt2), then prove the file computes what PyTorch computes.

What goes in comes from the family's hook `export_example(model, spec, batch) -> dict` (deeprecipe/family.py):
    inputs:  {name: example tensor}           (required; the first axis is the batch)
    module:  the nn.Module to export           (default: the model; a GAN gives its generator)
    outputs: [names of the outputs]            (default: output, output1, ...)
    dynamic: {input name: {axis: axis name}}   (default: {0: "batch"} on every input)

Files: ONNX writes one self-contained model.onnx while the weights fit in it (protobuf's 2 GB limit; small models),
and model.onnx plus model.onnx.data (weights beside it: copy both) only beyond that; the summary's `files` and the
printed line name every file written, with the summary model.json itself. pt2 is `torch.export.export` saved by
`torch.export.save` (model.pt2: the graph and its weights; `torch.export.load(path).module()` runs it). Its dynamic
axes are `torch.export.Dim`s; a net whose code fixes one of them (a shape baked into a reshape) is exported with
the example's shapes instead, and the summary's `dynamic` says so ({}).

Parity: after writing the file, both the exported model and PyTorch run on fresh inputs of another batch size
(so the dynamic batch axis is exercised too; the example batch itself when the axes are fixed) and the export fails
unless every output satisfies |exported - torch| <= atol + rtol * |torch| (fp32 on the CPU; defaults atol 1e-4,
rtol 1e-3).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from deeprecipe.core import UserError
from deeprecipe.engine.checkpoint import model_weights

ATOL, RTOL = 1e-4, 1e-3
ONNX_INLINE_BYTES = 1_800_000_000  # weights up to this stay inside the .onnx (a protobuf holds at most 2 GB)
FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}


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


def dynamic_shapes(ex: dict) -> tuple:
    """The `dynamic_shapes` of torch.export (and the ONNX exporter) for an example: one torch.export.Dim per axis
    name, shared by the inputs that name it (a seq2seq's source and target share "batch")."""
    from torch.export import Dim

    dims: dict[str, Dim] = {}
    shapes = tuple(
        {ax: dims.setdefault(n, Dim(n, min=1)) for ax, n in ex["dynamic"].get(name, {}).items()}
        for name in ex["inputs"]
    )
    return (shapes,)  # one entry: TensorsOnly.forward takes *inputs


def export_onnx(module: nn.Module, ex: dict, path: Path) -> list[Path]:
    """Write `path` (and `path`.data when the weights do not fit in one file); returns the files written."""
    weights = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # an earlier export's weights must not pass for this file's

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(ex["inputs"].values()),
            str(path),
            input_names=list(ex["inputs"]),
            output_names=ex.get("outputs"),
            dynamic_shapes=dynamic_shapes(ex),
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


def export_pt2(module: nn.Module, ex: dict, path: Path) -> list[Path]:
    """torch.export.export of the module on the example, saved to `path`; the batch (and any other axis the example
    names) stays dynamic where the net allows it, else `ex["dynamic"]` is emptied: the file takes the example's
    shapes only."""
    args, fixed = tuple(ex["inputs"].values()), None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes(ex))
        except Exception as e:  # a shape the net's code fixes: export what the example has
            fixed = first_line(e)
            program = torch.export.export(module, args)
        torch.export.save(program, str(path))
    if fixed is not None:
        ex["dynamic"] = {}
        warnings.warn(f"the pt2 file takes the example's shapes only (no dynamic axes): {fixed}", stacklevel=2)
    return [path]


@contextlib.contextmanager
def weights_only_loads():
    """torch.load inside is weights-only whatever its caller asks (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD)."""
    keep = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for k, v in keep.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def run_pt2(path: Path, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run a .pt2 file. torch.export.load falls back to unpickling arbitrary objects when a weights-only load
    fails; forcing weights-only loads makes such a file an error instead (a plain net's file holds tensors only)."""
    with weights_only_loads():
        program = torch.export.load(str(path))
    with torch.no_grad():
        return _as_list(program.module()(*inputs.values()))


def first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


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
    """Export the model of run folder `run` (loaded on the CPU) to `out` (default RUN/export/model.onnx|.pt2) and
    check parity; returns the summary."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    model.float().eval()
    ex = example(family, model, spec, batch=2)
    module = TensorsOnly(ex["module"]).eval()
    path = Path(out) if out else Path(run) / "export" / f"model{FORMATS[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        files = (export_onnx if fmt == "onnx" else export_pt2)(module, ex, path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{fmt} export of {run} failed: {first_line(e)}") from e
    # parity on fresh inputs with another batch size (the dynamic axis), or on the example when the axes are fixed
    check = example(family, model, spec, batch=3 if ex["dynamic"] else 2)["inputs"]
    with torch.no_grad():
        want = [t.float() for t in _as_list(module(*check.values()))]
    got = (run_onnx if fmt == "onnx" else run_pt2)(path, check)
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


# ------------------------------------------------------------------------------------------ int8


def int8_range() -> tuple[bool, str]:
    """(reduce_range, why): onnxruntime's x86 int8 kernels are fastest with uint8 activations and int8 weights
    (U8S8: 2-3x the float net where signed activations gave ~1.1x on a U-Net); without VNNI their 16-bit
    intermediate sums can saturate, which 7-bit weights avoid. So the weights keep 8 bits where the CPU has VNNI
    (or is not x86), else 7."""
    from deeprecipe.engine.device import cpu_info

    name, flags = cpu_info()
    x86 = bool(flags & {"sse2", "avx2"})
    if not x86 or flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return False, f"uint8 activations, 8-bit weights ({name}: {'VNNI' if x86 else 'not x86'})"
    return True, f"uint8 activations, 7-bit weights: {name} has no VNNI, whose int8 sums would saturate"


def int8_inputs(family, model: nn.Module, spec) -> str:
    """The input name of a net that static int8 quantization applies to here, or a UserError saying why not: one
    float input (token ids and several inputs are refused; quantize_run also checks that the training data's
    prepared batches (family.batch_input) have the input's shape)."""
    ex = example(family, model, spec, batch=2)
    ins = {n: str(t.dtype).removeprefix("torch.") for n, t in ex["inputs"].items()}
    if len(ins) != 1 or not next(iter(ex["inputs"].values())).is_floating_point():
        raise UserError(
            f"--int8 calibrates a net with one float input on its training data; task '{family.name}' exports "
            f"{', '.join(f'{n} ({d})' for n, d in ins.items())}: export without --int8"
        )
    return next(iter(ins))


def prepared_batches(family, split, spec, idx: torch.Tensor, batch: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """(net input as float32 (B, ...), labels: the prepared batch's last entry) of the examples `idx`, in order."""
    for i in range(0, len(idx), batch):
        prepared = family.prepare(split.take(idx[i : i + batch]), spec, None)
        yield family.batch_input(prepared).float().contiguous().cpu(), prepared[-1]


class Calibration:
    """onnxruntime's CalibrationDataReader over prepared batches of the training split: get_next() -> feeds."""

    def __init__(self, name: str, batches: Iterator[tuple[torch.Tensor, Any]]):
        self.name, self.batches = name, batches

    def get_next(self) -> dict | None:
        x = next(self.batches, None)
        return None if x is None else {self.name: x[0].numpy()}


def latency_ms(session, name: str, x: np.ndarray, budget_s: float = 1.0) -> float:
    """Median milliseconds of one onnxruntime run on `x`, after warm-up, over up to `budget_s` seconds (>= 5 runs)."""
    for _ in range(3):
        session.run(None, {name: x})
    times: list[float] = []
    end = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < end and len(times) < 200):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def readers_of(nodes) -> dict[str, list]:
    """{tensor name: the nodes that read it, in graph order} of an ONNX graph's nodes."""
    readers: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    return readers


def relu_before_pool(path: Path, out: Path, keep: frozenset[str] = frozenset()) -> int:
    """Write the ONNX graph at `path` to `out` with every MaxPool -> Relu pair (the MaxPool's output read by that
    Relu only) turned into Relu -> MaxPool, which computes the same (ReLU is monotone, so it commutes with a max);
    returns how many pairs were turned. Why: the quantizer absorbs a ReLU into the quantization of its input, so
    after a pool that gives the pool's output another scale than its input, and onnxruntime then dequantizes,
    pools in float and quantizes again; with the ReLU first, the pool runs on the uint8 values (models/cnn.py pools
    first because that is faster to train). MaxPool nodes named in `keep` stay where they are."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in g.node]  # copies: the field is rebuilt
    readers = readers_of(nodes)
    outputs = {o.name for o in g.output}
    relu_of = {n.input[0]: i for i, n in enumerate(nodes) if n.op_type == "Relu"}
    turned: dict[int, int] = {}  # pool's index -> its relu's index (the relu moves before the pool)
    for i, pool in enumerate(nodes):
        j = relu_of.get(pool.output[0]) if pool.op_type == "MaxPool" and len(pool.output) == 1 else None
        if j is None or len(readers[pool.output[0]]) != 1 or pool.output[0] in outputs or pool.name in keep:
            continue
        relu = nodes[j]
        x, mid, y = pool.input[0], pool.output[0], relu.output[0]
        relu.input[0], relu.output[0], pool.input[0], pool.output[0] = x, mid, mid, y
        turned[i] = j
    if turned:
        moved = set(turned.values())
        order = []
        for i, n in enumerate(nodes):
            if i in turned:
                order.append(nodes[turned[i]])
            if i not in moved:
                order.append(n)
        stale = {nodes[j].output[0] for j in moved}  # now the pre-pool shape: let shape inference redo it
        kept = [v for v in g.value_info if v.name not in stale]
        g.ClearField("node")
        g.node.extend(order)
        g.ClearField("value_info")
        g.value_info.extend(kept)
    onnx.save(model, str(out))
    return len(turned)


def flatten_channels_last(path: Path) -> int:
    """Rewrite the ONNX graph at `path` in place so that each flatten of a (B, C, H, W) map into the dense layer
    after it reads the map in (B, H, W, C) order: a Transpose before the Reshape / Flatten, and the columns of that
    Gemm / MatMul's weight permuted to match, which computes the same; returns how many were rewritten. Why: in the
    int8 file onnxruntime runs the convolutions in NHWC and had to transpose back to NCHW before the flatten; the
    Transpose added here cancels that one (measured: -17 us of ~70 at batch 1 on the Fashion-MNIST CNN). Only a
    flatten read by that layer alone, whose weight (an initializer) nothing else reads, is rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {
        v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.value_info, *inferred.input, *inferred.output]
    }
    weights = {t.name: t for t in g.initializer}
    readers = readers_of(g.node)
    outputs = {o.name for o in g.output}
    done = 0
    for flat in list(g.node):
        if flat.op_type not in ("Reshape", "Flatten") or flat.output[0] in outputs:
            continue
        if flat.op_type == "Flatten" and next((a.i for a in flat.attribute if a.name == "axis"), 1) != 1:
            continue
        x, y = shapes.get(flat.input[0], []), shapes.get(flat.output[0], [])
        dense = readers.get(flat.output[0], [])
        if len(x) != 4 or not all(isinstance(d, int) and d > 0 for d in x[1:]) or x[2] * x[3] == 1:
            continue
        C, H, W = x[1:]
        if len(y) != 2 or y[1] != C * H * W or not y[0] or y[0] != x[0] or len(dense) != 1:
            continue
        layer = dense[0]
        trans_b = next((a.i for a in layer.attribute if a.name == "transB"), 0)
        if layer.op_type not in ("Gemm", "MatMul") or layer.input[0] != flat.output[0]:
            continue
        if layer.input[1] not in weights or len(readers[layer.input[1]]) != 1:
            continue
        w = numpy_helper.to_array(weights[layer.input[1]])
        cols = w if layer.op_type == "Gemm" and trans_b else w.T  # (out, C*H*W)
        cols = cols.reshape(-1, C, H, W).transpose(0, 2, 3, 1).reshape(cols.shape[0], C * H * W)
        w = cols if layer.op_type == "Gemm" and trans_b else cols.T
        weights[layer.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), layer.input[1]))
        nhwc = f"{flat.input[0]}_nhwc"
        to_nhwc = helper.make_node("Transpose", [flat.input[0]], [nhwc], perm=[0, 2, 3, 1])
        g.node.insert(list(g.node).index(flat), to_nhwc)
        flat.input[0] = nhwc
        done += 1
    onnx.save(model, str(path))
    return done


def float_outputs(path: Path) -> int:
    """Rewrite the quantized (QDQ) ONNX graph at `path` in place so that each graph output made by a dense layer
    (Gemm) comes straight from it in float, without the QuantizeLinear -> DequantizeLinear pair the
    quantizer puts after it; returns how many. Why: onnxruntime then runs that layer as one int8 kernel with a
    float result (QGemm without an output scale), one node fewer per request, and the scores are no longer
    rounded to 256 levels. Other layers keep their pair (a convolution's int8 kernel needs an output scale)."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    made = {o: n for n in g.node for o in n.output}
    readers = readers_of(g.node)
    outputs = {o.name for o in g.output}
    drop = []
    for name in outputs:
        dq = made.get(name)
        q = made.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        layer = made.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if layer is None or layer.op_type != "Gemm" or q.input[0] in outputs:
            continue
        if len(readers[q.input[0]]) != 1 or len(readers[dq.input[0]]) != 1:
            continue
        layer.output[0] = name
        drop += [q, dq]
    for n in drop:
        g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)  # the dropped pair's scale and zero point (onnxruntime warns of each otherwise)
    onnx.save(model, str(path))
    return len(drop) // 2


def float_stem(path: Path, name: str) -> list[str]:
    """Names of the nodes of a stem to keep float in the int8 file: the Conv reading the input `name` when it has at
    most 3 input channels, with the Relu / MaxPool / BatchNormalization nodes that alone read its output after it;
    [] when the graph starts otherwise. Why: onnxruntime's int8 convolution is slow on so few channels (a
    1-channel 3x3 conv measured 3-4x its float time), while in float the stem runs in its blocked layout; which of
    the two files is faster is measured (quantize_run), not assumed."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    weights = {t.name: t for t in g.initializer}
    readers = readers_of(g.node)
    first = readers.get(name, [])
    if len(first) != 1 or first[0].op_type != "Conv" or first[0].input[1] not in weights:
        return []
    w = numpy_helper.to_array(weights[first[0].input[1]])
    groups = next((a.i for a in first[0].attribute if a.name == "group"), 1)
    if w.ndim != 4 or w.shape[1] * groups > 3:
        return []
    stem, out = [first[0].name], first[0].output[0]
    while len(readers.get(out, [])) == 1 and readers[out][0].op_type in ("Relu", "MaxPool", "BatchNormalization"):
        node = readers[out][0]
        stem.append(node.name)
        out = node.output[0]
    return stem


def faster_of(files: dict[str, Path], name: str, x32: np.ndarray, timing_s: float, rounds: int = 3) -> dict:
    """{variant: {1: ms, 32: ms}}: the median onnxruntime latency of each file at batch 1 and 32 over `rounds`
    alternating rounds (alternating, so that a machine slowing down mid-way penalises no variant); each round opens
    one session at a time (timed_session)."""
    ms: dict[str, dict[int, list[float]]] = {k: {1: [], 32: []} for k in files}
    for _ in range(rounds):
        for k, p in files.items():
            for b, t in timed_session(p, name, x32, timing_s / rounds).items():
                ms[k][b].append(t)
    return {k: {b: float(np.median(v)) for b, v in t.items()} for k, t in ms.items()}


def timed_session(path: Path, name: str, x32: np.ndarray, budget_s: float) -> dict[int, float]:
    """{1: ms, 32: ms}: latency_ms of a fresh onnxruntime session of `path` at batch 1 and 32, the session closed
    before returning. Why one at a time: an open session keeps its intra-op pool threads, which compete with the
    timed one for the cores (two-thread batch-1 times on a 2-core machine moved by ~20% with the other sessions)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {b: latency_ms(session, name, x32[:b], budget_s) for b in (1, 32)}  # its last reference goes here


def quantize_run(
    run: str,
    family,
    model: nn.Module,
    spec,
    data,
    out: str | None = None,
    calibration: int = 256,
    batch: int = 64,
    atol: float = ATOL,
    rtol: float = RTOL,
    timing_s: float = 1.0,
    stem: bool | None = None,
) -> dict:
    """Export the run's model to float ONNX (parity-checked, as export_run), quantize it to int8 with
    onnxruntime's static post-training quantization (QDQ, uint8 activations, per-channel int8 weights (7-bit
    where the CPU lacks VNNI: int8_range), activation ranges from
    `calibration` examples of the training split), and compare both on the test split (val when there is none):
    accuracy for classifiers, mIoU for segmenters, else the int8 output's agreement with float. Returns
    {"float": summary, "int8": summary, "metric", "split", "calibration", "float_nodes"}, each summary {file,
    bytes, score, latency_ms: {1, 32}} (the median of runs over up to `timing_s` seconds each); the int8 file is
    `out` with .int8.onnx (default RUN/export/model.int8.onnx), these figures in model.int8.json.
    A net whose first convolution reads at most 3 channels (float_stem) is quantized twice, with and without that
    stem kept float; `stem` None keeps the file faster on this CPU (latency at batch 1 times batch 32, alternating
    rounds; both variants' figures in "variants_ms"), True / False force one. "float_nodes" names what stayed float."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    name = int8_inputs(family, model, spec)
    test_name = "test" if data.test is not None and len(data.test) else "val"
    test = data.split(test_name)
    train = data.split("train")
    ex = example(family, model, spec, batch=2)
    want, fed = ex["inputs"][name], next(prepared_batches(family, train, spec, torch.arange(min(2, len(train))), 2))[0]
    dynamic = ex["dynamic"].get(name, {})
    if want.ndim != fed.ndim or any(a != b for i, (a, b) in enumerate(zip(want.shape, fed.shape)) if i not in dynamic):
        raise UserError(  # a GAN's generator takes noise, not the training images
            f"--int8 calibrates on the training data, whose net input is {list(fed.shape)[1:]} per example, while "
            f"task '{family.name}' exports {name} {list(want.shape)[1:]}: export without --int8"
        )
    flt = export_run(run, family, model, spec, "onnx", out, atol, rtol)
    if len(flt["files"]) > 2:
        raise UserError("--int8 needs the float model in one .onnx file (its weights are over the 2 GB of one file)")
    fpath = Path(flt["file"])
    qpath = fpath.with_suffix(".int8.onnx")
    files = {"float": fpath, "int8": qpath}
    keep = float_stem(fpath, name) if stem is not False else []
    variants = {"all int8": []} if stem is not True or not keep else {}
    if keep:
        variants["float stem"] = keep
    tmps = {v: qpath.with_name(f"{qpath.name}.{i}.tmp") for i, v in enumerate(variants)}
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: max(1, calibration)]
    order = torch.arange(len(test))
    x32 = next(prepared_batches(family, test, spec, order.repeat(32 // len(order) + 1)[:32], 32))[0].numpy()
    reduce, why = int8_range()
    warnings.warn(f"int8: {why}", stacklevel=2)
    result: dict = {"metric": "", "split": test_name, "examples": len(test), "calibration": len(pick)}
    try:
        for v, nodes in variants.items():
            turned, pre = tmps[v].with_suffix(".relu.tmp"), tmps[v].with_suffix(".pre.tmp")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    relu_before_pool(fpath, turned, frozenset(nodes))  # the pools run on uint8 values
                    flatten_channels_last(turned)  # no transpose back to NCHW before the dense layers
                    quant_pre_process(str(turned), str(pre), skip_symbolic_shape=True)  # fusions ORT advises
                    quantize_static(
                        str(pre),
                        str(tmps[v]),
                        Calibration(name, prepared_batches(family, train, spec, pick, batch)),
                        quant_format=QuantFormat.QDQ,
                        per_channel=True,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        reduce_range=reduce,
                        nodes_to_exclude=nodes,
                    )
                    float_outputs(tmps[v])  # a dense head's scores come out of its int8 kernel in float
            finally:
                turned.unlink(missing_ok=True)
                pre.unlink(missing_ok=True)
        chosen = next(iter(variants))
        if len(variants) > 1:
            result["variants_ms"] = faster_of({v: tmps[v] for v in variants}, name, x32, timing_s)
            chosen = min(variants, key=lambda v: result["variants_ms"][v][1] * result["variants_ms"][v][32])
        os.replace(tmps[chosen], qpath)
        result["float_nodes"] = variants[chosen]
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"int8 quantization of {fpath} failed: {first_line(e)}") from e
    finally:
        for t in tmps.values():
            t.unlink(missing_ok=True)

    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in files.items()}
    scores: dict[str, Score] = {}
    for x, y in prepared_batches(family, test, spec, order, batch):
        got = {k: torch.from_numpy(s.run(None, {name: x.numpy()})[0]) for k, s in sessions.items()}
        for k, out in got.items():
            scores.setdefault(k, Score(out, y, spec.num_classes, family.IGNORE_INDEX)).update(out, y, got["float"])
    result["metric"], result["kernels"] = scores["float"].metric, why
    del sessions  # timed one at a time (timed_session)
    for k, p in files.items():
        result[k] = {
            "file": str(p),
            "bytes": p.stat().st_size,
            "score": scores[k].compute(),
            "latency_ms": timed_session(p, name, x32, timing_s),
        }
    qpath.with_suffix(".json").write_text(json.dumps(result, indent=1))  # model.int8.onnx -> model.int8.json
    return result


class Score:
    """A figure of a model's outputs over a split, batch by batch: "acc" (accuracy) for (B, C) logits of (B,)
    labels, "miou" (torchmetrics' macro Jaccard index: classes never seen do not count) for (B, C, H, W) logits of
    (B, H, W) masks, else "agreement" with the float model's outputs (1 - relative L2 error: 1.0 when equal)."""

    def __init__(self, out: torch.Tensor, labels: Any, num_classes: int, ignore_index: int | None):
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        self.metric, kw = "agreement", {"num_classes": num_classes, "ignore_index": ignore_index}
        if isinstance(labels, torch.Tensor) and not labels.is_floating_point() and num_classes:
            if out.ndim == 2 and labels.shape == out.shape[:1]:
                self.metric, self.m = "acc", MulticlassAccuracy(average="micro", **kw)
            elif out.ndim == 4 and labels.shape == (out.shape[0], *out.shape[2:]):
                self.metric, self.m = "miou", MulticlassJaccardIndex(average="macro", **kw)
        self.err, self.ref = 0.0, 0.0

    def update(self, out: torch.Tensor, labels: Any, ref: torch.Tensor) -> None:
        if self.metric == "agreement":
            self.err += float((out.double() - ref.double()).square().sum())
            self.ref += float(ref.double().square().sum())
        else:
            self.m.update(out.argmax(1), labels.long().cpu())

    def compute(self) -> float:
        if self.metric == "agreement":
            return 1 - (self.err / max(self.ref, 1e-30)) ** 0.5
        return float(self.m.compute())
