"""Text for language models: any UTF-8 file or folder, a character or byte-level BPE tokenizer, random windows.

The corpus is tokenized once into a flat token array on disk (read back as a numpy memory map), cached in
`cache` (default: a `.deeprecipe-cache` folder beside the data, or ~/.cache/deeprecipe when that is not
writable), keyed by the files' names, sizes and mtimes and the tokenizer settings. Token arrays up to
`in_memory_mb` are copied into a tensor (and onto the GPU); larger ones stay memory-mapped on disk.

The last `val_fraction` of the tokens is the val split (a held-out tail, never seen in training). A training
batch is B windows of block_size + 1 tokens at offsets drawn from a generator seeded by (seed, step), so the
batch of step s is a pure function of (seed, s), which exact resume needs (see data/core.py). Evaluation
walks the split in non-overlapping windows, so every token of it is predicted exactly once.

`decode(ids)` gives every token back (an exact round trip); `text(ids)` is what a user reads: the same without
special tokens (<pad>, <s>, </s>), which a barely trained model may emit anywhere.

The tokenizer travels in `DataSpec.extra["tokenizer"]` (saved with the run as spec.json): sampling and
serving need nothing but the run folder.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from deeprecipe.config import ranged
from deeprecipe.core import UserError
from deeprecipe.data.core import Data, DataError, DataSpec, to_device

CHUNK = 1 << 20  # bytes read (and tokenized) at a time: memory stays flat for corpora of any size


# ------------------------------------------------------------------------------------------ files


def resolve_path(path: str, what: str = "data.path") -> Path:
    """Expand $VARS and ~; a relative path that does not exist is looked up under $DEEPRECIPE_DATA."""
    if not path:
        raise DataError(f"{what} is empty: give a text file or folder (e.g. {what}=${{DEEPRECIPE_DATA}}/corpus.txt)")
    expanded = os.path.expanduser(os.path.expandvars(path))
    if "$" in expanded:
        raise DataError(f"{what}={path}: an environment variable in it is not set (e.g. export DEEPRECIPE_DATA=...)")
    p = Path(expanded)
    root = os.environ.get("DEEPRECIPE_DATA")
    if not p.exists() and not p.is_absolute() and root and (Path(root) / p).exists():
        p = Path(root) / p
    if not p.exists():
        hint = "" if root else " (relative paths are also looked up under $DEEPRECIPE_DATA, which is not set)"
        raise DataError(f"{what}={path}: {p} does not exist{hint}")
    return p


def list_files(path: Path) -> list[Path]:
    """A file, or every non-hidden file under a folder in name order."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            f
            for f in path.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
    if not files:
        raise DataError(f"{path}: no text files found")
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f}: the file is empty (remove it or point data.path at a file with text)")
    return files


def iter_text(files: list[Path]):
    """Yield the text of `files` in chunks of about CHUNK bytes cut after a newline; checks UTF-8 as it goes."""
    for f in files:
        dec = codecs.getincrementaldecoder("utf-8")()
        done, carry = 0, ""
        with open(f, "rb") as fh:
            while True:
                raw = fh.read(CHUNK)
                nul = raw.find(b"\x00")
                if nul >= 0:
                    raise DataError(
                        f"{f}: binary data (a NUL byte at byte {done + nul}); language models need UTF-8 text files"
                    )
                try:
                    text = carry + dec.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{f}: not UTF-8 text (byte {done + e.start}); convert it, e.g. "
                        f"iconv -f latin1 -t utf-8 {f.name} > {f.stem}.utf8.txt"
                    ) from None
                done += len(raw)
                if not raw:
                    if text:
                        yield text
                    break
                cut = text.rfind("\n") + 1
                if cut:
                    yield text[:cut]
                    carry = text[cut:]
                else:
                    carry = text


# ------------------------------------------------------------------------------------------ tokenizers


class CharTokenizer:
    """One token per character of the training text; the vocabulary is its sorted character set."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @classmethod
    def train(cls, chunks, vocab_size: int = 0) -> CharTokenizer:
        seen: set[str] = set()
        for text in chunks:
            seen.update(text)
        return cls("".join(sorted(seen)))

    def encode(self, text: str, where: str = "the text") -> list[int]:
        missing = sorted(set(text) - self.stoi.keys())
        if missing:
            shown = "".join(missing[:20]).encode("unicode_escape").decode()
            raise UserError(
                f"{where} has {len(missing)} character(s) the vocabulary lacks: '{shown}' (this "
                f"character-level model knows only the {self.vocab_size} characters of its training text)"
            )
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def text(self, ids) -> str:
        """What a user reads (a character vocabulary has no special tokens: decode)."""
        return self.decode(ids)

    def to_extra(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class BPETokenizer:
    """Byte-level BPE (Hugging Face tokenizers) trained on the corpus: any text encodes, and decodes exactly."""

    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @classmethod
    def train(cls, chunks, vocab_size: int = 4096, special: tuple[str, ...] = ()) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=list(special),
            show_progress=False,
        )
        tok.train_from_iterator(chunks, trainer)
        return cls(tok)

    def encode(self, text: str, where: str = "the text") -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        """Every token back, special ones (<pad>, <s>, </s>) included: an exact round trip."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def text(self, ids) -> str:
        """What a user reads (a translation, a sample, a served answer): the special tokens left out."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_extra(self) -> dict:
        return {"kind": "bpe", "json": self.tok.to_str()}


TOKENIZERS = {"char": CharTokenizer, "bpe": BPETokenizer}


def tokenizer_from_extra(extra: dict, vocab_size: int = 0, where: str = "spec.json"):
    """Rebuild a tokenizer saved by to_extra(); check it against the vocabulary size the model was built for."""
    if not isinstance(extra, dict) or extra.get("kind") not in TOKENIZERS:
        raise UserError(f"{where}: no tokenizer saved (expected a 'tokenizer' entry of kind char or bpe)")
    if extra["kind"] == "char":
        tok = CharTokenizer(extra["chars"])
    else:
        from tokenizers import Tokenizer

        tok = BPETokenizer(Tokenizer.from_str(extra["json"]))
    if vocab_size and tok.vocab_size != vocab_size:
        raise UserError(
            f"{where}: the tokenizer has {tok.vocab_size} tokens but the model was built for {vocab_size}: "
            "the tokenizer and the checkpoint do not belong together"
        )
    return tok


def saved_tokenizer(source: str):
    """The tokenizer of a run folder (its spec.json) or of a tokenizer file saved beside a corpus."""
    path = resolve_path(source, "data.tokenizer_from")
    file = path / "spec.json" if path.is_dir() else path
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"data.tokenizer_from={source}: cannot read {file} ({e}); give a run folder") from None
    extra = saved["extra"].get("tokenizer") if "extra" in saved else saved
    return tokenizer_from_extra(extra, where=str(file))


def tokenizer_from_spec(spec: DataSpec):
    return tokenizer_from_extra(spec.extra.get("tokenizer"), spec.vocab_size)


# ------------------------------------------------------------------------------------------ splits


class WindowSplit:
    """A token array seen as windows of block_size + 1 tokens: x = window[:-1], y = window[1:].

    len() and take() walk non-overlapping windows (evaluation); step_batch() draws random ones (training)."""

    def __init__(self, tokens: np.ndarray | torch.Tensor, block_size: int):
        self.tokens, self.T, self.device = tokens, block_size, torch.device("cpu")

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.T)

    def to(self, device) -> WindowSplit:
        self.device = torch.device(device)
        if isinstance(self.tokens, torch.Tensor):
            self.tokens = self.tokens.to(self.device)
        return self

    def windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.T
        if isinstance(self.tokens, torch.Tensor):
            starts = to_device(starts, self.tokens.device)
            w = self.tokens[starts[:, None] + torch.arange(T + 1, device=self.tokens.device)]
        else:  # memory-mapped: gather on the CPU, then move
            w = torch.from_numpy(self.tokens[starts.numpy()[:, None] + np.arange(T + 1)].astype(np.int64))
        w = to_device(w, self.device).long()  # (B, T+1)
        return w[:, :-1], w[:, 1:]

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows(idx.cpu() * self.T)

    def step_batch(self, seed: int, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 2_654_435_761 % (2**63 - 1))
        return self.windows(torch.randint(0, len(self.tokens) - self.T, (batch,), generator=g))


# ------------------------------------------------------------------------------------------ data set


def _cache_dir(cache: str, data_path: Path) -> Path:
    if cache:
        d = Path(os.path.expanduser(os.path.expandvars(cache)))
    else:
        parent = data_path if data_path.is_dir() else data_path.parent
        d = parent / ".deeprecipe-cache"
        # a read-only data folder (by its permission bits: root may write anywhere) is left untouched
        if not d.is_dir() and not (os.access(parent, os.W_OK) and parent.stat().st_mode & 0o200):
            d = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deeprecipe"
    d.mkdir(parents=True, exist_ok=True)
    return d


def tokenize_to_file(tok, files: list[Path], out: Path, dtype, where: str = "the text") -> None:
    """Encode the corpus chunk by chunk, appending to a flat binary token file (written under a temporary name)."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            for text in iter_text(files):
                np.asarray(tok.encode(text, where), dtype=dtype).tofile(fh)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass
class TextData:
    """Any UTF-8 text file or folder of files, for language models."""

    name: str = "text"
    path: str = ""  # a text file or a folder of them; $VARS expanded; relative paths also tried under $DEEPRECIPE_DATA
    tokenizer: Literal["char", "bpe"] = "char"  # char: a token per character; bpe: byte-level BPE trained on the corpus
    vocab_size: int = 4096  # BPE vocabulary size (char: the corpus's character set)
    block_size: int = ranged(256, "> 0")  # context length: tokens per training window
    val_fraction: float = ranged(0.1, "(0, 1)")  # the last fraction of the tokens, held out for validation
    cache: str = ""  # folder for the token array and tokenizer ("": beside the data, else ~/.cache/deeprecipe)
    in_memory_mb: int = 1024  # token arrays up to this size are held in memory (and on the GPU)
    tokenizer_from: str = ""  # reuse the tokenizer of a run folder (fine-tuning: `--init-from` that run) instead

    def build(self) -> Data:
        fixed = saved_tokenizer(self.tokenizer_from) if self.tokenizer_from else None
        path = resolve_path(self.path)
        files = list_files(path)
        stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        bpe_size = self.vocab_size if self.tokenizer == "bpe" else 0
        key_src = json.dumps([stamp, fixed.to_extra() if fixed else [self.tokenizer, bpe_size]])
        key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
        cache = _cache_dir(self.cache, path)
        tok_file = cache / f"{key}.tokenizer.json"
        if fixed is not None:
            tok = fixed
        elif tok_file.is_file():
            tok = tokenizer_from_extra(json.loads(tok_file.read_text()), where=str(tok_file))
        else:
            tok = TOKENIZERS[self.tokenizer].train(iter_text(files), self.vocab_size)
        dtype = np.uint16 if tok.vocab_size <= 65536 else np.int32
        arr_file = cache / f"{key}.{np.dtype(dtype).name}.bin"
        if not arr_file.is_file():
            where = f"{path} (with the tokenizer of {self.tokenizer_from})" if fixed else str(path)
            tokenize_to_file(tok, files, arr_file, dtype, where)
            tok_file.write_text(json.dumps(tok.to_extra()))
        tokens = np.memmap(arr_file, dtype=dtype, mode="r")
        n = len(tokens)
        n_val = int(n * self.val_fraction)
        T = self.block_size
        if n - n_val < T + 2 or n_val < T + 1:
            raise DataError(
                f"{path}: {n} tokens are too few for block_size={T} with val_fraction={self.val_fraction} "
                f"(need at least {T + 1} val tokens and {T + 2} train tokens): lower data.block_size"
            )
        if tokens.nbytes <= self.in_memory_mb * 2**20:
            tokens = torch.from_numpy(np.array(tokens, dtype=np.int64 if dtype == np.int32 else np.int32))
        spec = DataSpec(
            vocab_size=tok.vocab_size,
            extra={"tokenizer": tok.to_extra(), "block_size": T, "tokens": {"train": n - n_val, "val": n_val}},
        )
        return Data(spec, WindowSplit(tokens[: n - n_val], T), WindowSplit(tokens[n - n_val :], T))
