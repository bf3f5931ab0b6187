"""The `check` and `lr-find` verbs: the training recipe as checks (deeprecipe/checks/), and a learning-rate range test.

check prints one line per check, writes plots/, checks.json and report.html into the run folder, and exits
with status 3 when a check fails (2 stays "a problem with the command or config", 1 "a crash").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FAILED_EXIT = 3


def _run_dir(kind: str, recipe: str, out: str | None) -> Path:
    from deeprecipe.engine.run import new_run_dir

    return new_run_dir(f"{kind}-{Path(recipe).stem}", out)


def _load(args):
    from deeprecipe.recipe import load

    overrides = list(args.set or [])
    if args.device:
        overrides.append(f"train.device={args.device}")
    return load(args.recipe, overrides)


def _names(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def cmd_check(args) -> None:
    from deeprecipe import api
    from deeprecipe.engine.device import pick_device

    cfg = _load(args)
    width = 11

    def show(v):
        if v.advice == "not selected":
            return
        print(
            f"{v.name:<{width}} {v.status.upper():<5} {v.seconds:5.1f}s  {v.measured}"
            + (f"  [expected {v.expected}]" if v.expected and v.status in ("warn", "fail") else "")
            + (f"\n{'':<{width + 15}}-> {v.advice}" if v.advice and v.status in ("warn", "fail") else ""),
            flush=True,
        )

    run_dir = _run_dir("check", args.recipe, args.out)
    device = pick_device(cfg.train.device)  # the device the checks' runtime picks
    print(f"checking {args.recipe} ({cfg.data.name}, {cfg.model.name}, task {cfg.task}) on {device}", flush=True)
    verdicts = api.check(
        cfg,
        out=run_dir,
        only=_names(args.only),
        skip=_names(args.skip),
        steps=args.steps,
        batch=args.batch,
        overfit_steps=args.overfit_steps,
        max_files=args.max_files,
        strict=args.strict,
        progress=show,
        debug=args.debug,
    )
    counts = {s: sum(v.status == s for v in verdicts) for s in ("pass", "warn", "fail", "skip")}
    print(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f"\nreport: {run_dir / 'report.html'}", flush=True)
    if counts["fail"] > 0 or (args.strict and counts["warn"] > 0):
        sys.exit(FAILED_EXIT)


def cmd_lr_find(args) -> None:
    from deeprecipe.checks import Ctx
    from deeprecipe.checks.lr_find import lr_range_test
    from deeprecipe.checks.plots import lr_curve
    from deeprecipe.cli.runs import family_of
    from deeprecipe.engine import optim

    cfg = _load(args)
    run_dir = _run_dir("lr-find", args.recipe, args.out)
    ctx = Ctx(cfg, run_dir, family_of(cfg), batch_size=args.batch or cfg.train.batch_size)
    ctx.cfg.optim.label_smoothing = cfg.optim.label_smoothing  # the loss the recipe trains with
    model = ctx.model()
    opt = optim.optimizer(model, cfg.optim)
    every = max(1, args.steps // 10)

    def progress(k: int, lr: float, loss: float) -> None:  # ten lines on stderr while it runs
        if k % every == 0 or k == args.steps:
            print(f"  step {k}/{args.steps}  lr {lr:.2e}  loss {loss:.4f}", file=sys.stderr, flush=True)

    print(
        f"lr-find {args.recipe}: {args.steps} steps, lr {args.start:g} to {args.end:g}, batch {ctx.batch_size}, "
        f"on {ctx.rt.device}",
        file=sys.stderr,
        flush=True,
    )
    r = lr_range_test(
        model, opt, ctx.train_batch, ctx.loss, args.start, args.end, args.steps, cfg.optim.clip, progress=progress
    )
    if not r.lrs:
        from deeprecipe.core import UserError

        raise UserError(f"the loss was not finite even at lr {args.start:g}: run 'deeprecipe check' first")
    path = run_dir / "plots" / "lr_find.png"
    lr_curve(r.lrs, r.losses, r.suggestion, path)
    (run_dir / "lr_find.json").write_text(
        json.dumps(
            {
                "lrs": r.lrs,
                "losses": r.losses,
                "suggestion": r.suggestion,
                "best_lr": r.best_lr,
                "steepest_lr": r.steepest_lr,
            }
        )
    )
    print(
        f"loss lowest at lr {r.best_lr:.3g}, steepest fall at lr {r.steepest_lr:.3g}"
        + (f" (still falling at {args.end:g}: try a larger --end)" if r.best_lr >= r.lrs[-1] else "")
    )
    print(f"suggested: --set optim.lr={r.suggestion:.2g}   (recipe has {cfg.optim.lr:g})\nplot: {path}")


def add_parsers(sub) -> None:
    s = sub.add_parser("check", help="run the training recipe's checks on a recipe (exit 3 when one fails)")
    s.add_argument("recipe", help="recipe name (see 'deeprecipe recipes') or YAML path")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    s.add_argument("--out", help="run folder (default runs/check-<recipe>-<time>)")
    s.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    s.add_argument("--only", help="comma-separated checks to run")
    s.add_argument("--skip", help="comma-separated checks to leave out")
    s.add_argument("--steps", type=int, help="length of the short training runs (default 50, or the task's)")
    s.add_argument(
        "--batch", type=int, help="batch size of the short runs, at most the recipe's (default 32, or the task's)"
    )
    s.add_argument(
        "--overfit-steps", type=int, help="step budget to memorize a tiny batch (default 200, or the task's)"
    )
    s.add_argument("--max-files", type=int, default=2000, help="decode at most this many files (an even sample)")
    s.add_argument("--strict", action="store_true", help="warnings fail too")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("lr-find", help="learning-rate range test on a copy of the model; plot and suggested lr")
    s.add_argument("recipe", help="recipe name (see 'deeprecipe recipes') or YAML path")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    s.add_argument("--out", help="run folder (default runs/lr-find-<recipe>-<time>)")
    s.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    s.add_argument("--start", type=float, default=1e-6, help="lowest learning rate, the first step's (default 1e-6)")
    s.add_argument("--end", type=float, default=1.0, help="highest learning rate, the last step's (default 1)")
    s.add_argument("--steps", type=int, default=100, help="steps from --start to --end, lr raised exponentially")
    s.add_argument("--batch", type=int, default=0, help="batch size (default the recipe's)")
    s.set_defaults(func=cmd_lr_find)
