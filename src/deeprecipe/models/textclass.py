"""Text classifiers: a Transformer encoder and a bidirectional LSTM over padded token ids, with masked mean pooling.

    ids (B, T), PAD after each text -> token (+ position) embeddings
        -> text-transformer: n_layer pre-LayerNorm encoder layers that never attend to PAD
           text-lstm:        n_layer bidirectional LSTM layers, the backward one reading each text from its own end
        -> mean over the text's positions (PAD excluded) -> LayerNorm -> `head` Linear -> logits (B, classes)

PAD never changes a text's logits: attention masks it, the forward LSTM reads it only after the text, the
backward LSTM reads each text reversed in place (pads stay behind it), and pooling skips it. So a text gets
the same answer alone or batched with longer ones. Position 0 is never masked: an all-PAD row (an empty text,
or the checks' blanked input) still has one position to pool instead of a 0/0. The head starts at zero, so the
loss at init is exactly ln(classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from deeprecipe.config import ranged
from deeprecipe.core import ConfigError, DataSpec
from deeprecipe.models.dropout import Dropout
from deeprecipe.models.head import Classifier


def _sizes(spec: DataSpec, name: str) -> tuple[int, int, int, int]:
    """(vocab, classes, pad id, max length) of a text-classification spec."""
    if spec.vocab_size <= 0 or spec.num_classes <= 0:
        raise ConfigError(f"{name} needs a text classification data set (vocab_size and num_classes)")
    return spec.vocab_size, spec.num_classes, int(spec.extra.get("pad", 0)), int(spec.extra.get("max_len", 512))


@dataclass
class TextTransformerConfig:
    name: str = "text-transformer"
    n_layer: int = ranged(2, "> 0")
    n_head: int = ranged(4, "> 0")
    d_model: int = ranged(128, "> 0")
    ff_mult: int = 4  # feed-forward width = ff_mult * d_model
    dropout: float = ranged(0.1, "[0, 1)")  # on embeddings, attention weights (not fused kernels: slower) and residuals

    def build(self, spec: DataSpec) -> nn.Module:
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
        vocab, classes, pad, max_len = _sizes(spec, self.name)
        return TextTransformer(
            vocab, classes, pad, max_len, self.n_layer, self.n_head, self.d_model, self.ff_mult, self.dropout
        )


@dataclass
class TextLSTMConfig:
    name: str = "text-lstm"
    n_layer: int = ranged(1, "> 0")
    hidden: int = ranged(128, "> 0")  # state width of each direction
    emb: int = 64  # embedding width
    dropout: float = ranged(0.1, "[0, 1)")  # on the embedding and on each layer's output

    def build(self, spec: DataSpec) -> nn.Module:
        vocab, classes, pad, _ = _sizes(spec, self.name)
        return TextLSTM(vocab, classes, pad, self.n_layer, self.hidden, self.emb, self.dropout)


def pad_mask(ids: torch.Tensor, pad: int) -> torch.Tensor:
    """True at PAD positions (B, T), position 0 excepted."""
    return (ids == pad) & (torch.arange(ids.shape[1], device=ids.device) > 0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C), PAD mask (B, T) -> mean over the unmasked positions (B, C)."""
    keep = (~mask).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(1) / keep.sum(1)


class TextTransformer(Classifier, nn.Module):
    def __init__(self, vocab, classes, pad, max_len, n_layer=2, n_head=4, d_model=128, ff_mult=4, dropout=0.1):
        super().__init__()
        self.pad, self.max_len = pad, max_len
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.drop = Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            d_model, n_head, ff_mult * d_model, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)
        nn.init.normal_(self.tok_emb.weight, 0.0, 0.02)
        nn.init.normal_(self.pos_emb.weight, 0.0, 0.02)
        nn.init.zeros_(self.head.weight)  # loss at init = ln(classes)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, classes)
        T = ids.shape[1]
        if T > self.max_len:
            raise ValueError(f"{T} tokens: longer than the model's max_len ({self.max_len})")
        mask = pad_mask(ids, self.pad)
        x = self.drop(self.tok_emb(ids) + self.pos_emb(torch.arange(T, device=ids.device)))  # (B, T, C)
        x = self.encoder(x, src_key_padding_mask=mask)
        return self.head(self.norm(masked_mean(x, mask)))


class TextLSTM(Classifier, nn.Module):
    def __init__(self, vocab, classes, pad, n_layer=1, hidden=128, emb=64, dropout=0.1):
        super().__init__()
        self.pad = pad
        self.embed = nn.Embedding(vocab, emb)
        self.drop = Dropout(dropout)
        widths = [emb] + [2 * hidden] * (n_layer - 1)
        self.fwd = nn.ModuleList(nn.LSTM(w, hidden, batch_first=True) for w in widths)
        self.bwd = nn.ModuleList(nn.LSTM(w, hidden, batch_first=True) for w in widths)
        self.norm = nn.LayerNorm(2 * hidden)
        self.head = nn.Linear(2 * hidden, classes)
        nn.init.zeros_(self.head.weight)  # loss at init = ln(classes)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, classes)
        mask = pad_mask(ids, self.pad)
        t = torch.arange(ids.shape[1], device=ids.device)
        n = (~mask).sum(1, keepdim=True)  # (B, 1) text lengths
        order = torch.where(t < n, n - 1 - t, t)  # each text reversed in place, its PAD tail kept: an involution

        def rev(z):  # (B, T, C)
            return z.gather(1, order.unsqueeze(-1).expand(-1, -1, z.shape[-1]))

        x = self.drop(self.embed(ids))  # (B, T, emb)
        for fwd, bwd in zip(self.fwd, self.bwd):
            x = self.drop(torch.cat([fwd(x)[0], rev(bwd(rev(x))[0])], -1))  # (B, T, 2 * hidden)
        return self.head(self.norm(masked_mean(x, mask)))
