"""seq2seq: the encoder-decoder Transformer for translation (pre-LayerNorm, sinusoidal positions).

    src (B, S) -> embed * sqrt(d) + positions -> enc_layers x [self-attn, MLP]           -> memory (B, S, d)
    tgt (B, T) -> embed * sqrt(d) + positions -> dec_layers x [causal self-attn, cross-attn to memory, MLP]
               -> LN -> linear head (tied to the target embedding)                        -> logits (B, T, vocab)

Padding positions of the source are masked out of every attention over it; padded target positions are
ignored by the loss. Decoding: greedy, or beam search with the GNMT length penalty ((5 + n) / 6) ** alpha.
Beam search stops a sentence once `beam` hypotheses have ended, so beam 1 is exactly greedy.

No classifier API (models/head.py): the `head` over the target vocabulary may be tied to its embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from deeprecipe.config import ranged
from deeprecipe.core import ConfigError, DataSpec
from deeprecipe.models.dropout import Dropout


@dataclass
class Seq2SeqConfig:
    name: str = "seq2seq"
    d_model: int = ranged(256, "> 0")
    n_head: int = ranged(4, "> 0")
    enc_layers: int = 3
    dec_layers: int = 3
    ff: int = 0  # MLP width (0: 4 * d_model)
    dropout: float = ranged(0.1, "[0, 1)")
    max_positions: int = 512  # longest sequence the positional table covers
    tie_weights: bool = True  # head = target embedding; with a shared vocabulary the source embedding too
    beam: int = ranged(4, "> 0")  # default beam width for the final test scores and `deeprecipe translate`
    length_penalty: float = ranged(0.6, ">= 0")  # alpha of the GNMT length penalty (0: none)

    def build(self, spec: DataSpec) -> nn.Module:
        if "src_vocab" not in spec.extra:
            raise ConfigError("seq2seq needs a parallel-text data set (data.name: pairs)")
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
        e = spec.extra
        return Seq2Seq(
            e["src_vocab"],
            spec.vocab_size,
            self.d_model,
            self.n_head,
            self.enc_layers,
            self.dec_layers,
            self.ff or 4 * self.d_model,
            self.dropout,
            self.max_positions,
            self.tie_weights,
            e["shared_vocab"],
            e["pad"],
            e["bos"],
            e["eos"],
        )


def sinusoids(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n).float()[:, None]
    freq = torch.exp(torch.arange(0, d, 2).float() * (-math.log(10000.0) / d))
    out = torch.zeros(n, d)
    out[:, 0::2], out[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return out  # (n, d)


class Seq2Seq(nn.Module):
    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        d: int = 256,
        n_head: int = 4,
        enc_layers: int = 3,
        dec_layers: int = 3,
        ff: int = 1024,
        dropout: float = 0.1,
        max_positions: int = 512,
        tie_weights: bool = True,
        shared_vocab: bool = True,
        pad: int = 0,
        bos: int = 1,
        eos: int = 2,
    ):
        super().__init__()
        self.pad, self.bos, self.eos, self.d, self.vocab_size = pad, bos, eos, d, tgt_vocab
        self.tgt_emb = nn.Embedding(tgt_vocab, d, padding_idx=pad)
        self.src_emb = self.tgt_emb if shared_vocab and tie_weights else nn.Embedding(src_vocab, d, padding_idx=pad)
        self.register_buffer("pos", sinusoids(max_positions, d), persistent=False)
        self.drop = Dropout(dropout)
        enc = nn.TransformerEncoderLayer(d, n_head, ff, dropout, activation="gelu", batch_first=True, norm_first=True)
        dec = nn.TransformerDecoderLayer(d, n_head, ff, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc, enc_layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec, dec_layers, norm=nn.LayerNorm(d))
        self.head = nn.Linear(d, tgt_vocab, bias=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.normal_(self.tgt_emb.weight, 0.0, d**-0.5)
        if self.src_emb is not self.tgt_emb:
            nn.init.normal_(self.src_emb.weight, 0.0, d**-0.5)
        if tie_weights:
            self.head.weight = self.tgt_emb.weight

    def embed(self, emb: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > len(self.pos):
            raise ValueError(f"sequence of {ids.shape[1]} tokens is longer than max_positions={len(self.pos)}")
        return self.drop(emb(ids) * math.sqrt(self.d) + self.pos[: ids.shape[1]])  # (B, L, d)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        src_pad = src == self.pad  # (B, S), True where padding
        return self.encoder(self.embed(self.src_emb, src), src_key_padding_mask=src_pad), src_pad

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_pad: torch.Tensor) -> torch.Tensor:
        T = tgt.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=tgt.device).triu(1)  # True: may not attend
        h = self.decoder(
            self.embed(self.tgt_emb, tgt),
            memory,
            tgt_mask=causal,
            tgt_is_causal=True,
            tgt_key_padding_mask=tgt == self.pad,
            memory_key_padding_mask=src_pad,
        )
        return self.head(h)  # (B, T, vocab)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, src_pad = self.encode(src)
        return self.decode(tgt_in, memory, src_pad)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: int = 100) -> list[list[int]]:
        """Token ids of each translation (without <s> and </s>)."""
        memory, src_pad = self.encode(src)
        ys = torch.full((len(src), 1), self.bos, dtype=torch.long, device=src.device)
        done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            nxt = self.decode(ys, memory, src_pad)[:, -1].float().argmax(-1)  # (B,)
            ys = torch.cat([ys, nxt.masked_fill(done, self.eos)[:, None]], 1)
            done |= nxt == self.eos
            if done.all():
                break
        return [_strip(row, self.eos) for row in ys[:, 1:].tolist()]

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, beam: int = 4, alpha: float = 0.6, max_len: int = 100) -> list[list[int]]:
        """Token ids of the best hypothesis per sentence, ranked by log-probability / ((5 + n) / 6) ** alpha."""
        B, K = len(src), beam
        memory, src_pad = self.encode(src)
        memory, src_pad = memory.repeat_interleave(K, 0), src_pad.repeat_interleave(K, 0)
        ys = torch.full((B * K, 1), self.bos, dtype=torch.long, device=src.device)
        scores = torch.zeros(B, K, device=src.device)
        scores[:, 1:] = float("-inf")  # all beams start identical: keep one alive
        best: list[list[int] | None] = [None] * B
        best_score, n_done, active = [float("-inf")] * B, [0] * B, [True] * B
        rank = torch.arange(2 * K, device=src.device)
        for t in range(max_len):
            logp = self.decode(ys, memory, src_pad)[:, -1].float().log_softmax(-1)  # (B*K, V)
            V = logp.shape[-1]
            top, idx = (scores.view(-1, 1) + logp).view(B, K * V).topk(2 * K, -1)  # (B, 2K)
            from_beam, tok = idx // V, idx % V
            is_eos = tok == self.eos
            for b, j in is_eos[:, :K].nonzero().tolist():  # hypotheses ending among the top K are final
                if not active[b]:
                    continue
                s = top[b, j].item() / ((5 + t + 1) / 6) ** alpha
                if s > best_score[b]:
                    best_score[b], best[b] = s, ys[b * K + from_beam[b, j], 1:].tolist()
                n_done[b] += 1
                active[b] = n_done[b] < K
            if not any(active):
                break
            keep = (is_eos * 2 * K + rank).argsort(-1)[:, :K]  # the K best candidates that do not end
            scores = top.gather(1, keep)
            rows = (torch.arange(B, device=src.device)[:, None] * K + from_beam.gather(1, keep)).view(-1)
            ys = torch.cat([ys[rows], tok.gather(1, keep).view(-1, 1)], 1)
        return [best[b] if best[b] is not None else ys[b * K, 1:].tolist() for b in range(B)]


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids
