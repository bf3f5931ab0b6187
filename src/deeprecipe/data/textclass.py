"""Labelled texts for text classification: a CSV (columns text,label), a JSONL file ({"text": ..., "label": ...}
per line), a folder with one subfolder per class of .txt files (one text per file), or the built-in demo:
language identification on the Multi30k captions (source: multi30k; English, German, French, Czech).

Texts are tokenized with the char or byte-level BPE tokenizer of data/text.py, trained on the train split only;
id 0 is PAD in both (a NUL character, a <pad> token). The tokenizer travels in spec.extra["tokenizer"], so
predict and serve rebuild it from the run folder. Characters a char vocabulary lacks (in val/test texts, or
at predict time) are dropped. A split is a TensorSplit of ids (N, L), padded with PAD and cut at max_len
tokens, and labels (N,). A source without splits is split into train/val/test by split_seed (not the
training seed); Multi30k has its own val and test files.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Literal

import torch

from deeprecipe.config import ranged
from deeprecipe.data.core import Data, DataError, DataSpec, TensorSplit
from deeprecipe.data.pairs import pad, read_lines
from deeprecipe.data.text import BPETokenizer, CharTokenizer, resolve_path, saved_tokenizer

PAD = 0
LANGS = ("en", "de", "fr", "cs")  # the Multi30k caption files: {split}.{lang}.gz
MULTI30K_SPLITS = ("train", "val", "test_2016_flickr")

Items = list[tuple[str, str]]  # (text, label)


FIELD_LIMIT = 1 << 28  # csv refuses fields over 131072 characters by default; a long document is a valid text


def read_csv(path: Path) -> Items:
    old = csv.field_size_limit(FIELD_LIMIT)
    line = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            if "text" not in cols or "label" not in cols:
                raise DataError(f"{path}: columns {cols}: a CSV of texts needs the columns text and label")
            items = []
            for r in reader:
                line = reader.line_num
                n = len(cols) + len(r.get(None) or []) - sum(v is None for k, v in r.items() if k is not None)
                if n != len(cols):
                    raise DataError(
                        f"{path}:{line}: {n} fields, expected {len(cols)} ({', '.join(cols)}): "
                        "quote a text that holds a comma or a quote"
                    )
                items.append(_item(r["text"], r["label"], f"{path}:{line}"))
            return items
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); convert it, e.g. with iconv -t utf-8") from None
    except csv.Error as e:  # a NUL byte, a field over FIELD_LIMIT, ...
        raise DataError(f"{path}:{line + 1}: not readable as CSV ({e})") from None
    finally:
        csv.field_size_limit(old)


def read_jsonl(path: Path) -> Items:
    items = []
    for i, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{i}: not a JSON object ({e})") from None
        if not isinstance(row, dict) or "text" not in row or "label" not in row:
            found = list(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{path}:{i}: a line needs the keys text and label, found {found}")
        items.append(_item(row["text"], row["label"], f"{path}:{i}"))
    return items


def read_folder(path: Path) -> Items:
    classes = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{path}: no class folders (give one subfolder of .txt files per class, or a .csv/.jsonl)")
    items = []
    for d in classes:
        files = sorted(d.glob("*.txt"))
        if not files:
            raise DataError(f"{d}: class '{d.name}' has no .txt files")
        items += [("\n".join(read_lines(f)).strip(), d.name) for f in files]  # read_lines names an empty file
    return items


def _item(text, label, where: str) -> tuple[str, str]:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: empty text")
    if label is None or str(label).strip() == "":
        raise DataError(f"{where}: empty label")
    return text.strip(), str(label).strip()


def read_multi30k(folder: Path, split: str, per_lang: int) -> Items:
    """The captions of one split in every language, labelled by language. Train takes a different stretch of
    `per_lang` lines per language, so no image is described in two languages (content gives nothing away)."""
    by_lang = []
    for k, lang in enumerate(LANGS):
        file = next((p for p in (folder / f"{split}.{lang}.gz", folder / f"{split}.{lang}") if p.is_file()), None)
        if file is None:
            raise DataError(f"{folder}: no {split}.{lang}.gz (the Multi30k caption files, see data/README)")
        lines = read_lines(file)
        if split == "train" and per_lang:
            lines = lines[k * per_lang : (k + 1) * per_lang]
        by_lang.append([(s.strip(), lang) for s in lines if s.strip()])
    # interleaved (en, de, fr, cs, en, ...): every prefix (train.limit_eval, the checks' held-out batch) has all four
    return [item for group in zip_longest(*by_lang) for item in group if item]


def encode(tok, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids of each text, cut at max_len; characters a char vocabulary lacks are dropped (and NUL, its PAD)."""
    if tok.kind == "char":
        return [[i for c in t if (i := tok.stoi.get(c, PAD)) != PAD][:max_len] for t in texts]
    return [ids[:max_len] for ids in tok.encode_batch(texts)]


@dataclass
class TextClassData:
    """Labelled texts for text classification (see the module docstring)."""

    name: str = "textclass"
    path: str = ""  # a .csv (text,label), a .jsonl, or a folder of class folders of .txt; multi30k: its folder
    source: Literal["files", "multi30k"] = "files"  # files: path as above; multi30k: language id on its captions
    tokenizer: Literal["char", "bpe"] = "char"  # char: a token per character; bpe: byte-level BPE trained on train
    vocab_size: int = 2000  # BPE vocabulary size (char: the train split's character set)
    max_len: int = ranged(256, "> 0")  # tokens kept of each text (the rest is cut)
    val_fraction: float = ranged(0.1, "[0, 1)")  # of the texts, held out for validation (a source without splits)
    test_fraction: float = ranged(0.1, "[0, 1)")  # of the texts, held out for test (a source without splits)
    split_seed: int = 0  # the split is fixed by this seed, not the training seed
    per_class: int = ranged(0, ">= 0")  # at most N training texts per class (0: all; multi30k: per language)
    tokenizer_from: str = ""  # reuse the tokenizer of a text classification run (fine-tuning: --init-from it)

    def build(self) -> Data:
        if min(self.val_fraction, self.test_fraction) < 0 or self.val_fraction + self.test_fraction >= 1:
            raise DataError("data.val_fraction and data.test_fraction must be >= 0 and leave texts to train on")
        path = resolve_path(self.path)
        if self.source == "multi30k":
            train, val, test = (read_multi30k(path, s, self.per_class) for s in MULTI30K_SPLITS)
        else:
            readers = {".csv": read_csv, ".jsonl": read_jsonl}
            if path.is_file() and path.suffix.lower() not in readers:
                raise DataError(f"{path}: give a .csv, a .jsonl, or a folder with one subfolder per class")
            train, val, test = self.split(read_folder(path) if path.is_dir() else readers[path.suffix.lower()](path))
        labels = {lab for _, lab in train + val + test}
        if not labels:
            raise DataError(f"{path}: no texts in it")
        if len(labels) < 2:
            raise DataError(
                f"{path}: every text has the label {next(iter(labels))!r}: a classifier needs texts of at least two "
                "classes"
            )
        numeric = all(s.lstrip("-").isdigit() for s in labels)
        classes = sorted(labels, key=int if numeric else None)
        seen = {lab for _, lab in train}
        missing = [c for c in classes if c not in seen]
        if missing:
            raise DataError(
                f"{path}: class '{missing[0]}' has no training text after the split: add texts of it, or lower "
                "data.val_fraction / data.test_fraction"
            )
        tok = self.train_tokenizer([t for t, _ in train])
        index = {c: i for i, c in enumerate(classes)}

        def tensors(items: Items) -> TensorSplit | None:
            if not items:
                return None
            ids = encode(tok, [t for t, _ in items], self.max_len)
            return TensorSplit(pad([s or [PAD] for s in ids], "cpu"), torch.tensor([index[lab] for _, lab in items]))

        extra = {"tokenizer": tok.to_extra(), "pad": PAD, "max_len": self.max_len}
        spec = DataSpec(num_classes=len(classes), class_names=classes, vocab_size=tok.vocab_size, extra=extra)
        return Data(spec, tensors(train), tensors(val), tensors(test))

    def split(self, items: Items) -> tuple[Items, Items, Items]:
        """(train, val, test) by split_seed; train in that random order, at most per_class texts of each class."""
        n = len(items)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        n_test, n_val = int(n * self.test_fraction), int(n * self.val_fraction)
        test, val = [items[i] for i in perm[:n_test]], [items[i] for i in perm[n_test : n_test + n_val]]
        train, count = [], {}
        for i in perm[n_test + n_val :]:
            count[items[i][1]] = count.get(items[i][1], 0) + 1
            if not self.per_class or count[items[i][1]] <= self.per_class:
                train.append(items[i])
        return train, val, test

    def train_tokenizer(self, texts: list[str]):
        if self.tokenizer_from:
            tok = saved_tokenizer(self.tokenizer_from)
            if tok.decode([PAD]) not in ("\0", "<pad>"):
                raise DataError(f"data.tokenizer_from={self.tokenizer_from}: not a text classification tokenizer")
            return tok
        if self.tokenizer == "char":  # NUL first: it is PAD, id 0
            return CharTokenizer("\0" + CharTokenizer.train(texts).chars.replace("\0", ""))
        return BPETokenizer.train(iter(texts), self.vocab_size, ("<pad>",))
