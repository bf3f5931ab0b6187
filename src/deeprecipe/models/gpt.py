"""GPT: a decoder-only Transformer language model (pre-LayerNorm, causal self-attention, tied embeddings).

    tokens (B, T) -> token (+ position) embeddings -> dropout
                  -> n_layer x [x + attn(LN(x)); x + mlp(LN(x))] -> LN -> linear head tied to the embedding
                  -> logits (B, T, vocab)

Attention runs through F.scaled_dot_product_attention (flash / memory-efficient kernels where the device has
them), except in bf16 on the CPU over at most 512 keys, where the plain product-softmax-product is faster
(`attention`). Generation keeps a KV cache: the prompt is run once, then each new token attends to the cached keys and
values of the tokens before it. When the context is full it slides: the cache is rebuilt from the last
block_size tokens (positions are absolute, so a cache cannot simply be cropped). Positions are a learned
embedding added to the tokens' (model.pos=learned, GPT-2's) or rotary (model.pos=rope: each layer turns its queries
and keys by their position, so attention scores depend on offsets only; cached keys are stored turned).

No classifier API (models/head.py): the `head` over the vocabulary is tied to the token embeddings (tie_weights),
not a layer to re-size for classes; fine-tuning takes the last top-level layer as its head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.config import ranged
from deeprecipe.core import ConfigError, DataSpec
from deeprecipe.models.dropout import Dropout

# name -> (n_layer, n_head, n_embd); gpt2-124M is GPT-2 small's layout (with its 50257-token vocabulary)
SIZES = {
    "tiny": (2, 2, 64),
    "mini": (4, 4, 128),
    "small": (6, 6, 384),
    "medium": (8, 8, 512),
    "gpt2-124M": (12, 12, 768),
}


@dataclass
class GPTConfig:
    name: str = "gpt"
    size: Literal["", "tiny", "mini", "small", "medium", "gpt2-124M"] = ""  # a named size (SIZES) sets n_layer,
    # n_head and n_embd ("": those fields as given)
    n_layer: int = ranged(4, "> 0")
    n_head: int = ranged(4, "> 0")
    n_embd: int = ranged(128, "> 0")
    block_size: int = 0  # context length; 0: the data's block_size
    dropout: float = ranged(0.1, "[0, 1)")  # on embeddings and each residual branch
    attn_dropout: float = ranged(0.0, "[0, 1)")  # on attention weights; > 0: off the fused (flash) kernels, slower
    bias: bool = False  # biases in Linear and LayerNorm layers (off: a little faster, as good)
    tie_weights: bool = True  # the output head shares the token embedding matrix
    pos: Literal["learned", "rope"] = "learned"  # positions: a learned embedding added to the tokens', or rotary
    # (RoPE: queries and keys turned by their position in every attention layer, so attention sees offsets)

    def build(self, spec: DataSpec) -> nn.Module:
        n_layer, n_head, n_embd = self.n_layer, self.n_head, self.n_embd
        if self.size:
            n_layer, n_head, n_embd = SIZES[self.size]
        if n_embd % n_head:
            raise ConfigError(f"model.n_embd={n_embd} is not divisible by model.n_head={n_head}")
        block = self.block_size or int(spec.extra.get("block_size", 0))
        if block <= 0 or spec.vocab_size <= 0:
            raise ConfigError("gpt needs a text data set (vocab_size and block_size), or set model.block_size")
        return GPT(
            spec.vocab_size,
            block,
            n_layer,
            n_head,
            n_embd,
            dropout=self.dropout,
            bias=self.bias,
            tie_weights=self.tie_weights,
            attn_dropout=self.attn_dropout,
            rope=self.pos == "rope",
        )


class KVCache:
    """Keys and values of the tokens seen so far, one (k, v) pair of (B, h, S, hd) per layer."""

    def __init__(self, n_layer: int):
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer

    def __len__(self) -> int:
        return 0 if self.kv[0] is None else self.kv[0][0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old = self.kv[layer]
        if old is not None:
            k, v = torch.cat([old[0], k], 2), torch.cat([old[1], v], 2)
        self.kv[layer] = (k, v)
        return k, v


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (Su et al. 2021): each (first half, second half) pair of x's (B, h, T, hd) features turned by the angle
    of its position and frequency; cos, sin (T, hd / 2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def rope_angles(block_size: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (block_size, head_dim / 2) of position t times frequency base^(-i / (head_dim / 2))."""
    half = head_dim // 2
    freq = base ** (-torch.arange(half, dtype=torch.float32) / half)
    angle = torch.arange(block_size, dtype=torch.float32)[:, None] * freq[None]
    return angle.cos(), angle.sin()


EXPLICIT_MAX_KEYS = 512  # bf16 on the CPU: the explicit form is faster up to here (bench/RESULTS.md), slower beyond


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) where `mask` (T, S) allows, else causal when T == S > 1) v, with dropout p on the
    weights; q (B, h, T, hd), k and v (B, h, S, hd). The CPU's flash kernel is slow in bf16 (training a 4 x 192
    char GPT at context 128: 14 vs 8 ms per layer, forward and backward): there, for contexts of at
    most EXPLICIT_MAX_KEYS keys, the scores are formed explicitly (softmax in float32); everywhere else
    F.scaled_dot_product_attention picks its kernel."""
    T, S = q.shape[2], k.shape[2]
    causal = bool(mask is None and S == T and T > 1)
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or S > EXPLICIT_MAX_KEYS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, h, T, S)
    if causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.dropout(scores.float().softmax(-1), p) if p else scores.float().softmax(-1)
    return weights.to(v.dtype) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, attn_dropout: float = 0.0):
        super().__init__()
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.attn_dropout = n_head, attn_dropout
        self.resid_drop = Dropout(dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rope: tuple | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, hd)
        if rope is not None:  # (cos, sin) of these T positions: keys are cached turned
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, h, S, hd) with S = past + T
        S = k.shape[2]
        # no past: the usual causal mask; a past: query i (at position S - T + i) sees keys 0 .. S - T + i
        mask = None if S == T or T == 1 else torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        p = self.attn_dropout if self.training else 0.0
        y = attention(q, k, v, mask, p)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, attn_dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, attn_dropout)
        self.norm2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=bias),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd, bias=bias),
            Dropout(dropout),
        )

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rope: tuple | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, layer, rope)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.1,
        bias: bool = False,
        tie_weights: bool = True,
        attn_dropout: float = 0.0,
        rope: bool = False,
    ):
        super().__init__()
        self.vocab_size, self.block_size, self.n_layer = vocab_size, block_size, n_layer
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = None if rope else nn.Embedding(block_size, n_embd)
        if rope:  # not state: rebuilt from the config
            cos, sin = rope_angles(block_size, n_embd // n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias, attn_dropout) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled down by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        B, T = idx.shape
        past = len(cache) if cache is not None else 0
        if past + T > self.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than the context ({self.block_size})")
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(past, past + T, device=idx.device))
        else:
            rope = (self.rope_cos[past : past + T], self.rope_sin[past : past + T])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, rope)
        logits = self.head(self.norm(x))  # (B, T, vocab)
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
        use_cache: bool = True,
    ):
        """Yield the next token (B,) for `max_new_tokens` steps after the prompt `idx` (B, T)."""
        idx = idx[:, -self.block_size :]
        cache = KVCache(self.n_layer) if use_cache else None
        logits, _ = self(idx, cache=cache)
        for i in range(max_new_tokens):
            nxt = sample_next(logits[:, -1].float(), temperature, top_k, top_p, generator)  # (B,)
            yield nxt
            if i == max_new_tokens - 1:
                break
            idx = torch.cat([idx, nxt[:, None]], 1)
            if use_cache and idx.shape[1] <= self.block_size:
                logits, _ = self(nxt[:, None], cache=cache)
            else:  # no cache, or the context is full: run the last block_size tokens afresh
                idx = idx[:, -self.block_size :]
                cache = KVCache(self.n_layer) if use_cache else None
                logits, _ = self(idx, cache=cache)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kw) -> torch.Tensor:
        """The prompt (B, T) followed by `max_new_tokens` sampled tokens: (B, T + max_new_tokens)."""
        new = list(self.stream(idx, max_new_tokens, **kw))
        return torch.cat([idx, torch.stack(new, 1)], 1) if new else idx


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V): temperature 0 is greedy; top-k and top-p cut-offs."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens after the nucleus (the first always stays)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
