"""The image-to-image family: degradations, metrics against closed forms, data errors, checks with planted bugs,
predict on files of any size, and the unpaired (CycleGAN) step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torchvision.io import write_png

from deeprecipe.checks.core import Ctx
from deeprecipe.core import ConfigError, DataError, UserError
from deeprecipe.data.core import Draws
from deeprecipe.data.img2img import Img2ImgData
from deeprecipe.families.img2img import Img2Img, checks, degrade
from deeprecipe.families.img2img import metrics as im
from deeprecipe.families.img2img.degrade import input_image
from deeprecipe.families.img2img.infer import inpaint, tiled
from deeprecipe.family import PredictOptions
from deeprecipe.models.pix2pix import Pix2Pix
from deeprecipe.recipe import load
from test_serve import needs_chromium

TINY_MODEL = ["model.width=8", "model.depth=2", "model.max_width=16", "model.d_width=8", "model.d_layers=2"]
TINY_SCENES = ["data.size=[32,32]", "data.train_size=16", "data.val_size=8", "data.test_size=8"]


def draws(seed: int = 0) -> Draws:
    return Draws(torch.Generator().manual_seed(seed))


def family() -> Img2Img:
    f = Img2Img()
    f.name = "img2img"
    return f


# ------------------------------------------------------------------------------------------ metrics and degradations


def test_psnr_and_ssim_match_closed_forms():
    """A uniform error of d gives PSNR = 20 log10(1 / d); an exact image SSIM 1 and PSNR at the cap."""
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8
    for d in (1 / 255, 0.05, 0.1):
        got = im.psnr(x + d, x)
        assert torch.allclose(got, torch.full((3,), 20 * math.log10(1 / d)), atol=1e-3)
    assert torch.allclose(im.ssim(x, x), torch.ones(3), atol=1e-5)
    assert (im.psnr(x, x) == im.MAX_PSNR).all()
    mask = torch.zeros(3, 1, 16, 16)
    mask[:, :, :8] = 1  # error only inside the mask: PSNR on the mask is that of the error alone
    y = x + 0.1 * mask
    assert torch.allclose(im.psnr_masked(y, x, mask), torch.full((3,), 20.0), atol=1e-3)
    assert torch.allclose(im.psnr(y, x), torch.full((3,), 20 * math.log10(1 / 0.1) + 10 * math.log10(2)), atol=1e-3)


def test_shrink_of_a_constant_image_is_constant_and_blur_keeps_the_mean():
    x = torch.full((2, 3, 32, 32), 0.2)
    lr = degrade.shrink(x, 4, 0.0, 0.0, draws())
    assert lr.shape == (2, 3, 8, 8) and torch.allclose(lr, degrade.quantize(x[:, :, :8, :8]))
    assert torch.allclose(degrade.enlarge(lr, 4), degrade.quantize(x), atol=1e-6)
    img = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    b = degrade.blur(img, torch.tensor([0.0, 2.0]))
    assert torch.equal(b[0], img[0])  # sigma 0 leaves the image
    assert abs(float(b[1].mean() - img[1].mean())) < 0.02 and float(b[1].std()) < float(img[1].std())
    noisy = degrade.shrink(img, 2, 0.0, 0.2, draws(3))
    again = degrade.shrink(img, 2, 0.0, 0.2, draws(3))
    assert torch.equal(noisy, again)  # the step's draws fix the noise


def test_holes_cover_what_they_are_asked():
    d = draws(5)
    box = degrade.holes(64, 40, 40, "box", 0.25, d, "cpu")
    assert box.shape == (64, 1, 40, 40) and set(box.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(box.mean()) - 0.25) < 0.03  # each box is a quarter of its image (up to pixel rounding)
    strokes = degrade.holes(64, 64, 64, "strokes", 0.25, d, "cpu")
    assert 0.1 < float(strokes.mean()) < 0.35
    both = degrade.holes(64, 32, 32, "both", 0.25, draws(6), "cpu")
    assert 0.1 < float(both.mean()) < 0.35


# ------------------------------------------------------------------------------------------ data


def png(path, h, w, c=3, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(
        torch.randint(0, 256, (c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8), str(path)
    )
    return path


def test_paired_folders_refuse_a_missing_partner_and_different_sizes(tmp_path):
    for i in range(4):
        png(tmp_path / "A" / f"{i}.png", 20, 24, seed=i)
        png(tmp_path / "B" / f"{i}.png", 20, 24, seed=10 + i)
    data = Img2ImgData(mode="paired", source="pairs", path=str(tmp_path), size=(16, 16), val_fraction=0.25).build()
    assert data.spec.in_channels == 6 and data.spec.extra["channels_a"] == 3 and len(data.train) == 2
    png(tmp_path / "A" / "lone.png", 20, 24)
    with pytest.raises(DataError, match=r"lone\.png has no partner"):
        Img2ImgData(mode="paired", source="pairs", path=str(tmp_path), size=(16, 16)).build()
    png(tmp_path / "B" / "lone.png", 21, 24)
    with pytest.raises(DataError, match=r"B/lone\.png is 24x21 but its partner .*A/lone\.png is 24x20"):
        Img2ImgData(mode="paired", source="pairs", path=str(tmp_path), size=(16, 16)).build()
    # unpaired: any two folders, no partner needed
    png(tmp_path / "B" / "lone.png", 20, 24)
    png(tmp_path / "B" / "extra.png", 30, 30)
    Img2ImgData(mode="unpaired", source="pairs", path=str(tmp_path), size=(16, 16)).build()


def test_an_image_smaller_than_the_scale_allows_is_named(tmp_path):
    png(tmp_path / "big.png", 40, 40)
    png(tmp_path / "tiny.png", 10, 12)
    with pytest.raises(DataError, match=r"tiny\.png is 12x10: smaller than the scale factor allows"):
        Img2ImgData(mode="sr", source="folder", path=str(tmp_path), size=(32, 32), scale=4).build()
    with pytest.raises(DataError, match="multiples of the scale"):
        Img2ImgData(mode="sr", source="scenes", size=(34, 34), scale=4, train_size=2, val_size=0, test_size=0).build()


def test_unpaired_scenes_train_on_disjoint_halves_and_evaluate_on_true_pairs():
    from deeprecipe.data.scenes import render_scenes

    d = Img2ImgData(mode="unpaired", size=(32, 32), train_size=8, val_size=4, test_size=0).build()
    x = d.train.tensors[0]
    night_of_a = render_scenes(torch.arange(8)[:4], (32, 32), look="night")[0]
    assert torch.equal(x[:4, 3:], render_scenes(torch.arange(4, 8), (32, 32), look="night")[0])
    assert not torch.equal(x[:4, 3:], night_of_a)  # B of a training pair is another scene
    v = d.val.tensors[0]
    numbers = torch.arange(10_000_000, 10_000_004)
    assert torch.equal(v[:, :3], render_scenes(numbers, (32, 32), look="day")[0])
    assert torch.equal(v[:, 3:], render_scenes(numbers, (32, 32), look="night")[0])


# ------------------------------------------------------------------------------------------ checks


class CopyNet(Pix2Pix):
    """The planted bug: returns its input picture (with a zero-weight path through G so the step still runs)."""

    def forward(self, x):
        return input_image(x, self.mode) + 0 * self.g(x)


def ctx_for(recipe: str, sets: list[str], tmp_path, make_model=None, **work) -> Ctx:
    cfg = load(recipe, ["train.device=cpu", *TINY_SCENES, *TINY_MODEL, *sets])
    return Ctx(cfg, tmp_path, family(), make_model=make_model, **work)


@pytest.mark.parametrize("recipe", ["scenes-sr4", "scenes-inpaint"])
def test_input_copy_catches_a_generator_that_returns_its_input(recipe, tmp_path):
    good = checks.input_copy(ctx_for(recipe, [], tmp_path, steps=8, batch_size=4))
    assert good.status == "pass", good

    def copy_net(spec):
        m = family().build_model(ctx.cfg, spec)
        return CopyNet(m.generator, m.discriminator, m.mode, m.out_channels, m.unshuffle)

    ctx = ctx_for(recipe, [], tmp_path, make_model=copy_net, steps=8, batch_size=4)
    bad = checks.input_copy(ctx)
    assert bad.status == "fail" and bad.value >= checks.COPY_DB, bad


class BlindNet(Pix2Pix):
    """The planted bug of label2image: the label map never reaches G (zeroed), so every map gets one image."""

    def forward(self, x):
        return super().forward(0 * x)


def test_input_copy_catches_a_label2image_generator_blind_to_its_labels(tmp_path):
    sets = ["model.feature_recipe=none"]
    good = checks.input_copy(ctx_for("scenes-label2image", sets, tmp_path, steps=8, batch_size=4))
    assert good.status == "pass" and good.value < checks.COPY_DB, good

    def blind_net(spec):
        m = family().build_model(ctx.cfg, spec)
        return BlindNet(m.generator, m.discriminator, m.mode, m.out_channels, m.unshuffle)

    ctx = ctx_for("scenes-label2image", sets, tmp_path, make_model=blind_net, steps=8, batch_size=4)
    bad = checks.input_copy(ctx)
    assert bad.status == "fail" and "same image for every label map" in bad.advice, bad


def test_crop_cuts_the_same_square_of_image_and_labels_and_data_refuses_a_bad_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 20, 24), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 7, (5, 20, 24), generator=g)
    cx, cy = degrade.crop(x, y, 8, Draws(torch.Generator().manual_seed(1)))
    assert cx.shape == (5, 3, 8, 8) and cy.shape == (5, 8, 8)
    tops = set()
    for i in range(5):  # each example's crop is a square of its own image, and its labels' the same square
        hits = [(r, c) for r in range(13) for c in range(17) if torch.equal(x[i, :, r : r + 8, c : c + 8], cx[i])]
        assert hits and torch.equal(y[i, hits[0][0] : hits[0][0] + 8, hits[0][1] : hits[0][1] + 8], cy[i])
        tops.add(hits[0])
    assert len(tops) > 1  # not one place for the whole batch
    with pytest.raises(DataError, match=r"data\.crop=18: .* multiple of the scale"):
        Img2ImgData(mode="sr", size=(32, 32), scale=4, crop=18, train_size=2, val_size=0, test_size=0).build()
    with pytest.raises(DataError, match=r"data\.crop=8: .* at least 16 pixels"):
        Img2ImgData(mode="sr", size=(32, 32), scale=4, crop=8, train_size=2, val_size=0, test_size=0).build()
    x32, y32 = degrade.crop(x, y, 24, draws())  # a crop at least the image's side: the whole images
    assert x32 is x and y32 is y


@pytest.mark.parametrize("adv", [0.0, 0.05])
def test_l1_only_trains_g_alone_and_grad_flow_judges_what_trains(adv, tmp_path):
    """model.adv=0: D is neither run nor trained (its weights stay as built) while G learns; grad_flow passes
    both ways (it does not ask D for gradients it never gets)."""
    from deeprecipe.checks.core import fit

    ctx = ctx_for("scenes-sr4", [f"model.adv={adv}"], tmp_path, steps=3, batch_size=4)
    model = ctx.model()
    d0 = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    g0 = {k: v.clone() for k, v in model.generator.state_dict().items()}
    fit(ctx, model, 2, ctx.train_batch)
    d_same = all(torch.equal(v, model.discriminator.state_dict()[k]) for k, v in d0.items())
    assert d_same == (adv == 0.0)
    assert not all(torch.equal(v, model.generator.state_dict()[k]) for k, v in g0.items())
    assert checks.grad_flow(ctx).status == "pass"


def test_pixel_loss_is_the_mean_absolute_or_squared_error_and_mse_trains(tmp_path):
    from deeprecipe.families.img2img import pixel_loss

    out, t = torch.tensor([[0.5, -0.5], [1.0, 0.0]]), torch.zeros(2, 2)
    assert float(pixel_loss(out, t, "l1")) == pytest.approx(0.5)
    assert float(pixel_loss(out, t, "mse")) == pytest.approx(0.375)
    ctx, model = trained("scenes-inpaint", tmp_path, ["model.pixel_loss=mse", "model.adv=0.05"])
    assert model(ctx.heldout_batch(2)[0]).isfinite().all()
    with pytest.raises(ConfigError, match=r"model.pixel_loss=l2: did you mean 'l1'\? \(one of l1, mse\)"):
        load("scenes-inpaint", ["model.pixel_loss=l2"])


def test_one_batch_overfits_past_40_db(tmp_path):
    sets = ["model.width=32", "model.max_width=64"]  # the recipe's width: G on 2 x 2 blocks at width 16 got 38 dB
    v = checks.overfit(ctx_for("scenes-inpaint", sets, tmp_path, overfit_examples=2, overfit_steps=600))
    assert v.status == "pass" and v.value > 40, v


# ------------------------------------------------------------------------------------------ use


def trained(recipe: str, tmp_path, sets=()):
    """A model of the recipe after 2 steps through the family's own step."""
    from deeprecipe.checks.core import fit

    ctx = ctx_for(recipe, list(sets), tmp_path, steps=2, batch_size=4)
    model = ctx.model()
    fit(ctx, model, 2, ctx.train_batch)
    return ctx, model.eval()


def _short_reach(model, reach: int):
    m = copy.copy(model)
    m.reach = reach
    return m


def test_predict_enlarges_files_of_any_size_and_tiles_agree(tmp_path):
    ctx, model = trained("scenes-sr4", tmp_path)
    f = family()
    files = [str(png(tmp_path / "odd.png", 9, 13)), str(png(tmp_path / "wide.png", 20, 70))]
    res = f.predict(model, ctx.spec, ctx.cfg, ctx.rt, files, PredictOptions(out=tmp_path / "out"))
    assert [r["size"] for r in res] == [[52, 36], [280, 80]]
    # tiles give exactly the whole image's answer, seams included: blocks of 16 px, 5 x 9 tiles
    x = degrade.enlarge(torch.rand(1, 3, 19, 35, generator=torch.Generator().manual_seed(0)) * 2 - 1, 4)
    with torch.no_grad():
        model = copy.deepcopy(model)
        model.generator.head.weight.mul_(30)  # the sr residual starts near 0: make G's part of the answer large
        whole = model(x)
        tiles = tiled(model, x, ctx.rt, tile=16)
        short = tiled(_short_reach(model, 8), x, ctx.rt, tile=16)  # the oracle's power: too short a reach shows
    assert tiles.shape == whole.shape and float((tiles - whole).abs().max()) < 1e-5  # float rounding only
    assert float((short - whole).abs().max()) > 1e-4  # a reach of 8 px leaves seams (measured 4e-4)
    with pytest.raises(UserError, match=r"dot\.png is 5x1: too small to enlarge"):
        f.predict(
            model, ctx.spec, ctx.cfg, ctx.rt, [str(png(tmp_path / "dot.png", 1, 5))], PredictOptions(out=tmp_path)
        )


def test_inpaint_keeps_the_pixels_outside_the_hole_and_refuses_a_bad_mask(tmp_path):
    ctx, model = trained("scenes-inpaint", tmp_path)
    img = torch.randint(0, 256, (3, 24, 30), dtype=torch.uint8)
    hole = torch.zeros(24, 30)
    hole[5:12, 4:20] = 1
    out = inpaint(model, ctx.spec, ctx.rt, img, hole)
    assert torch.equal(out[:, hole == 0], img[:, hole == 0])
    f = family()
    files = [str(png(tmp_path / "p.png", 24, 30))]
    with pytest.raises(UserError, match=r"p\.png: inpaint needs its mask .*p_mask\.png"):
        f.predict(model, ctx.spec, ctx.cfg, ctx.rt, files, PredictOptions(out=tmp_path))
    png(tmp_path / "p_mask.png", 20, 30, c=1)
    with pytest.raises(UserError, match=r"p_mask\.png: the mask is 30x20 but the image is 30x24"):
        f.predict(model, ctx.spec, ctx.cfg, ctx.rt, files, PredictOptions(out=tmp_path))
    (tmp_path / "p_mask.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"p_mask\.png: not a readable mask image"):
        f.predict(model, ctx.spec, ctx.cfg, ctx.rt, files, PredictOptions(out=tmp_path))
    png(tmp_path / "p_mask.png", 24, 30, c=1)
    (r,) = f.predict(model, ctx.spec, ctx.cfg, ctx.rt, files, PredictOptions(out=tmp_path / "o"))
    assert r["size"] == [30, 24]


def test_unshuffled_generator_sees_pixel_blocks_and_answers_any_size(tmp_path):
    """model.unshuffle=2: G's raw output is pixel_shuffle(U-Net(pixel_unshuffle(x))) on the image padded to even
    sides and cropped back; an odd-sized inpainting keeps every pixel outside its hole."""
    import torch.nn.functional as F

    ctx, model = trained("scenes-inpaint", tmp_path, ["model.unshuffle=2"])
    assert model.generator.down[0][0].in_channels == 4 * 4  # RGB + mask, 2 x 2 blocks
    x = torch.rand(2, 4, 32, 32) * 2 - 1
    with torch.no_grad():
        want = F.pixel_shuffle(model.generator(F.pixel_unshuffle(x, 2)), 2)
        assert torch.allclose(model.g(x), want)
    img = torch.randint(0, 256, (3, 23, 31), dtype=torch.uint8)
    hole = torch.zeros(23, 31)
    hole[5:12, 4:20] = 1
    out = inpaint(model, ctx.spec, ctx.rt, img, hole)
    assert out.shape == img.shape and torch.equal(out[:, hole == 0], img[:, hole == 0])
    assert not torch.equal(out[:, hole == 1], img[:, hole == 1])
    with pytest.raises(ConfigError, match=r"model.unshuffle=3: use one of 1, 2, 4"):
        load("scenes-inpaint", ["model.unshuffle=3"])


def test_label2image_and_cyclegan_train_and_score(tmp_path, monkeypatch):
    """A label map -> scene run and a day -> night CycleGAN run: both evaluate PSNR/SSIM against the truth and,
    at the final evaluation, the domain FID (the CycleGAN's untranslated input too); the unpaired run's parts are
    both generators and both discriminators."""
    from deeprecipe.families.img2img.infer import translate

    monkeypatch.setenv("DEEPRECIPE_CACHE", str(tmp_path / "cache"))
    for recipe in ("scenes-label2image", "scenes-day2night-cyclegan"):
        ctx, model = trained(recipe, tmp_path / recipe, ["model.feature_steps=2"])
        f = family()
        assert "fid" not in f.evaluate(model, ctx.data, "val", ctx.cfg, ctx.rt, False)
        m = f.evaluate(model, ctx.data, "val", ctx.cfg, ctx.rt, True)
        assert 0 < m["psnr"] < 60 and -1 <= m["ssim"] <= 1 and m["fid"] > 0, m
        if recipe.endswith("cyclegan"):
            assert set(f.parts(model, ctx.cfg)) == {"d", "g"} and "psnr_input" in m and m["fid_input"] > 0
            assert len(list(f.parts(model, ctx.cfg)["g"][0].children())) == 2
            out = translate(model, ctx.spec, ctx.rt, torch.zeros(3, 20, 28, dtype=torch.uint8))
        else:
            out = translate(model, ctx.spec, ctx.rt, torch.zeros(20, 28, dtype=torch.uint8))
            labels = torch.zeros(1, 20, 28, dtype=torch.uint8)
            write_png(labels, str(tmp_path / "lab.png"))
            (r,) = f.predict(
                model, ctx.spec, ctx.cfg, ctx.rt, [str(tmp_path / "lab.png")], PredictOptions(out=tmp_path)
            )
            assert r["size"] == [28, 20]
            labels[0, 3, 4] = 9
            write_png(labels, str(tmp_path / "lab.png"))
            with pytest.raises(UserError, match=r"lab\.png: label id 9 is not one of the 8 classes"):
                f.predict(model, ctx.spec, ctx.cfg, ctx.rt, [str(tmp_path / "lab.png")], PredictOptions(out=tmp_path))
        assert out.shape == (3, 20, 28) and out.dtype == torch.uint8


def test_scene_fid_is_zero_on_the_real_images_and_sees_a_change_of_look(tmp_path, monkeypatch):
    """The domain FID on the scene segmenter's features: real scenes against themselves score ~0, against the same
    scenes at night far more, and the feature net trains on the run's scenes (size, seed, training images)."""
    from deeprecipe.data.scenes import render_scenes

    monkeypatch.setenv("DEEPRECIPE_CACHE", str(tmp_path / "cache"))
    cfg = load("scenes-label2image", ["train.device=cpu", *TINY_SCENES, "model.feature_steps=20"])
    fcfg = im.scene_feature_config(cfg)
    assert (fcfg.task, fcfg.model.name, fcfg.data.name) == ("segment", "unet", "scenes")
    assert list(fcfg.data.size) == [32, 32] and fcfg.data.train_size == 16 and fcfg.train.steps == 20
    feats = im.scene_features(cfg, torch.device("cpu"))
    assert feats(torch.zeros(3, 3, 48, 40)).shape == (3, feats.num_features)
    numbers = torch.arange(20_000_000, 20_000_040)
    day, night = (render_scenes(numbers, (32, 32), look)[0].float() / 127.5 - 1 for look in ("day", "night"))
    fid = im.DomainFID(feats, inputs=True)
    for i in range(0, 40, 16):
        fid.add(day[i : i + 16], day[i : i + 16], night[i : i + 16])
    got = fid.compute()
    assert abs(got["fid"]) < 1e-3 * got["fid_input"] and got["fid_input"] > 0, got
    with pytest.raises(UserError, match="model.feature_recipe=fashion-mnist-cnn: the scene feature net is a segment"):
        im.scene_feature_config(load("scenes-label2image", ["model.feature_recipe=fashion-mnist-cnn"]))


def test_folder_translations_get_a_domain_fid_from_an_a_versus_b_classifier(tmp_path, monkeypatch):
    """Two folders of the user's (day scenes in A/, the same scenes at night in B/): the feature net is a classifier
    of A vs B; real B against itself scores ~0, A against B far more; a paired run's final evaluation reports both."""
    from deeprecipe.data.scenes import render_scenes

    monkeypatch.setenv("DEEPRECIPE_CACHE", str(tmp_path / "cache"))
    numbers = torch.arange(20_000_000, 20_000_040)
    day, night = (render_scenes(numbers, (32, 32), look)[0] for look in ("day", "night"))
    for i in range(24):
        for part, img in (("A", day[i]), ("B", night[i])):
            (tmp_path / "pairs" / part).mkdir(parents=True, exist_ok=True)
            write_png(img, str(tmp_path / "pairs" / part / f"{i}.png"))
    sets = [f"data.path={tmp_path / 'pairs'}", "data.size=[32,32]", "model.feature_steps=30"]
    cfg = load("folder-pix2pix", ["train.device=cpu", *sets])
    fcfg = im.pair_feature_config(cfg)
    assert (fcfg.task, fcfg.data.name, fcfg.train.steps) == ("classify", "imagefolder", 30)
    feats = im.pair_features(cfg, torch.device("cpu"))
    assert feats.accuracy > 0.9  # day and night tell apart at once
    fid = im.DomainFID(feats, inputs=True)
    unit = [v[24:].float() / 127.5 - 1 for v in (day, night)]  # scenes no file holds
    fid.add(unit[1], unit[1], unit[0])
    got = fid.compute()
    assert abs(got["fid"]) < 1e-3 * got["fid_input"] and got["fid_input"] > 0, got
    ctx, model = trained("folder-pix2pix", tmp_path / "run", sets)
    m = family().evaluate(model, ctx.data, "val", ctx.cfg, ctx.rt, True)
    assert m["fid"] > 0 and m["fid_input"] > 0, m
    with pytest.raises(UserError, match="model.feature_recipe=scenes-unet: the feature net of folder translations"):
        im.pair_feature_config(load("folder-pix2pix", [*sets, "model.feature_recipe=scenes-unet"]))


def test_export_example_runs_the_generator(tmp_path):
    ctx, model = trained("scenes-inpaint", tmp_path)
    ex = family().export_example(model, ctx.spec, 2)
    x = ex["inputs"]["image"]
    assert x.shape == (2, 4, 32, 32) and set(x[:, -1].unique().tolist()) <= {0.0, 1.0}
    assert model(x).shape == (2, 3, 32, 32)


# ------------------------------------------------------------------------------------------ serve and export


def test_served_inpaint_fills_only_the_hole_refuses_a_bad_mask_and_exports(tmp_path):
    """A tiny inpainting run, served as `deeprecipe serve` serves it: /inpaint with a mask keeps the pixels
    outside the hole and gives predict's answer; a mask of another size is a 400 naming it; the ONNX export
    passes its parity check."""
    import base64
    import io

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from deeprecipe.cli import main, open_run
    from deeprecipe.serve.server import ServeOptions, build_app

    run = tmp_path / "run"
    sets = ["train.device=cpu", "train.precision=fp32", "train.eval_every=0", "train.steps=2", "train.batch_size=2"]
    sets += [*TINY_SCENES, *TINY_MODEL]
    assert main(["train", "scenes-inpaint", "--out", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
    image = png(tmp_path / "p.png", 24, 30)
    mask = torch.zeros(1, 24, 30, dtype=torch.uint8)
    mask[:, 4:14, 6:20] = 255
    write_png(mask, str(tmp_path / "p_mask.png"))
    cfg, spec, model, rt, fam = open_run(str(run), "cpu", "fp32")
    (want,) = fam.predict(model, spec, cfg, rt, [str(image)], PredictOptions(out=tmp_path / "o"))
    with TestClient(build_app(str(run), *open_run(str(run), "cpu", "fp32"), ServeOptions(token="tk"))) as c:
        c.headers["Authorization"] = "Bearer tk"
        files = {"image": ("p.png", image.read_bytes(), "image/png")}
        r = c.post("/inpaint", files={**files, "mask": ("m.png", (tmp_path / "p_mask.png").read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        got = np.array(Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))))
        assert np.array_equal(got, np.array(Image.open(want["out"])))
        assert np.array_equal(got[mask[0].numpy() == 0], np.array(Image.open(image))[mask[0].numpy() == 0])
        write_png(mask[:, :20], str(tmp_path / "small_mask.png"))
        bad = c.post(
            "/inpaint", files={**files, "mask": ("small.png", (tmp_path / "small_mask.png").read_bytes(), "image/png")}
        )
        assert bad.status_code == 400 and "small.png: the mask is 30x20 but the image is 30x24" in bad.text
        assert c.post("/inpaint", files=files).status_code == 200  # no mask: a centred box
        wide = png(tmp_path / "wide.png", 30, 1100)  # past MAX_SIDE: image and mask scaled down alike
        write_png(torch.full((1, 30, 1100), 255, dtype=torch.uint8), str(tmp_path / "wide_mask.png"))
        r = c.post(
            "/inpaint",
            files={
                "image": ("wide.png", wide.read_bytes(), "image/png"),
                "mask": ("wide_mask.png", (tmp_path / "wide_mask.png").read_bytes(), "image/png"),
            },
        )
        assert r.status_code == 200 and r.json()["size"] == [1024, 28], r.text
    assert main(["export", str(run), "--format", "onnx"]) == 0


@pytest.mark.slow
@needs_chromium
def test_page_paints_a_mask_over_the_image_and_shows_before_and_after(tmp_path):
    """In headless Chromium: the /inpaint widget is a canvas over the uploaded image; a brush stroke on its left
    part is sent as the mask (at the image's size, else the server says 400), and the answer shown as `after`
    differs from the image only there; Clear wipes the strokes, and sending nothing painted is refused."""
    import base64
    import io

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from deeprecipe.cli import main, open_run
    from deeprecipe.serve.server import ServeOptions, build_app
    from test_serve import browser

    run = tmp_path / "run"
    sets = ["train.device=cpu", "train.precision=fp32", "train.eval_every=0", "train.steps=2", "train.batch_size=2"]
    sets += [*TINY_SCENES, *TINY_MODEL]
    assert main(["train", "scenes-inpaint", "--out", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
    image = png(tmp_path / "p.png", 40, 48, seed=5)
    app = build_app(str(run), *open_run(str(run), "cpu", "fp32"), ServeOptions())
    with browser(app, tmp_path) as (driver, url):
        driver.get(url)
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_elements(By.ID, "canvas-0"), "no mask widget")
        assert driver.find_element(By.CSS_SELECTOR, "section").get_attribute("data-path") == "/inpaint"
        driver.find_element(By.ID, "file-0").send_keys(str(image))
        canvas = driver.find_element(By.ID, "canvas-0")
        wait.until(lambda d: canvas.get_attribute("width") == "48", "the canvas did not take the image's size")
        w, h = canvas.size["width"], canvas.size["height"]  # 320 px wide on the page

        def paint():  # press 30 px from the left, a quarter up, drag 60 px right and 20 down (a fresh chain)
            chain = ActionChains(driver).move_to_element_with_offset(canvas, -w // 2 + 30, -h // 4)
            chain.click_and_hold().move_by_offset(60, 20).release().perform()

        paint()
        driver.find_element(By.ID, "clear-0").click()
        driver.find_element(By.ID, "go-0").click()
        wait.until(lambda d: "paint over" in d.find_element(By.ID, "result-0").text, "an empty mask was sent")
        paint()
        driver.find_element(By.ID, "go-0").click()
        wait.until(lambda d: d.find_elements(By.ID, "after-0"), "no answer shown")
        assert driver.find_element(By.ID, "result-0").text == "48x40"
        assert driver.find_element(By.ID, "before-0").get_attribute("src").startswith("data:image/png")
        src = driver.find_element(By.ID, "after-0").get_attribute("src").split(",", 1)[1]
    after = np.array(Image.open(io.BytesIO(base64.b64decode(src)))).astype(int)
    changed = np.abs(after - np.array(Image.open(image)).astype(int)).max(-1) > 0  # (40, 48)
    ys, xs = changed.nonzero()
    assert changed.sum() > 10, "the painted pixels were not filled"
    assert xs.max() < 24 and ys.max() < 30, "pixels outside the stroke changed"  # the stroke: about x 3..15, y 8..15


def test_telea_fills_a_flat_image_nearly_exactly():
    pytest.importorskip("cv2")
    img = torch.full((2, 3, 20, 20), 0.4)
    hole = degrade.holes(2, 20, 20, "box", 0.25, draws(1), "cpu")
    filled = im.telea(img * (1 - hole), hole)
    assert filled.shape == img.shape and (filled - img).abs().max() <= 4 / 255


def test_the_modes_table_has_an_entry_for_every_mode_the_data_makes():
    """Every data.mode the img2img data set accepts has its row in the family's table (modes.py): a new mode fails
    here, not at its first prepare, predict or request."""
    from deeprecipe.data.img2img import MODES as DATA_MODES
    from deeprecipe.families.img2img.modes import MODES

    assert set(MODES) == set(DATA_MODES)
