"""Each check is proven on a planted bug: it fails on the buggy model/data/family and passes on the correct one.

Tiny setups (8x8 digits, an MLP, a one-layer attention net, tiny registry models of every family on synthetic
data) keep the file to seconds on a CPU; the registry test runs every built-in recipe with tiny settings.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe import config
from deeprecipe.checks import CHECKS, Ctx, run_checks
from deeprecipe.checks import data as dchecks
from deeprecipe.checks import training as tchecks
from deeprecipe.checks.core import init_head_from_priors
from deeprecipe.checks.lr_find import lr_range_test
from deeprecipe.cli import main
from deeprecipe.data.core import Data, DataError, DataSpec, TensorSplit
from deeprecipe.families import get_family
from deeprecipe.families.classify import Classify
from deeprecipe.families.lm import LanguageModel
from deeprecipe.models.head import Classifier
from deeprecipe.recipe import load

# ---------------------------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def cfg():
    return load("digits-mlp", ["train.device=cpu"])


@pytest.fixture(scope="module")
def digits(cfg):
    return cfg.data.build()


def clone(data: Data, **splits) -> Data:
    d = copy.copy(data)
    for k, v in splits.items():
        setattr(d, k, v)
    return d


def ctx_for(cfg, tmp_path, data, model=None, family=None, **kw) -> Ctx:
    kw.setdefault("steps", 30)
    return Ctx(cfg, tmp_path, family or get_family(cfg.task), data=data, make_model=model, **kw)


class Net(Classifier, nn.Module):
    """The correct tiny classifier: flatten -> 64 -> classes (its `head` given by get_classifier: models/head.py)."""

    def __init__(self, spec: DataSpec):
        super().__init__()
        c, (h, w) = spec.in_channels, spec.image_size
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 64), nn.ReLU())
        self.head = nn.Linear(64, spec.num_classes)

    def forward(self, x):
        return self.head(self.body(x))


class SoftmaxNet(Net):  # softmax applied before cross-entropy (which applies its own)
    def forward(self, x):
        return super().forward(x).softmax(-1)


class MixNet(Net):  # a reshape that mixes examples: (B, C, H, W) read as (C*H*W, B)
    def forward(self, x):
        B = len(x)
        return self.head(self.body[1:](x.reshape(-1, B).t().reshape(B, -1)))


class BatchStatNet(Net):  # a norm that uses batch statistics even at eval time
    def __init__(self, spec):
        super().__init__(spec)
        self.norm = nn.BatchNorm1d(64, track_running_stats=False)

    def forward(self, x):
        return self.head(self.norm(self.body(x)))


class BlindNet(Net):  # ignores its input: every example gets the same logits
    def forward(self, x):
        return self.head(self.body(torch.zeros_like(x)))


class DetachNet(Net):  # a stray detach: the body never learns
    def forward(self, x):
        return self.head(self.body(x).detach())


class FrozenNet(Net):  # a layer frozen by mistake
    def __init__(self, spec):
        super().__init__(spec)
        self.body.requires_grad_(False)


class LoudHead(Net):  # head weights 50x too large: confident and wrong at step 0
    def __init__(self, spec):
        super().__init__(spec)
        with torch.no_grad():
            self.head.weight.mul_(50)


class BiasedHead(Net):  # a head bias that prefers class 0 for no reason
    def __init__(self, spec):
        super().__init__(spec)
        with torch.no_grad():
            self.head.bias.zero_()[0] = 6.0


class NondetNet(Net):  # init from an unseeded generator: every build differs
    def __init__(self, spec):
        super().__init__(spec)
        with torch.no_grad():
            self.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(torch.seed()))


# ---------------------------------------------------------------------------------------------- model bugs


@pytest.mark.parametrize(
    "check, bad",
    [
        ("overfit", SoftmaxNet),
        ("dependency", MixNet),
        ("dependency", BatchStatNet),
        ("dependency", BlindNet),
        ("baseline", BlindNet),
        ("grad_flow", DetachNet),
        ("grad_flow", FrozenNet),
        ("init_loss", LoudHead),
        ("init_prior", BiasedHead),
        ("seed", NondetNet),
    ],
)
def test_planted_model_bug_fails_and_correct_model_passes(cfg, digits, tmp_path, check, bad):
    buggy = CHECKS[check](ctx_for(cfg, tmp_path, digits, bad))
    assert buggy.status == "fail", buggy
    good = CHECKS[check](ctx_for(cfg, tmp_path, digits, Net))
    assert good.status == "pass", good


def test_dependency_does_not_blame_a_zero_initialized_head(cfg, digits, tmp_path):
    """A head zeroed at init (the usual fix for init_prior) makes every input gradient exactly 0 at step 0."""

    def zero_head(spec):
        m = Net(spec)
        nn.init.zeros_(m.head.weight)
        return m

    assert tchecks.dependency(ctx_for(cfg, tmp_path, digits, zero_head)).status == "pass"


def test_loss_down_fails_at_a_learning_rate_that_diverges(cfg, digits, tmp_path):
    hot = copy.deepcopy(cfg)
    hot.optim.lr, hot.optim.clip = 30.0, 0.0
    assert tchecks.loss_down(ctx_for(hot, tmp_path, digits, Net)).status == "fail"
    assert tchecks.loss_down(ctx_for(cfg, tmp_path, digits, Net)).status == "pass"


def test_init_prior_offers_the_fix_on_imbalanced_labels(cfg, digits, tmp_path):
    x, y = digits.train.tensors
    keep = torch.cat([(y == 0).nonzero().flatten(), (y != 0).nonzero().flatten()[:60]])  # ~75% class 0
    data = clone(digits, train=TensorSplit(x[keep], y[keep]))
    v = tchecks.init_prior(ctx_for(cfg, tmp_path, data, Net))
    assert v.status == "warn" and "log(priors)" in v.advice

    def fixed(spec):
        m = Net(spec)
        counts = torch.bincount(y[keep], minlength=10).float()
        assert init_head_from_priors(m, counts / counts.sum())
        return m

    assert tchecks.init_prior(ctx_for(cfg, tmp_path, data, fixed)).status == "pass"
    assert tchecks.init_loss(ctx_for(cfg, tmp_path, data, fixed)).status == "pass"  # entropy of the priors


# ---------------------------------------------------------------------------------------------- data bugs


def shuffled_labels(d: Data) -> Data:
    g = torch.Generator().manual_seed(1)
    x, y = d.train.tensors
    vx, vy = d.val.tensors
    return clone(
        d,
        train=TensorSplit(x, y[torch.randperm(len(y), generator=g)]),
        val=TensorSplit(vx, vy[torch.randperm(len(vy), generator=g)]),
    )


@pytest.mark.parametrize("check", ["baseline", "dynamics"])
def test_labels_shuffled_apart_from_inputs(cfg, digits, tmp_path, check):
    assert CHECKS[check](ctx_for(cfg, tmp_path, shuffled_labels(digits), Net)).status == "fail"
    assert CHECKS[check](ctx_for(cfg, tmp_path, digits, Net)).status == "pass"


def test_saliency_warns_on_an_explanation_that_shows_nothing_learnt(digits, tmp_path):
    """The oracle is what the net can have learnt in the short run: the registry's CNN on the digits' labels
    passes (Grad-CAM stands out from untrained copies' maps); with the labels shuffled apart from the inputs, or
    the same CNN blind to its input, Grad-CAM is one of an untrained net's maps on most images: warn. An MLP has
    no feature map: skipped with its reason."""
    cnn = load("digits-cnn", ["train.device=cpu", "model.channels=[8,16]", "model.dense=[32]"])

    class Blind(nn.Module):
        def __init__(self, spec):
            super().__init__()
            self.net = cnn.model.build(spec)

        def forward(self, x):
            return self.net(torch.zeros_like(x))

    work = dict(steps=60, batch_size=32)
    good = tchecks.saliency(ctx_for(cnn, tmp_path, digits, **work))
    assert good.status == "pass" and good.value <= 0.25, good
    for data, net in ((shuffled_labels(digits), None), (digits, Blind)):
        bad = tchecks.saliency(ctx_for(cnn, tmp_path, data, net, **work))
        assert bad.status == "warn" and bad.value > 0.5 and "uninformative on" in bad.measured, bad
    mlp = tchecks.saliency(ctx_for(cnn, tmp_path, digits, Net))
    assert mlp.status == "skip" and "no conv feature map" in mlp.advice, mlp


def test_leakage_test_images_copied_into_train(cfg, digits, tmp_path):
    (x, y), (tx, ty) = digits.train.tensors, digits.test.tensors
    leaky = clone(digits, train=TensorSplit(torch.cat([x, tx[:40]]), torch.cat([y, ty[:40]])))
    v = dchecks.leakage(ctx_for(cfg, tmp_path, leaky))
    assert v.status == "fail" and "test: 40 of" in v.measured
    assert dchecks.leakage(ctx_for(cfg, tmp_path, digits)).status == "pass"


def test_leakage_finds_near_copies(cfg, tmp_path):
    fashion = load("fashion-mnist-cnn")
    try:
        d = fashion.data.build()
    except DataError as e:
        pytest.skip(f"Fashion-MNIST is not installed: {e}")
    x, y = d.train.tensors[0][:3000], d.train.tensors[1][:3000]
    tx, ty = d.test.tensors[0][:1000], d.test.tensors[1][:1000]
    near = (tx[:50].float() * 0.9 + 10 + torch.randn(50, *tx.shape[1:]) * 2).clamp(0, 255).to(torch.uint8)
    clean = Data(d.spec, TensorSplit(x, y), None, TensorSplit(tx, ty))
    leaky = Data(d.spec, TensorSplit(torch.cat([x, near]), torch.cat([y, ty[:50]])), None, TensorSplit(tx, ty))
    assert dchecks.leakage(ctx_for(fashion, tmp_path, clean)).status == "pass"
    assert dchecks.leakage(ctx_for(fashion, tmp_path, leaky)).status == "fail"


def test_duplicates_and_conflicting_labels(cfg, digits, tmp_path):
    x, y = digits.train.tensors
    doubled = clone(digits, train=TensorSplit(torch.cat([x, x[:300]]), torch.cat([y, (y[:300] + 1) % 10])))
    v = dchecks.duplicates(ctx_for(cfg, tmp_path, doubled))
    assert v.status == "fail" and "300 exact" in v.measured and "300 with conflicting" in v.measured
    assert dchecks.duplicates(ctx_for(cfg, tmp_path, digits)).status == "pass"


def test_label_ids_out_of_range(cfg, digits, tmp_path):
    tx, ty = digits.test.tensors
    bad = clone(digits, test=TensorSplit(tx, torch.where(ty == 9, 10, ty)))
    v = dchecks.labels(ctx_for(cfg, tmp_path, bad))
    assert v.status == "fail" and "test" in v.measured
    assert dchecks.labels(ctx_for(cfg, tmp_path, digits)).status == "pass"


def test_balance_missing_and_rare_classes(cfg, digits, tmp_path):
    x, y = digits.train.tensors
    no3 = clone(digits, train=TensorSplit(x[y != 3], y[y != 3]))
    assert dchecks.balance(ctx_for(cfg, tmp_path, no3)).status == "fail"
    rare = torch.cat([(y != 3).nonzero().flatten(), (y == 3).nonzero().flatten()[:5]])
    assert dchecks.balance(ctx_for(cfg, tmp_path, clone(digits, train=TensorSplit(x[rare], y[rare])))).status == "warn"
    v = dchecks.balance(ctx_for(cfg, tmp_path, digits))
    assert v.status == "pass" and (tmp_path / v.plots[0]).is_file()


def test_batch_check_catches_a_missing_normalization(cfg, digits, tmp_path):
    class RawPrepare(Classify):
        def prepare(self, batch, spec, draws):  # forgot normalize(): pixels 0..255 reach the net
            return batch[0].float(), batch[1]

        def show_batch(self, batch, spec):  # no pictures: fast
            return None

    assert dchecks.batch(ctx_for(cfg, tmp_path, digits, family=RawPrepare())).status == "fail"
    v = dchecks.batch(ctx_for(cfg, tmp_path, digits))
    assert v.status == "pass" and {Path(p).name for p in v.plots} == {"examples.png", "batch.png"}


def write_folder(root: Path, corrupt: bool) -> None:
    from torchvision.io import write_png

    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            img = torch.randint(0, 255, (1, 8, 8), generator=g, dtype=torch.uint8)
            write_png(img, str(root / c / f"{i}.png"))
    if corrupt:
        (root / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")


def test_files_check_names_the_corrupt_file_and_the_verb_exits_3(tmp_path, capsys):
    for corrupt in (False, True):
        root = tmp_path / f"imgs{int(corrupt)}"
        write_folder(root, corrupt)
        icfg = load("imagefolder-resnet", [f"data.path={root}", "data.image_size=8"])
        v = dchecks.files(Ctx(icfg, tmp_path, get_family(icfg.task)))
        assert v.status == ("fail" if corrupt else "pass"), v
        if corrupt:
            assert "3.png" in v.measured
            with pytest.raises(SystemExit) as e:
                main(
                    [
                        "check",
                        "imagefolder-resnet",
                        "--set",
                        f"data.path={root}",
                        "--set",
                        "data.image_size=8",
                        "--out",
                        str(tmp_path / "run"),
                        "--only",
                        "files,labels",
                    ]
                )
            assert e.value.code == 3
            assert "data" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- sequences


class TinyAttention(nn.Module):
    """One self-attention layer over token ids: (B, T) -> (B, T, vocab)."""

    def __init__(self, vocab: int, causal: bool, d: int = 16, T: int = 8):
        super().__init__()
        self.causal, self.emb, self.pos = causal, nn.Embedding(vocab, d), nn.Parameter(torch.randn(T, d) * 0.1)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.out = nn.Linear(d, vocab)

    def forward(self, idx):
        T = idx.shape[1]
        h = self.emb(idx) + self.pos[:T]
        mask = torch.ones(T, T, dtype=torch.bool).triu(1) if self.causal else None
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        return self.out(h + a)


class TinyLM(LanguageModel):
    """The lm family for a net that returns logits only (B, T, vocab), not the registry's (logits, loss)."""

    CHECK_DEFAULTS = {}  # the generic work (batches of 32): a tiny net's two-batch loss at init is noisy at 8

    def loss(self, model, batch, cfg, part):
        return F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten()), {}


@pytest.mark.parametrize("masked", [True, False])
def test_causal_dependency_catches_attention_without_its_mask(cfg, tmp_path, masked):
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 11, (64, 9), generator=g)
    data = Data(DataSpec(vocab_size=11), TensorSplit(seq[:, :-1], seq[:, 1:]))
    ctx = ctx_for(cfg, tmp_path, data, lambda spec: TinyAttention(spec.vocab_size, masked), TinyLM())
    v = tchecks.dependency(ctx)
    assert v.status == ("pass" if masked else "fail"), v
    if not masked:
        assert "future" in v.advice or "causal" in v.advice
    assert tchecks.init_loss(ctx).status == "pass"  # ln(vocab) through the generic fallback


def test_gpt_without_its_causal_mask_fails_dependency(cfg, tmp_path):
    """The registry's GPT through the lm family's hooks: with the mask, pass; attention over every position, fail."""
    from deeprecipe.models.gpt import GPTConfig

    seq = torch.randint(0, 11, (64, 9), generator=torch.Generator().manual_seed(0))
    data = Data(DataSpec(vocab_size=11, extra={"block_size": 8}), TensorSplit(seq[:, :-1], seq[:, 1:]))

    def gpt(spec, masked=True):
        m = GPTConfig(n_layer=1, n_head=2, n_embd=16).build(spec)
        if not masked:
            for blk in m.blocks:
                a = blk.attn

                def forward(x, cache=None, layer=0, rope=None, a=a):  # the bug: no is_causal, no mask
                    B, T, C = x.shape
                    q, k, v = a.qkv(x).view(B, T, 3, a.n_head, C // a.n_head).permute(2, 0, 3, 1, 4)
                    return a.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))

                a.forward = forward
        return m

    good = tchecks.dependency(ctx_for(cfg, tmp_path, data, gpt, LanguageModel()))
    assert good.status == "pass" and "future 0" in good.measured, good
    bad = tchecks.dependency(ctx_for(cfg, tmp_path, data, lambda spec: gpt(spec, masked=False), LanguageModel()))
    assert bad.status == "fail" and "causal" in bad.advice, bad


def pairs_data(n: int = 48, vocab: int = 13) -> Data:
    """Copy task on token ids: target = <s> source </s>, lengths 3..6, PAD 0 (the translate task's layout)."""
    from deeprecipe.data.pairs import BOS, EOS, PairSplit

    g = torch.Generator().manual_seed(0)
    src = [torch.randint(3, vocab, (3 + i % 4,), generator=g).tolist() for i in range(n)]
    tgt = [[BOS, *s, EOS] for s in src]
    spec = DataSpec(vocab_size=vocab, extra={"pad": 0, "shared_vocab": True, "src_vocab": vocab})
    return Data(spec, PairSplit(src, tgt, [""] * n, [""] * n))


@pytest.mark.parametrize("bug", [None, "no causal mask", "mixed sources"])
def test_translator_dependency_on_source_and_target_side(cfg, tmp_path, bug):
    from deeprecipe.families import translate
    from deeprecipe.models.seq2seq import Seq2Seq

    class Buggy(Seq2Seq):
        def decode(self, tgt, memory, src_pad):
            if bug == "no causal mask":  # the decoder sees the target tokens it must predict
                return self.head(self.decoder(self.embed(self.tgt_emb, tgt), memory, memory_key_padding_mask=src_pad))
            return super().decode(tgt, memory, src_pad)

        def encode(self, src):
            memory, src_pad = super().encode(src)
            if bug == "mixed sources":  # a sentence reads its neighbour's source
                memory = memory + 0.5 * memory.roll(1, 0)
            return memory, src_pad

    def model(spec):
        return Buggy(spec.vocab_size, spec.vocab_size, d=16, n_head=2, enc_layers=1, dec_layers=1, ff=32)

    v = translate.check_dependency(ctx_for(cfg, tmp_path, pairs_data(), model, translate.Translate()))
    assert v.status == ("pass" if bug is None else "fail"), v
    if bug == "no causal mask":
        assert "causal" in v.advice
    if bug == "mixed sources":
        assert "mix" in v.advice


class TinySeg(nn.Module):
    """Two convs to per-pixel logits (B, C, H, W); `mix` plants a bug that mixes examples of the batch."""

    def __init__(self, spec, mix: bool = False):
        super().__init__()
        self.mix = mix
        self.net = nn.Sequential(
            nn.Conv2d(spec.in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, spec.num_classes, 1)
        )

    def forward(self, x):
        h = self.net[:2](x)
        if self.mix:  # e.g. a norm over the batch and the pixels at eval time
            h = h - h.mean((0, 2, 3), keepdim=True)
        return self.net[2](h)


def seg_data(n: int = 24, C: int = 3) -> Data:
    """Pixels of class k are bright in channel k; a 255 border (ignored)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, C, (n, 1, 4, 4), generator=g).repeat_interleave(2, 2).repeat_interleave(2, 3)[:, 0]
    x = F.one_hot(y.long(), C).permute(0, 3, 1, 2) * 150 + torch.randint(0, 60, (n, C, 8, 8), generator=g)
    y[:, 0] = 255
    spec = DataSpec(
        num_classes=C,
        class_names=list("abc"[:C]),
        in_channels=C,
        image_size=(8, 8),
        mean=(0.3,) * C,
        std=(0.3,) * C,
        extra={"palette": [[255, 0, 0], [0, 255, 0], [0, 0, 255]]},
    )
    return Data(
        spec,
        TensorSplit(x.to(torch.uint8), y.to(torch.uint8)),
        TensorSplit(x[:8].to(torch.uint8), y[:8].to(torch.uint8)),
    )


def test_segmentation_counts_per_pixel_and_catches_mixing(cfg, tmp_path):
    from deeprecipe.families.segment import Segment

    data = seg_data()
    ctx = ctx_for(cfg, tmp_path, data, TinySeg, Segment())
    assert dchecks.labels(ctx).status == "pass"  # 255 is "no label", not out of range
    v = tchecks.init_loss(ctx)
    assert v.status == "pass" and "ln 3" in v.expected, v  # per pixel
    assert tchecks.dependency(ctx).status == "pass"
    assert (
        tchecks.dependency(ctx_for(cfg, tmp_path, data, lambda spec: TinySeg(spec, mix=True), Segment())).status
        == "fail"
    )
    x, y = data.train.tensors
    bad = clone(data, train=TensorSplit(x, torch.where(y == 2, 3, y)))  # a class id = C
    assert dchecks.labels(ctx_for(cfg, tmp_path, bad, TinySeg, Segment())).status == "fail"


def test_video_dependency_catches_a_reshape_across_clips(cfg, tmp_path):
    from deeprecipe.families.video import Video
    from deeprecipe.models.video3d import C3D

    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 255, (32, 1, 4, 8, 8), generator=g, dtype=torch.uint8), torch.arange(32) % 4
    spec = DataSpec(num_classes=4, class_names=list("abcd"), in_channels=1, image_size=(8, 8), mean=(0.5,), std=(0.3,))
    data = Data(spec, TensorSplit(x, y))

    class TimeMixer(C3D):  # (B, C, T, H, W) read as (T, B, ...) and back: frames of different clips swap
        def forward(self, x):
            B, C, T, H, W = x.shape
            return super().forward(x.transpose(0, 2).reshape(B, C, T, H, W))

    for net, status in ((C3D, "pass"), (TimeMixer, "fail")):
        ctx = ctx_for(cfg, tmp_path, data, lambda spec, net=net: net(1, 4, [4, 8]), Video())
        assert tchecks.dependency(ctx).status == status


def test_gan_checks_catch_mixed_noise_and_a_frozen_generator(tmp_path):
    from deeprecipe.families.gan import GAN
    from deeprecipe.families.gan import checks as gchecks
    from deeprecipe.models.gan import GANConfig

    gcfg = load("digits-gan", ["train.device=cpu", "model.hidden=[16,32]"])
    data = gcfg.data.build()

    def mixed(spec):  # each image is drawn from the whole batch's noise
        m = GANConfig(hidden=(16, 32), latent=64).build(spec)
        forward = m.generator.forward
        m.generator.forward = lambda z, y=None: forward(z + z.mean(0, keepdim=True), y)
        return m

    def frozen(spec):
        m = GANConfig(hidden=(16, 32), latent=64).build(spec)
        m.generator.net[0].requires_grad_(False)
        return m

    ok = Ctx(gcfg, tmp_path, GAN(), data=data, steps=3, batch_size=16)
    assert {tchecks.seed(ok).status, gchecks.dependency(ok).status, gchecks.grad_flow(ok).status} == {"pass"}
    v = gchecks.dependency(Ctx(gcfg, tmp_path, GAN(), data=data, make_model=mixed))
    g_part, d_part = v.measured.split("; ")
    assert v.status == "fail" and "mix" in v.advice and "x_j| = 0 (" not in g_part and "x_j| = 0 (" in d_part, v
    v = gchecks.grad_flow(Ctx(gcfg, tmp_path, GAN(), data=data, make_model=frozen, batch_size=16))
    assert v.status == "fail" and "generator.net.0" in v.measured, v
    verdicts = run_checks(Ctx(gcfg, tmp_path, GAN(), data=data, batch_size=16), only=["init_loss", "seed"])
    assert [x.name for x in verdicts] == list(CHECKS)  # the GAN's seed replaces the built-in one in place
    status = {x.name: x.status for x in verdicts}
    assert status["seed"] == "pass" and status["init_loss"] == "skip"


# ---------------------------------------------------------------------------------------------- files on disk


def _png(path: Path, img: torch.Tensor) -> str:
    from deeprecipe.data.image_ops import png

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(img))
    return str(path)


def data_cfg(raw: dict):
    from deeprecipe.data import data_config_class

    return config.from_dict(data_config_class(raw["name"]), raw, "data")


def _noise(g, *shape) -> torch.Tensor:
    return torch.randint(0, 40, shape, generator=g)


def learnable_images(root: Path, per_class: int = 24) -> list[tuple[str, str]]:
    """Class 'a' is bright on the left, 'b' on the right, under noise: (file, class) of 8 x 8 RGB PNGs."""
    g, out = torch.Generator().manual_seed(0), []
    for c, cls in enumerate("ab"):
        for i in range(per_class):
            img = _noise(g, 3, 8, 8)
            img[:, :, c * 4 : c * 4 + 4] += 180
            out.append((_png(root / cls / f"{i}.png", img.to(torch.uint8)), cls))
    return out


def learnable_masks(n: int = 16, ids=(0, 1, 2)):
    """(image, mask) pairs: 2 x 2 blocks of class k (mask value ids[k]) are bright in channel k."""
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        k = torch.randint(0, 3, (4, 4), generator=g).repeat_interleave(2, 0).repeat_interleave(2, 1)  # (8, 8)
        img = (F.one_hot(k, 3).permute(2, 0, 1) * 180 + _noise(g, 3, 8, 8)).to(torch.uint8)
        yield img, torch.tensor(ids, dtype=torch.uint8)[k][None]


def imagefolder_case(tmp: Path):
    learnable_images(tmp / "imgs")
    return ("imagefolder-resnet", data_cfg(dict(name="imagefolder", path=str(tmp / "imgs"), image_size=8)), [])


def csv_case(tmp: Path):
    rows = learnable_images(tmp / "csv" / "img")
    (tmp / "csv" / "list.csv").write_text("".join(f"{Path(f).relative_to(tmp / 'csv')},{c}\n" for f, c in rows))
    return ("imagefolder-resnet", data_cfg(dict(name="csv", path=str(tmp / "csv" / "list.csv"), image_size=8)), [])


def maskfolder_case(tmp: Path):
    for i, (img, mask) in enumerate(learnable_masks()):
        _png(tmp / "seg" / "images" / f"{i}.png", img)
        _png(tmp / "seg" / "masks" / f"{i}.png", mask)
    cfg = dict(name="maskfolder", path=str(tmp / "seg"), classes=["x", "y", "z"], size=[8, 8], crop=0, flip=False)
    return ("scenes-unet", data_cfg(cfg), [])


def cityscapes_case(tmp: Path):
    root = tmp / "cityscapes"
    for i, (img, mask) in enumerate(learnable_masks(ids=(7, 8, 26))):  # labelIds of road, sidewalk, car
        split, city = ("val", "lindau") if i >= 13 else ("train", "aachen")
        _png(root / "leftImg8bit" / split / city / f"{city}_{i:06d}_000019_leftImg8bit.png", img)
        _png(root / "gtFine" / split / city / f"{city}_{i:06d}_000019_gtFine_labelIds.png", mask)
    cfg = dict(name="cityscapes", path=str(root), size=[8, 8], crop=0, flip=False, val_fraction=0.2)
    return ("cityscapes-unet", data_cfg(cfg), ["optim.lr=0.004"])  # 19 classes: the overfit check's 100 steps


def videofolder_case(tmp: Path):
    """Frame folders: a bright bar sweeps right (class 'right', upper half) or left ('left', lower half)."""
    g = torch.Generator().manual_seed(0)
    for c, cls in enumerate(("left", "right")):
        for v in range(8):
            for t in range(8):
                frame = _noise(g, 3, 16, 16)
                col = t * 2 if cls == "right" else 14 - t * 2
                frame[:, c * 8 : c * 8 + 8, col : col + 2] += 200
                _png(tmp / "videos" / cls / f"v{v}" / f"{t:03d}.png", frame.clamp(0, 255).to(torch.uint8))
    cfg = dict(name="videofolder", path=str(tmp / "videos"), frames=4, stride=1, size=16, eval_clips=2)
    data = data_cfg({**cfg, "crop_pad": 0, "flip": False, "val_fraction": 0.25})
    return ("ucf101-r2plus1d", data, ["optim.lr=0.003"])  # the template's lr is for 30,000 steps, not 30


def streamed_case(tmp: Path):
    """Class folders too big for memory (in_memory_mb=0): read file by file through a DataLoader."""
    learnable_images(tmp / "imgs")
    return (
        "imagefolder-resnet",
        data_cfg(dict(name="imagefolder", path=str(tmp / "imgs"), image_size=8, in_memory_mb=0)),
        [],
    )


def videofiles_case(tmp: Path):
    """The frame folders of videofolder_case encoded as MPEG-4 files (PyAV)."""
    av = pytest.importorskip("av")
    from deeprecipe.data.image_ops import read

    recipe, data, overrides = videofolder_case(tmp / "frames")
    for folder in sorted((tmp / "frames" / "videos").glob("*/*")):
        frames = [read(f, 3).permute(1, 2, 0).numpy() for f in sorted(folder.iterdir())]  # (H, W, 3) each
        out = tmp / "videos" / folder.parent.name / f"{folder.name}.mp4"
        out.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(out), "w") as c:
            st = c.add_stream("mpeg4", rate=10)
            st.width, st.height, st.pix_fmt = 16, 16, "yuv420p"
            for f in frames:
                c.mux(st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            c.mux(st.encode())
    data.path = str(tmp / "videos")
    return recipe, data, overrides


FILE_CASES = {
    "imagefolder": imagefolder_case,
    "streamed": streamed_case,
    "videofiles": videofiles_case,
    "csv": csv_case,
    "maskfolder": maskfolder_case,
    "cityscapes": cityscapes_case,
    "videofolder": videofolder_case,
}


@pytest.mark.parametrize("name", sorted(FILE_CASES))
def test_checks_pass_on_good_file_backed_data(name, tmp_path):
    """Good files from disk (class folders, a CSV, mask folders, a Cityscapes tree, video frame folders): every
    check runs on them (labels and clip shapes through the data set and the family's hooks) and none fails."""
    recipe, data, overrides = FILE_CASES[name](tmp_path)
    cfg = load(recipe, ["train.device=cpu", *TINY_MODEL[load(recipe).model.name], *overrides])
    cfg.data = data
    verdicts = run_checks(Ctx(cfg, tmp_path / "out", get_family(cfg.task), steps=30, batch_size=16, overfit_steps=100))
    failed = [v for v in verdicts if v.status == "fail"]
    assert not failed, failed
    status = {v.name: v.status for v in verdicts}
    assert all(status[n] == "pass" for n in ("files", "labels", "duplicates", "leakage", "dependency")), status


# ---------------------------------------------------------------------------------------------- user code


USER_MODEL = """
import torch.nn as nn

class Small(nn.Module):
    def __init__(self, num_classes, in_channels, image_size, hidden=32):
        super().__init__()
        h, w = image_size
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * h * w, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x))

class Mixer(Small):
    def forward(self, x):
        return self.head(self.body(x - x.mean(0)))  # subtracts the batch mean: examples mix
"""

USER_DATA = """
import torch
from deeprecipe.data.core import Data, DataSpec, TensorSplit

def blobs(n=600, leak=0):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = (torch.randn(n, 1, 4, 4, generator=g) * 30 + 80 + 50 * y.view(-1, 1, 1, 1)).clamp(0, 255).to(torch.uint8)
    xf = x.float() / 255
    spec = DataSpec(num_classes=3, class_names=["a", "b", "c"], in_channels=1, image_size=(4, 4),
                    mean=(float(xf.mean()),), std=(float(xf.std()),))
    tr, te = slice(0, 500), slice(500, n)
    trx, try_ = torch.cat([x[tr], x[te][:leak]]), torch.cat([y[tr], y[te][:leak]])
    return Data(spec, TensorSplit(trx, try_), TensorSplit(x[te], y[te]))
"""


def test_checks_run_on_user_model_and_data_files(tmp_path, capsys):
    (tmp_path / "mymodel.py").write_text(USER_MODEL)
    (tmp_path / "mydata.py").write_text(USER_DATA)
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(
        f"description: user code\ndata: {{name: '{tmp_path / 'mydata.py'}:blobs'}}\n"
        f"model: {{name: '{tmp_path / 'mymodel.py'}:Small'}}\ntrain: {{device: cpu, batch_size: 32}}\n"
    )
    base = ["check", str(recipe), "--steps", "30"]
    assert main(base + ["--set", f"model.name={tmp_path / 'mymodel.py'}:Small", "--out", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and (tmp_path / "ok" / "report.html").is_file()
    saved = json.loads((tmp_path / "ok" / "checks.json").read_text())
    assert [v["name"] for v in saved] == list(CHECKS) and "check passed" in (
        tmp_path / "ok" / "status.json"
    ).read_text()
    for model, data_args, failing in (
        ("Mixer", [], "dependency"),
        ("Small", ["--set", "data.args={leak: 50}"], "leakage"),
    ):
        with pytest.raises(SystemExit) as e:
            main(
                base
                + ["--set", f"model.name={tmp_path / 'mymodel.py'}:{model}", *data_args, "--out", str(tmp_path / model)]
            )
        assert e.value.code == 3
        failed = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if " FAIL " in ln]
        assert failed == [failing]


# ---------------------------------------------------------------------------------------------- lr-find


def test_lr_find_leaves_model_optimizer_and_rng_untouched(cfg, digits, tmp_path):
    from deeprecipe.engine import optim

    ctx = ctx_for(cfg, tmp_path, digits, Net)
    model = ctx.model()
    opt = optim.adamw(model, cfg.optim)
    for s in range(2):  # the optimizer has state (Adam moments) to disturb
        ctx.loss(model, ctx.train_batch(s)).backward()
        opt.step()
        opt.zero_grad()
    before_m = copy.deepcopy(model.state_dict())
    before_o = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    r = lr_range_test(model, opt, ctx.train_batch, ctx.loss, 1e-5, 10.0, 40)
    assert all(torch.equal(before_m[k], v) for k, v in model.state_dict().items())
    after_o = opt.state_dict()
    assert [g["lr"] for g in after_o["param_groups"]] == [g["lr"] for g in before_o["param_groups"]]
    for k, st in before_o["state"].items():
        assert all(torch.equal(v, after_o["state"][k][n]) for n, v in st.items())
    assert torch.equal(rng, torch.get_rng_state())
    assert r.diverged and 1e-5 <= r.suggestion < r.best_lr


def test_lr_find_stays_below_the_divergence_of_a_quadratic():
    """SGD on 0.5 * a * (w - c)^2 (c noisy, so the loss has a floor) diverges exactly when lr > 2 / a: the
    loss must bottom out below that lr, the test must stop soon after it, and the suggestion lie below it."""
    a = 4.0
    w = nn.Linear(1, 1, bias=False)
    nn.init.constant_(w.weight, 3.0)
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    noise = torch.randn(300, generator=torch.Generator().manual_seed(0))
    r = lr_range_test(w, opt, lambda k: noise[k], lambda m, c: 0.5 * a * (m.weight.sum() - c) ** 2, 1e-3, 10.0, 300)
    assert r.diverged and r.best_lr <= 2 / a and r.suggestion < 2 / a
    assert max(r.lrs) < 2 / a * 2  # stopped soon after the blow-up (or, noise growing, just before it)
    assert float(w.weight.detach()) == 3.0


def test_lr_find_verb_writes_plot_and_suggestion(tmp_path, capsys):
    assert (
        main(
            [
                "lr-find",
                "digits-mlp",
                "--set",
                "train.device=cpu",
                "--steps",
                "30",
                "--batch",
                "32",
                "--out",
                str(tmp_path / "lr"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "suggested: --set optim.lr=" in out and (tmp_path / "lr" / "plots" / "lr_find.png").is_file()
    lr = float(out.split("optim.lr=")[1].split()[0])
    assert math.isfinite(lr) and 1e-6 <= lr <= 1.0


# ---------------------------------------------------------------------------------------------- registry

# tiny settings of the registry test, by data set and by model: a new entry must add its line here (KeyError)
TINY_DATA = {
    "scenes-detect": ["data.size=[64,64]", "data.train_size=128", "data.val_size=32", "data.test_size=32"],
    "boxfiles": [],  # the voc/coco/yolo/kitti-detect templates: data.path to fill in (skipped until then)
    "digits": [],
    "fashion-mnist": ["data.image_size=14", "data.limit=4000"],
    "text": ["data.block_size=32", "data.vocab_size=320"],  # (BPE only: a vocabulary that learns context fast)
    "pairs": ["data.vocab_size=1000", "data.max_len=24"],
    "scenes": ["data.size=[32,32]", "data.train_size=256", "data.val_size=32", "data.test_size=32", "data.crop=0"],
    "moving-digits": ["data.frames=4", "data.size=16", "data.train_size=400", "data.val_size=64", "data.test_size=64"],
    "imagefolder": [],
    "cityscapes": [],
    "videofolder": [],
    "textclass": ["data.per_class=300", "data.max_len=48"],
    "img2img": ["data.size=[32,32]", "data.train_size=32", "data.val_size=8", "data.test_size=8"],
    "driving": ["data.episodes=5", "data.frames=2", "data.size=[32,32]", "data.eval_episodes=0"],  # + data.path
}
TINY_MODEL = {
    "centernet": ["model.width=8", "model.neck=32", "model.max_width=64"],
    "mlp": [],
    "cnn": [],
    "resnet": [],
    "gpt": ["model.n_layer=2", "model.n_embd=64", "model.n_head=2"],
    "lstm": ["model.n_layer=1", "model.hidden=128"],
    "seq2seq": ["model.d_model=64", "model.n_head=2", "model.enc_layers=1", "model.dec_layers=1"],
    "unet": ["model.width=8", "model.depth=2"],
    "unet-resnet18": [],  # torchvision's encoder; the decoder's default widths (memorizing needs them)
    "fcn": ["model.width=8", "model.stages=3", "model.max_width=32"],
    "c3d": ["model.channels=[8,16]"],
    "r2plus1d": ["model.width=8", "model.blocks=[1,1]", "model.stem_stride=1"],
    "gan": ["model.hidden=[32,64]"],
    "dcgan": ["model.image_size=28", "model.g_width=8", "model.d_width=8"],  # 14 px data, resized on the fly
    "text-transformer": ["model.d_model=32", "model.n_layer=1"],
    "text-lstm": [],
    "pix2pix": ["model.width=8", "model.depth=2", "model.max_width=16", "model.d_width=8", "model.d_layers=2"],
    "cyclegan": ["model.width=8", "model.depth=2", "model.max_width=16", "model.d_width=8", "model.d_layers=2"],
    "tv-resnet18": [],  # torchvision's: no width to shrink
}
# true findings the checks report on a built-in recipe, asserted exactly until the model is fixed (then remove);
# none today (the last one, C3D's head preferring some classes at step 0, was fixed by zero-initializing it)
KNOWN_FINDINGS: dict[str, set[str]] = {}
# the short runs, by task (sequences: fewer, longer examples and more steps, as their CHECK_DEFAULTS say)
TINY_WORK = {
    "lm": dict(steps=200, batch_size=8, overfit_steps=150),
    # (a recipe's own entry first) steering labels recorded off the expert's line (noise) are corrections a net
    # needs more than 30 steps to read; the highway recipe's 5 tiny episodes overfit by then
    "racetrack-steer-cnn": dict(steps=200, batch_size=16, overfit_steps=100),
    "pretrain": dict(steps=12, batch_size=8, overfit_steps=50),  # a ResNet-18 on two views of each image
    "masked": dict(steps=30, batch_size=8, overfit_steps=100),  # a ResNet-18 U-Net filling hidden cells
}


@pytest.mark.parametrize("recipe", sorted(config.list_recipes()))
def test_every_builtin_recipe_passes_check(recipe, tmp_path):
    cfg = load(recipe, ["train.device=cpu"])
    small = ["train.device=cpu"] + TINY_DATA[cfg.data.name] + TINY_MODEL[cfg.model.name]
    if cfg.task == "pretrain":  # a small projection MLP (the section is the pretrain family's alone)
        small += ["pretrain.proj_hidden=64", "pretrain.proj_dim=32"]
    if cfg.data.name == "driving":  # recorded into the test's own folder, never into $DEEPRECIPE_DATA
        small.append(f"data.path={tmp_path / 'rollouts'}")
    try:
        cfg = load(recipe, small)
        data = cfg.data.build()
    except DataError as e:
        pytest.skip(f"data of {recipe} is not on this machine: {e}")
    work = TINY_WORK.get(recipe) or TINY_WORK.get(cfg.task, dict(steps=30, batch_size=16, overfit_steps=100))
    verdicts = run_checks(Ctx(cfg, tmp_path, get_family(cfg.task), data=data, **work))
    failed = [v for v in verdicts if v.status == "fail"]
    assert {v.name for v in failed} == KNOWN_FINDINGS.get(recipe, set()), failed
    applies = {"seed", "dependency"} | ({"grad_flow"} if cfg.task in ("gan", "img2img") else {"init_loss"})
    if cfg.task in ("pretrain", "masked"):  # NT-Xent at init depends on what random features already tell apart;
        applies = (applies - {"init_loss"}) | {"dynamics", "grad_flow"}  # a reconstruction error has no closed form
    if data.spec.extra.get("control") == "steer":  # steering is regressed (MSE): no closed-form loss at init
        applies = (applies - {"init_loss"}) | {"baseline"}
    assert {v.name for v in verdicts if v.status == "pass"} >= applies
