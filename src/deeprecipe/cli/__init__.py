"""The `deeprecipe` command: one verb per job. Errors a user can fix print one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import warnings
from pathlib import Path

from deeprecipe.cli.runs import add_run_args, load_run_api, open_run
from deeprecipe.core import UserError, one_line

# modules of this package that add verbs: each defines add_parsers(subparsers) and imports nothing heavy at module
# level (torch and the families are imported by its cmd functions), so building the parser stays light
VERB_MODULES: list[str] = [
    "deeprecipe.cli.check",
    "deeprecipe.cli.serve",
    "deeprecipe.cli.tune",
    "deeprecipe.cli.translate",
    "deeprecipe.cli.drive",
    "deeprecipe.cli.robust",
]

# ------------------------------------------------------------------------------------------ verbs


def cmd_recipes(args) -> None:
    from deeprecipe import api

    recipes = api.recipes()
    width = max(map(len, recipes), default=0)
    for name, desc in recipes.items():
        print(f"{name:<{width}}  {desc}")


def cmd_train(args) -> None:
    from deeprecipe import api

    overrides = list(args.set or [])
    flags = {"init_from": args.init_from, "freeze": args.freeze, "head_lr": args.head_lr}
    flags |= {"backbone_lr": args.backbone_lr, "unfreeze_after": args.unfreeze_after}
    overrides += [f"finetune.{k}={v}" for k, v in flags.items() if v is not None]  # shortcuts for the section
    if args.resume and args.init_from:
        raise UserError(
            "--init-from starts a new run and --resume continues one (it keeps its fine-tuning plan): use one"
        )
    command = shlex.join(["deeprecipe", *args.argv])
    run = api.train(
        args.resume or args.recipe, overrides, args.out, args.device, resume=bool(args.resume), command=command
    )
    shown = {k: v for k, v in run.final.items() if isinstance(v, (int, float))}
    print(f"weights: {run.weights.text}")
    print(" ".join(f"{k}={v:.4f}" for k, v in shown.items()))  # every key names its split: val_acc, test_acc
    print(f"run folder: {run.dir}\nreport: {run.dir / 'report.html'}")


def cmd_eval(args) -> None:
    from deeprecipe.engine.plots import confusion

    if args.shift or args.attack or args.eps:  # robustness under shift and attack (cli/robust.py)
        from deeprecipe.cli.robust import eval_robust, robust_options

        robust_options(args)  # bad flags fail in one line before the run loads
        cfg, spec, model, rt, family = open_run(args.run, args.device)
        data = cfg.data.build()
        for name in ("train", "val", "test"):
            s = getattr(data, name)
            if s is not None:
                s.to(rt.device)
        split = args.split or data.final_split()
        return eval_robust(args, cfg, model, rt, family, data, split)
    run = load_run_api(args.run, args.device)
    out = run.evaluate(args.split)
    split, spec = out.pop("split"), run.spec
    if args.json:
        about = run.weights
        print(json.dumps(out | {"split": split, "weights": about.text, "step": about.step}))
        return
    for k, v in out.items():
        if isinstance(v, (int, float)):
            print(f"{split}_{k}: {v:.4f}")
    if "precision" in out:
        names = spec.class_names
        w = max(len(n) for n in names)
        print(f"{'class':<{w}}  precision  recall")
        for n, p, r in zip(names, out["precision"], out["recall"]):
            print(f"{n:<{w}}  {p:9.3f}  {r:6.3f}")
    if "confusion" in out:
        path = Path(args.run) / "plots" / f"confusion_{split}.png"
        confusion(out["confusion"], spec.class_names, path, f"{split} confusion matrix")
        print(f"confusion matrix: {path}")


def cmd_predict(args) -> None:
    """Predict every file; a file that cannot be used is reported (error: ...) and the others go on, with a
    non-zero exit at the end."""
    run = load_run_api(args.run, args.device, args.precision)
    files, results, failed = [Path(f) for f in args.files], [], 0  # Paths: a missing file is no text to classify
    errors = "raise" if len(files) == 1 else "record"
    for r in run.predict(files, top=args.top, out=args.out, errors=errors, stream=True):
        results.append(r)
        if "error" in r:
            failed += 1
            print(f"error: {r['error']}", file=sys.stderr)
        elif not args.json:
            print(r.get("text") or json.dumps(r), flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
    if failed:
        raise UserError(f"{failed} of {len(files)} files could not be predicted (named above); the others were")


def cmd_explain(args) -> None:
    """Explain a run's predictions on files (the family's explain hook): an overlay per file, and with --sanity
    the parameter-randomisation check of the method (exit 3 when it flags the attributions as uninformative)."""
    from deeprecipe.engine.explain import METHODS
    from deeprecipe.family import ExplainOptions

    if args.method and args.method not in METHODS:
        raise UserError(f"explain --method {args.method}: unknown method; choose one of {', '.join(METHODS)}")
    cfg, spec, model, rt, family = open_run(args.run, args.device, args.precision)
    opts = ExplainOptions(method=args.method or "", target=args.target, out=Path(args.out) if args.out else None)
    opts.sanity = args.sanity
    results = family.explain(model, spec, cfg, rt, list(args.files), opts)
    flagged = 0
    for r in results:
        if not args.json:
            print(r["text"], flush=True)
        s = r.get("sanity")
        if s:
            flagged += s["verdict"] == "uninformative"
            if not args.json:
                print(
                    f"  sanity: {s['verdict']} (rank correlation {s['final']:.3f} with every layer randomised, "
                    f"uninformative above {s['threshold']}; distance to untrained maps {s['ratio']:.2f}x theirs, "
                    f"uninformative at or below 1) -> {r['sanity_plot']}",
                    flush=True,
                )
    if args.json:
        plain = (str, int, float, list, dict)  # the map itself stays out (it is in the overlay)
        print(json.dumps([{k: v for k, v in r.items() if isinstance(v, plain)} for r in results]))
    if flagged:
        n = f"{flagged} of {len(results)}"
        print(f"sanity check failed: {n} explanations are uninformative (see each file's sanity line)", file=sys.stderr)
        sys.exit(3)


def cmd_sample(args) -> None:
    """Generate from a trained run: text from a language model, images from a GAN (the family's sample hook)."""
    if not 0 <= args.seed < 2**64:  # checked before the model loads (the API checks it again)
        raise UserError(f"--seed {args.seed}: must be in 0 .. 2**64 - 1")
    run = load_run_api(args.run, args.device)
    pieces = run.sample(
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        n=args.n,
        seed=args.seed,
        out=args.out,
        stream=True,
    )
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()


def cmd_runs(args) -> None:
    from deeprecipe.engine.run import read_status

    root = Path(args.dir)
    found = sorted(p.parent for p in root.glob("*/config.yaml"))
    if not found:
        print(f"no runs under {root}/")
        return
    for p in found:
        s = read_status(p)
        best = {k: v for k, v in (s.get("best") or {}).items() if isinstance(v, (int, float))}
        best_s = " ".join(f"best {s.get('best_split', 'val')}_{k}={v:.4f}" for k, v in best.items())
        if best_s and s.get("best_step") is not None:
            best_s += f" @ step {s['best_step']}"
        print(f"{str(p):<48} {s.get('status', '?'):<8} step {s.get('step', '?'):<7} {best_s}")


def cmd_data(args) -> None:
    import torch

    from deeprecipe.engine import plots
    from deeprecipe.recipe import load

    cfg = load(args.recipe, args.set or [])
    data = cfg.data.build()
    spec = data.spec
    print(f"data set: {cfg.data.name}")
    for name in ("train", "val", "test"):
        s = getattr(data, name)
        print(f"  {name}: {len(s) if s is not None else 0} examples")
    if spec.num_classes and hasattr(data.train, "tensors"):
        y = data.train.tensors[-1]
        if y.ndim == 1:
            counts = torch.bincount(y, minlength=spec.num_classes).tolist()
            print("  class balance (train): " + ", ".join(f"{n}={c}" for n, c in zip(spec.class_names, counts)))
    if spec.image_size != (0, 0):
        print(f"  images: {spec.in_channels} x {spec.image_size[0]} x {spec.image_size[1]}")
        idx = torch.arange(min(32, len(data.train)))
        x, y = data.train.take(idx)[:2]
        names = spec.class_names
        caps = [names[int(v)] if names and y.ndim == 1 else "" for v in y] if y.ndim == 1 else None
        out = Path(args.out or f"data-{cfg.data.name}.png")
        imgs = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if imgs.ndim == 5:  # video (N, C, T, H, W): show the first frame
            imgs = imgs[:, :, 0]
        plots.image_grid(imgs.cpu(), caps, out, f"{cfg.data.name}: first training examples")
        print(f"  grid: {out}")


# ------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deeprecipe", description="Train, check, evaluate, export and serve the classic deep-learning systems."
    )
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.add_argument("--version", action="version", version=f"deeprecipe {_version()}")
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("recipes", help="list the built-in recipes")
    s.set_defaults(func=cmd_recipes)

    s = sub.add_parser("train", help="train a recipe (name or YAML path); --resume RUN continues a run exactly")
    s.add_argument("recipe", nargs="?", help="recipe name (see 'deeprecipe recipes') or YAML path")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. optim.lr=1e-3")
    s.add_argument("--out", help="run folder (default runs/<recipe>-<time>)")
    s.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    s.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    ft = "fine-tuning (sets the config section finetune): "
    s.add_argument("--init-from", metavar="RUN_OR_FILE", help=ft + "start from these weights")
    s.add_argument("--freeze", help=ft + "'backbone', or a layer name to freeze up to")
    s.add_argument("--head-lr", type=float, help=ft + "lr multiplier of the new head (default 1)")
    s.add_argument("--backbone-lr", type=float, help=ft + "lr multiplier of the rest (default 1)")
    s.add_argument(
        "--unfreeze-after", type=int, metavar="N", help=ft + "unfreeze frozen layers one every N steps, head first"
    )
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="evaluate a run's model (its best weights) on its test split")
    add_run_args(s)
    s.add_argument("--split", choices=["train", "val", "test"], help="split to evaluate (default test, else val)")
    s.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    s.add_argument("--shift", help="image shifts, e.g. fog,night,blur,noise,jpeg,brightness: the metric per severity")
    s.add_argument("--severity", default="1,2,3,4,5", help="severities of --shift, 1..5 (default 1,2,3,4,5)")
    s.add_argument("--attack", choices=["fgsm", "pgd"], help="adversarial attack in pixel space (needs --eps)")
    s.add_argument("--eps", help="attack radii in pixel levels of 1/255, e.g. 2,8 or 2/255,8/255")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("predict", help="run a trained model on files")
    add_run_args(s, precision="fp32")  # fp32 by default, as serve answers
    s.add_argument("files", nargs="+", help="input files (images, videos or text files, as the task takes)")
    s.add_argument("--top", type=int, default=3, help="how many labels to show, most probable first (default 3)")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.add_argument("--out", help="folder for output files (segmentation masks, ...)")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("explain", help="explain a run's predictions on files: attribution overlays (Captum)")
    add_run_args(s, precision="fp32")
    s.add_argument("files", nargs="+", help="input files: images, or text files (texts, prompts, sentences)")
    s.add_argument("--method", help="ig | gradcam | occlusion (images), ig (text), attention (translation)")
    s.add_argument("--target", type=int, help="class index (a language model: token id); default: the predicted one")
    s.add_argument("--out", help="folder for the overlays (default: next to each input file)")
    s.add_argument(
        "--sanity", action="store_true", help="check that the attributions change with the weights randomised"
    )
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.set_defaults(func=cmd_explain)

    s = sub.add_parser("sample", help="generate from a run: text (language models) or images (GANs)")
    add_run_args(s)
    s.add_argument("--prompt", default="", help="text to continue (language models)")
    s.add_argument("--max-tokens", type=int, default=500, help="tokens to generate (language models; default 500)")
    s.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    s.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: all)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this probability")
    s.add_argument("--n", type=int, default=64, help="how many images (GANs)")
    s.add_argument("--seed", type=int, default=0, help="random seed (the same seed, the same sample)")
    s.add_argument("--out", help="output folder or file (GAN grids and images)")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("runs", help="list runs with their status and best metric")
    s.add_argument("--dir", default="runs", help="folder holding the run folders (default runs)")
    s.set_defaults(func=cmd_runs)

    s = sub.add_parser("data", help="a data set's sizes, class balance and a grid of examples")
    s.add_argument("recipe", nargs="?", default="digits-cnn", help="recipe name or YAML path (default digits-cnn)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. data.path=...")
    s.add_argument("--out", help="PNG path of the example grid")
    s.set_defaults(func=cmd_data)

    for mod in VERB_MODULES:
        importlib.import_module(mod).add_parsers(sub)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deeprecipe")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = [str(a) for a in argv]  # the exact command, for commands.txt and the report
    warnings.showwarning = _note
    try:
        args.func(args)
        return 0
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings of deeprecipe's own code are notes for the user: one line on stderr, no source location."""
    if str(filename).startswith(str(Path(__file__).parents[1])):
        print(f"note: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


if __name__ == "__main__":
    sys.exit(main())
