"""The `tune` verb: an Optuna study over a recipe's config fields, every trial a normal run folder (engine/tune.py).

    deeprecipe tune digits-cnn --param optim.lr=log:1e-4:1e-2 --param model.dropout=0:0.5 --trials 20

writes TUNE/trial-NNNN/ (run folders: `runs --dir TUNE`, `eval`, `train --resume` work on them), TUNE/study.db
(or the --storage database), TUNE/best.yaml (a recipe `train` accepts), the plots, summary.txt and report.html.
The same command again resumes the study; the same command on other machines with one --storage URL shares it.
A trial whose worker dies (killed, its machine gone) misses its heartbeats; the other workers fail it and run its
parameters again.
"""

from __future__ import annotations

import sys
from pathlib import Path


def cmd_tune(args) -> None:
    from deeprecipe.cli.runs import family_of
    from deeprecipe.config import read_recipe
    from deeprecipe.core import UserError
    from deeprecipe.engine import tune as T
    from deeprecipe.engine.loop import train

    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials {args.trials}: give at least 1")
    if args.minutes is not None and args.minutes <= 0:
        raise UserError(f"--minutes {args.minutes}: give a positive number of minutes")
    overrides = list(args.set or [])
    if args.device:
        overrides.append(f"train.device={args.device}")
    raw, name = read_recipe(args.recipe)
    space = T.space_of(raw, list(args.param or []))
    T.check_space(raw, name, overrides, space)  # every path and bound, before any trial
    cfg = T.config_of(raw, name, overrides, {})
    family = family_of(cfg)
    metric = family.METRIC[0]
    if cfg.train.eval_every == 0 or cfg.train.eval_every >= cfg.train.steps:
        if args.pruner != "none":
            print(
                f"note: train.eval_every={cfg.train.eval_every} evaluates only at the end of a trial: nothing to "
                "prune from (set train.eval_every below train.steps)",
                file=sys.stderr,
            )
    out = Path(args.out or Path("runs") / f"tune-{Path(args.recipe).stem}")
    job = T.Tune(
        raw=raw,
        name=name,
        overrides=overrides,
        space=space,
        out=out,
        storage=args.storage or "",
        study=args.study or "",
        trials=args.trials if args.trials is not None else (10**9 if args.minutes else 20),
        minutes=args.minutes or 0.0,
        pruner=args.pruner,
        startup=args.prune_after,
        seed=args.seed,
        heartbeat=args.heartbeat,
    )
    T.make_pruner(job.pruner, job.startup)
    study = T.open_study(job, family)
    before = T.finished(study)
    if before:
        print(f"resuming study '{study.study_name}': {before} finished trials", file=sys.stderr)

    def say(info: T.TrialInfo) -> None:
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.params.items())
        value = f"val_{metric}={info.value:.4f}" if info.value is not None else info.error
        print(f"trial {info.number}: {info.state} at step {info.step}  {value}  {shown}", flush=True)

    try:
        T.tune(job, family, train, say, study=study)
    finally:  # also after Ctrl-C: what the study has so far
        best = T.write_best(study, out)
        report = T.write_report(study, out, metric)
        lines = T.summary(study, metric)
        print(lines[0])
        if len(lines) > 1 and lines[1].startswith("best"):
            print(lines[1])
        if best:
            print(f"best config: {best} (deeprecipe train {best})")
        print(f"tune folder: {out}\nreport: {report}")


def add_parsers(sub) -> None:
    s = sub.add_parser(
        "tune", help="search hyperparameters with Optuna (TPE, pruning); every trial a run folder; resumable"
    )
    s.add_argument("recipe", help="recipe name (see 'deeprecipe recipes') or YAML path (its tune: section adds params)")
    s.add_argument(
        "--param",
        action="append",
        metavar="KEY=SPEC",
        help="a dimension: optim.lr=log:1e-4:1e-2, model.dropout=0:0.5, train.batch_size=int:32:256, "
        "int:log:LO:HI, model.name=cnn,resnet",
    )
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field of every trial")
    s.add_argument("--trials", type=int, help="finished trials the study should have (default 20; counts resumed)")
    s.add_argument("--minutes", type=float, help="start no trial after this many minutes")
    s.add_argument("--pruner", choices=["median", "halving", "none"], default="median", help="default median")
    s.add_argument(
        "--prune-after", type=int, default=3, metavar="N", help="trials before the median pruner prunes (default 3)"
    )
    s.add_argument("--storage", help="database URL (default sqlite:///OUT/study.db), e.g. postgresql://host/db")
    s.add_argument("--study", help="study name (default the recipe's name)")
    s.add_argument("--out", help="tune folder (default runs/tune-<recipe>; the same folder resumes)")
    s.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler (default 0)")
    s.add_argument(
        "--heartbeat",
        type=int,
        default=30,
        metavar="SECONDS",
        help="a running trial's heartbeat interval; one silent for 3 beats is failed and run again (default 30)",
    )
    s.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    s.set_defaults(func=cmd_tune)
