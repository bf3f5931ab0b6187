"""After deployment: `eval --shift/--attack` (robustness, engine/robust.py), `embed` (a map of the penultimate
features and their k-NN accuracy, engine/embed.py) and `monitor` (drift of a folder of new images against the
run's reference statistics, engine/drift.py). Nothing heavy is imported until a verb runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from deeprecipe.core import UserError


def _severities(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"--severity {text}: give severities 1..5 separated by commas, e.g. 1,3,5") from None
    if not out or not all(1 <= s <= 5 for s in out):
        raise UserError(f"--severity {text}: severities are 1..5")
    return out


def robust_options(args) -> tuple[list[str], tuple[int, ...], list[str], list[float]]:
    """(shifts, severities, attacks, eps) of `eval --shift/--severity/--attack/--eps`, checked: a bad flag is one
    line."""
    from deeprecipe.engine import robust

    shifts = robust.check_shifts([s.strip() for s in args.shift.split(",")]) if args.shift else []
    severities = _severities(args.severity)
    if args.attack and not args.eps:
        raise UserError(f"--attack {args.attack} needs --eps, e.g. --eps 2,8 (pixel levels of 1/255)")
    if args.eps and not args.attack:
        raise UserError("--eps is the radius of an --attack (fgsm or pgd): name the attack")
    eps = robust.parse_eps(args.eps) if args.eps else []
    return shifts, severities, [args.attack] if args.attack else [], eps


def eval_robust(args, cfg, model, rt, family, data, split: str) -> None:
    """`deeprecipe eval RUN --shift ... --attack ... --eps ...`: the table printed (or JSON), robustness.json,
    plots/robustness.png and the report's section."""
    from deeprecipe.engine import robust
    from deeprecipe.engine.report import write_report

    shifts, severities, attacks, eps = robust_options(args)
    r = robust.robustness(family, model, data, cfg, rt, split, shifts, severities, attacks, eps)
    paths = robust.save(r, Path(args.run))
    write_report(Path(args.run))
    if args.json:
        print(json.dumps(r))
        return
    print("\n".join(robust.table(r)))
    print(f"table: {paths['json']}\nplot: {paths['plot']}")


def cmd_embed(args) -> None:
    from deeprecipe.cli.runs import open_run
    from deeprecipe.engine.embed import embed
    from deeprecipe.engine.report import write_report

    if args.points < 10:
        raise UserError(f"--points {args.points}: t-SNE needs at least 10 points")
    cfg, spec, model, rt, family = open_run(args.run, args.device)
    data = cfg.data.build()
    for s in (data.train, data.val, data.test):
        if s is not None:
            s.to(rt.device)
    split = args.split or data.final_split()
    r = embed(family, model, data, cfg, rt, Path(args.run), split, args.points, args.k)
    write_report(Path(args.run))
    print(f"{r['k']}-NN accuracy of the {split} penultimate features: {r['knn_acc']:.4f} (chance {r['chance']:.4f})")
    print(f"map: {Path(args.run) / 'plots' / 'embedding.png'}")


class FolderImages:
    """A folder's image files as a sequence of uint8 images (C, H, W) made as `predict` makes them, each read when
    a window asks for it: memory holds one window, however many files the folder has."""

    def __init__(self, files: list[Path], spec):
        self.files, self.spec = files, spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from deeprecipe.data import image_ops

        return image_ops.for_model(image_ops.read(self.files[i], self.spec.in_channels), self.spec)


def cmd_monitor(args) -> None:
    """Score a folder of new images for drift, window by window; exit 3 when a window drifts."""
    from deeprecipe.cli.runs import open_run
    from deeprecipe.data import image_ops
    from deeprecipe.engine import drift
    from deeprecipe.engine.report import write_report

    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"monitor: {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in image_ops.EXTS)
    if not files:
        raise UserError(f"monitor: no images in {folder} (looked for {', '.join(sorted(image_ops.EXTS))})")
    if len(files) < 10:
        raise UserError(f"monitor: {len(files)} images in {folder}; a two-sample test needs at least 10")
    if args.window < 10:
        raise UserError(f"--window {args.window}: at least 10 images per window for a two-sample test")
    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha {args.alpha}: a significance level in (0, 1), e.g. 0.01")
    drift.load_reference(Path(args.run))  # a run without reference statistics fails before the model loads
    cfg, spec, model, rt, family = open_run(args.run, args.device)
    images = FolderImages(files, spec)
    results = drift.monitor(family, model, spec, cfg, rt, Path(args.run), images, args.window, args.alpha)
    for r in results:
        r["files"] = [str(files[r["first"]]), str(files[r["last"]])]
    drift.save_monitor(results, Path(args.run), str(folder), args.alpha)
    write_report(Path(args.run))
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{'window':<8} {'images':>6} {'MMD^2':>8} {'p feat':>7} {'p input':>7} {'p class':>7}  files")
        for i, r in enumerate(results):
            pc = "-" if r["p_classes"] is None else f"{r['p_classes']:.4f}"
            print(
                f"{i:<8} {r['n']:>6} {r['mmd2']:>8.4f} {r['p_features']:>7.4f} {r['p_inputs']:>7.4f} {pc:>7}  "
                f"{Path(r['files'][0]).name} .. {Path(r['files'][1]).name}" + ("  DRIFT" if r["drift"] else "")
            )
    bad = [i for i, r in enumerate(results) if r["drift"]]
    if bad:
        print(
            f"warning: drift in {len(bad)} of {len(results)} windows ({', '.join(map(str, bad))}): a p-value below "
            f"{args.alpha}/3",
            file=sys.stderr,
        )
        sys.exit(3)


def add_parsers(sub) -> None:
    from deeprecipe.cli.runs import add_run_args

    s = sub.add_parser("embed", help="t-SNE map of a classifier's penultimate features and their k-NN accuracy")
    add_run_args(s)
    s.add_argument("--split", choices=["val", "test"], help="split to map (default test, else val)")
    s.add_argument("--points", type=int, default=2000, help="examples of the split to map (default 2000)")
    s.add_argument("--k", type=int, default=5, help="neighbours of the k-NN classifier (default 5)")
    s.set_defaults(func=cmd_embed)

    s = sub.add_parser("monitor", help="drift of a folder of new images against the run's reference (exit 3: drift)")
    add_run_args(s)
    s.add_argument("folder", help="folder of new images (scored in file-name order, window by window)")
    s.add_argument("--window", type=int, default=64, help="images per window (default 64)")
    s.add_argument("--alpha", type=float, default=0.01, help="significance level of a window (default 0.01)")
    s.add_argument("--json", action="store_true", help="print the windows as JSON")
    s.set_defaults(func=cmd_monitor)
