"""Hyperparameter search with Optuna: a search space over config fields, one normal run folder per trial.

`parse_param("optim.lr=log:1e-4:1e-2")` reads one dimension of the space; `check_space` proves before any trial
starts that every value the space can give resolves into a valid config (an unknown path names the nearest valid
one, a value out of its range says so); `tune(...)` runs trials of a study held in a database (SQLite by default,
any URL Optuna supports), each trial a run folder `trial-NNNN/` trained by the one loop, pruned from the loop's
intermediate evaluations. Several processes (on one machine or several) may work on one study: the budget
`trials` counts the study's finished trials, so together they finish that many, each trial number run once.
A running trial writes a heartbeat to the database; one silent for three heartbeats (its worker killed, its
machine gone) is failed by whichever worker notices and comes back once more as a waiting trial with the same
parameters, which the next free worker runs. Optuna is imported only when a study is opened. The caller (the CLI)
hands in the family; nothing here prints.
"""

from __future__ import annotations

import copy
import itertools
import math
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deeprecipe.config import TUNE_KEY, Config, with_overrides
from deeprecipe.core import ConfigError, UserError
from deeprecipe.family import Family
from deeprecipe.recipe import resolve

TRIAL_DIR = "trial-{:04d}"
PRUNERS = ("median", "halving", "none")
MAX_COMBOS = 64  # categorical combinations checked before the first trial
GRACE = 3  # heartbeats a running trial may miss before it counts as dead
RETRIES = 2  # a dead trial's parameters run at most this many more times (a trial that kills its worker stops)


@dataclass
class Param:
    """One dimension of the search space: a config path and its distribution."""

    path: str  # section.key, as --set takes it
    kind: str  # float | log | int | intlog | choice
    low: float = 0.0
    high: float = 0.0
    choices: list = field(default_factory=list)

    def samples(self) -> list:
        """The values that bound what this dimension can give (checked before any trial)."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def suggest(self, trial) -> Any:
        """This dimension's value for an Optuna trial (a retried trial gets its earlier value back)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.path, self.choices)
        if self.kind in ("int", "intlog"):
            return trial.suggest_int(self.path, int(self.low), int(self.high), log=self.kind == "intlog")
        return trial.suggest_float(self.path, self.low, self.high, log=self.kind == "log")


def parse_param(text: str) -> Param:
    """`path=SPEC`: `LO:HI` (uniform float), `log:LO:HI`, `int:LO:HI`, `int:log:LO:HI`, or `A,B,C` (choices,
    each read as YAML). A one-line ConfigError for anything else, an empty range or a log range with a bound <= 0."""
    if "=" not in text:
        raise ConfigError(f"--param '{text}' must look like section.key=SPEC, e.g. optim.lr=log:1e-4:1e-2")
    path, spec = (t.strip() for t in text.split("=", 1))
    if not path or not spec:
        raise ConfigError(f"--param '{text}': give a config path and a range or choices, e.g. model.dropout=0:0.5")
    return parse_spec(path, spec)


def parse_spec(path: str, spec: Any) -> Param:
    where = f"--param {path}={spec}"
    if isinstance(spec, list):  # a YAML list in a recipe's tune: section
        spec = ",".join(yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip() for v in spec)
    spec = str(spec).strip()
    if "," in spec:
        choices = [_yaml(t.strip()) for t in spec.split(",")]
        if any(c == "" for c in choices) or len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}: choices must be distinct and non-empty (e.g. model.name=cnn,resnet)")
        return Param(path, "choice", choices=choices)
    parts = spec.split(":")
    kind = "float"
    if parts[0] in ("log", "int"):
        kind = parts.pop(0)
        if kind == "int" and parts and parts[0] == "log":
            kind = "intlog"
            parts.pop(0)
    if len(parts) != 2:
        raise ConfigError(f"{where}: not a range or choices; use LO:HI, log:LO:HI, int:LO:HI, int:log:LO:HI or A,B,C")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{where}: the bounds must be numbers, got '{parts[0]}' and '{parts[1]}'") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(f"{where}: the bounds must be finite")
    if kind in ("int", "intlog") and not (lo.is_integer() and hi.is_integer()):
        raise ConfigError(f"{where}: an int range needs integer bounds")
    if lo >= hi:
        raise ConfigError(f"{where}: empty range (the low bound {parts[0]} must be below the high bound {parts[1]})")
    if kind in ("log", "intlog") and lo <= 0:
        raise ConfigError(f"{where}: a log range needs bounds above 0, got {parts[0]}")
    if kind in ("int", "intlog"):
        lo, hi = int(lo), int(hi)
    return Param(path, kind, lo, hi)


def _yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def space_of(raw: dict, params: list[str]) -> list[Param]:
    """The recipe's `tune:` section (path: spec) then the --param options (a later one replaces a path)."""
    section = raw.get(TUNE_KEY) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"the recipe's '{TUNE_KEY}' section must map config paths to ranges or choices")
    space = {str(k): parse_spec(str(k), v) for k, v in section.items()}
    for text in params:
        p = parse_param(text)
        space[p.path] = p
    if not space:
        raise ConfigError("nothing to tune: give --param section.key=SPEC (or a tune: section in the recipe)")
    return list(space.values())


def overrides_of(values: dict[str, Any]) -> list[str]:
    """--set strings for sampled values; a `.name` first (changing data.name or model.name resets its section)."""
    items = sorted(values.items(), key=lambda kv: not kv[0].endswith(".name"))
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in items]


def config_of(raw: dict, name: str, overrides: list[str], values: dict[str, Any]) -> Config:
    """The typed config of one point of the space: the recipe, the --set overrides, then the sampled values."""
    return resolve(with_overrides(copy.deepcopy(raw), [*overrides, *overrides_of(values)]), name)


def check_space(raw: dict, name: str, overrides: list[str], space: list[Param]) -> None:
    """Every path exists and every corner of the space resolves (each choice, each bound), or a ConfigError."""
    for p in space:
        if p.path == "task" or "." not in p.path:
            raise ConfigError(f"--param {p.path}: tune a field of a section (optim.lr, model.dropout, train.steps)")
    choices = [p for p in space if p.kind == "choice"]
    ranges = [p for p in space if p.kind != "choice"]
    combos = itertools.islice(itertools.product(*(p.choices for p in choices)), MAX_COMBOS)
    for combo in combos:
        for end in (0, 1):
            values = {p.path: c for p, c in zip(choices, combo)} | {p.path: p.samples()[end] for p in ranges}
            config_of(raw, name, overrides, values)


# ---------------------------------------------------------------------------------------------- the study


def open_storage(url: str, heartbeat: int = 0):
    """An Optuna RDB storage, or a one-line UserError (bad URL, missing driver, unreachable server). With
    `heartbeat` (seconds), trials run by study.optimize beat at that interval, and one silent for GRACE beats is
    failed and queued again (up to RETRIES times) by the next worker that checks."""
    import optuna

    beats = {}
    with warnings.catch_warnings():  # Optuna marks heartbeats and the retry callback experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if heartbeat:
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES)
            beats = dict(
                heartbeat_interval=heartbeat, grace_period=GRACE * heartbeat, heartbeat_stale_trial_callback=retry
            )
    for attempt in range(4):  # workers starting together race to create the tables: the loser tries again
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), **beats)
        except Exception as e:  # a bad URL, a missing driver, sqlalchemy's OperationalError (unreachable) ...
            error = e
            if not any(w in str(e) for w in ("locked", "already exists", "UNIQUE constraint")):
                break
            time.sleep(0.25 * 2**attempt)
    first = next((ln for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
    raise UserError(f"--storage {url}: cannot open the study database ({first.strip()[:200]})") from None


def _engine_kwargs(url: str) -> dict:
    # SQLite shared by processes: wait for the other writer's lock instead of failing at once
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}


def make_pruner(kind: str, startup: int):
    import optuna

    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner {kind}: use one of {', '.join(PRUNERS)}")


@dataclass
class TrialInfo:
    """What one finished trial did (the CLI prints it)."""

    number: int
    state: str  # complete | pruned | failed
    value: float | None
    step: int
    params: dict
    run_dir: Path
    error: str = ""


@dataclass
class Tune:
    """A tuning job: the recipe, the space and the budget."""

    raw: dict  # the recipe mapping (its tune: section is ignored here)
    name: str  # the recipe's name
    overrides: list[str]  # --set options applied to every trial
    space: list[Param]
    out: Path  # the tune folder: trial-NNNN/, study.db, best.yaml, plots, report
    storage: str = ""  # database URL ("" -> sqlite:///OUT/study.db)
    study: str = ""  # study name ("" -> the recipe's name)
    trials: int = 20  # finished trials (complete or pruned) the study should have
    minutes: float = 0.0  # no trial starts after this many minutes (0: no limit)
    pruner: str = "median"
    startup: int = 3  # trials before the median pruner prunes
    seed: int = 0
    heartbeat: int = 30  # seconds between a running trial's heartbeats; GRACE missed ones and it is failed, retried


def storage_url(job: Tune) -> str:
    return job.storage or f"sqlite:///{(job.out / 'study.db').resolve()}"


def open_study(job: Tune, family: Family):
    """The study (created, or loaded to resume: same name, same database), its direction from family.METRIC."""
    import optuna

    metric, mode = family.METRIC
    direction = "maximize" if mode == "max" else "minimize"
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the caller reports every trial itself
    if job.heartbeat < 1:
        raise UserError(f"--heartbeat {job.heartbeat}: give a whole number of seconds, at least 1")
    made = not job.out.exists()
    job.out.mkdir(parents=True, exist_ok=True)
    try:
        storage = open_storage(storage_url(job), job.heartbeat)
    except UserError:
        if made and not any(job.out.iterdir()):  # a tune that never opened its study leaves no folder
            job.out.rmdir()
        raise
    study = optuna.create_study(
        storage=storage,
        study_name=job.study or job.name,
        direction=direction,
        load_if_exists=True,
        pruner=make_pruner(job.pruner, job.startup),
    )
    if study.direction.name.lower() != direction:
        raise UserError(
            f"study '{study.study_name}' in {storage_url(job)} is to {study.direction.name.lower()}, but "
            f"val {metric} is to {direction}: give another --study"
        )
    return study


def finished(study) -> int:
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=done))


class TrialFailed(Exception):
    """A trial that ends as failed without stopping the tune (a NaN loss, a config its values make invalid)."""


def tune(
    job: Tune,
    family: Family,
    train: Callable[..., dict],
    on_trial: Callable[[TrialInfo], None] = lambda info: None,
    study=None,
) -> Any:
    """Run trials until the study has `job.trials` finished ones (or the time is up). `train` is
    engine.loop.train (handed in so a test may wrap it); `on_trial` hears of each finished trial.

    Each trial runs under study.optimize, which beats its heartbeat and, before it asks for a trial, fails the
    trials of dead workers (queued again as waiting trials, which ask hands out first). A worker that finds the
    rest of the budget taken by other workers' running trials waits to see them finish or die."""
    import optuna

    from deeprecipe.engine.loop import NonFiniteLoss
    from deeprecipe.engine.run import read_status

    study = study or open_study(job, family)
    metric = family.METRIC[0]
    deadline = time.monotonic() + job.minutes * 60 if job.minutes else math.inf
    S = optuna.trial.TrialState

    def beating(t) -> bool:  # a running trial of this tune's workers: its heartbeat shows whether it lives
        return t.state == S.RUNNING and "heartbeat" in t.user_attrs

    def run(trial) -> float:
        ahead = [
            t
            for t in study.get_trials(deepcopy=False, states=(S.RUNNING, S.COMPLETE, S.PRUNED, S.WAITING))
            if t.number <= trial.number and (t.state != S.RUNNING or beating(t) or t.number == trial.number)
        ]
        if len(ahead) > job.trials:  # another worker took the last trial of the budget in the meantime
            trial.set_user_attr("over_budget", True)
            raise TrialFailed("over budget")
        params = {p.path: p.suggest(trial) for p in job.space}
        run_dir = job.out / TRIAL_DIR.format(trial.number)
        for key, value in (("host", socket.gethostname()), ("heartbeat", job.heartbeat), ("run_dir", str(run_dir))):
            trial.set_user_attr(key, value)
        seen = {"step": 0}

        def monitor(step: int, results: dict) -> bool:
            value = results.get(metric)
            seen["step"] = step
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return False
            trial.report(float(value), step)
            return trial.should_prune()

        cfg = config_of(job.raw, job.name, job.overrides, params)
        command = f"deeprecipe tune {job.name} (trial {trial.number}: {' '.join(overrides_of(params))})"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                train(cfg, family, run_dir, command=command, monitor=monitor)
        except (NonFiniteLoss, ConfigError) as e:
            on_trial(TrialInfo(trial.number, "failed", None, seen["step"], params, run_dir, str(e)))
            raise TrialFailed(str(e)) from e
        status = read_status(run_dir)
        best, step = (status.get("best") or {}).get(metric), status.get("step", 0)
        if status.get("status") == "pruned":
            on_trial(TrialInfo(trial.number, "pruned", best, step, params, run_dir))
            raise optuna.TrialPruned()
        if best is None or not math.isfinite(best):
            on_trial(TrialInfo(trial.number, "failed", None, step, params, run_dir, "no metric"))
            raise TrialFailed("no metric")
        on_trial(TrialInfo(trial.number, "complete", float(best), step, params, run_dir))
        return float(best)

    ended = {"here": False}  # the last trial ended in this process (its end, not an error, reaches study.tell)

    def objective(trial) -> float:
        ended["here"] = False
        try:
            value = run(trial)
        except (optuna.TrialPruned, TrialFailed, optuna.exceptions.UpdateFinishedTrialError):
            ended["here"] = True
            raise
        ended["here"] = True
        return value

    while time.monotonic() < deadline:
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state in (S.COMPLETE, S.PRUNED) for t in trials)
        if done >= job.trials:
            break
        if done + sum(map(beating, trials)) >= job.trials and not any(t.state == S.WAITING for t in trials):
            time.sleep(1.0)  # the rest of the budget is running elsewhere: will it finish, or die?
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # a dead one comes back as a waiting trial
            continue
        # a fresh seeded sampler per trial: one worker's search is reproducible, two workers sample apart
        study.sampler = optuna.samplers.TPESampler(seed=job.seed + len(trials))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.optimize(objective, n_trials=1, catch=(TrialFailed,))
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            # telling a finished trial: this process stalled (suspended, starved) past the grace, another worker
            # failed its trial and queued the parameters again, so the work done here no longer counts
            if not ended["here"]:
                raise
            warnings.warn(
                f"a trial of this worker missed {GRACE} heartbeats and was failed by another worker, which runs its "
                "parameters again; going on with the next trial",
                stacklevel=2,
            )
    return study


def best_trial(study):
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return study.best_trial if done else None


def write_best(study, out: Path) -> Path | None:
    """best.yaml: the config of the best complete trial's run folder, a recipe `deeprecipe train` accepts."""
    from deeprecipe.engine.atomic import atomic_text

    t = best_trial(study)
    if t is None:
        return None
    run_dir = Path(t.user_attrs.get("run_dir", out / TRIAL_DIR.format(t.number)))
    text = (run_dir / "config.yaml").read_text()
    head = f"# best trial {t.number} of study '{study.study_name}': val {t.value:.6g} ({run_dir})\n"
    atomic_text(out / "best.yaml", head + text)
    return out / "best.yaml"


def write_plots(study, out: Path) -> dict[str, str]:
    """Optimisation history, parameter importances and parallel coordinates (optuna.visualization.matplotlib) as
    PNGs in the tune folder: name -> file, or name -> why it is missing (too few trials, one parameter, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as vis

    from deeprecipe.engine.atomic import atomic_write  # two workers may draw at once

    plots = {
        "history": (vis.plot_optimization_history, "optimisation history"),
        "importances": (vis.plot_param_importances, "parameter importances"),
        "parallel": (vis.plot_parallel_coordinate, "parallel coordinates"),
    }
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    written = {}
    for name, (fn, title) in plots.items():
        if len(done) < 2:
            written[name] = f"{title}: needs 2 complete trials, the study has {len(done)}"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            atomic_write(out / f"{name}.png", lambda p, fig=fig: fig.savefig(p, dpi=90, format="png"))
            plt.close(fig)
            written[name] = f"{name}.png"
        except Exception as e:  # e.g. importances of a space whose values never varied
            plt.close("all")
            written[name] = f"{title}: not drawn ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return written


def summary(study, metric: str) -> list[str]:
    """Plain lines: the counts, the best trial and its parameters, then one line per trial."""
    import optuna

    every = study.get_trials(deepcopy=False)
    trials = [t for t in every if not t.user_attrs.get("over_budget")]  # a worker's ask past the budget: not run
    count = {s: sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    S = optuna.trial.TrialState
    lines = [
        f"study '{study.study_name}' ({study.direction.name.lower()} val {metric}): {count[S.COMPLETE]} complete, "
        f"{count[S.PRUNED]} pruned, {count[S.FAIL]} failed, {count[S.RUNNING]} running"
        + (f" ({len(every) - len(trials)} past the budget, not run)" if len(every) > len(trials) else "")
    ]
    t = best_trial(study)
    if t is not None:
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        lines.append(f"best: trial {t.number} val {metric}={t.value:.4f}  {shown}")
    for t in trials:
        value = f"{t.value:.4f}" if t.value is not None else "-"
        if t.state == S.PRUNED and t.intermediate_values:
            step = max(t.intermediate_values)
            value = f"{t.intermediate_values[step]:.4f} @ step {step}"
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        lines.append(f"  trial {t.number:4d}  {t.state.name.lower():<8} {value:<20} {shown}")
    return lines


def write_report(study, out: Path, metric: str) -> Path:
    """summary.txt and report.html (the summary, the plots, the best config) in the tune folder."""
    import html

    from deeprecipe.engine.atomic import atomic_text

    lines = summary(study, metric)
    atomic_text(out / "summary.txt", "\n".join(lines) + "\n")
    plots = write_plots(study, out)
    figs = "".join(
        f"<h2>{html.escape(name)}</h2>"
        + (f"<img src='{html.escape(v)}'>" if v.endswith(".png") else f"<p>{html.escape(v)}</p>")
        for name, v in plots.items()
    )
    best = (out / "best.yaml").read_text() if (out / "best.yaml").is_file() else "(no complete trial yet)"
    page = (
        "<!doctype html><meta charset='utf-8'><title>tune " + html.escape(study.study_name) + "</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "img{max-width:100%;border:1px solid #eee}pre{background:#f6f6f6;padding:8px}</style>"
        f"<h1>tune {html.escape(study.study_name)}</h1><pre>{html.escape(chr(10).join(lines))}</pre>{figs}"
        f"<h2>best.yaml</h2><pre>{html.escape(best)}</pre>"
    )
    atomic_text(out / "report.html", page)
    return out / "report.html"
