"""`deeprecipe translate RUN`: translate sentences given as arguments, in a file (one per line) or on stdin.

With --ref, the translations are also scored against reference lines (BLEU and chrF, sacreBLEU)."""

from __future__ import annotations

import sys
from pathlib import Path

from deeprecipe.cli.runs import add_run_args, open_run
from deeprecipe.core import UserError


def cmd_translate(args) -> None:
    from deeprecipe.data.pairs import read_lines
    from deeprecipe.families import translate

    cfg, spec, model, rt, _ = open_run(args.run, args.device, task="translate")
    if args.sentences:
        lines = list(args.sentences)
    elif args.file:
        lines = read_lines(Path(args.file))
    else:
        lines = sys.stdin.read().splitlines()
    if not lines:
        raise UserError("nothing to translate: give sentences, --file FILE, or lines on stdin")
    beam = args.beam if args.beam is not None else getattr(cfg.model, "beam", 4)
    alpha = args.length_penalty if args.length_penalty is not None else getattr(cfg.model, "length_penalty", 0.6)
    out = translate.translate_lines(model, spec, lines, rt, beam, alpha)
    for line in out:
        print(line)
    if args.ref:
        refs = read_lines(Path(args.ref))
        if len(refs) != len(out):
            raise UserError(f"--ref {args.ref} has {len(refs)} lines but there are {len(out)} sentences")
        s = translate.scores(out, refs)
        print(f"BLEU {s['bleu']:.2f}  chrF {s['chrf']:.2f}  (sacreBLEU, beam {beam})", file=sys.stderr)


def add_parsers(sub) -> None:
    s = sub.add_parser("translate", help="translate sentences with a trained translation run")
    add_run_args(s, run="a translation run folder")
    s.add_argument("sentences", nargs="*", help="sentences to translate (default: --file, else stdin)")
    s.add_argument("--file", help="a text file, one sentence per line (.gz ok)")
    s.add_argument("--ref", help="reference translations, one per line: print BLEU and chrF to stderr")
    s.add_argument("--beam", type=int, help="beam width (1: greedy; default: the run's model.beam)")
    s.add_argument("--length-penalty", type=float, help="GNMT length penalty alpha (default: model.length_penalty)")
    s.set_defaults(func=cmd_translate)
