"""Text classification (families/textclass): the reader of CSV, JSONL and class folders with its bad inputs, the
two models (padding never changes a text's logits; loss at init is ln C), and a tiny run of Multi30k language
identification through the CLI: it learns, predict and /classify-text give the same probabilities, the ONNX
export passes its parity check, and `deeprecipe check` fails the baseline of a model that ignores its text."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, sets
from deeprecipe.cli import main, open_run
from deeprecipe.core import DataError
from deeprecipe.data import DATASETS, data_config_class
from deeprecipe.data.core import DataSpec
from deeprecipe.data.text import tokenizer_from_spec
from deeprecipe.families import get_family
from deeprecipe.models import MODELS

WORDS = {"pos": ["good", "great", "fine", "nice"], "neg": ["bad", "awful", "poor", "sad"]}


def texts(n: int = 20) -> list[tuple[str, str]]:
    """n distinct texts per class, interleaved: (text, label); every character is in many of them (a char
    vocabulary learns only the train split's characters)."""
    return [
        (f"{WORDS[lab][i % 4]} day, {'very ' * (i // 4)}{WORDS[lab][(i + 1) % 4]}", lab)
        for i in range(n)
        for lab in WORDS
    ]


def write(tmp: Path, fmt: str, items=None) -> Path:
    items = texts() if items is None else items
    if fmt == "csv":
        p = tmp / "data.csv"
        p.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in items))
    elif fmt == "jsonl":
        p = tmp / "data.jsonl"
        p.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in items))
    else:
        p = tmp / "folder"
        for i, (t, lab) in enumerate(items):
            (p / lab).mkdir(parents=True, exist_ok=True)
            (p / lab / f"{i:03d}.txt").write_text(t + "\n")
    return p


# ---------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "folder"])
def test_csv_jsonl_and_folder_read_alike_and_split_by_seed(tmp_path, fmt):
    cfg = DATASETS["textclass"](path=str(write(tmp_path, fmt)), val_fraction=0.2, test_fraction=0.2)
    assert data_config_class("textclass") is type(cfg)
    data = cfg.build()
    spec = data.spec
    assert spec.class_names == ["neg", "pos"] and spec.num_classes == 2
    assert spec.extra["pad"] == 0 and spec.extra["max_len"] == 256 and spec.vocab_size > 20
    json.dumps(spec.extra)  # spec.json
    tok = tokenizer_from_spec(spec)  # what predict and serve rebuild
    rows = {}
    for name, n in (("train", 24), ("val", 8), ("test", 8)):
        ids, y = getattr(data, name).tensors
        assert ids.dtype == torch.long and ids.ndim == 2 and len(ids) == len(y) == n
        for row, lab in zip(ids.tolist(), y.tolist()):
            length = sum(t != 0 for t in row)
            assert all(t == 0 for t in row[length:])  # PAD only after the text
            rows[tok.decode(row[:length])] = (name, spec.class_names[lab])
    assert sorted((t, lab) for t, (_, lab) in rows.items()) == sorted(texts())  # every text once, rightly labelled
    again = type(cfg)(**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__}).build()
    assert torch.equal(again.test.tensors[0], data.test.tensors[0])  # the split is fixed by split_seed


def test_bpe_tokens_are_cut_at_max_len_and_numeric_labels_sort_as_numbers(tmp_path):
    items = [(t, {"pos": "10", "neg": "9"}[lab]) for t, lab in texts()]
    cfg = DATASETS["textclass"](path=str(write(tmp_path, "csv", items)), tokenizer="bpe", vocab_size=300, max_len=5)
    data = cfg.build()
    assert data.spec.class_names == ["9", "10"]
    assert data.train.tensors[0].shape[1] == 5
    assert tokenizer_from_spec(data.spec).decode([0]) == "<pad>"


def test_per_class_keeps_n_training_texts_of_each_class(tmp_path):
    data = DATASETS["textclass"](path=str(write(tmp_path, "jsonl")), per_class=3).build()
    assert torch.bincount(data.train.tensors[1]).tolist() == [3, 3]


def test_tokenizer_from_a_run_is_reused_as_is(tmp_path):
    first = DATASETS["textclass"](path=str(write(tmp_path, "csv"))).build()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "spec.json").write_text(json.dumps({"extra": first.spec.extra}))
    other = [("zebra quiz", "pos"), ("jolly vex", "neg")] * 5  # characters the first vocabulary lacks
    again = DATASETS["textclass"](path=str(write(tmp_path, "jsonl", other)), tokenizer_from=str(tmp_path / "run"))
    spec = again.build().spec
    assert spec.extra["tokenizer"] == first.spec.extra["tokenizer"] and spec.vocab_size == first.spec.vocab_size


def bad_csv(tmp, text):
    (tmp / "bad.csv").write_text(text)
    return tmp / "bad.csv"


def bad_jsonl(tmp, text):
    (tmp / "bad.jsonl").write_text(text)
    return tmp / "bad.jsonl"


def empty_class(tmp):
    p = write(tmp, "folder")
    (p / "zzz").mkdir()
    return p


def empty_file(tmp):
    p = write(tmp, "folder")
    (p / "pos" / "empty.txt").write_text("")
    return p


BAD = {
    "missing file": (lambda tmp: tmp / "nope.csv", "nope.csv"),
    "unknown columns": (lambda tmp: bad_csv(tmp, "sentence,label\nhi,pos\n"), "bad.csv: columns ['sentence', 'label']"),
    "no texts": (lambda tmp: bad_csv(tmp, "text,label\n"), "bad.csv: no texts"),
    "empty text in a CSV": (lambda tmp: bad_csv(tmp, "text,label\nhi,pos\n  ,neg\n"), "bad.csv:3: empty text"),
    "empty label": (lambda tmp: bad_csv(tmp, "text,label\nhi,pos\nho,\n"), "bad.csv:3: empty label"),
    "a field missing": (lambda tmp: bad_csv(tmp, "text,label\nhi,pos\nho\n"), "bad.csv:3: 1 fields, expected 2"),
    "a comma unquoted": (
        lambda tmp: bad_csv(tmp, "text,label\nhi,pos\nho, ho,neg\n"),
        "bad.csv:3: 3 fields, expected 2",
    ),
    "one class": (
        lambda tmp: bad_csv(tmp, "text,label\nhi,pos\nho,pos\nha,pos\n"),
        "bad.csv: every text has the label 'pos'",
    ),
    "not JSON": (lambda tmp: bad_jsonl(tmp, '{"text": "a", "label": "x"}\n{oops\n'), "bad.jsonl:2: not a JSON"),
    "JSON without label": (lambda tmp: bad_jsonl(tmp, '{"text": "a", "lab": "x"}\n'), "bad.jsonl:1: a line needs"),
    "class folder without texts": (empty_class, "class 'zzz' has no .txt files"),
    "empty text file": (empty_file, "empty.txt: the file is empty"),
    "class with no training text": (
        lambda tmp: write(tmp, "csv", [*texts(), ("lonely", "rare")]),
        "class 'rare' has no training text",
    ),
    "not a table": (lambda tmp: bad_csv(tmp, "x").rename(tmp / "notes.txt"), "notes.txt: give a .csv"),
}


def test_a_text_longer_than_csvs_default_field_limit_is_read(tmp_path):
    long = "good day " * 20_000  # 180,000 characters: over csv's default limit of 131,072
    p = write(tmp_path, "csv", [*texts(), (long, "pos")])
    data = DATASETS["textclass"](path=str(p), max_len=16, val_fraction=0, test_fraction=0).build()
    assert len(data.train) == len(texts()) + 1 and data.train.tensors[0].shape[1] == 16


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_data_error_naming_the_file(tmp_path, case):
    make, message = BAD[case]
    cfg = DATASETS["textclass"](path=str(make(tmp_path)), val_fraction=0.3, test_fraction=0.3)
    with pytest.raises(DataError) as e:
        cfg.build()
    assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- models

SPEC = DataSpec(num_classes=3, class_names=["a", "b", "c"], vocab_size=23, extra={"pad": 0, "max_len": 12})
TINY_MODELS = {
    "text-transformer": dict(n_layer=2, n_head=2, d_model=16),
    "text-lstm": dict(n_layer=2, hidden=8, emb=8),
}


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_model_logits_ignore_padding_and_start_at_ln_c(name):
    torch.manual_seed(0)
    model = MODELS[name](**TINY_MODELS[name]).build(SPEC)
    ids = torch.randint(1, 23, (4, 12))
    ids[1, 5:] = 0
    ids[3] = 0  # all PAD (an empty text, the checks' blanked input): still finite
    loss = F.cross_entropy(model(ids), torch.tensor([0, 1, 2, 0]))
    assert abs(loss.item() - math.log(3)) < 1e-6  # the head starts at zero
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight)
        model.eval()
        out = model(ids)
        assert torch.isfinite(out).all() and out.shape == (4, 3)
        torch.testing.assert_close(model(ids[1:2, :5]), out[1:2], atol=1e-5, rtol=1e-5)  # alone == padded
        assert MODELS[name]().build(SPEC)(ids).shape == (4, 3)  # the documented defaults build too


# ---------------------------------------------------------------------------------------------- a tiny run

RUN_SETS = [
    *TINY,
    "train.steps=60",
    "train.batch_size=32",
    "train.limit_eval=400",
    "data.per_class=500",
    "data.max_len=48",
    "model.d_model=32",
    "model.n_layer=1",
    "model.n_head=2",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny multi30k language-id run of the transformer recipe (skipped without $DEEPRECIPE_DATA)."""
    root = os.environ.get("DEEPRECIPE_DATA")
    if not root or not (Path(root) / "multi30k").is_dir():
        pytest.skip("DEEPRECIPE_DATA is not set to the shared data folder (e.g. export DEEPRECIPE_DATA=../shared/data)")
    out = tmp_path_factory.mktemp("textclass") / "run"
    assert main(["train", "multi30k-langid-transformer", "--out", str(out), *sets(*RUN_SETS)]) == 0
    yield out
    torch.set_grad_enabled(True)  # in case loading a run turns autograd off for the process


def test_tiny_langid_run_learns_far_above_chance(run):
    final = json.loads((run / "status.json").read_text())["final"]
    assert final["test_acc"] > 0.8 and final["test_macro_f1"] > 0.8, final  # chance: 0.25
    assert (run / "plots" / "confusion.png").is_file()


def test_predict_and_served_classify_text_give_the_same_probabilities(run, cli, tmp_path):
    from fastapi.testclient import TestClient

    from deeprecipe.serve.server import ServeOptions, build_app

    text = "Ein Mann fährt mit seinem Fahrrad über eine Brücke."
    (tmp_path / "de.txt").write_text(text + "\n")
    code, out, _ = cli("predict", run, tmp_path / "de.txt", "--json", "--top", "4")
    assert code == 0
    [want] = json.loads(out)
    assert want["label"] == "de" and len(want["top"]) == 4 and want["text"].startswith(str(tmp_path / "de.txt"))
    with TestClient(build_app(str(run), *open_run(str(run), "cpu", "fp32"), ServeOptions())) as c:
        r = c.post("/classify-text", json={"text": text, "top": 4})
        assert r.status_code == 200
        got = r.json()
        assert got["label"] == want["label"] and [t["label"] for t in got["top"]] == [t["label"] for t in want["top"]]
        assert [t["prob"] for t in got["top"]] == pytest.approx([t["prob"] for t in want["top"]], abs=2e-4)
        assert c.post("/classify-text", json={"text": "☃☃☃"}).status_code == 400  # no known character
        assert c.post("/classify-text", json={"text": ""}).status_code == 422
        [w] = c.get("/info").json()["endpoints"]
        assert w == {"path": "/classify-text", "kind": "text", "title": "Classify a text", "button": "Classify"}
        assert "res.translation ??" in c.get("/").text  # the page's text widget shows a label too


def test_onnx_export_passes_its_parity_check(run, cli, tmp_path):
    code, out, err = cli("export", run, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert code == 0, err
    assert "parity with PyTorch" in out and "'1': 'time'" in out


BLIND = '''
import torch
import torch.nn as nn


class Blind(nn.Module):
    """Predicts from nothing: its forward ignores the ids."""

    def __init__(self, num_classes):
        super().__init__()
        self.head = nn.Linear(1, num_classes)

    def forward(self, ids):
        return self.head(torch.ones(len(ids), 1, device=ids.device))
'''


def test_check_baseline_fails_a_model_that_ignores_its_text(shared_data, cli, capsys, tmp_path):
    (tmp_path / "blind.py").write_text(BLIND)
    small = sets("train.device=cpu", "data.per_class=300", "data.max_len=48")
    work = ["--only", "init_loss,baseline", "--steps", "30", "--batch", "16"]
    tiny = sets("model.d_model=32", "model.n_layer=1")
    code, out, _ = cli("check", "multi30k-langid-transformer", *small, *tiny, *work, "--out", tmp_path / "ok")
    assert code == 0, out
    assert "init_loss   PASS" in out and "baseline    PASS" in out
    blind = sets("model.name=blind.py:Blind")
    with pytest.raises(SystemExit) as e:  # the check verb exits 3 when a check fails
        cli("check", "multi30k-langid-transformer", *small, *blind, *work, "--out", tmp_path / "bad")
    assert e.value.code == 3
    assert "baseline    FAIL" in capsys.readouterr().out


def test_family_is_registered_with_its_recipes():
    family = get_family("textclass")
    assert family.METRIC == ("acc", "max")
    from deeprecipe.recipe import load

    for recipe in ("multi30k-langid-transformer", "multi30k-langid-lstm"):
        cfg = load(recipe, [])
        assert cfg.task == "textclass" and cfg.data.name == "textclass" and cfg.data.source == "multi30k"
