"""Language modelling: next-token loss, perplexity and bits per character, and text sampling.

A batch is (x, y): token windows (B, T) and the same windows shifted by one. Evaluation covers the whole
split (or its first train.limit_eval windows) in non-overlapping windows, so each token is predicted once,
from the context of its own window. Bits per character divide the summed loss by the number of characters
the predicted tokens decode to, so char and BPE models are comparable.

Policies for bad prompts (`deeprecipe sample`): characters a character-level vocabulary lacks are an error
naming them; a prompt longer than the context is cut to its last block_size tokens (a note goes to stderr).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.config import Config
from deeprecipe.core import ConfigError, DataSpec, UserError
from deeprecipe.data.core import Data, eval_batches
from deeprecipe.data.text import tokenizer_from_spec
from deeprecipe.family import ExplainOptions, Family, SampleOptions, ServeContext
from deeprecipe.runtime import Runtime


def start_ids(tok, prompt: str, where: str = "--prompt") -> list[int]:
    """The prompt's token ids; an empty prompt starts from a newline (or token 0 if there is none)."""
    if prompt:
        return tok.encode(prompt, where=where)
    if tok.kind == "char":
        return [tok.stoi.get("\n", 0)]
    return tok.encode("\n") or [0]


def stream_text(
    model: nn.Module,
    tok,
    ids: list[int],
    max_tokens: int,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
):
    """Yield the generated text piece by piece (a byte-level token may end inside a character: it waits)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out, shown = [], ""
    for nxt in model.stream(idx, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=g):
        out.append(int(nxt[0]))
        text = tok.text(out)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown) :]
        shown = text
    text = tok.text(out)
    if len(text) > len(shown):
        yield text[len(shown) :]


def _check_model(model: nn.Module, tok) -> None:
    v = getattr(model, "vocab_size", tok.vocab_size)
    if v != tok.vocab_size:
        raise UserError(
            f"the tokenizer has {tok.vocab_size} tokens but the model has {v}: "
            "the tokenizer and the checkpoint do not belong together"
        )


class NextToken(nn.Module):
    """A language model seen as a classifier of the next token: ids (B, T) -> logits (B, V) at the last position."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids)[0][:, -1]


class LanguageModel(Family):
    """Language modelling (see the module docstring)."""

    METRIC = ("loss", "min")

    def check_config(self, cfg: Config) -> None:
        if cfg.optim.label_smoothing:  # the models compute their own plain next-token cross-entropy
            raise ConfigError("optim.label_smoothing does not apply to language models: set it to 0")

    def loss(self, model: nn.Module, batch, cfg: Config, part: str):
        x, y = batch
        _, loss = model(x, y)
        return loss, {}

    # deeprecipe check (checks/core.py): the loss at init is ln(vocab) (the fallback), per position (B, T) through
    # the fallback cross-entropy of model(x)[0]; the dependency check also proves that position t ignores the
    # future; the baseline's blank input is token 0 everywhere (the net can learn the unigram, not the context)
    CAUSAL = True

    # a window is block_size examples in one: fewer windows per step, more steps (context use shows after ~50)
    CHECK_DEFAULTS = {"batch_size": 8, "steps": 80, "overfit_examples": 2}

    def show_batch(self, batch, spec: DataSpec) -> str:
        """The first windows of a prepared batch as text, input and target side by side (deeprecipe check)."""
        tok = tokenizer_from_spec(spec)
        x, y = batch
        rows = [
            f"--- window {i}: input | target (shifted by one)\n"
            f"{tok.decode(x[i].tolist())!r}\n{tok.decode(y[i].tolist())!r}"
            for i in range(min(4, len(x)))
        ]
        return "\n".join(rows) + "\n"

    def evaluate(self, model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, final: bool) -> dict:
        tok = tokenizer_from_spec(data.spec)
        split_ = data.split(split)
        V = data.spec.vocab_size
        batch = max(1, min(cfg.train.eval_batch_size, 2**25 // (split_.T * V)))  # bound the (B, T, V) logits
        nll, tokens, chars = 0.0, 0, 0
        for x, y in eval_batches(split_, batch, rt.device, cfg.train.limit_eval):
            logits, _ = model(x)
            nll += F.cross_entropy(logits.float().view(-1, V), y.reshape(-1), reduction="sum").item()
            tokens += y.numel()
            # windows are consecutive, so y.flatten() is one stretch of text
            chars += y.numel() if tok.kind == "char" else len(tok.decode(y.flatten().tolist()))
        if tokens == 0:
            raise UserError(f"the {split} split has no complete window of block_size + 1 tokens")
        mean = nll / tokens
        return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "bpc": nll / max(chars, 1) / math.log(2)}

    def finish(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run_dir: Path, results: dict) -> dict:
        """A sample of the finished model into plots/sample.txt (shown in report.html)."""
        tok = tokenizer_from_spec(data.spec)
        model.eval()
        with torch.no_grad(), rt.autocast():
            text = "".join(stream_text(model, tok, start_ids(tok, ""), 500, 0.8, seed=cfg.train.seed, device=rt.device))
        (Path(run_dir) / "plots").mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "plots" / "sample.txt").write_text(text)
        return {}

    def explain(
        self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: ExplainOptions
    ) -> list[dict]:
        """Text files (a prompt each) -> how much each prompt token drives the predicted next token (or --target,
        a token id): Integrated Gradients on the token embedding's output from a prompt of newline tokens;
        "tokens" is [(token, score), ...] in prompt order, "label" the explained next token."""
        from deeprecipe.engine import explain as ex

        ex.check_method(opts.method, ("ig",), "a language model")
        if opts.target is not None and not 0 <= opts.target < spec.vocab_size:
            raise UserError(f"explain --target {opts.target}: the vocabulary has token ids 0..{spec.vocab_size - 1}")
        tok = tokenizer_from_spec(spec)
        block = int(spec.extra.get("block_size") or 0)
        net = NextToken(ex.safe_copy(model))
        base = start_ids(tok, "")[0]  # the newline token: a prompt that says nothing
        results = []
        for f in files:
            try:
                text = Path(f).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"{f}: cannot read it as UTF-8 text ({type(e).__name__}): give a text file") from None
            ids = start_ids(tok, text.removesuffix("\n"), where=f)  # the file's last newline is not the prompt's
            ids = ids[-block:] if block else ids  # as sample does: the last block_size tokens
            x = torch.tensor([ids], device=rt.device)
            with torch.no_grad():
                p = net(x).float().softmax(-1)[0]
            c = int(p.argmax()) if opts.target is None else opts.target
            r = {"file": f, "label": tok.decode([c]), "target": c, "method": "ig", "score": round(float(p[c]), 4)}
            r |= ex.token_explanation(net, f, ids, c, base, tok.decode, opts.sanity, opts.out)
            r["text"] = f"{f}: next {r['label']!r} ({r['score']:.3f}) ig: {r.pop('top')}"
            results.append(r)
        return results

    def sample(self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, opts: SampleOptions) -> Iterator[str]:
        """`deeprecipe sample RUN`: the prompt, then the generated text piece by piece as it is sampled."""
        tok = tokenizer_from_spec(spec)
        _check_model(model, tok)
        ids = start_ids(tok, opts.prompt)
        block = getattr(model, "block_size", 0)
        if block and len(ids) > block:
            warnings.warn(
                f"the prompt has {len(ids)} tokens and the context holds {block}: the model sees the last {block}",
                stacklevel=2,
            )
        if opts.max_tokens < 1:
            raise UserError(f"--max-tokens {opts.max_tokens}: must be at least 1")
        if not 0 < opts.top_p <= 1:
            raise UserError(f"--top-p {opts.top_p}: must be in (0, 1]")

        def pieces():
            yield opts.prompt
            with torch.no_grad(), rt.autocast():
                yield from stream_text(
                    model, tok, ids, opts.max_tokens, opts.temperature, opts.top_k, opts.top_p, opts.seed, rt.device
                )
            yield "\n"

        return pieces()

    def serve(self, ctx: ServeContext) -> None:
        """POST /generate: a prompt in, its continuation streamed out as it is sampled (one request at a time)."""
        tok = tokenizer_from_spec(ctx.spec)
        _check_model(ctx.model, tok)

        def generate(prompt: str, max_tokens: int, temperature: float, top_k: int, top_p: float, seed: int):
            ids = start_ids(tok, prompt, where="the prompt")  # checked here: a bad prompt is a 400, not a broken stream

            def pieces():
                with ctx.rt.autocast():
                    yield from stream_text(
                        ctx.model, tok, ids, max_tokens, temperature, top_k, top_p, seed, ctx.rt.device
                    )

            return pieces()

        ctx.text_generation("/generate", generate, "Continue a text")
