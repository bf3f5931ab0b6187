"""Parallel text for translation: two line-aligned files (line i of one translates line i of the other; .gz
read as is) or one TSV file (source<TAB>target per line), with byte-level BPE vocabularies trained locally.

Files of a split are found as `{path}/{split}.{lang}` (or `.gz`), or `{path}/{split}` as a TSV file. The
tokenizers (shared by both languages, or one per language) travel in `DataSpec.extra` with the ids of the
special tokens, so translating needs nothing but the run folder.

Training batches are length-bucketed: each epoch (seeded by (seed, epoch)) shuffles the pairs, sorts pools of
50 batches by length, cuts them into batches and shuffles the batches. The batch of step s is thus a pure
function of (seed, s), as data/core.py requires, and padding is a small part of each batch.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import torch

from deeprecipe.config import ranged
from deeprecipe.data.core import Data, DataError, DataSpec, to_device
from deeprecipe.data.text import BPETokenizer, resolve_path

SPECIAL = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 in every vocabulary trained here
PAD, BOS, EOS = 0, 1, 2


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (gzip when it ends in .gz), without their line ends."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path}: binary data (a NUL byte at byte {nul}); expected UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); convert it, e.g. with iconv -t utf-8") from None
    return text.rstrip("\n").split("\n")


def read_pairs(folder: Path, split: str, src: str, tgt: str) -> tuple[list[str], list[str]]:
    """(sources, targets) of a split: two line-aligned files or a TSV file."""

    def find(name: str) -> Path | None:
        for p in (folder / name, folder / f"{name}.gz"):
            if p.is_file():
                return p
        return None

    a, b = find(f"{split}.{src}"), find(f"{split}.{tgt}")
    if a and b:
        sa, sb = read_lines(a), read_lines(b)
        if len(sa) != len(sb):
            raise DataError(
                f"parallel files differ in length: {a} has {len(sa)} lines, {b} has {len(sb)}; "
                "line i of one must translate line i of the other"
            )
        return [s.strip() for s in sa], [s.strip() for s in sb]
    tsv = find(split) or find(f"{split}.tsv")
    if tsv is None:
        raise DataError(
            f"split '{split}': found neither {folder}/{split}.{src} + .{tgt} (or .gz) nor a TSV {folder}/{split}[.tsv]"
        )
    sa, sb = [], []
    for i, line in enumerate(read_lines(tsv), 1):
        if "\t" not in line:
            raise DataError(f"{tsv}:{i}: no tab; a TSV line is source<TAB>target")
        s, t = line.split("\t", 2)[:2]
        sa.append(s.strip())
        sb.append(t.strip())
    return sa, sb


class PairSplit:
    """Tokenized pairs; take() pads examples in order (evaluation), step_batch() draws length buckets (training).

    A batch is (src (B, S), tgt (B, T)) padded with PAD; tgt is <s> target </s>."""

    def __init__(self, src: list[list[int]], tgt: list[list[int]], refs: list[str], sources: list[str]):
        self.src, self.tgt, self.refs, self.sources = src, tgt, refs, sources
        self.lengths = torch.tensor([len(s) + len(t) for s, t in zip(src, tgt)])
        self.device = torch.device("cpu")
        self._epoch: tuple | None = None  # (seed, epoch, batch) -> its batches, cached

    def __len__(self) -> int:
        return len(self.src)

    def to(self, device) -> PairSplit:
        self.device = torch.device(device)
        return self

    def take(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        idx = [int(i) for i in idx]
        return pad([self.src[i] for i in idx], self.device), pad([self.tgt[i] for i in idx], self.device)

    def epoch_batches(self, seed: int, epoch: int, batch: int) -> list[torch.Tensor]:
        if self._epoch is None or self._epoch[0] != (seed, epoch, batch):
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            nb = max(1, len(self) // batch)
            perm = torch.randperm(len(self), generator=g)[: nb * batch]
            pool = 50 * batch
            chunks = [c[self.lengths[c].argsort(stable=True)] for c in perm.split(pool)]
            batches = list(torch.cat(chunks).split(batch))
            order = torch.randperm(len(batches), generator=g).tolist()
            self._epoch = ((seed, epoch, batch), [batches[i] for i in order])
        return self._epoch[1]

    def step_batch(self, seed: int, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        nb = max(1, len(self) // batch)
        epoch, i = divmod(step, nb)
        return self.take(self.epoch_batches(seed, epoch, batch)[i])


def pad(seqs: list[list[int]], device) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return to_device(out, torch.device(device))


@dataclass
class PairsData:
    """Parallel text: line-aligned file pairs or TSV files, split into train / val / test."""

    name: str = "pairs"
    path: str = ""  # folder of the files; $VARS expanded; relative paths also tried under $DEEPRECIPE_DATA
    src_lang: str = "en"  # file suffix of the source language
    tgt_lang: str = "de"  # file suffix of the target language
    train: str = "train"  # split file stems: {path}/{train}.{src_lang}[.gz] and .{tgt_lang}, or a TSV {path}/{train}
    val: str = "val"
    test: str = ""  # "": no test split
    shared_vocab: bool = True  # one BPE vocabulary for both languages (lets the model tie all embeddings)
    vocab_size: int = 8000  # BPE vocabulary size (per language when not shared)
    max_len: int = ranged(100, "> 0")  # training pairs longer than this many tokens (either side) are dropped

    def build(self) -> Data:
        folder = resolve_path(self.path)
        if folder.is_file():
            folder = folder.parent
        tr_src, tr_tgt = read_pairs(folder, self.train, self.src_lang, self.tgt_lang)
        if self.shared_vocab:
            src_tok = tgt_tok = BPETokenizer.train(iter(tr_src + tr_tgt), self.vocab_size, SPECIAL)
        else:
            src_tok = BPETokenizer.train(iter(tr_src), self.vocab_size, SPECIAL)
            tgt_tok = BPETokenizer.train(iter(tr_tgt), self.vocab_size, SPECIAL)

        def encode(src: list[str], tgt: list[str], drop_long: bool) -> PairSplit:
            s_ids = src_tok.encode_batch(src)
            t_ids = [[BOS, *t, EOS] for t in tgt_tok.encode_batch(tgt)]
            keep = [
                i
                for i in range(len(src))
                if not drop_long or (0 < len(s_ids[i]) <= self.max_len and len(t_ids[i]) <= self.max_len + 2)
            ]
            if not keep:
                raise DataError(f"{folder}/{self.train}: no pair within data.max_len={self.max_len} tokens")
            s_ids = [s_ids[i] or [EOS] for i in keep]  # an empty source still needs one position to attend to
            return PairSplit(s_ids, [t_ids[i] for i in keep], [tgt[i] for i in keep], [src[i] for i in keep])

        train = encode(tr_src, tr_tgt, True)
        val = encode(*read_pairs(folder, self.val, self.src_lang, self.tgt_lang), False) if self.val else None
        test = encode(*read_pairs(folder, self.test, self.src_lang, self.tgt_lang), False) if self.test else None
        extra = {
            "shared_vocab": self.shared_vocab,
            "src_vocab": src_tok.vocab_size,
            "pad": PAD,
            "bos": BOS,
            "eos": EOS,
            "src_tokenizer": src_tok.to_extra(),
            "max_len": self.max_len,
        }
        if not self.shared_vocab:
            extra["tgt_tokenizer"] = tgt_tok.to_extra()
        return Data(DataSpec(vocab_size=tgt_tok.vocab_size, extra=extra), train, val, test)
