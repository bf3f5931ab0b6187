"""The `check` and `lr-find` verbs: the training recipe as checks (deeprecipe/checks/), and a learning-rate range test.

check prints one line per check, writes plots/, checks.json and report.html into the run folder, and exits
with status 3 when a check fails (2 stays "a problem with the command or config", 1 "a crash").
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

FAILED_EXIT = 3
COLORS = {"pass": "#2e7d32", "warn": "#ef6c00", "fail": "#c62828", "skip": "#777"}


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


def write_page(run_dir: Path, title: str, verdicts: list, cfg_text: str) -> Path:
    from deeprecipe.engine.atomic import atomic_text

    rows = "".join(
        f"<tr><td>{html.escape(v.name)}</td><td style='color:{COLORS.get(v.status, '#000')};font-weight:bold'>"
        f"{v.status}</td><td>{html.escape(v.measured)}</td><td>{html.escape(v.expected)}</td>"
        f"<td>{html.escape(v.advice)}</td><td>{v.seconds:.1f}s</td></tr>"
        for v in verdicts
    )
    figs = "".join(
        f"<h3>{html.escape(v.name)}: {html.escape(p)}</h3>"
        + (
            f"<img src='{html.escape(p)}'>"
            if p.endswith(".png")
            else f"<pre>{html.escape((run_dir / p).read_text()[:5000])}</pre>"
        )
        for v in verdicts
        for p in v.plots
    )
    page = (
        "<!doctype html><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;"
        "vertical-align:top}img{max-width:100%;border:1px solid #eee}pre{background:#f6f6f6;padding:8px}</style>"
        f"<h1>{html.escape(title)}</h1><table><tr><th>check</th><th>verdict</th><th>measured</th>"
        f"<th>expected</th><th>advice</th><th>time</th></tr>{rows}</table><h2>Plots</h2>{figs}"
        f"<h2>Config</h2><pre>{html.escape(cfg_text)}</pre>"
    )
    atomic_text(run_dir / "report.html", page)
    return run_dir / "report.html"


def cmd_check(args) -> None:
    from dataclasses import asdict

    from deeprecipe.checks import CHECKS, Ctx, run_checks
    from deeprecipe.cli import family_of
    from deeprecipe.config import dump
    from deeprecipe.core import UserError
    from deeprecipe.engine.atomic import atomic_text

    cfg = _load(args)
    family = family_of(cfg)
    known = [*CHECKS, *family.EXTRA_CHECKS]
    for name in _names(args.only) + _names(args.skip):
        if name not in known:
            raise UserError(f"unknown check '{name}': the checks are {', '.join(known)}")
    run_dir = _run_dir("check", args.recipe, args.out)
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    atomic_text(run_dir / "config.yaml", dump(cfg))
    ctx = Ctx(
        cfg,
        run_dir,
        family,
        steps=args.steps,
        batch_size=args.batch,
        overfit_steps=args.overfit_steps,
        max_files=args.max_files,
    )
    ctx.debug = args.debug
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

    print(f"checking {args.recipe} ({cfg.data.name}, {cfg.model.name}, task {cfg.task}) on {ctx.rt.device}", flush=True)
    verdicts = run_checks(ctx, _names(args.only), _names(args.skip), progress=show)
    counts = {s: sum(v.status == s for v in verdicts) for s in ("pass", "warn", "fail", "skip")}
    failed = counts["fail"] > 0 or (args.strict and counts["warn"] > 0)
    atomic_text(run_dir / "checks.json", json.dumps([asdict(v) for v in verdicts], indent=1))
    atomic_text(
        run_dir / "status.json",
        json.dumps(
            {
                "status": "check failed" if failed else "check passed",
                "recipe": cfg.recipe,
                "task": cfg.task,
                "counts": counts,
            }
        ),
    )
    page = write_page(run_dir, f"deeprecipe check {cfg.recipe}", verdicts, dump(cfg))
    print(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f"\nreport: {page}", flush=True)
    if failed:
        sys.exit(FAILED_EXIT)


def cmd_lr_find(args) -> None:
    from deeprecipe.checks import Ctx
    from deeprecipe.checks.lr_find import lr_range_test
    from deeprecipe.checks.plots import lr_curve
    from deeprecipe.cli import family_of
    from deeprecipe.engine import optim

    cfg = _load(args)
    run_dir = _run_dir("lr-find", args.recipe, args.out)
    ctx = Ctx(cfg, run_dir, family_of(cfg), batch_size=args.batch or cfg.train.batch_size)
    ctx.cfg.optim.label_smoothing = cfg.optim.label_smoothing  # the loss the recipe trains with
    model = ctx.model()
    opt = optim.adamw(model, cfg.optim)
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
