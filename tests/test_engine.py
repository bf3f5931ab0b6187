"""The training engine: accumulation equals the big batch, exact resume after SIGKILL, checkpoint safety,
non-finite losses, EMA and early stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, TINY, sets
from deeprecipe import config
from deeprecipe.engine import checkpoint, loop, optim
from deeprecipe.engine.atomic import atomic_text, atomic_write
from deeprecipe.engine.run import read_metrics, read_status
from deeprecipe.families import get_family
from deeprecipe.recipe import load


def train(out: Path, *overrides: str, recipe: str = "digits-mlp") -> dict:
    small = recipe == "digits-mlp" and not any(o.startswith("model.name=") for o in overrides)  # the recipe's MLP
    cfg = load(recipe, TINY + ["model.hidden=[32]"] * small + list(overrides))
    return loop.train(cfg, get_family(cfg.task), Path(out))


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    folder = checkpoint.latest(Path(run) / "checkpoints")
    assert folder is not None, f"{run} has no complete checkpoint"
    return load_file(str(folder / "model.safetensors"))


def assert_same(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs")


# ------------------------------------------------------------------------------------------ accumulation


@pytest.mark.parametrize(
    "model",
    [
        ["model.name=mlp", "model.hidden=[32]", "model.dropout=0"],
        ["model.name=cnn", "model.channels=[4, 8]", "model.dense=[16]", "model.batchnorm=false", "model.dropout=0"],
    ],
)
def test_accumulation_equals_the_big_batch(tmp_path, model):
    """accum=4 micro-batches of 8 give the same weights as one batch of 32, random crops included (BatchNorm
    and dropout off: batch statistics and dropout masks legitimately differ per micro-batch)."""
    common = ["train.batch_size=32", "train.steps=3", "data.crop_pad=1", "data.flip=true", *model]
    train(tmp_path / "big", *common, "train.accum=1", recipe="digits-cnn")
    train(tmp_path / "acc", *common, "train.accum=4", recipe="digits-cnn")
    big, acc = final_weights(tmp_path / "big"), final_weights(tmp_path / "acc")
    assert_same(big, acc, exact=False)
    start = train(tmp_path / "one", *common, "train.steps=1", recipe="digits-cnn")  # the weights did move
    assert start is not None
    assert any(not torch.allclose(big[k], final_weights(tmp_path / "one")[k]) for k in big)


# ------------------------------------------------------------------------------------------ exact resume

RESUME = [
    "train.steps=36",
    "train.batch_size=128",
    "train.ckpt_every=5",
    "train.eval_every=10",
    "train.log_every=1",
    "train.ema=0.9",
    "train.precision=fp32",
    "train.device=cpu",
    "train.workers=0",
]


def _steps_logged(run: Path) -> int:
    """The last training step in metrics.jsonl (reads only the file's tail: this runs in a tight loop)."""
    try:
        with open(run / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 2000))
            tail = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(tail):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row:
            return row["step"]
    return 0


def _start(run: Path, env: dict, resume: bool) -> subprocess.Popen:
    args = ["--resume", str(run)] if resume else ["digits-cnn", "--out", str(run), *sets(*RESUME)]
    return subprocess.Popen(
        [PYTHON, "-m", "deeprecipe.cli", "train", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, subenv):
    """Kill a real run with SIGKILL twice (before its first checkpoint; between checkpoints, after an evaluation),
    resume each time; the final weights, EMA, best weights and logged losses equal an uninterrupted run's."""
    run = tmp_path / "killed"
    for i, kill_at in enumerate([3, 19]):
        proc = _start(run, subenv, resume=i > 0)
        while _steps_logged(run) < kill_at:
            assert proc.poll() is None, f"run ended before step {kill_at}: {proc.stderr.read()[-2000:]}"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        proc.stderr.close()
    proc = _start(run, subenv, resume=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]

    ref = tmp_path / "ref"
    cfg = load("digits-cnn", RESUME)
    loop.train(cfg, get_family(cfg.task), ref)
    assert_same(final_weights(ref), final_weights(run))
    assert any(k.startswith("ema.") for k in final_weights(run))
    assert_same(
        load_file(str(ref / "checkpoints" / "best.safetensors")),
        load_file(str(run / "checkpoints" / "best.safetensors")),
    )
    losses = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    assert losses == {r["step"]: r["loss"] for r in read_metrics(ref) if "loss" in r}
    assert sorted(losses) == list(range(1, 37))  # the rewind left each step logged once
    assert read_status(run)["status"] == "done"
    assert len((run / "commands.txt").read_text().splitlines()) == 3  # the first run and two resumes


# ------------------------------------------------------------------------------------------ checkpoint safety


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, cli):
    real, calls, saved = checkpoint.save_file, [], {}

    def flaky(tensors, path, metadata=None):
        if Path(path).name.startswith(".model.safetensors"):
            calls.append(path)
            if len(calls) == 2:  # the second checkpoint: half a file, then the disk is full
                Path(path).write_bytes(b"\0" * 100)
                raise OSError(28, "No space left on device")
            saved.update({k: v.clone() for k, v in tensors.items()})
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", flaky)
    out = tmp_path / "run"
    code, _, err = cli("train", "digits-mlp", "--out", out, *sets(*TINY, "model.hidden=[16]"))
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: cannot write checkpoint") and "Traceback" not in err
    assert "No space left on device" in err and "step-0000002 is intact" in err
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-0000002"
    weights, state = checkpoint.load(checkpoint.latest(ckpt))
    assert_same(weights, saved)
    assert state["step"] == 2
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")], "temporary files left behind"
    # and the run resumes from it
    monkeypatch.setattr(checkpoint, "save_file", real)
    code, _, err = cli("train", "--resume", out)
    assert code == 0, err
    assert (ckpt / "latest").read_text() == "step-0000004"


def test_resume_removes_temporaries_a_killed_writer_left(tmp_path, cli):
    """A writer killed mid-write leaves `.latest.tmp<PID>` (atomic_write) or a `.step-N.partial` folder (save):
    a run that starts or resumes removes those of processes that are gone, and keeps a live process's."""
    out = tmp_path / "run"
    code, _, err = cli("train", "digits-mlp", "--out", out, *sets(*TINY, "model.hidden=[16]"))
    assert code == 0, err
    gone = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    ckpt = out / "checkpoints"
    stale = [ckpt / f".latest.tmp{dead}", out / "plots" / f".loss.png.tmp{dead}", out / f".status.json.tmp{dead}"]
    for p in stale:
        p.write_text("half")
    (ckpt / ".step-0000003.partial").mkdir()
    (ckpt / ".step-0000003.partial" / "model.safetensors").write_bytes(b"\0")
    live = out / "plots" / f".mine.png.tmp{os.getpid()}"  # this process: alive
    live.write_text("being written")
    code, _, err = cli("train", "--resume", out, "--set", "train.steps=6")
    assert code == 0, err
    assert not any(p.exists() for p in stale) and not (ckpt / ".step-0000003.partial").exists()
    assert live.exists()


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    atomic_text(target, "old")

    def boom(p):
        Path(p).write_text("partial")
        raise OSError(5, "I/O error")

    with pytest.raises(OSError):
        atomic_write(target, boom)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


# ------------------------------------------------------------------------------------------ non-finite loss

NAN_MODEL = """
import torch, torch.nn as nn

class NaNAfter(nn.Module):
    '''A linear classifier whose training forward returns NaN from call `after` + 1 on.'''
    def __init__(self, num_classes, in_channels, image_size, after=3):
        super().__init__()
        self.lin = nn.Linear(in_channels * image_size[0] * image_size[1], num_classes)
        self.after, self.calls = after, 0

    def forward(self, x):
        out = self.lin(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                out = out * float("nan")
        return out
"""


@pytest.fixture
def nan_model(tmp_path) -> str:
    f = tmp_path / "nan_model.py"
    f.write_text(NAN_MODEL)
    return f"model.name={f}:NaNAfter"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, cli, nan_model):
    out = tmp_path / "run"
    code, _, err = cli("train", "digits-mlp", "--out", out, *sets(*TINY, nan_model, "train.steps=6"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: loss became nan at step 4") and "Traceback" not in err
    assert (out / "checkpoints" / "latest").read_text() == "step-0000002"
    weights, state = checkpoint.load(checkpoint.latest(out / "checkpoints"))
    assert state["step"] == 2 and all(torch.isfinite(w).all() for w in weights.values())
    assert read_status(out)["status"] == "failed" and read_status(out)["step"] == 4


def test_nonfinite_skip_keeps_going(tmp_path, cli, nan_model):
    out = tmp_path / "run"
    code, _, err = cli(
        "train",
        "digits-mlp",
        "--out",
        out,
        *sets(*TINY, nan_model, "train.steps=6", "train.ckpt_every=3", "train.nonfinite=skip"),
    )
    assert code == 0, err
    rows = read_metrics(out)
    assert [r["step"] for r in rows if r.get("skipped_batch")] == [4, 5, 6]
    assert any("val_acc" in r and r["step"] == 6 for r in rows)  # the final evaluation still ran
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-0000006"  # the final checkpoint too
    # the skipped batches never reached the weights: step 6 holds exactly the weights of step 3
    assert_same(
        load_file(str(ckpt / "step-0000003" / "model.safetensors")),
        load_file(str(ckpt / "step-0000006" / "model.safetensors")),
    )
    assert read_status(out)["status"] == "done"


def _device_check(monkeypatch) -> None:
    """The loop's CUDA path on the CPU: fused AdamW (the CPU has the kernel too) and the non-finite check kept
    on the device; no CUDA graph (that needs a GPU)."""
    plain = optim.adamw

    def fused(module, cfg, scale=None, mult=1.0):
        opt = plain(module, cfg, scale, mult)
        keep = ("params", "weight_decay", "lr_scale", "start_step")
        groups = [{k: g[k] for k in keep} for g in opt.param_groups]
        fused = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True, capturable=True)
        optim.device_lr(fused)
        return fused

    monkeypatch.setattr(optim, "adamw", fused)
    monkeypatch.setattr(loop, "on_device", lambda parts, rt: True)


def test_device_side_nonfinite_check_matches_the_host_check(tmp_path, monkeypatch, nan_model):
    """With no host sync per step (the CUDA path), a NaN step's update is dropped by the optimizer itself: the
    run ends with exactly the weights of the host-checked run, and logs the dropped steps."""
    common = [nan_model, "train.steps=6", "train.ckpt_every=3", "train.nonfinite=skip", "train.cuda_graph=false"]
    train(tmp_path / "host", *common)
    _device_check(monkeypatch)
    train(tmp_path / "device", *common)
    host, device = final_weights(tmp_path / "host"), final_weights(tmp_path / "device")
    assert_same(host, device, exact=False)
    assert sum(r.get("skipped_batch", 0) for r in read_metrics(tmp_path / "device")) == 3  # steps 4, 5, 6
    assert read_status(tmp_path / "device")["status"] == "done"


def test_device_side_nonfinite_check_stops_before_the_next_checkpoint(tmp_path, monkeypatch, nan_model):
    _device_check(monkeypatch)
    with pytest.raises(loop.NonFiniteLoss, match="NaN/inf at step 4"):
        train(tmp_path / "run", nan_model, "train.steps=6", "train.cuda_graph=false")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-0000002"
    assert read_status(tmp_path / "run")["status"] == "failed"


def test_device_health_names_the_dropped_steps_at_the_read():
    h = loop.DeviceHealth(torch.device("cpu"), 4)
    for step, v in enumerate([0.0, 1.0, 0.0, 1.0], 1):
        h.add(torch.tensor(v), step)
    assert h.read() == [2, 4] and h.read() == []
    h.add(torch.tensor(1.0), 5)
    assert h.read() == [5]


# ------------------------------------------------------------------------------------------ EMA, early stopping


def test_ema_matches_closed_form():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = optim.ema(model, 0.8)
    expect = {k: v.clone().float() for k, v in model.state_dict().items()}  # the first update copies
    ema.update_parameters(model)
    for _ in range(3):
        model.train()
        model(torch.randn(8, 3))  # moves the BatchNorm running statistics
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(model)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                expect[k] = 0.8 * expect[k] + 0.2 * v
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, expect[k], msg=k)
    assert optim.ema(model, 0.0) is None


def test_evaluation_uses_the_ema_weights(tmp_path):
    out = tmp_path / "run"
    train(out, "train.ema=0.5")
    w = final_weights(out)
    ema, model = checkpoint.split_prefix(w, "ema."), checkpoint.split_prefix(w, "model.")
    assert ema.keys() == model.keys() and any(not torch.equal(ema[k], model[k]) for k in ema)
    assert_same(load_file(str(out / "checkpoints" / "best.safetensors")), ema)  # evaluated at the end only
    assert_same(checkpoint.inference_weights(out), ema)


def test_early_stopping_after_evaluations_without_improvement(tmp_path):
    out = tmp_path / "run"
    train(out, "optim.lr=1e-12", "train.steps=20", "train.eval_every=1", "train.early_stop=2", "train.ckpt_every=10")
    # lr ~0 (0 itself is refused): evaluation 1 is never beaten; evaluations 2 and 3 do not improve -> stop at step 3
    assert read_status(out)["status"] == "done" and read_status(out)["step"] == 3
    assert (out / "checkpoints" / "latest").read_text() == "step-0000003"
    assert max(r["step"] for r in read_metrics(out)) == 3


def test_lr_schedules():
    cfg = config.OptimConfig(warmup=0.1)
    f = [optim.lr_factor(cfg, s, 100) for s in range(100)]
    assert f[9] == pytest.approx(1.0) and f[0] == pytest.approx(0.1) and f[-1] < 0.01
    assert all(a <= b for a, b in zip(f[:10], f[1:10])) and all(a >= b for a, b in zip(f[10:], f[11:]))
    one = config.OptimConfig(schedule="onecycle", warmup=0.25)
    g = [optim.lr_factor(one, s, 100) for s in range(100)]
    assert max(g) == pytest.approx(1.0) and g.index(max(g)) == 25 and g[-1] < 0.05
    const = config.OptimConfig(schedule="constant", warmup=0)
    assert {optim.lr_factor(const, s, 10) for s in range(10)} == {1.0}


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    opt = optim.adamw(model, config.OptimConfig(weight_decay=0.1))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay == {id(named["0.weight"]), id(named["3.weight"])}


def test_metrics_jsonl_survives_a_cut_line(tmp_path):
    """A SIGKILL mid-append leaves half a line; reading and resuming must not trip over it."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + '\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


# ------------------------------------------------------------------------------------------ time budget
BUDGET = [*TINY, "train.steps=1000", "train.ckpt_every=5", "optim.warmup=0.25"]


class FakeClock:
    """A clock that advances `d` seconds at each reading (the loop reads it once before the first step and once
    after each step: step k then ends at k * d); raises after `fail_after` readings, like a run killed there."""

    def __init__(self, d: float, fail_after: int = 0):
        self.t, self.d, self.n, self.fail_after = 1000.0, d, 0, fail_after

    def __call__(self) -> float:
        self.n += 1
        if self.fail_after and self.n > self.fail_after:
            raise KeyboardInterrupt("killed")
        self.t += self.d
        return self.t


def _lrs(run: Path) -> list[float]:
    return [r["lr"] for r in read_metrics(run) if "lr" in r]


@pytest.mark.parametrize("cap", [1000, 12])
def test_time_budget_runs_the_step_schedule_that_fits(tmp_path, monkeypatch, cap):
    """train.minutes with steps of exactly 1 s and a 20 s budget: the run stops after the 20 steps that fit (or at
    the train.steps cap, 12), and each step's lr is the step schedule's for that many steps, or its next step's (the
    budget places the schedule by the end of each step: its decay runs one step ahead; the first step, before any
    reading of the clock, may run lower)."""
    from deeprecipe.engine import clock

    monkeypatch.setattr(clock, "now", FakeClock(1.0))
    cfg = load("digits-mlp", [*BUDGET, f"train.steps={cap}", "train.minutes=0.3333333333"])
    loop.train(cfg, get_family(cfg.task), tmp_path / "timed")
    fits = min(cap, 20)
    steps = load("digits-mlp", [*BUDGET, f"train.steps={fits}"])
    loop.train(steps, get_family(steps.task), tmp_path / "steps")
    timed, want = _lrs(tmp_path / "timed"), _lrs(tmp_path / "steps")
    assert read_status(tmp_path / "timed")["step"] == fits and len(timed) == len(want) == fits
    near = [(want + [0.0])[i : i + 2] for i in range(fits)]  # this step's lr or the next one's (0 after the last)
    assert all(min(w) * (1 - 1e-5) <= t <= max(w) * (1 + 1e-5) for t, w in zip(timed[1:], near[1:])), (timed, want)
    assert timed[0] <= want[0] * (1 + 1e-5)  # before the clock's first reading: the step count's share alone
    assert timed[-1] == pytest.approx(0.0, abs=1e-9) and max(timed) == pytest.approx(cfg.optim.lr)


def test_time_budget_resumes_exactly(tmp_path, monkeypatch):
    """A timed run killed after step 11 and resumed from its step-10 checkpoint ends with the weights of the
    uninterrupted timed run, bit for bit: the checkpoint keeps the seconds spent, so the schedule goes on; resumed
    after its end, it trains no further step."""
    from deeprecipe.engine import clock

    cfg = load("digits-mlp", [*BUDGET, "train.minutes=0.3333333333"])
    monkeypatch.setattr(clock, "now", FakeClock(1.0))
    loop.train(cfg, get_family(cfg.task), tmp_path / "whole")
    monkeypatch.setattr(clock, "now", FakeClock(1.0, fail_after=12))  # the reading after step 11 never comes
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, get_family(cfg.task), tmp_path / "cut")
    monkeypatch.setattr(clock, "now", FakeClock(1.0))
    loop.train(cfg, get_family(cfg.task), tmp_path / "cut", resume=True)
    a = load_file(str(checkpoint.latest(tmp_path / "whole" / "checkpoints") / "model.safetensors"))
    b = load_file(str(checkpoint.latest(tmp_path / "cut" / "checkpoints") / "model.safetensors"))
    assert read_status(tmp_path / "cut")["step"] == read_status(tmp_path / "whole")["step"] == 20
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.setattr(clock, "now", FakeClock(1.0))  # resumed once more: the budget is spent, no step runs
    loop.train(cfg, get_family(cfg.task), tmp_path / "cut", resume=True)
    assert read_status(tmp_path / "cut")["step"] == 20 and checkpoint.latest(
        tmp_path / "cut" / "checkpoints"
    ).name.endswith("20")


def test_time_budget_keeps_a_warmup_in_steps():
    """optim.warmup >= 1 under a time budget: the warmup still rises by steps (the step schedule's values), then the
    decay follows the position; the factor never jumps at the warmup's end (it meets the decay there)."""
    for schedule in ("cosine", "onecycle", "constant"):
        cfg = config.OptimConfig(schedule=schedule, warmup=10)
        rise = [optim.lr_factor(cfg, s, 1000) for s in range(10)]
        assert [optim.lr_factor(cfg, s, 10**6, position=s / 10**4) for s in range(10)] == pytest.approx(rise, rel=1e-5)
        assert optim.lr_factor(cfg, 10, 0, position=0.5) == pytest.approx(optim.decay(cfg, 0.5))
        f = [optim.lr_factor(cfg, s, 0, position=s / 40) for s in range(41)]
        assert all(abs(a - b) <= 0.11 for a, b in zip(f, f[1:])), (schedule, f)
    assert optim.decay(config.OptimConfig(), 1.0) == 0.0 and optim.decay(config.OptimConfig(min_lr=0.1), 1.0) == 0.1
