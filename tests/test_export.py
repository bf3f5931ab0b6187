"""Export: ONNX and torch.export (.pt2) files compute what PyTorch computes, with a dynamic batch axis."""

import json
import os

import pytest
import torch
import torch.nn as nn

from deeprecipe.cli import main, open_run
from deeprecipe.core import UserError
from deeprecipe.data.core import Data, DataSpec, TensorSplit
from deeprecipe.families import get_family
from deeprecipe.families.classify import Classify
from deeprecipe.family import Family
from deeprecipe.models import MODELS
from deeprecipe.serve import export


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    args = [
        "train",
        "digits-cnn",
        "--out",
        str(out),
        "--set",
        "train.steps=3",
        "--set",
        "train.device=cpu",
        "--set",
        "model.channels=[8,16]",
        "--set",
        "train.eval_every=0",
    ]
    assert main(args) == 0
    return out


def export_run(run_dir, fmt: str, out: str) -> dict:
    """export.export_run on the run loaded as `deeprecipe export` loads it (CPU, fp32)."""
    cfg, spec, model, rt, family = open_run(str(run_dir), "cpu", "fp32")
    return export.export_run(str(run_dir), family, model, spec, fmt, out)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_run_matches_pytorch_on_another_batch_size(run_dir, fmt, tmp_path):
    out = tmp_path / f"m.{fmt}"
    s = export_run(run_dir, fmt, str(out))
    assert out.is_file() and s["max_abs_diff"] <= 1e-4
    assert json.loads(out.with_suffix(".json").read_text())["class_names"] == [str(i) for i in range(10)]
    # the oracle, independently of export_run: run the file on a batch of 5 against the PyTorch model
    cfg, spec, model, rt, family = open_run(str(run_dir), "cpu", "fp32")
    x = Classify().export_example(model, spec, 5)["inputs"]["image"]
    got = (export.run_onnx if fmt == "onnx" else export.run_pt2)(out, {"image": x})[0]
    torch.testing.assert_close(got, model(x), atol=1e-4, rtol=1e-3)


def test_onnx_export_of_a_small_model_is_one_file_that_works_alone(run_dir, tmp_path, cli):
    out = tmp_path / "a" / "m.onnx"
    code, printed, _ = cli("export", str(run_dir), "--out", str(out))
    assert code == 0 and sorted(p.name for p in out.parent.iterdir()) == ["m.json", "m.onnx"]  # no m.onnx.data
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["files"] == [str(out), str(out.with_suffix(".json"))]
    assert all(f in printed for f in summary["files"])
    alone = tmp_path / "b" / "m.onnx"  # copied without anything beside it, it still runs
    alone.parent.mkdir()
    alone.write_bytes(out.read_bytes())
    cfg, spec, model, rt, family = open_run(str(run_dir), "cpu", "fp32")
    x = Classify().export_example(model, spec, 4)["inputs"]["image"]
    torch.testing.assert_close(export.run_onnx(alone, {"image": x})[0], model(x), atol=1e-4, rtol=1e-3)


def test_onnx_weights_past_the_protobuf_limit_go_beside_it_and_every_file_is_named(run_dir, tmp_path, monkeypatch, cli):
    monkeypatch.setattr(export, "ONNX_INLINE_BYTES", 0)  # as if the weights were over 2 GB
    out = tmp_path / "m.onnx"
    code, printed, _ = cli("export", str(run_dir), "--out", str(out))
    files = json.loads(out.with_suffix(".json").read_text())["files"]
    assert code == 0 and files == [str(out), str(out) + ".data", str(out.with_suffix(".json"))]
    assert all(f in printed for f in files) and all(os.path.isfile(f) for f in files)
    monkeypatch.setattr(export, "ONNX_INLINE_BYTES", 10**12)  # exported again, small: the old .data goes
    assert cli("export", str(run_dir), "--out", str(out))[0] == 0 and not os.path.exists(str(out) + ".data")


def test_export_fails_when_the_file_differs(run_dir, tmp_path, monkeypatch):
    real = export.run_pt2
    monkeypatch.setattr(export, "run_pt2", lambda p, inputs: [t + 1e-2 for t in real(p, inputs)])
    with pytest.raises(UserError, match="differs from PyTorch"):
        export_run(run_dir, "pt2", str(tmp_path / "m.pt2"))


def test_cli_export_exit_codes(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--format", "pt2", "--out", str(tmp_path / "m.pt2")]) == 0
    assert "parity with PyTorch" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "not-a-run"), "--format", "pt2"]) == 2


class FixedBatch(nn.Module):
    """A net whose code bakes the batch size in (a reshape to the example's batch of 2)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x.reshape(2, 4))


def test_pt2_of_a_net_that_fixes_the_batch_keeps_the_example_shapes_and_says_so(tmp_path):
    x = torch.randn(2, 2, 2)
    ex = {"inputs": {"x": x}, "dynamic": {"x": {0: "batch"}}}
    module = export.TensorsOnly(FixedBatch()).eval()
    with pytest.warns(UserWarning, match="example's shapes only"):
        export.export_pt2(module, ex, tmp_path / "m.pt2")
    assert ex["dynamic"] == {}
    torch.testing.assert_close(export.run_pt2(tmp_path / "m.pt2", {"x": x})[0], module(x))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_exports_with_a_dynamic_batch(name, tmp_path):
    """Each model's tiny case (tests/test_models.py) exports (torch.export) at batch 2 and agrees with PyTorch at
    batch 4.
    GANs export their generator through the family hook (test below)."""
    from test_models import TINY

    torch.manual_seed(0)
    case = TINY[name]()
    if case.run is not None:
        assert name in FAMILY_EXPORTS, f"{name} is called through a custom step: give it a family export test"
        return
    cfg, spec, inputs = case.cfg, case.spec, case.inputs
    model = cfg.build(spec).eval()
    names = [f"input{i}" for i in range(len(inputs))]
    ex = {"inputs": {n: t[:2] for n, t in zip(names, inputs)}, "dynamic": {n: {0: "batch"} for n in names}}
    export.export_pt2(export.TensorsOnly(model).eval(), ex, tmp_path / "m.pt2")
    assert ex["dynamic"] == {n: {0: "batch"} for n in names}  # torch.export kept the batch axis dynamic
    with torch.no_grad():
        want = export.TensorsOnly(model)(*inputs)
    got = export.run_pt2(tmp_path / "m.pt2", dict(zip(names, inputs)))
    torch.testing.assert_close(got[0], want[0] if isinstance(want, tuple) else want, atol=1e-4, rtol=1e-3)


FAMILY_EXPORTS = {
    "gan": "gan",
    "dcgan": "gan",
    "c3d": "video",
    "seq2seq": "translate",
    "tv-detector": "detect",
    "pix2pix": "img2img",
    "cyclegan": "img2img",
}


@pytest.mark.parametrize("model_name", sorted(FAMILY_EXPORTS))
def test_family_export_examples_export_to_onnx_with_parity(model_name, tmp_path):
    """The family hooks that say what a family exports: the GAN generator, a video net, a seq2seq decoder pass."""
    from test_models import TINY

    family_name = FAMILY_EXPORTS[model_name]
    torch.manual_seed(0)
    case = TINY[model_name]()
    cfg, spec = case.cfg, case.spec
    model = cfg.build(spec).eval()
    family = get_family(family_name)
    ex = export.example(family, model, spec, 2)
    export.export_onnx(export.TensorsOnly(ex["module"]).eval(), ex, tmp_path / "m.onnx")
    fresh = export.example(family, model, spec, 3)["inputs"]
    with torch.no_grad():
        want = export.TensorsOnly(ex["module"])(*fresh.values())
    got = export.run_onnx(tmp_path / "m.onnx", fresh)[0]
    torch.testing.assert_close(torch.as_tensor(got), want, atol=1e-4, rtol=1e-3)


class TinyLM(nn.Module):
    """The language-model contract: forward(idx) -> (logits, loss)."""

    def __init__(self, vocab=11):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def forward(self, idx, targets=None):
        return self.out(torch.cumsum(self.emb(idx), 1)), None  # (B, T, vocab)


def test_default_example_exports_a_language_model_forward_with_dynamic_batch_and_time(tmp_path):
    spec = DataSpec(vocab_size=11)
    model = TinyLM().eval()
    ex = export.example(Family(), model, spec, 2)  # a family without its own export_example
    assert ex["dynamic"] == {"tokens": {0: "batch", 1: "time"}}
    module = export.TensorsOnly(model).eval()
    export.export_onnx(module, ex, tmp_path / "lm.onnx")
    ids = torch.randint(0, 11, (3, 5))  # another batch size and length
    got = export.run_onnx(tmp_path / "lm.onnx", {"tokens": ids})[0]
    torch.testing.assert_close(got, model(ids)[0], atol=1e-4, rtol=1e-3)


def test_int8_timings_run_with_one_onnxruntime_session_open(run_dir, tmp_path, monkeypatch):
    """Each latency is taken with no other session alive (their pool threads would compete for the cores), both
    for the stem variants' race and for the two files' figures."""
    import weakref

    import onnxruntime as ort

    live: weakref.WeakSet = weakref.WeakSet()

    class Tracked(ort.InferenceSession):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            live.add(self)

    seen = []
    timed = export.latency_ms

    def counting(session, *a, **kw):
        seen.append(len(live))
        return timed(session, *a, **kw)

    monkeypatch.setattr(ort, "InferenceSession", Tracked)
    monkeypatch.setattr(export, "latency_ms", counting)
    cfg, spec, model, rt, family = open_run(str(run_dir), "cpu", "fp32")
    r = export.quantize_run(
        str(run_dir), family, model, spec, cfg.data.build(), str(tmp_path / "m.onnx"), 16, timing_s=0
    )
    assert len(seen) == 2 * 2 + (3 * 2 * 2 if "variants_ms" in r else 0)  # (rounds x) files x batch sizes
    assert set(seen) == {1}, seen


def test_int8_file_is_smaller_and_scores_close_to_float_on_the_test_split(run_dir, tmp_path):
    cfg, spec, model, rt, family = open_run(str(run_dir), "cpu", "fp32")
    data = cfg.data.build()
    r = export.quantize_run(str(run_dir), family, model, spec, data, str(tmp_path / "m.onnx"), 64, timing_s=0)
    f, q = r["float"], r["int8"]
    assert q["file"] == str(tmp_path / "m.int8.onnx") and os.path.isfile(q["file"])
    assert q["bytes"] < f["bytes"] and r["metric"] == "acc" and r["split"] == "test" and r["calibration"] == 64
    assert r["kernels"] == export.int8_range()[1]
    # the oracle for the float figure: the PyTorch model's accuracy on the same split
    with torch.no_grad():
        want = family.evaluate(model.eval(), data, "test", cfg, rt, True)["acc"]
    assert f["score"] == pytest.approx(want, abs=1e-6)
    assert abs(q["score"] - f["score"]) <= 0.1, r
    assert {1, 32} <= set(q["latency_ms"]) and all(v > 0 for v in q["latency_ms"].values())
    assert json.loads((tmp_path / "m.int8.json").read_text())["int8"]["bytes"] == q["bytes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.json", "m.int8.onnx", "m.json", "m.onnx"]


def test_int8_pools_run_on_the_quantized_values(run_dir, tmp_path):
    """models/cnn.py pools before its ReLU; the exporter turns each MaxPool -> Relu into Relu -> MaxPool for
    quantization. Oracles: the turned float graph gives the original's outputs (onnxruntime), and in the int8
    file every MaxPool reads and writes one scale and zero point, the condition for onnxruntime to pool the uint8
    values instead of dequantizing, pooling in float and quantizing again (which made int8 ~ as slow as float)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    cfg, spec, model, rt, family = open_run(str(run_dir), "cpu", "fp32")
    r = export.quantize_run(
        str(run_dir), family, model, spec, cfg.data.build(), str(tmp_path / "m.onnx"), 16, timing_s=0, stem=False
    )
    assert r["float_nodes"] == [] and "variants_ms" not in r
    flt = onnx.load(r["float"]["file"])
    assert [n.op_type for n in flt.graph.node][:3] == ["Conv", "MaxPool", "Relu"]  # what the model exports
    assert export.relu_before_pool(tmp_path / "m.onnx", tmp_path / "t.onnx") == 1  # channels [8, 16]: one pool
    assert [n.op_type for n in onnx.load(tmp_path / "t.onnx").graph.node][:3] == ["Conv", "Relu", "MaxPool"]
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32) * 3
    a, b = (ort.InferenceSession(str(f)).run(None, {"image": x})[0] for f in (tmp_path / "m.onnx", tmp_path / "t.onnx"))
    np.testing.assert_array_equal(a, b)
    q = onnx.load(r["int8"]["file"]).graph
    init = {t.name: numpy_helper.to_array(t) for t in q.initializer}
    made = {o: n for n in q.node for o in n.output}
    pools = [n for n in q.node if n.op_type == "MaxPool"]
    assert pools
    flat = next(n for n in q.node if n.op_type in ("Reshape", "Flatten"))  # read channels last (flatten test below)
    assert made[flat.input[0]].op_type in ("Transpose", "DequantizeLinear")
    assert any(n.op_type == "Transpose" and list(n.attribute[0].ints) == [0, 2, 3, 1] for n in q.node)
    for pool in pools:
        dq = made[pool.input[0]]
        qn = next(n for n in q.node if n.op_type == "QuantizeLinear" and n.input[0] == pool.output[0])
        assert dq.op_type == "DequantizeLinear"
        assert init[dq.input[1]] == init[qn.input[1]] and init[dq.input[2]] == init[qn.input[2]]


def test_int8_dense_scores_come_out_in_float(run_dir, tmp_path, monkeypatch):
    """float_outputs drops the QuantizeLinear -> DequantizeLinear pair after the dense head. Oracles: the pair's
    own arithmetic (the file before the rewrite gives (clip(round(s / scale) + zp, 0, 255) - zp) * scale of the
    rewritten file's scores s, up to one level where the two roundings meet), and onnxruntime's optimized graph
    ends in the head's int8 kernel, with no DequantizeLinear after it."""
    import shutil

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    cfg, spec, model, rt, family = open_run(str(run_dir), "cpu", "fp32")
    monkeypatch.setattr(export, "float_outputs", lambda path: 0)  # the file as the quantizer writes it
    r = export.quantize_run(
        str(run_dir), family, model, spec, cfg.data.build(), str(tmp_path / "m.onnx"), 16, timing_s=0, stem=False
    )
    monkeypatch.undo()
    before, after = tmp_path / "m.int8.onnx", tmp_path / "f.onnx"
    shutil.copy(before, after)
    assert export.float_outputs(after) == 1 and export.float_outputs(after) == 0  # once: then nothing to drop
    g = onnx.load(before).graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    made = {o: n for n in g.node for o in n.output}
    q = made[made[g.output[0].name].input[0]]
    assert q.op_type == "QuantizeLinear" and made[q.input[0]].op_type == "Gemm"
    scale, zp = float(init[q.input[1]]), int(init[q.input[2]])
    ga = onnx.load(after).graph
    assert ga.node[-1].op_type == "Gemm"
    assert {t.name for t in ga.initializer} <= {i for n in ga.node for i in n.input}  # no scale left unread
    assert {t.name for t in ga.initializer} == set(init) - {q.input[1], q.input[2]}
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    old, new = (ort.InferenceSession(str(f)).run(None, {"image": x})[0] for f in (before, after))
    want = (np.clip(np.round(new / scale) + zp, 0, 255) - zp) * scale
    assert np.abs(old - want).max() <= scale * 1.001 and np.mean(np.isclose(old, want, atol=1e-5)) > 0.95
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(after), opts)
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops[-1] == "QGemm" and ops.count("DequantizeLinear") == 0, ops
    assert r["int8"]["file"] == str(before)


def test_flatten_reads_the_map_channels_last_with_the_same_outputs(tmp_path):
    """flatten_channels_last: a Transpose to (B, H, W, C) before each flatten into a dense layer, that layer's
    weight columns permuted. Oracles: onnxruntime gives the original graph's outputs for Gemm (transB 1 and 0) and
    MatMul layers and for Flatten and Reshape; a flatten whose dense weight is shared, or of a 1 x 1 map, stays."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def graph(op: str, dense: str, C=3, H=4, W=5, share=False):
        w = rng.standard_normal((6, C * H * W) if dense == "gemm-t" else (C * H * W, 6)).astype(np.float32)
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0, -1], np.int64), "shape")]
        flat = (
            helper.make_node("Flatten", ["x"], ["f"], axis=1)
            if op == "Flatten"
            else helper.make_node("Reshape", ["x", "shape"], ["f"])
        )
        layer = {
            "gemm-t": helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
            "gemm": helper.make_node("Gemm", ["f", "w"], ["y"]),
            "matmul": helper.make_node("MatMul", ["f", "w"], ["y"]),
        }[dense]
        nodes = [flat, layer] + ([helper.make_node("ReduceSum", ["w"], ["z"], keepdims=0)] if share else [])
        outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])]
        outs += [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)] if share else []
        g = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C, H, W])], outs, inits
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    for op in ("Flatten", "Reshape"):
        for dense in ("gemm-t", "gemm", "matmul"):
            path = tmp_path / f"{op}-{dense}.onnx"
            onnx.save(graph(op, dense), str(path))
            x = rng.standard_normal((7, 3, 4, 5)).astype(np.float32)
            want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
            assert export.flatten_channels_last(path) == 1, (op, dense)
            g = onnx.load(str(path)).graph
            assert [n.op_type for n in g.node][:2] == ["Transpose", op]
            got = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    onnx.save(graph("Reshape", "gemm-t", share=True), str(tmp_path / "shared.onnx"))
    assert export.flatten_channels_last(tmp_path / "shared.onnx") == 0
    onnx.save(graph("Reshape", "gemm-t", C=8, H=1, W=1), str(tmp_path / "pooled.onnx"))
    assert export.flatten_channels_last(tmp_path / "pooled.onnx") == 0


def test_a_thin_first_conv_stays_float_when_that_file_is_faster(run_dir, tmp_path, monkeypatch):
    """The CNN reads 1 channel: its first Conv, pool and ReLU are the float stem. Oracles: with the stem kept, those
    nodes read and write float (no QuantizeLinear / DequantizeLinear touches them) while every other Conv is
    quantized, and the file agrees with the float one about as well as the all-int8 file; with `stem` None both
    files are timed and the one with the smaller batch-1 x batch-32 latency is kept (a fake clock decides)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    cfg, spec, model, rt, family = open_run(str(run_dir), "cpu", "fp32")
    data = cfg.data.build()
    r = export.quantize_run(
        str(run_dir), family, model, spec, data, str(tmp_path / "m.onnx"), 16, timing_s=0, stem=True
    )
    assert export.float_stem(tmp_path / "m.onnx", "image") == r["float_nodes"]
    flt = onnx.load(tmp_path / "m.onnx").graph
    assert [n.op_type for n in flt.node if n.name in r["float_nodes"]] == ["Conv", "MaxPool", "Relu"]
    q = onnx.load(r["int8"]["file"]).graph
    kept = [n for n in q.node if n.name in r["float_nodes"]]
    assert [n.op_type for n in kept] == ["Conv", "MaxPool", "Relu"]
    made = {o: n.op_type for n in q.node for o in n.output}
    assert all(made.get(i) not in ("DequantizeLinear",) for n in kept for i in n.input)
    assert [n.input[0] for n in q.node if n.op_type == "Conv"][0] == "image"  # the float input, not a dequantized one
    assert sum(made.get(n.input[0]) == "DequantizeLinear" for n in q.node if n.op_type == "Conv") == 1  # the second
    x = np.random.default_rng(0).standard_normal((7, 1, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": x})[0]
    got = ort.InferenceSession(r["int8"]["file"]).run(None, {"image": x})[0]
    assert np.abs(got - want).max() <= 0.25 * np.abs(want).max()
    assert abs(r["int8"]["score"] - r["float"]["score"]) <= 0.1

    for faster in ("all int8", "float stem"):
        clock = {"all int8": 2.0, "float stem": 3.0} if faster == "all int8" else {"all int8": 3.0, "float stem": 2.0}
        monkeypatch.setattr(
            export, "faster_of", lambda files, *a, c=clock: {k: {1: 0.1 * c[k], 32: c[k]} for k in files}
        )
        r = export.quantize_run(str(run_dir), family, model, spec, data, str(tmp_path / "n.onnx"), 16, timing_s=0)
        assert set(r["variants_ms"]) == {"all int8", "float stem"}
        assert (r["float_nodes"] != []) == (faster == "float stem")
        convs = [n for n in onnx.load(r["int8"]["file"]).graph.node if n.op_type == "Conv"]
        assert (convs[0].input[0] == "image") == (faster == "float stem")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("n.")) == [
        "n.int8.json",
        "n.int8.onnx",
        "n.json",
        "n.onnx",
    ]


def test_only_a_first_conv_of_at_most_3_channels_is_a_stem(tmp_path):
    import onnx

    for channels, want in ((1, ["c", "p", "r"]), (3, ["c", "p", "r"]), (4, [])):
        net = nn.Sequential(nn.Conv2d(channels, 8, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU())
        path = tmp_path / f"s{channels}.onnx"
        export.export_onnx(
            export.TensorsOnly(net).eval(), {"inputs": {"x": torch.randn(1, channels, 12, 12)}, "dynamic": {}}, path
        )
        names = [n.name for n in onnx.load(path).graph.node]
        got = export.float_stem(path, "x")
        assert [names.index(n) for n in got] == ([0, 1, 2] if want else [])


@pytest.mark.parametrize(
    "flags,reduce",
    [
        ({"sse2", "avx2", "avx512f", "avx512_vnni"}, False),
        ({"sse2", "avx2", "avx_vnni"}, False),
        ({"sse2", "avx2", "avx512f", "avx512bw"}, True),
        ({"fp", "asimd", "asimddp"}, False),
    ],
)
def test_int8_weights_keep_8_bits_only_where_the_cpu_sums_them_without_saturating(monkeypatch, flags, reduce):
    import deeprecipe.engine.device as device

    monkeypatch.setattr(device, "cpu_info", lambda: ("Some CPU", flags))
    got, why = export.int8_range()
    assert got is reduce and "Some CPU" in why and ("7-bit" in why) is reduce


def test_int8_refuses_nets_it_does_not_apply_to_in_one_line(run_dir, cli):
    spec = DataSpec(vocab_size=11)
    with pytest.raises(UserError, match="one float input") as e:
        export.int8_inputs(Family(), TinyLM().eval(), spec)  # token ids in: nothing to calibrate activations on
    assert "\n" not in str(e.value) and "tokens (int64)" in str(e.value)
    code, out, err = cli("export", run_dir, "--format", "pt2", "--int8")
    assert code == 2 and "--int8" in err and "use --format onnx" in err and not out

    class Generator(Family):  # a GAN's export: noise in, though its training data are images
        def export_example(self, model, spec, batch):
            return {"inputs": {"noise": torch.randn(batch, 16)}}

    images = DataSpec(num_classes=2, in_channels=1, image_size=(8, 8))
    split = TensorSplit(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UserError, match=r"net input is \[1, 8, 8\] .* exports noise \[16\]"):
        export.quantize_run(str(run_dir), Generator(), nn.Linear(16, 64), images, Data(images, split, test=split))
