"""Each check is proven on a planted bug: it fails on the buggy model/data/task and passes on the correct one.

Tiny setups (8x8 digits, an MLP or a one-layer attention net) keep the file to seconds on a CPU.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

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
from deeprecipe.tasks import classify

# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster than two on a CPU shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cfg():
    return config.load("digits-mlp", ["train.device=cpu"])


@pytest.fixture(scope="module")
def digits(cfg):
    return cfg.data.build()


def clone(data: Data, **splits) -> Data:
    d = copy.copy(data)
    for k, v in splits.items():
        setattr(d, k, v)
    return d


def ctx_for(cfg, tmp_path, data, model=None, task=None, **kw) -> Ctx:
    kw.setdefault("steps", 30)
    return Ctx(cfg, tmp_path, data=data, make_model=model, task=task, **kw)


class Net(nn.Module):
    """The correct tiny classifier: flatten -> 64 -> classes."""

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


def test_leakage_test_images_copied_into_train(cfg, digits, tmp_path):
    (x, y), (tx, ty) = digits.train.tensors, digits.test.tensors
    leaky = clone(digits, train=TensorSplit(torch.cat([x, tx[:40]]), torch.cat([y, ty[:40]])))
    v = dchecks.leakage(ctx_for(cfg, tmp_path, leaky))
    assert v.status == "fail" and "test: 40 of" in v.measured
    assert dchecks.leakage(ctx_for(cfg, tmp_path, digits)).status == "pass"


def test_leakage_finds_near_copies(cfg, tmp_path):
    fashion = config.load("fashion-mnist-cnn")
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
    def prepare_raw(batch, spec, gen=None):  # forgot normalize(): pixels 0..255 reach the net
        return batch[0].float(), batch[1]

    task = SimpleNamespace(loss=classify.loss, METRIC=classify.METRIC, prepare=prepare_raw)  # no pictures: fast
    assert dchecks.batch(ctx_for(cfg, tmp_path, digits, task=task)).status == "fail"
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
        icfg = config.load("imagefolder-resnet", [f"data.path={root}", "data.image_size=8"])
        v = dchecks.files(Ctx(icfg, tmp_path))
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


def lm_task(causal: bool = True):
    def loss(model, batch, cfg):
        return F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten()), {}

    return SimpleNamespace(prepare=lambda b, spec, gen=None: b, loss=loss, CAUSAL=causal, METRIC=("loss", "min"))


@pytest.mark.parametrize("masked", [True, False])
def test_causal_dependency_catches_attention_without_its_mask(cfg, tmp_path, masked):
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 11, (64, 9), generator=g)
    data = Data(DataSpec(vocab_size=11), TensorSplit(seq[:, :-1], seq[:, 1:]))
    ctx = ctx_for(cfg, tmp_path, data, lambda spec: TinyAttention(spec.vocab_size, masked), lm_task())
    v = tchecks.dependency(ctx)
    assert v.status == ("pass" if masked else "fail"), v
    if not masked:
        assert "future" in v.advice or "causal" in v.advice
    assert tchecks.init_loss(ctx).status == "pass"  # ln(vocab) through the generic fallback


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


@pytest.mark.parametrize("recipe", sorted(config.list_recipes()))
def test_every_builtin_recipe_passes_check(recipe, tmp_path):
    cfg = config.load(recipe, ["train.device=cpu"])
    try:
        cfg.data.build()
    except DataError as e:
        pytest.skip(f"data of {recipe} is not on this machine: {e}")
    # tiny settings: fewer, smaller steps; images of the bigger sets at half size
    small = {} if cfg.data.name == "digits" else {"data.image_size": 14, "data.limit": 4000}
    cfg = config.load(recipe, ["train.device=cpu"] + [f"{k}={v}" for k, v in small.items()])
    verdicts = run_checks(Ctx(cfg, tmp_path, steps=30, batch_size=16, overfit_steps=100))
    failed = [v for v in verdicts if v.status == "fail"]
    assert not failed, failed
    assert {v.name for v in verdicts if v.status == "pass"} >= {"seed", "init_loss", "overfit", "dependency"}
