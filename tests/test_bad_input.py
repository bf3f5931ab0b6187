"""Bad input through the CLI: exit code 2, one line on stderr starting with 'error:', no traceback, and no run
folder left behind."""

from __future__ import annotations

import gzip
import json
import subprocess

import numpy as np
import pytest

from conftest import PYTHON, TINY, sets
from deeprecipe.recipe import load
from test_data import write_csv, write_idx, write_mnist, write_pngs


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"


def train_fails(cli, tmp_path, *overrides: str, recipe: str = "digits-mlp", needles=()) -> str:
    out = tmp_path / "run"
    code, _, err = cli("train", recipe, "--out", out, *sets(*TINY, *overrides))
    assert_one_line_error(code, err, *needles)
    assert not out.exists(), f"a failed run left {sorted(p.name for p in out.iterdir())}"
    return err


# ------------------------------------------------------------------------------------------ data


def test_corrupt_image_is_named(cli, tmp_path):
    write_pngs(tmp_path / "imgs", per_class=3)
    bad = tmp_path / "imgs" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    train_fails(
        cli,
        tmp_path,
        "data.name=imagefolder",
        f"data.path={tmp_path / 'imgs'}",
        "data.image_size=8",
        needles=("cannot read image", str(bad)),
    )


def test_corrupt_image_while_streaming_is_named(cli, tmp_path):
    """Streamed from disk by a DataLoader worker, the error arrives wrapped in the worker's traceback: the CLI
    still prints one line naming the file, and removes the run folder it had started."""
    write_pngs(tmp_path / "imgs", per_class=4, size=8)
    bad = tmp_path / "imgs" / "fox" / "zz.png"
    bad.write_bytes(b"garbage")
    train_fails(
        cli,
        tmp_path,
        "data.name=imagefolder",
        f"data.path={tmp_path / 'imgs'}",
        "data.image_size=8",
        "data.in_memory_mb=0",
        "data.val_fraction=0",
        "train.workers=1",
        "train.batch_size=12",
        needles=("cannot read image", str(bad)),
    )


def test_unreadable_image_file(cli, tmp_path):
    """A dangling link: listed like an image, but reading it fails (a mode-000 file would not fail as root)."""
    write_pngs(tmp_path / "imgs", per_class=2)
    bad = tmp_path / "imgs" / "cat" / "1.png"
    bad.unlink()
    bad.symlink_to(tmp_path / "gone.png")
    train_fails(
        cli,
        tmp_path,
        "data.name=imagefolder",
        f"data.path={tmp_path / 'imgs'}",
        "data.image_size=8",
        needles=("cannot read image", str(bad)),
    )


def test_label_out_of_range(cli, tmp_path):
    folder = write_mnist(tmp_path / "m", bad_label=12)
    train_fails(cli, tmp_path, "data.name=mnist", f"data.path={folder}", needles=("label 12", "0..9"))


def test_test_label_out_of_range(cli, tmp_path):
    folder = write_mnist(tmp_path / "m", bad_test_label=10)
    train_fails(cli, tmp_path, "data.name=mnist", f"data.path={folder}", needles=("test label 10",))


def test_empty_data_sets(cli, tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "dog").mkdir()
    train_fails(cli, tmp_path, "data.name=imagefolder", f"data.path={tmp_path / 'empty'}", needles=("no image files",))
    (tmp_path / "none").mkdir()
    train_fails(cli, tmp_path, "data.name=imagefolder", f"data.path={tmp_path / 'none'}", needles=("no class folders",))
    (tmp_path / "header.csv").write_text("path,label\n")
    train_fails(cli, tmp_path, "data.name=csv", f"data.path={tmp_path / 'header.csv'}", needles=("no image files",))
    m = tmp_path / "m0"
    m.mkdir()
    for stem, shape in (
        ("train-images-idx3-ubyte", (0, 4, 4)),
        ("train-labels-idx1-ubyte", (0,)),
        ("t10k-images-idx3-ubyte", (0, 4, 4)),
        ("t10k-labels-idx1-ubyte", (0,)),
    ):
        write_idx(m / stem, np.zeros(shape))
    train_fails(cli, tmp_path, "data.name=mnist", f"data.path={m}", needles=("no training examples",))


def test_a_csv_too_small_for_its_splits(cli, tmp_path):
    """Two rows: val and test take one each and nothing is left to train on (was a ZeroDivisionError)."""
    csv = write_csv(tmp_path / "c")
    csv.write_text("\n".join(csv.read_text().splitlines()[:3]) + "\n")  # the header and two rows
    train_fails(
        cli,
        tmp_path,
        "data.name=csv",
        f"data.path={csv}",
        "data.image_size=8",
        needles=("2 examples are too few", "at least 3", "data.val_fraction and data.test_fraction to 0"),
    )


def test_an_empty_class_folder_is_a_note_or_with_strict_an_error(cli, tmp_path):
    write_pngs(tmp_path / "imgs", per_class=4)
    (tmp_path / "imgs" / "emu").mkdir()
    base = ("data.name=imagefolder", f"data.path={tmp_path / 'imgs'}", "data.image_size=8")
    train_fails(cli, tmp_path, *base, "data.strict=true", needles=("without images", str(tmp_path / "imgs" / "emu")))
    with pytest.warns(UserWarning, match=f"class folder without images: {tmp_path / 'imgs' / 'emu'}"):
        data = load("digits-mlp", list(base)).data.build()  # the CLI shows the warning as "note: ..."
    assert data.spec.class_names == ["cat", "dog", "emu", "fox"]


def test_missing_data_files(cli, tmp_path):
    train_fails(cli, tmp_path, "data.name=mnist", f"data.path={tmp_path / 'nowhere'}", needles=("nowhere",))
    folder = write_mnist(tmp_path / "m")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    train_fails(cli, tmp_path, "data.name=mnist", f"data.path={folder}", needles=("t10k-labels-idx1-ubyte",))
    train_fails(
        cli,
        tmp_path,
        "data.name=fashion-mnist",
        f"data.path={tmp_path / 'fm'}",
        needles=("apt-get install dataset-fashion-mnist",),
    )
    train_fails(cli, tmp_path, "data.name=imagefolder", f"data.path={tmp_path / 'nope'}", needles=("nope",))
    train_fails(cli, tmp_path, "data.name=csv", f"data.path={tmp_path / 'nope.csv'}", needles=("nope.csv",))
    csv = write_csv(tmp_path / "c")
    csv.write_text(csv.read_text() + "img/a/missing.png,a\n")
    train_fails(cli, tmp_path, "data.name=csv", f"data.path={csv}", needles=("missing.png", "list.csv:12"))


def test_damaged_idx_files(cli, tmp_path):
    folder = write_mnist(tmp_path / "m")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    train_fails(cli, tmp_path, "data.name=mnist", f"data.path={folder}", needles=("truncated",))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    train_fails(cli, tmp_path, "data.name=mnist", f"data.path={folder}", needles=("train-labels-idx1-ubyte.gz",))


def test_user_model_file_errors(cli, tmp_path):
    train_fails(cli, tmp_path, f"model.name={tmp_path / 'absent.py'}:Net", needles=("absent.py", "not found"))
    (tmp_path / "broken.py").write_text("def Net(:\n")
    train_fails(cli, tmp_path, f"model.name={tmp_path / 'broken.py'}:Net", needles=("SyntaxError",))
    (tmp_path / "ok.py").write_text("X = 1\n")
    train_fails(cli, tmp_path, f"model.name={tmp_path / 'ok.py'}:Net", needles=("defines no 'Net'",))


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "override,needles",
    [
        ("optim.lrr=0.1", ("optim.lrr", "did you mean 'lr'")),
        ("train.steps=many", ("train.steps", "integer")),
        ("model.name=cnnn", ("did you mean 'cnn'",)),
        ("data.name=digit", ("did you mean 'digits'",)),
        ("train.accum=0", ("train.accum",)),
        ("train.device=tpu", ("tpu",)),
        ("train.precision=fp8", ("fp8",)),
        ("optim.schedule=linear", ("optim.schedule",)),
        ("model.layout=resnet7", ("resnet7",)),
    ],
)
def test_config_typos_and_wrong_types(cli, tmp_path, override, needles):
    extra = ["model.name=resnet"] if override.startswith("model.layout") else []
    train_fails(cli, tmp_path, *extra, override, needles=needles)


def test_unknown_recipe_and_bad_yaml(cli, tmp_path):
    code, _, err = cli("train", "digits-cnm", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "did you mean 'digits-cnn'")
    (tmp_path / "bad.yaml").write_text("train: {steps: [\n")
    code, _, err = cli("train", tmp_path / "bad.yaml", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "not valid YAML")
    code, _, err = cli("train", tmp_path / "missing.yaml", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "missing.yaml")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ runs and resume


def test_bad_resume_path(cli, tmp_path):
    code, _, err = cli("train", "--resume", tmp_path / "no-such-run")
    assert_one_line_error(code, err, "no-such-run", "not a run folder")
    assert not (tmp_path / "no-such-run").exists()


@pytest.fixture
def finished_run(cli, tmp_path):
    out = tmp_path / "done"
    code, _, err = cli("train", "digits-mlp", "--out", out, *sets(*TINY, "model.hidden=[16]"))
    assert code == 0, err
    return out


def test_resume_with_changed_config_fails(cli, finished_run):
    code, _, err = cli("train", "--resume", finished_run, "--set", "optim.lr=0.1")
    assert_one_line_error(code, err, "changed config", "optim.lr")
    code, _, err = cli("train", "--resume", finished_run, "--set", "train.steps=6")  # training longer is allowed
    assert code == 0, err
    assert (finished_run / "checkpoints" / "latest").read_text() == "step-0000006"


def test_resume_with_damaged_checkpoint_fails_clearly(cli, finished_run):
    latest = finished_run / "checkpoints" / (finished_run / "checkpoints" / "latest").read_text()
    (latest / "model.safetensors").write_bytes(b"\x00" * 20)
    code, _, err = cli("train", "--resume", finished_run, "--set", "train.steps=6")
    assert_one_line_error(code, err, "model.safetensors")


def test_existing_run_folder_is_not_overwritten(cli, finished_run):
    code, _, err = cli("train", "digits-mlp", "--out", finished_run)
    assert_one_line_error(code, err, "already holds a run", "--resume")


def test_verbs_on_a_folder_that_is_not_a_run(cli, tmp_path):
    for verb in (["eval"], ["predict"]):
        args = [*verb, tmp_path / "nothing"] + ([tmp_path / "x.png"] if verb == ["predict"] else [])
        code, _, err = cli(*args)
        assert_one_line_error(code, err, "not a run folder")


def test_a_verb_of_one_task_refuses_a_run_of_another_before_loading_it(cli, finished_run):
    for args in (["translate", finished_run, "a dog"], ["drive", finished_run], ["dagger", finished_run]):
        code, _, err = cli(*args)
        assert_one_line_error(code, err, f"{finished_run} is a 'classify' run")  # no weights line: nothing loaded


def test_predict_on_a_corrupt_file(cli, finished_run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")

    def without_weights_line(err: str) -> str:  # every verb that loads a run says which weights it uses, first
        assert err.startswith("weights: "), err
        return err.split("\n", 1)[1]

    code, _, err = cli("predict", finished_run, bad)
    assert_one_line_error(code, without_weights_line(err), str(bad))
    code, _, err = cli("predict", finished_run, tmp_path / "absent.png")
    assert_one_line_error(code, without_weights_line(err), "absent.png")


def test_predict_on_many_files_reports_the_bad_ones_and_goes_on(cli, finished_run, tmp_path):
    good = write_pngs(tmp_path / "imgs", classes=("x",), per_class=2, size=8)
    bad, absent = tmp_path / "bad.png", tmp_path / "absent.png"
    bad.write_bytes(b"nope")
    files = [good[0], bad, absent, good[1]]
    code, out, err = cli("predict", finished_run, *files)
    assert code == 2
    assert [ln.split(": ")[0] for ln in out.splitlines()] == [str(good[0]), str(good[1])]
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 3 and str(bad) in errors[0] and str(absent) in errors[1], err
    assert errors[2] == "error: 2 of 4 files could not be predicted (named above); the others were"
    # the not-an-image error names the file and what to do, never a path inside a library
    assert "could not be decoded as an image" in errors[0] and "site-packages" not in err and ".py" not in err
    code, out, _ = cli("predict", finished_run, *files, "--json")
    got = json.loads(out)
    assert code == 2 and [r["file"] for r in got] == [str(f) for f in files]
    assert ["error" in r for r in got] == [False, True, True, False] and str(bad) in got[1]["error"]


def test_corrupt_pngs_print_only_our_lines(finished_run, tmp_path, subenv):
    """Damaged PNGs of the kinds libpng complains about on its own stderr line (a bad CRC, a broken zlib stream, a
    truncated file): the decoder stays silent, so stderr holds exactly the CLI's one line per file and the summary.
    Checked at the file-descriptor level (a subprocess): a C library's print bypasses Python's sys.stderr."""
    good = write_pngs(tmp_path / "imgs", classes=("x",), per_class=1, size=8)[0].read_bytes()
    idat = good.index(b"IDAT")
    damaged = {
        "crc.png": good[: idat + 6] + bytes([good[idat + 6] ^ 0xFF]) + good[idat + 7 :],  # IDAT data, CRC now wrong
        "zlib.png": good[: idat + 4] + b"\xff" * 8 + good[idat + 12 :],
        "short.png": good[: len(good) // 2],
        "ihdr.png": good[:20] + b"\xff" + good[21:],
    }
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
    r = subprocess.run(
        [PYTHON, "-m", "deeprecipe.cli", "predict", str(finished_run), *damaged],
        cwd=tmp_path,
        env=subenv,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and sum(ln.startswith("error: ") for ln in lines) == len(damaged) + 1, r.stderr
    assert all(ln.startswith(("error: ", "note: ", "weights: ")) for ln in lines), r.stderr  # nothing of libpng's


def test_debug_shows_the_traceback(cli, tmp_path):
    from deeprecipe.config import ConfigError

    with pytest.raises(ConfigError):
        cli("--debug", "train", "digits-mlp", "--out", tmp_path / "r", "--set", "optim.lrr=1")


def test_sample_refuses_a_seed_torch_cannot_take(cli, finished_run):
    for seed in ("-1", str(2**64)):
        code, _, err = cli("sample", finished_run, "--seed", seed)
        assert_one_line_error(code, err, "--seed")
