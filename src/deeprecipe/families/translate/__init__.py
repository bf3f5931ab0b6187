"""Translation: label-smoothed cross-entropy, BLEU and chrF through sacreBLEU on detokenized text.

A batch is (src (B, S), tgt (B, T)) with tgt = <s> target </s>; the net reads tgt[:, :-1] and predicts
tgt[:, 1:]. Evaluation decodes greedily (fast, for model selection by val BLEU); the finished run is scored on
the test split with beam search (model.beam, model.length_penalty). Hypotheses are decoded back to plain text
by the byte-level tokenizer, and scored against the untouched reference lines, as sacreBLEU expects.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.config import Config
from deeprecipe.core import DataSpec, UserError
from deeprecipe.data.core import Data, Draws, eval_batches
from deeprecipe.data.text import tokenizer_from_extra
from deeprecipe.family import ExplainOptions, Family, ServeContext, unwrapped
from deeprecipe.runtime import Runtime


def tokenizers(spec: DataSpec):
    """(source tokenizer, target tokenizer) saved with the run; checked against the model's vocabularies."""
    e = spec.extra
    src = tokenizer_from_extra(e.get("src_tokenizer"), e.get("src_vocab", 0))
    tgt = src if e.get("shared_vocab") else tokenizer_from_extra(e.get("tgt_tokenizer"), spec.vocab_size)
    if tgt.vocab_size != spec.vocab_size:
        raise UserError(
            f"the target tokenizer has {tgt.vocab_size} tokens but the model has {spec.vocab_size}: "
            "the tokenizer and the checkpoint do not belong together"
        )
    return src, tgt


def prepare(batch, spec: DataSpec, draws: Draws | None = None):
    src, tgt = batch
    return src, tgt[:, :-1], tgt[:, 1:]


def per_example_loss(model: nn.Module, batch, cfg: Config) -> torch.Tensor:
    """Cross-entropy per target position (B, T), 0 at padding."""
    src, tgt_in, tgt_out = batch
    logits = model(src, tgt_in).float()  # (B, T, vocab)
    return F.cross_entropy(logits.transpose(1, 2), tgt_out, ignore_index=unwrapped(model).pad, reduction="none")


def check_dependency(ctx):
    from deeprecipe.checks.training import awake, combined, dependency_verdict

    model = awake(ctx.model()).eval()
    b = ctx.train_batch(0, size=4, augment=False)

    def per(bb):
        return per_example_loss(model, bb, ctx.cfg)

    lengths = (b[2] != unwrapped(model).pad).sum(1).tolist()
    src = dependency_verdict(per, b, lambda bb: bb[0], lambda bb, x: (x, *bb[1:]), model, what="source: ")
    tgt = dependency_verdict(
        per, b, lambda bb: bb[1], lambda bb, x: (bb[0], x, bb[2]), model, True, lengths, what="target: "
    )
    return combined([src, tgt])


def decode(model: nn.Module, src: torch.Tensor, beam: int = 1, alpha: float = 0.6) -> list[list[int]]:
    m = unwrapped(model)
    max_len = min(len(m.pos) - 1, int(src.shape[1] * 1.5) + 10)
    return m.greedy(src, max_len) if beam <= 1 else m.beam_search(src, beam, alpha, max_len)


def scores(hyps: list[str], refs: list[str]) -> dict:
    """Corpus BLEU and chrF of detokenized hypotheses against one reference each (sacreBLEU defaults)."""
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score, "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score}


def score_files(hyp_file: str | Path, ref_file: str | Path) -> dict:
    from deeprecipe.data.pairs import read_lines

    hyps, refs = read_lines(Path(hyp_file)), read_lines(Path(ref_file))
    if len(hyps) != len(refs):
        raise UserError(f"{hyp_file} has {len(hyps)} lines but {ref_file} has {len(refs)}")
    return scores(hyps, refs)


def translate_split(model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, beam: int, alpha: float):
    """(hypotheses, references, summed token loss, token count) over a split (or its first limit_eval pairs)."""
    _, tgt_tok = tokenizers(data.spec)
    sp = data.split(split)
    hyps, nll, count = [], 0.0, 0
    for batch in eval_batches(sp, min(cfg.train.eval_batch_size, 256), rt.device, cfg.train.limit_eval):
        src, tgt_in, tgt_out = prepare(batch, data.spec)
        logits = model(src, tgt_in)
        nll += F.cross_entropy(
            logits.float().flatten(0, 1), tgt_out.flatten(), ignore_index=data.spec.extra["pad"], reduction="sum"
        ).item()
        count += int((tgt_out != data.spec.extra["pad"]).sum())
        hyps += [tgt_tok.text(ids) for ids in decode(model, src, beam, alpha)]
    return hyps, sp.refs[: len(hyps)], nll, count


def translate_lines(
    model: nn.Module, spec: DataSpec, lines: list[str], rt: Runtime, beam: int = 4, alpha: float = 0.6, batch: int = 64
) -> list[str]:
    """Plain sentences in, plain translations out (batches sorted by length, output in input order)."""
    from deeprecipe.data.pairs import EOS, pad

    src_tok, tgt_tok = tokenizers(spec)
    max_src = len(unwrapped(model).pos) - 1
    ids = [(src_tok.encode(s.strip()) or [EOS])[:max_src] for s in lines]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    for k in range(0, len(order), batch):
        chunk = order[k : k + batch]
        with torch.no_grad(), rt.autocast():
            hyp = decode(model, pad([ids[i] for i in chunk], rt.device), beam, alpha)
        for i, h in zip(chunk, hyp):
            out[i] = tgt_tok.text(h)  # no <s>, </s> or <pad> in what a user reads
    return out


def cross_attention(model: nn.Module, src: torch.Tensor, hyp: list[int]) -> torch.Tensor:
    """Where the decoder looks while writing `hyp` (token ids, without <s> and </s>) from `src` (1, S): (T, S)
    weights, row t the attention over the source tokens when predicting target token t (the last row: </s>),
    averaged over the heads and the decoder layers. Read from the decoder layers' source attention, asked for
    its weights by a hook; the model is not changed."""
    from deeprecipe.data.pairs import BOS

    m = unwrapped(model)
    maps: list[torch.Tensor] = []

    def ask(mod, args, kwargs):
        return args, kwargs | {"need_weights": True, "average_attn_weights": True}

    def keep(mod, args, kwargs, out):
        maps.append(out[1][0].float())  # (T, S)

    hooks = []
    for layer in m.decoder.layers:
        hooks.append(layer.multihead_attn.register_forward_pre_hook(ask, with_kwargs=True))
        hooks.append(layer.multihead_attn.register_forward_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad():
            m(src, torch.tensor([[BOS, *hyp]], device=src.device))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(maps).mean(0)


def save_attention(att: torch.Tensor, src: list[str], tgt: list[str], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    from deeprecipe.engine.plots import save_figure

    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(src), 1.2 + 0.35 * len(tgt)))
    ax.imshow(att.cpu().numpy(), cmap="viridis", vmin=0, aspect="auto")
    ax.set_xticks(range(len(src)), src, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(tgt)), tgt, fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("translation")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


class Translate(Family):
    """Translation (see the module docstring)."""

    prepare = staticmethod(prepare)
    per_example_loss = staticmethod(per_example_loss)

    METRIC = ("bleu", "max")

    def loss(self, model: nn.Module, batch, cfg: Config, part: str):
        src, tgt_in, tgt_out = batch
        logits = model(src, tgt_in)
        pad = unwrapped(model).pad
        return F.cross_entropy(
            logits.float().flatten(0, 1), tgt_out.flatten(), ignore_index=pad, label_smoothing=cfg.optim.label_smoothing
        ), {}

    # deeprecipe check (checks/core.py): the hooks below give the loss at init, the per-position loss, the source as
    # the net's input (the fallback batch[0]), and a dependency check on both sides (the source across the batch;
    # the decoder input across the batch and causally). A pair costs ~30 tokens through 6 layers and a vocabulary
    # head: small batches. The baseline is skipped: a translator starts to use its source after some hundred
    # steps, far beyond a short run (both nets learn the target language first); the dependency check proves
    # that the source reaches every target position.
    CHECK_DEFAULTS = {"batch_size": 8, "steps": 30, "overfit_examples": 4}

    CHECKS_SKIP = {"baseline": "the source starts to matter after some hundred steps, beyond the short run"}

    def expected_init_loss(self, spec: DataSpec, cfg: Config) -> tuple[float, str]:
        """ln(target vocab); a head tied to the embedding (rows N(0, 1/d)) against unit-variance features gives
        logits of variance ~1 at init, and Gaussian logits of variance s^2 cost ln V + s^2 / 2 on average."""
        tied = getattr(cfg.model, "tie_weights", False)
        return math.log(spec.vocab_size) + (0.5 if tied else 0.0), f"ln {spec.vocab_size} vocab" + (
            " + 1/2" if tied else ""
        )

    def show_batch(self, batch, spec: DataSpec) -> str:
        """The first pairs of a prepared batch as text: the source and the target the decoder must predict."""
        src_tok, tgt_tok = tokenizers(spec)
        pad, rows = spec.extra.get("pad", 0), []
        for i in range(min(6, len(batch[0]))):
            src, tgt = (b[i][b[i] != pad].tolist() for b in (batch[0], batch[2]))
            rows.append(f"src: {src_tok.decode(src)}\ntgt: {tgt_tok.decode(tgt)} ({len(src)} -> {len(tgt)} tokens)\n")
        return "\n".join(rows)

    EXTRA_CHECKS = {"dependency": check_dependency}

    def evaluate(self, model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, final: bool) -> dict:
        hyps, refs, nll, count = translate_split(model, data, split, cfg, rt, beam=1, alpha=0.0)
        return {"loss": nll / max(count, 1), **scores(hyps, refs)}

    def finish(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run_dir: Path, results: dict) -> dict:
        """Beam-search BLEU and chrF on the test split (or val), and some translations for the report."""
        split = data.final_split()
        beam, alpha = getattr(cfg.model, "beam", 4), getattr(cfg.model, "length_penalty", 0.6)
        model.eval()
        with torch.no_grad(), rt.autocast():
            hyps, refs, _, _ = translate_split(model, data, split, cfg, rt, beam, alpha)
        s = scores(hyps, refs)
        srcs = data.split(split).sources
        lines = [f"src: {a}\nref: {r}\nhyp: {h}\n" for a, r, h in list(zip(srcs, refs, hyps))[:30]]
        head = (
            f"{split}: BLEU {s['bleu']:.2f}, chrF {s['chrf']:.2f} (sacreBLEU, beam {beam}, length penalty {alpha})\n\n"
        )
        (Path(run_dir) / "plots" / "translations.txt").write_text(head + "\n".join(lines))
        return {f"{split}_bleu_beam{beam}": s["bleu"], f"{split}_chrf_beam{beam}": s["chrf"]}

    def explain(
        self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: ExplainOptions
    ) -> list[dict]:
        """Text files (a source sentence each) -> the greedy translation and its decoder-to-source attention map
        (`cross_attention`): "attention" [[...] per target token], "src_tokens", "tgt_tokens", and a heat map
        written to <stem>.attention.png (in --out, else next to the file)."""
        from deeprecipe.data.pairs import EOS, pad, read_lines
        from deeprecipe.engine import explain as ex

        method = ex.check_method(opts.method, ("attention",), "a translation model")
        if opts.target is not None:
            raise UserError("explain --target: a translation is explained as a whole (drop --target)")
        if opts.sanity:
            raise UserError("explain --sanity: the randomisation check is for attributions, not attention maps")
        src_tok, tgt_tok = tokenizers(spec)
        max_src = len(unwrapped(model).pos) - 1
        results = []
        for f in files:
            text = " ".join(read_lines(Path(f))).strip()
            if not text:
                raise UserError(f"{f}: no sentence in it (give a text file with the sentence to translate)")
            ids = (src_tok.encode(text) or [EOS])[:max_src]
            src = pad([ids], rt.device)
            with torch.no_grad():
                hyp = decode(model, src, beam=1)[0]
            att = cross_attention(model, src, hyp)
            src_names = [src_tok.decode([i]) for i in ids]
            tgt_names = [tgt_tok.decode([i]) for i in hyp] + ["</s>"]
            out = ex.out_path(f, method, opts.out)
            save_attention(att, src_names, tgt_names, out, f"{Path(f).name}: decoder attention over the source")
            translation = tgt_tok.text(hyp)
            r = {"file": f, "label": translation, "method": method, "out": str(out)}
            r |= {"src_tokens": src_names, "tgt_tokens": tgt_names, "attention": att.round(decimals=4).tolist()}
            r["text"] = f"{f}: {translation!r} attention -> {out}"
            results.append(r)
        return results

    def export_example(self, model: nn.Module, spec: DataSpec, batch: int) -> dict:
        """One teacher-forced decoder pass: source ids (B, S) and target-so-far ids (B, T) in, logits (B, T, V) out."""
        g = torch.Generator().manual_seed(batch)
        src = torch.randint(3, model.src_emb.num_embeddings, (batch, 7), generator=g)
        tgt = torch.randint(3, model.vocab_size, (batch, 5), generator=g)
        dynamic = {"src": {0: "batch", 1: "src_len"}, "tgt": {0: "batch", 1: "tgt_len"}}
        return {"inputs": {"src": src, "tgt": tgt}, "outputs": ["logits"], "dynamic": dynamic}

    def serve(self, ctx: ServeContext) -> None:
        """POST /translate: a sentence in, its translation out (beam search as the recipe says; batched)."""
        beam, alpha = getattr(ctx.cfg.model, "beam", 4), getattr(ctx.cfg.model, "length_penalty", 0.6)
        tokenizers(ctx.spec)  # fails at start-up when the run's tokenizers are missing
        ctx.translation("/translate", lambda texts: translate_lines(ctx.model, ctx.spec, texts, ctx.rt, beam, alpha))
