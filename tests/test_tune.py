"""`deeprecipe tune`: search-space specs and their errors, a tiny study of run folders with a best.yaml that
trains, pruning of a planted bad trial, a killed worker's trial failed by its heartbeat and retried by another
worker, and two processes sharing one SQLite study."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, sets
from deeprecipe.core import ConfigError
from deeprecipe.engine import tune as T

# tiny trials that evaluate (and so can be pruned) every 5 steps
TRIAL = [*TINY, "train.steps=20", "train.eval_every=5", "train.ckpt_every=10"]


def states(path: Path, name: str = "digits-mlp") -> list[tuple[int, str]]:
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{path.resolve()}")
    return [(t.number, t.state.name) for t in study.get_trials(deepcopy=False)]


# ---------------------------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "text, kind, low, high, choices",
    [
        ("model.dropout=0:0.5", "float", 0.0, 0.5, []),
        ("optim.lr=log:1e-4:1e-2", "log", 1e-4, 1e-2, []),
        ("train.batch_size=int:32:256", "int", 32, 256, []),
        ("model.width=int:log:8:64", "intlog", 8, 64, []),
        ("model.name=cnn,resnet", "choice", 0, 0, ["cnn", "resnet"]),
        ("train.ema=0, 0.999", "choice", 0, 0, [0, 0.999]),
    ],
)
def test_parse_specs(text, kind, low, high, choices):
    import optuna

    p = T.parse_param(text)
    assert (p.path, p.kind, p.low, p.high, p.choices) == (text.split("=")[0], kind, low, high, choices)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):  # what Optuna samples for the dimension lies in it
        trial = study.ask()
        value = p.suggest(trial)
        assert value in choices if kind == "choice" else low <= value <= high, value
        assert isinstance(value, int) == (kind in ("int", "intlog")) or kind == "choice"
        assert trial.params == {p.path: value}


@pytest.mark.parametrize(
    "text, said",
    [
        ("optim.lr", "must look like section.key=SPEC"),
        ("optim.lr=", "give a config path and a range"),
        ("optim.lr=1e-2:1e-4", "empty range"),
        ("model.dropout=0.3:0.3", "empty range"),
        ("optim.lr=log:0:1e-2", "log range needs bounds above 0"),
        ("optim.lr=log:-1:1", "log range needs bounds above 0"),
        ("optim.lr=abc", "not a range or choices"),
        ("optim.lr=1:2:3", "not a range or choices"),
        ("optim.lr=1:x", "must be numbers"),
        ("train.steps=int:1.5:4", "integer bounds"),
        ("model.name=cnn,cnn", "distinct"),
    ],
)
def test_parse_errors(text, said):
    with pytest.raises(ConfigError, match=said):
        T.parse_param(text)


def test_space_is_checked_before_any_trial(cli):
    base = ["tune", "digits-mlp", "--trials", "1", "--out", "t", *sets(*TRIAL)]
    for param, said in [
        ("optim.lrr=log:1e-4:1e-2", "unknown key 'optim.lrr': did you mean 'lr'?"),
        ("model.dropot=0:0.5", "did you mean 'dropout'?"),
        ("model.name=mlp,cnnn", "did you mean 'cnn'?"),
        ("model.dropout=0:1", "model.dropout=1.0: must be in [0, 1)"),
        ("optim.lr=log:0:1", "a log range needs bounds above 0"),
    ]:
        code, out, err = cli(*base, "--param", param)
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
        assert not Path("t").exists()
    code, _, err = cli(*base, "--param", "optim.lr=1e-3:1e-2", "--storage", "sqlite:////no/such/dir/s.db")
    assert code == 2 and err.startswith("error: --storage sqlite:////no/such/dir/s.db: cannot open")
    assert not Path("t").exists()
    code, _, err = cli(*base, "--param", "optim.lr=1e-3:1e-2", "--storage", "nosuchdb://x/y")
    assert code == 2 and "cannot open the study database" in err


# ---------------------------------------------------------------------------------------------- a study


def test_tiny_tune_writes_runs_study_and_a_best_recipe_that_trains(cli):
    Path("r.yaml").write_text(
        "task: classify\ndata: {name: digits}\nmodel: {name: mlp, hidden: [32]}\ntune:\n  model.dropout: '0:0.5'\n"
    )
    code, out, err = cli(
        "tune", "r.yaml", "--param", "optim.lr=log:1e-3:1e-2", "--trials", "3", "--out", "t",
        "--pruner", "none", *sets(*TRIAL),
    )  # fmt: skip
    assert code == 0, err
    assert [f"trial {i}: complete" in out for i in range(3)] == [True] * 3, out
    t = Path("t")
    assert (t / "study.db").is_file() and (t / "summary.txt").is_file() and (t / "report.html").is_file()
    assert (t / "history.png").is_file() and (t / "parallel.png").is_file(), (t / "report.html").read_text()
    for i in range(3):
        status = json.loads((t / f"trial-{i:04d}" / "status.json").read_text())
        assert status["status"] == "done" and status["step"] == 20
    cfg0 = (t / "trial-0000" / "config.yaml").read_text()
    assert "dropout" in cfg0 and "\ntune:" not in cfg0
    assert states(t / "study.db", "r") == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    code, out, _ = cli("runs", "--dir", "t")
    assert code == 0 and out.count("done") == 3
    # best.yaml is a recipe train accepts: the best trial's config, its lr and dropout
    code, out, err = cli("train", "t/best.yaml", "--out", "again", "--set", "train.steps=2")
    assert code == 0, err
    best = int((t / "best.yaml").read_text().split("best trial ")[1].split()[0])
    import yaml

    want, got = (yaml.safe_load((d / "config.yaml").read_text()) for d in (t / f"trial-{best:04d}", Path("again")))
    assert got["optim"]["lr"] == want["optim"]["lr"] and got["model"] == want["model"]
    # a recipe with a tune: section still trains (the section is the tuner's); an unknown key still fails
    assert cli("train", "r.yaml", "--out", "plain", *sets(*TINY))[0] == 0
    Path("bad.yaml").write_text("task: classify\ntunes: {}\n")
    code, _, err = cli("train", "bad.yaml", *sets(*TINY))
    assert code == 2 and "unknown key 'tunes'" in err


def test_median_pruner_prunes_a_planted_bad_trial():
    from deeprecipe import config
    from deeprecipe.engine.loop import train
    from deeprecipe.families import get_family

    raw, name = config.read_recipe("digits-mlp")
    space = T.space_of(raw, ["optim.lr=1e-8:1e-2"])
    job = T.Tune(raw, name, list(TRIAL), space, Path("t"), trials=3, pruner="median", startup=2, seed=0)
    family = get_family("classify")
    study = T.open_study(job, family)
    for lr in (3e-3, 4e-3, 1e-8):  # two good trials, then one that cannot learn
        study.enqueue_trial({"optim.lr": lr})
    seen = []
    T.tune(job, family, train, seen.append, study=study)
    assert [i.state for i in seen] == ["complete", "complete", "pruned"], seen
    status = json.loads(Path("t/trial-0002/status.json").read_text())
    assert status["status"] == "pruned" and status["step"] < 20
    assert states(Path("t/study.db"))[-1] == (2, "PRUNED")


# ---------------------------------------------------------------------------------------------- processes


def tune_cmd(out: str, trials: int, *extra: str) -> list[str]:
    args = ["tune", "digits-mlp", "--param", "optim.lr=log:1e-3:1e-2", "--trials", str(trials), "--out", out]
    beat = ["--heartbeat", "1"]  # a killed worker's trial is found dead 3 s after its last beat
    return [sys.executable, "-m", "deeprecipe.cli", *args, "--pruner", "none", *beat, *sets(*TRIAL), *extra]


def test_a_killed_workers_trial_is_failed_by_its_heartbeat_and_retried_by_another_worker(cli, subenv):
    """A worker killed (SIGKILL) during trial 1 of 2 leaves it RUNNING; a second worker on the study finds the budget
    taken, waits, fails the trial when its heartbeat stops, runs its parameters again as a new trial and so finishes
    the budget: nothing left RUNNING."""
    import optuna

    cmd = tune_cmd("t", 2, "--set", "train.steps=100", "--set", "train.eval_every=50")
    proc = subprocess.Popen(cmd, env=subenv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (Path("t/trial-0001/metrics.jsonl").exists() or proc.poll() is not None or time.time() > deadline):
        time.sleep(0.02)
    proc.kill()  # SIGKILL during trial 1 (trial 0 finished): its trial stays RUNNING in the database
    proc.wait()
    before = states(Path("t/study.db"))
    assert before == [(0, "COMPLETE"), (1, "RUNNING")], before
    code, out, err = cli(*cmd[3:])  # the second worker: the same command, in this process
    assert code == 0, err
    assert "resuming study 'digits-mlp': 1 finished trials" in err
    study = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{Path('t/study.db').resolve()}")
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"], trials
    retried = [t for t in trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 1]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE" and retried[0].params == trials[1].params
    assert f"trial {retried[0].number}: complete" in out
    assert Path("t/trial-0000/commands.txt").read_text().count("\n") == 1  # trial 0 was not run again


def test_a_trial_another_worker_failed_is_dropped_and_the_tune_goes_on():
    """A worker stalled past its heartbeats' grace finds its running trial failed by another worker: it drops the
    trial with a note (the other worker runs its parameters again) and goes on to finish the budget."""
    import optuna

    from deeprecipe import config
    from deeprecipe.engine.loop import train
    from deeprecipe.families import get_family

    raw, name = config.read_recipe("digits-mlp")
    job = T.Tune(raw, name, list(TRIAL), T.space_of(raw, ["optim.lr=log:1e-3:1e-2"]), Path("t"), trials=1)
    family = get_family("classify")
    study = T.open_study(job, family)
    other = optuna.load_study(study_name=name, storage=T.storage_url(job))  # the other worker's view

    def stalled(cfg, family, run_dir, command, monitor):
        if run_dir.name == "trial-0000":  # while trial 0 trains, the other worker gives it up as dead
            other.tell(0, state=optuna.trial.TrialState.FAIL)
        return train(cfg, family, run_dir, command=command, monitor=monitor)

    seen = []
    with pytest.warns(UserWarning, match="failed by another worker"):
        T.tune(job, family, stalled, seen.append, study=study)
    assert states(Path("t/study.db")) == [(0, "FAIL"), (1, "COMPLETE")]
    assert [(i.number, i.state) for i in seen] == [(1, "complete")]


def test_two_processes_share_one_sqlite_study(subenv):
    """Two workers on one study file finish exactly the budget together: 4 complete trials, each run by one
    worker once (its folder's commands.txt has one line, the workers' printed trials are disjoint and cover the
    4), both workers ran some, and the only other trials are ones a worker gave back unrun (FAIL, over_budget,
    no folder). Nothing is left RUNNING."""
    import optuna

    cmd = tune_cmd("t", 4)
    procs = [subprocess.Popen(cmd + ["--seed", str(i)], env=subenv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e.decode()[-500:] for _, e in outs]
    study = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{Path('t/study.db').resolve()}")
    trials = study.get_trials(deepcopy=False)
    done = {t.number for t in trials if t.state.name == "COMPLETE"}
    assert len(done) == 4, [(t.number, t.state.name) for t in trials]
    for t in trials:
        if t.number not in done:  # given back unrun: no folder, no training
            assert t.state.name == "FAIL" and t.user_attrs.get("over_budget"), (t.number, t.state, t.user_attrs)
    folders = {int(p.name.split("-")[1]) for p in Path("t").glob("trial-*")}
    assert folders == done, (folders, done)
    for n in done:
        assert json.loads((Path("t") / f"trial-{n:04d}" / "status.json").read_text())["status"] == "done"
        assert (Path("t") / f"trial-{n:04d}" / "commands.txt").read_text().count("\n") == 1
    ran = [
        {int(line.split()[1].rstrip(":")) for line in o.decode().splitlines() if line.startswith("trial ")}
        for o, _ in outs
    ]
    assert ran[0] and ran[1] and not ran[0] & ran[1] and ran[0] | ran[1] == done, ran


def test_the_loops_monitor_stops_a_run_as_pruned_but_not_at_its_last_step():
    from deeprecipe.engine.loop import train
    from deeprecipe.families import get_family
    from deeprecipe.recipe import load

    cfg = load("digits-mlp", TRIAL)
    calls = []
    train(cfg, get_family("classify"), Path("a"), monitor=lambda step, r: calls.append((step, r["acc"])) or step >= 10)
    status = json.loads(Path("a/status.json").read_text())
    assert [s for s, _ in calls] == [5, 10] and status["status"] == "pruned" and status["step"] == 10
    calls.clear()
    train(cfg, get_family("classify"), Path("b"), monitor=lambda step, r: calls.append(step) or step == 20)
    assert calls == [5, 10, 15, 20] and json.loads(Path("b/status.json").read_text())["status"] == "done"
