"""Does pretraining pay for a language model? A char GPT pretrained on tinyshakespeare, fine-tuned on another
text (English image captions from Multi30k's training side), against the same GPT trained from scratch on that
text for the same steps. Both arms share the pretrained run's character vocabulary (data.tokenizer_from), so the
only difference is the starting weights. Reported: validation loss (nats per character) on the captions'
held-out tail.

    python bench/finetune_text.py [--pretrained RUN] [--chars 200000] [--steps 300]

Without --pretrained, the shakespeare-char-gpt recipe is trained first (--pretrain-steps). Characters of the
captions that Shakespeare lacks are dropped (their count is printed).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shlex
import shutil
import sys
from pathlib import Path

from _budget import cli_train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", default="", help="a shakespeare-char-gpt run folder (else one is trained)")
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--chars", type=int, default=200_000, help="characters of caption text to fine-tune on")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="runs/bench-finetune-text")
    a = ap.parse_args()
    root = Path(os.environ.get("DEEPRECIPE_DATA", "../shared/data"))
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)
    print(f"machine: {platform.node()}: {os.cpu_count()} CPUs ({cpu}), load {os.getloadavg()[0]:.2f}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pre = Path(a.pretrained) if a.pretrained else out / "pretrain-shakespeare"
    if not (pre / "checkpoints").is_dir():
        print("pretraining on tinyshakespeare:")
        m, dt = cli_train(["shakespeare-char-gpt", "--out", str(pre), "--set", f"train.steps={a.pretrain_steps}"])
        print(f"  shakespeare val loss {m.get('val_loss', float('nan')):.4f} ({dt:.0f} s)")
    chars = set(json.loads((pre / "spec.json").read_text())["extra"]["tokenizer"]["chars"])
    with gzip.open(root / "multi30k" / "train.en.gz", "rt", encoding="utf-8") as f:
        raw = f.read(a.chars)
    text = "".join(c for c in raw if c in chars)
    corpus = out / "captions.txt"
    corpus.write_text(text)
    print(f"captions: {len(text):,} characters ({len(raw) - len(text)} outside Shakespeare's vocabulary dropped)")
    common = ["--set", f"data.path={corpus.resolve()}", "--set", f"data.tokenizer_from={pre.resolve()}"]
    common += ["--set", f"train.steps={a.steps}", "--set", "train.eval_every=0", "--set", "data.cache=" + str(out)]
    arms = {
        "scratch": ["--set", "optim.lr=0.002"],
        "fine-tuned": ["--init-from", str(pre), "--set", "optim.lr=0.0005", "--set", "optim.warmup=20"],
    }
    res = {}
    for name, extra in arms.items():
        run = out / name
        shutil.rmtree(run, ignore_errors=True)
        m, dt = cli_train(["shakespeare-char-gpt", "--out", str(run), *common, *extra])
        res[name] = m["val_loss"]
        print(f"    {name}: caption val loss {m['val_loss']:.4f} ({dt:.0f} s)", flush=True)
    print(
        f"\nchar GPT (recipe shakespeare-char-gpt), {a.steps} steps on {len(text):,} caption characters: "
        f"scratch {res['scratch']:.4f}, fine-tuned {res['fine-tuned']:.4f} nats/char "
        f"({res['scratch'] - res['fine-tuned']:+.4f} for fine-tuning)"
    )


if __name__ == "__main__":
    main()
