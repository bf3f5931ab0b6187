"""LSTM char-RNN: the classic recurrent language model.

    tokens (B, T) -> embedding -> dropout -> n_layer LSTM (dropout between layers) -> dropout -> linear
                  -> logits (B, T, vocab)

Each training window starts from a zero state. Generation carries the (h, c) state forward one token at a
time, so it has no context limit.

No classifier API (models/head.py): the `head` over the vocabulary may be tied to the embeddings, not a layer
to re-size for classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.config import ranged
from deeprecipe.core import ConfigError, DataSpec
from deeprecipe.models.dropout import Dropout
from deeprecipe.models.gpt import sample_next


@dataclass
class LSTMConfig:
    name: str = "lstm"
    n_layer: int = ranged(2, "> 0")
    hidden: int = ranged(512, "> 0")  # LSTM state width
    emb: int = 0  # embedding width (0: the hidden width)
    dropout: float = ranged(0.2, "[0, 1)")  # on the embedding, between LSTM layers and before the head
    tie_weights: bool = False  # share the embedding with the head (needs emb == hidden)

    def build(self, spec: DataSpec) -> nn.Module:
        if spec.vocab_size <= 0:
            raise ConfigError("lstm needs a text data set (vocab_size > 0)")
        emb = self.emb or self.hidden
        if self.tie_weights and emb != self.hidden:
            raise ConfigError(f"model.tie_weights needs model.emb == model.hidden (got {emb} and {self.hidden})")
        return CharRNN(spec.vocab_size, emb, self.hidden, self.n_layer, self.dropout, self.tie_weights)


class CharRNN(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        emb: int = 512,
        hidden: int = 512,
        n_layer: int = 2,
        dropout: float = 0.2,
        tie_weights: bool = False,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, emb)
        self.drop = Dropout(dropout)
        self.rnn = nn.LSTM(emb, hidden, n_layer, batch_first=True, dropout=dropout if n_layer > 1 else 0.0)
        self.head = nn.Linear(hidden, vocab_size)
        if tie_weights:
            self.head.weight = self.embed.weight

    def run(self, idx: torch.Tensor, state=None):
        """Logits (B, T, vocab) and the new (h, c) state."""
        out, state = self.rnn(self.drop(self.embed(idx)), state)  # (B, T, hidden)
        return self.head(self.drop(out)), state

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits, _ = self.run(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        """Yield the next token (B,) for `max_new_tokens` steps after the prompt `idx` (B, T)."""
        logits, state = self.run(idx)
        for i in range(max_new_tokens):
            nxt = sample_next(logits[:, -1].float(), temperature, top_k, top_p, generator)
            yield nxt
            if i < max_new_tokens - 1:
                logits, state = self.run(nxt[:, None], state)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kw) -> torch.Tensor:
        new = list(self.stream(idx, max_new_tokens, **kw))
        return torch.cat([idx, torch.stack(new, 1)], 1) if new else idx
