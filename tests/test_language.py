"""Language models and translation: properties against oracles (causality, cache = recomputation, beam 1 =
greedy, BLEU = sacreBLEU), tokenizer round trips, bad input, exact resume, and a tiny run per recipe."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from deeprecipe import config
from deeprecipe.core import UserError
from deeprecipe.data.core import DataSpec
from deeprecipe.data.text import BPETokenizer, CharTokenizer, TextData, iter_text, tokenizer_from_extra
from deeprecipe.engine import checkpoint, loop
from deeprecipe.families import get_family
from deeprecipe.models.gpt import GPT, sample_next
from deeprecipe.models.lstm import CharRNN
from deeprecipe.recipe import load, resolve

DATA = os.environ.get("DEEPRECIPE_DATA", "")
needs_data = pytest.mark.skipif(
    not DATA or not Path(DATA).is_dir(),
    reason="DEEPRECIPE_DATA is not set to the shared data folder (tinyshakespeare...)",
)
TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
) * 40


def train(cfg: config.Config, run_dir: Path, resume: bool = False) -> dict:
    """The engine's loop with the family the config names, as `deeprecipe train` runs it."""
    return loop.train(cfg, get_family(cfg.task), run_dir, resume=resume)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


def lm_models(vocab: int = 23, block: int = 16):
    torch.manual_seed(0)
    return {
        "gpt": GPT(vocab, block, n_layer=2, n_head=2, n_embd=32, dropout=0.0),
        "gpt-rope": GPT(vocab, block, n_layer=2, n_head=2, n_embd=32, dropout=0.0, rope=True),
        "lstm": CharRNN(vocab, 16, 32, 2, dropout=0.0),
    }


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["gpt", "gpt-rope", "lstm"])
def test_causal(name):
    """The output at position t does not change when tokens after t change."""
    model = lm_models()[name].eval()
    x = torch.randint(0, 23, (2, 16))
    t = 9
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, 23, (2, 16 - t - 1))
    a, _ = model(x)
    b, _ = model(y)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("name", ["gpt", "gpt-rope", "lstm"])
def test_loss_at_init_near_ln_vocab(name):
    model = lm_models(vocab=50)[name]
    _, loss = model(torch.randint(0, 50, (4, 16)), torch.randint(0, 50, (4, 16)))
    assert abs(loss.item() - math.log(50)) < 0.3


@pytest.mark.parametrize("name", ["gpt", "gpt-rope"])
def test_kv_cache_equals_recomputation(name):
    """Cached logits equal a full forward pass; greedy generation is the same with and without the cache,
    including past the context length, where the window slides."""
    model = lm_models()[name].eval()
    x = torch.randint(0, 23, (3, 12))
    full, _ = model(x)
    from deeprecipe.models.gpt import KVCache

    cache = KVCache(model.n_layer)
    first, _ = model(x[:, :5], cache=cache)
    steps = [first] + [model(x[:, i : i + 1], cache=cache)[0] for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    a = model.generate(x[:, :4], 30, temperature=0.0, use_cache=True)  # 34 > block_size 16
    b = model.generate(x[:, :4], 30, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("T,S", [(16, 16), (4, 12), (1, 9)])
def test_explicit_bf16_attention_equals_the_float_kernel(T, S):
    """Where gpt.attention forms the scores itself (bf16 on the CPU), its output and gradients are those of
    F.scaled_dot_product_attention in float32 on the same bf16 inputs, to bf16's precision: causal (T == S), a
    cache's offset mask (T < S) and one query; float32 inputs go to the kernel itself, bit for bit (more keys
    than EXPLICIT_MAX_KEYS: the next test)."""
    import torch.nn.functional as F

    from deeprecipe.models import gpt

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g).bfloat16() for n in (T, S, S))
    mask = None if S == T or T == 1 else torch.ones(T, S, dtype=torch.bool).tril(S - T)
    ref_in = [t.float().requires_grad_() for t in (q, k, v)]
    got_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, attn_mask=mask, is_causal=mask is None and T == S > 1)
    got = gpt.attention(*got_in, mask, 0.0)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)
    w = torch.randn(ref.shape, generator=g)
    (ref * w).sum().backward()
    (got.float() * w).sum().backward()
    for a, b in zip(got_in, ref_in):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=3e-2, rtol=3e-2)
    f = [t.float() for t in (q, k, v)]  # float32: the kernel's own result
    causal = mask is None and T == S > 1
    assert torch.equal(
        gpt.attention(*f, mask, 0.0), F.scaled_dot_product_attention(*f, attn_mask=mask, is_causal=causal)
    )


def test_bf16_attention_over_many_keys_uses_the_kernel(monkeypatch):
    import torch.nn.functional as F

    from deeprecipe.models import gpt

    calls = []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(kw) or a[0])
    q = torch.randn(1, 1, 4, 8).bfloat16()
    gpt.attention(q, q, q, None, 0.0)
    assert not calls
    monkeypatch.setattr(gpt, "EXPLICIT_MAX_KEYS", 3)
    gpt.attention(q, q, q, None, 0.0)
    assert calls == [{"attn_mask": None, "is_causal": True, "dropout_p": 0.0}]


def test_rope_turns_feature_pairs_as_complex_numbers_and_scores_depend_on_offsets_only():
    """Oracle: RoPE is the multiplication of each (x_i, x_{i + d/2}) pair, read as the complex number
    x_i + j x_{i + d/2}, by exp(j t base^(-i / (d/2))); so <rot(q, t), rot(k, s)> depends on t - s alone."""
    from deeprecipe.models.gpt import rope_angles, rotate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 8, generator=g)  # (B, h, T, hd)
    cos, sin = rope_angles(10, 8)
    got = rotate(x, cos, sin)
    z = torch.complex(x[..., :4].double(), x[..., 4:].double())
    t = torch.arange(10, dtype=torch.float64)[:, None]
    turned = z * torch.exp(1j * t * 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4))
    torch.testing.assert_close(got.double(), torch.cat([turned.real, turned.imag], -1), atol=1e-5, rtol=1e-5)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)
    qs, ks = q.expand(10, 8)[None, None], k.expand(10, 8)[None, None]
    rq, rk = rotate(qs, cos, sin)[0, 0], rotate(ks, cos, sin)[0, 0]
    for shift in (1, 4):  # positions (2, 5) and (2 + shift, 5 + shift): the same score
        torch.testing.assert_close(rq[2] @ rk[5], rq[2 + shift] @ rk[5 + shift], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rq[2] @ rk[5], rq[2] @ rk[6])


def test_sampling_cutoffs():
    logits = torch.randn(5, 40)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=g), logits.argmax(-1))
    top5 = logits.topk(5, -1).indices
    for _ in range(20):
        s = sample_next(logits, 2.0, top_k=5, generator=g)
        assert (top5 == s[:, None]).any(-1).all()


# ---------------------------------------------------------------------------------------------- text data


def test_tokenizer_round_trips():
    text = "Héllo wörld, 日本語!\n\tend  "
    char = CharTokenizer.train([text])
    assert char.decode(char.encode(text)) == text
    bpe = BPETokenizer.train([TEXT, text], vocab_size=300)
    other = "unseen: Ωmega 🙂 \r\n x"
    for t in (text, other, TEXT[:500]):
        assert bpe.decode(bpe.encode(t)) == t
    for tok in (char, bpe):  # saved in spec.extra (JSON) and rebuilt
        import json

        again = tokenizer_from_extra(json.loads(json.dumps(tok.to_extra())), tok.vocab_size)
        assert again.encode(text) == tok.encode(text)


def test_text_data_windows_and_tail_split(corpus, tmp_path):
    data = TextData(path=str(corpus), block_size=8, val_fraction=0.1, cache=str(tmp_path / "c")).build()
    tok = tokenizer_from_extra(data.spec.extra["tokenizer"], data.spec.vocab_size)
    n_val = int(len(TEXT) * 0.1)
    # the val split is the tail of the text, walked in non-overlapping windows
    x, y = data.val.take(torch.arange(2))
    assert tok.decode(x[0].tolist()) == TEXT[len(TEXT) - n_val : len(TEXT) - n_val + 8]
    assert torch.equal(x[1, 0], y[0, -1])
    a = data.train.step_batch(3, 7, 4)
    b = data.train.step_batch(3, 7, 4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])
    # memory-mapped (nothing held in memory) gives the same windows
    mm = TextData(path=str(corpus), block_size=8, cache=str(tmp_path / "c"), in_memory_mb=0).build()
    assert isinstance(mm.train.tokens, __import__("numpy").ndarray)
    assert all(torch.equal(u, v) for u, v in zip(mm.train.step_batch(3, 7, 4), a))


@pytest.mark.parametrize(
    "content,match", [(b"", "empty"), (b"abc\x00def\n", "binary"), (b"caf\xe9 latin-1\n", "not UTF-8")]
)
def test_bad_text_files(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(UserError, match=match):
        TextData(path=str(p), cache=str(tmp_path / "c")).build()
    if content:
        with pytest.raises(UserError, match=match):
            list(iter_text([p]))


def test_bad_prompt_and_mismatch():
    tok = CharTokenizer("abc\n")
    with pytest.raises(UserError, match="lacks"):
        tok.encode("abz", where="--prompt")
    with pytest.raises(UserError, match="do not belong together"):
        tokenizer_from_extra(tok.to_extra(), vocab_size=65)


# ---------------------------------------------------------------------------------------------- training


def lm_config(recipe: str, corpus: Path, tmp: Path, steps: int, **model) -> config.Config:
    raw, name = config.read_recipe(recipe)
    raw["data"].update(path=str(corpus), block_size=16, vocab_size=300, cache=str(tmp / "cache"))
    keep = {"name": raw["model"]["name"]}
    raw["model"] = (
        keep
        | ({"n_layer": 1, "n_head": 2, "n_embd": 32} if keep["name"] == "gpt" else {"n_layer": 1, "hidden": 32})
        | model
    )
    raw["train"].update(
        steps=steps,
        batch_size=8,
        eval_every=0,
        ckpt_every=5,
        device="cpu",
        limit_eval=8,
        eval_batch_size=8,
        log_every=5,
    )
    raw["optim"].update(warmup=2, lr=0.01)
    return resolve(raw, name)


@pytest.mark.parametrize("opt", ["adamw", "muon"])
def test_lm_exact_resume(corpus, tmp_path, opt):
    """k steps, then resume to N, gives bitwise the same weights as N steps straight (a constant schedule, so
    that stopping at k is the same as being killed at k; dropout on, so the RNG state must be restored too);
    with Muon too (its momentum and AdamW's moments are both in the checkpoint)."""
    cfg = lm_config("shakespeare-char-gpt", corpus, tmp_path, 10, dropout=0.1)
    cfg.optim.schedule, cfg.optim.name = "constant", opt
    train(cfg, tmp_path / "full")
    cfg5 = lm_config("shakespeare-char-gpt", corpus, tmp_path, 5, dropout=0.1)
    cfg5.optim.schedule, cfg5.optim.name = "constant", opt
    train(cfg5, tmp_path / "split")
    train(cfg, tmp_path / "split", resume=True)
    a = checkpoint.load(checkpoint.latest(tmp_path / "full" / "checkpoints"))[0]
    b = checkpoint.load(checkpoint.latest(tmp_path / "split" / "checkpoints"))[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_from_a_run_lets_fine_tuning_load_every_tensor(corpus, tmp_path):
    """data.tokenizer_from: another text is encoded with the source run's vocabulary, so --init-from loads the
    embedding and the tied head too; a character that vocabulary lacks is a one-line error."""
    from deeprecipe.engine.finetune import load_matching, read_source

    train(lm_config("shakespeare-char-gpt", corpus, tmp_path, 3), tmp_path / "src")
    other = tmp_path / "other.txt"
    other.write_text("we speak, all of us.\n" * 60)  # fewer distinct characters than the source text
    fresh = TextData(path=str(other), block_size=16, cache=str(tmp_path / "c")).build()
    data = TextData(path=str(other), block_size=16, cache=str(tmp_path / "c"), tokenizer_from=str(tmp_path / "src"))
    tuned = data.build()
    saved = __import__("json").loads((tmp_path / "src" / "spec.json").read_text())
    assert tuned.spec.extra["tokenizer"] == saved["extra"]["tokenizer"]
    assert fresh.spec.vocab_size < tuned.spec.vocab_size == saved["vocab_size"]
    model = resolve(
        {
            **config.read_recipe("shakespeare-char-gpt")[0],
            "model": {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 32},
        },
        "x",
    ).model.build(tuned.spec)
    report = load_matching(model, read_source(str(tmp_path / "src")))
    assert not report["skipped"] and not report["new"] and "tok_emb.weight" in report["loaded"]
    bad = tmp_path / "bad.txt"
    bad.write_text("speak \u00a7 all\n" * 60)
    with pytest.raises(UserError, match="lacks"):
        TextData(path=str(bad), block_size=16, cache=str(tmp_path / "c"), tokenizer_from=str(tmp_path / "src")).build()
    with pytest.raises(UserError, match="tokenizer_from"):
        TextData(path=str(other), cache=str(tmp_path / "c"), tokenizer_from=str(tmp_path / "nowhere")).build()


@pytest.mark.parametrize("recipe", ["shakespeare-char-gpt", "shakespeare-char-lstm", "shakespeare-bpe-gpt", "text-gpt"])
def test_lm_recipe_tiny_run(recipe, corpus, tmp_path):
    cfg = lm_config(recipe, corpus, tmp_path, 30)
    final = train(cfg, tmp_path / "run")
    spec = DataSpec(**__import__("json").loads((tmp_path / "run" / "spec.json").read_text()))
    assert final["val_loss"] < math.log(spec.vocab_size) - 0.5  # it learned something
    assert final["val_ppl"] == pytest.approx(math.exp(final["val_loss"]), rel=1e-6)
    assert (tmp_path / "run" / "plots" / "sample.txt").read_text()
    # `deeprecipe sample` rebuilds everything from the run folder
    from deeprecipe.cli import main

    with torch.enable_grad():  # in case loading a run switches gradients off for the process
        args = ["sample", str(tmp_path / "run"), "--prompt", "First", "--max-tokens", "20", "--device", "cpu"]
        assert main(args) == 0
    # `deeprecipe explain`: Integrated Gradients of the predicted next token over the prompt's tokens
    from deeprecipe.engine.run import load_run
    from deeprecipe.family import ExplainOptions

    family = get_family("lm")
    cfg, spec, model, rt = load_run(tmp_path / "run", family, "cpu")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("First, we\n")
    (r,) = family.explain(model, spec, cfg, rt, [str(prompt)], ExplainOptions())
    assert "".join(t for t, _ in r["tokens"]) == "First, we"  # every prompt token, in order
    total = sum(v for _, v in r["tokens"])
    assert abs(r["delta"]) < 0.05 * (1 + abs(total)), r  # completeness: the scores add up to f(x) - f(baseline)
    with pytest.raises(UserError, match="token ids 0.."):
        family.explain(model, spec, cfg, rt, [str(prompt)], ExplainOptions(target=spec.vocab_size))


def test_char_bpc_equals_loss_in_bits(corpus, tmp_path):
    cfg = lm_config("shakespeare-char-gpt", corpus, tmp_path, 5)
    final = train(cfg, tmp_path / "run")
    assert final["val_bpc"] == pytest.approx(final["val_loss"] / math.log(2), rel=1e-6)


@needs_data
def test_shakespeare_data():
    cfg = load("shakespeare-char-gpt")
    data = cfg.data.build()
    assert data.spec.vocab_size == 65
    assert data.spec.extra["tokens"]["train"] + data.spec.extra["tokens"]["val"] == 1_115_394


# ---------------------------------------------------------------------------------------------- translation

WORDS = {
    "a": "ein",
    "man": "mann",
    "woman": "frau",
    "dog": "hund",
    "runs": "läuft",
    "sits": "sitzt",
    "big": "großer",
    "small": "kleiner",
    "red": "roter",
    "the": "der",
    "park": "park",
    "in": "im",
}


@pytest.fixture
def parallel(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    keys = list(WORDS)
    for split, n in (("train", 300), ("val", 20), ("test", 20)):
        src = [
            " ".join(
                keys[i]
                for i in torch.randint(0, len(keys), (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)
            )
            for _ in range(n)
        ]
        (tmp_path / f"{split}.en").write_text("\n".join(src) + "\n")
        (tmp_path / f"{split}.de").write_text("\n".join(" ".join(WORDS[w] for w in s.split()) for s in src) + "\n")
    return tmp_path


def tiny_seq2seq(vocab: int = 40):
    from deeprecipe.models.seq2seq import Seq2Seq

    torch.manual_seed(0)
    return Seq2Seq(vocab, vocab, d=32, n_head=2, enc_layers=1, dec_layers=1, ff=64, dropout=0.0).eval()


def test_text_a_user_reads_has_no_special_tokens(monkeypatch):
    """A barely trained translator or language model may emit <s>, </s> or <pad> anywhere: decode keeps them (an
    exact round trip), but translations, samples and served text leave them out."""
    from deeprecipe.data.pairs import BOS, EOS, PAD, SPECIAL
    from deeprecipe.engine.device import Runtime
    from deeprecipe.families import translate
    from deeprecipe.families.lm import stream_text

    tok = BPETokenizer.train(["ein haus und ein hund\n"] * 3, vocab_size=300, special=SPECIAL)
    ids = tok.encode("ein haus")
    assert tok.decode([BOS, *ids, EOS]) == "<s>ein haus</s>"
    vocab = {"src_tokenizer": tok.to_extra(), "src_vocab": tok.vocab_size, "shared_vocab": True}
    spec = DataSpec(vocab_size=tok.vocab_size, extra=vocab)
    model = torch.nn.Module()
    model.pos = torch.zeros(64)  # what translate_lines reads for the longest source
    monkeypatch.setattr(translate, "decode", lambda m, src, beam, alpha: [[BOS, BOS, *ids, PAD]] * len(src))
    assert translate.translate_lines(model, spec, ["a house"], Runtime(torch.device("cpu"), None)) == ["ein haus"]

    class Babbler(torch.nn.Module):  # a language model's stream of next tokens
        def stream(self, idx, n, **kw):
            yield from (torch.tensor([t]) for t in [BOS, *ids, EOS, PAD][:n])

    assert "".join(stream_text(Babbler(), tok, ids, 10)) == "ein haus"
    assert tok.text([BOS, BOS, *ids, PAD]) == "ein haus"


def test_beam_one_equals_greedy():
    model = tiny_seq2seq()
    src = torch.randint(3, 40, (6, 9))
    src[3:, 5:] = 0  # padded sentences
    greedy = model.greedy(src, max_len=12)
    for alpha in (0.0, 0.6, 1.0):
        assert model.beam_search(src, beam=1, alpha=alpha, max_len=12) == greedy
    beams = model.beam_search(src, beam=4, alpha=0.6, max_len=12)
    assert len(beams) == 6 and all(2 not in b for b in beams)  # no </s> inside a hypothesis


def test_source_padding_is_masked():
    """A sentence's decoder output does not change when it is batched with a longer, padded-against one."""
    model = tiny_seq2seq()
    short, long_ = torch.randint(3, 40, (1, 5)), torch.randint(3, 40, (1, 11))
    tgt = torch.randint(3, 40, (1, 7))
    alone = model(short, tgt)
    batch = torch.cat([torch.cat([short, torch.zeros(1, 6, dtype=torch.long)], 1), long_])
    together = model(batch, tgt.repeat(2, 1))[:1]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-4)


def test_bleu_equals_sacrebleu(tmp_path):
    import sacrebleu

    from deeprecipe.families.translate import score_files

    refs = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch im Park."]
    hyps = ["Ein Mann fährt ein Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest im Park."]
    (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n")
    got = score_files(tmp_path / "hyp.txt", tmp_path / "ref.txt")
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    assert score_files(tmp_path / "ref.txt", tmp_path / "ref.txt")["bleu"] == pytest.approx(100.0)


def test_parallel_bad_input(parallel):
    from deeprecipe.data.pairs import PairsData

    (parallel / "val.de").write_text("eins\nzwei\n")
    with pytest.raises(UserError, match="has 20 lines.*has 2"):
        PairsData(path=str(parallel), vocab_size=100).build()
    (parallel / "val.de").write_bytes(b"\xff\xfe bad\n" * 20)
    with pytest.raises(UserError, match="not UTF-8"):
        PairsData(path=str(parallel), vocab_size=100).build()


def test_tsv_pairs(parallel):
    from deeprecipe.data.pairs import PairsData

    en, de = (parallel / "train.en").read_text().splitlines(), (parallel / "train.de").read_text().splitlines()
    (parallel / "all.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in zip(en, de)))
    data = PairsData(path=str(parallel), train="all.tsv", val="", vocab_size=100).build()
    assert len(data.train) == 300 and data.train.refs == de
    src, tgt = data.train.step_batch(0, 3, 16)
    assert src.shape[0] == 16 and (tgt[:, 0] == 1).all()


def test_translate_recipe_tiny_run(parallel, tmp_path):
    raw, name = config.read_recipe("multi30k-en-de")
    raw["data"].update(path=str(parallel), test="test", vocab_size=120)
    raw["model"].update(d_model=64, n_head=2, enc_layers=1, dec_layers=1, beam=2, dropout=0.0)
    raw["train"].update(steps=150, batch_size=32, eval_every=0, ckpt_every=150, device="cpu", log_every=50)
    raw["optim"].update(lr=0.003, warmup=10)
    final = train(resolve(raw, name), tmp_path / "run")
    assert final["val_chrf"] > 30 and "test_bleu_beam2" in final  # chance is about 15
    assert (tmp_path / "run" / "plots" / "translations.txt").read_text().startswith("test: BLEU")
    from deeprecipe.cli import main

    with torch.enable_grad():
        assert main(["translate", str(tmp_path / "run"), "a big dog", "the man sits", "--device", "cpu"]) == 0
    # `deeprecipe explain`: the greedy translation and where its decoder looked in the source
    from deeprecipe.engine.run import load_run
    from deeprecipe.families.translate import translate_lines
    from deeprecipe.family import ExplainOptions

    family = get_family("translate")
    cfg, spec, model, rt = load_run(tmp_path / "run", family, "cpu")
    sentence = tmp_path / "s.txt"
    sentence.write_text("a big dog\n")
    (r,) = family.explain(model, spec, cfg, rt, [str(sentence)], ExplainOptions(out=tmp_path / "ex"))
    assert r["label"] == translate_lines(model, spec, ["a big dog"], rt, beam=1)[0]  # the hooks change nothing
    att = torch.tensor(r["attention"])
    assert att.shape == (len(r["tgt_tokens"]), len(r["src_tokens"])) and r["tgt_tokens"][-1] == "</s>"
    torch.testing.assert_close(att.sum(1), torch.ones(len(att)), atol=1e-3, rtol=0)  # each row a distribution
    assert "".join(r["src_tokens"]).strip() == "a big dog" and (tmp_path / "ex" / "s.attention.png").stat().st_size
    with pytest.raises(UserError, match="a translation model takes attention"):
        family.explain(model, spec, cfg, rt, [str(sentence)], ExplainOptions(method="ig"))


def test_checkpoint_tokenizer_mismatch(corpus, tmp_path, capsys):
    """A run whose spec.json vocabulary no longer matches its weights: one-line errors, not a kernel crash."""
    import json

    from deeprecipe.cli import main

    train(lm_config("shakespeare-char-gpt", corpus, tmp_path, 2), tmp_path / "run")
    spec_path = tmp_path / "run" / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["extra"]["tokenizer"]["chars"] += "#"  # a tokenizer of another vocabulary
    spec_path.write_text(json.dumps(spec))
    args = ["sample", str(tmp_path / "run"), "--max-tokens", "5", "--device", "cpu"]
    with torch.enable_grad():
        assert main(args) == 2  # the tokenizer disagrees with the model's vocabulary
        assert "do not belong together" in capsys.readouterr().err
        spec["vocab_size"] += 1
        spec_path.write_text(json.dumps(spec))
        assert main(args) == 2  # the model rebuilt from spec.json disagrees with the checkpoint
        assert "checkpoint does not match" in capsys.readouterr().err


@needs_data
def test_multi30k_data():
    cfg = load("multi30k-en-de", ["data.vocab_size=2000"])
    data = cfg.data.build()
    assert (len(data.train), len(data.val), len(data.test)) == (29000, 1014, 1000)
    assert data.test.refs[0] == data.test.refs[0].strip() and data.spec.extra["src_vocab"] == data.spec.vocab_size


def test_gpt2_124m_layout():
    """The gpt2-124M size with biases and GPT-2's vocabulary and context has GPT-2 small's parameter count."""
    from deeprecipe.models.gpt import GPTConfig

    spec = DataSpec(vocab_size=50257, extra={"block_size": 1024})
    with torch.device("meta"):
        model = GPTConfig(size="gpt2-124M", bias=True).build(spec)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_a_rope_gpt_exports_to_onnx_with_any_batch_and_length(tmp_path):
    from deeprecipe.serve import export

    model = lm_models()["gpt-rope"].eval()
    ex = {"inputs": {"tokens": torch.randint(0, 23, (2, 8))}, "dynamic": {"tokens": {0: "batch", 1: "time"}}}
    export.export_onnx(export.TensorsOnly(model).eval(), ex, tmp_path / "rope.onnx")
    ids = torch.randint(0, 23, (3, 11))  # another batch size and length: the angles are sliced to it
    got = export.run_onnx(tmp_path / "rope.onnx", {"tokens": ids})[0]
    torch.testing.assert_close(got, model(ids)[0], atol=1e-4, rtol=1e-3)
