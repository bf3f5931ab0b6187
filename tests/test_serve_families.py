"""Every family serves: a tiny run of each family is loaded the way `deeprecipe serve RUN` loads it, and each
endpoint's answer is checked against the family's own functions run on an independently loaded copy of the
model (the oracle), along with the family's bad inputs. The cases iterate over the family registry."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from deeprecipe.cli import main, open_run
from deeprecipe.families import FAMILIES
from deeprecipe.family import PredictOptions
from deeprecipe.serve.server import ServeOptions, build_app
from test_serve import png  # a random PNG: png(h, w, channels, seed)

FAST = ["train.device=cpu", "train.precision=fp32", "train.eval_every=0", "train.log_every=1", "train.ckpt_every=2"]
WORDS = {"a": "ein", "big": "großer", "dog": "hund", "man": "mann", "sits": "sitzt", "the": "der", "red": "rot"}


def corpus(tmp: Path) -> list[str]:
    (tmp / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 40)
    return ["data.path=" + str(tmp / "corpus.txt"), "data.block_size=16"]


def pairs(tmp: Path) -> list[str]:
    g = torch.Generator().manual_seed(0)
    keys = list(WORDS)
    for split in ("train", "val", "test"):
        src = [" ".join(keys[int(i)] for i in torch.randint(0, len(keys), (4,), generator=g)) for _ in range(40)]
        (tmp / f"{split}.en").write_text("\n".join(src) + "\n")
        (tmp / f"{split}.de").write_text("\n".join(" ".join(WORDS[w] for w in s.split()) for s in src) + "\n")
    return [f"data.path={tmp}", "data.test=test", "data.vocab_size=120"]


def texts(tmp: Path) -> list[str]:
    rows = [f"{w} day {i},{lab}" for i in range(20) for lab, w in (("pos", "good"), ("neg", "bad"))]
    (tmp / "texts.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    return ["data.source=files", f"data.path={tmp / 'texts.csv'}"]


# a tiny run of each task: (recipe, overrides, or a function of the temporary folder giving extra overrides)
CASES = {
    "detect": (
        "scenes-detect",
        ["data.size=[48, 48]", "data.train_size=8", "data.val_size=4", "data.test_size=4", "model.width=4"]
        + ["model.neck=8", "model.max_width=16", "train.steps=2", "train.batch_size=4"],
        None,
    ),
    "classify": ("digits-cnn", ["model.channels=[4,8]", "model.dense=[8]", "train.steps=2"], None),
    "lm": ("shakespeare-char-gpt", ["model.n_layer=1", "model.n_embd=16", "model.n_head=2", "train.steps=2"], corpus),
    "translate": (
        "multi30k-en-de",
        ["model.d_model=32", "model.n_head=2", "model.enc_layers=1", "model.dec_layers=1", "model.beam=2"]
        + ["train.steps=2", "train.batch_size=16", "optim.warmup=0"],
        pairs,
    ),
    "gan": ("digits-gan", ["model.hidden=[16]", "model.eval_samples=0", "train.steps=2"], None),
    "textclass": ("multi30k-langid-lstm", ["model.hidden=8", "model.emb=8", "train.steps=2"], texts),
    "segment": (
        "scenes-unet",
        ["data.size=[32, 48]", "data.train_size=4", "data.val_size=2", "data.test_size=2", "data.crop=24"]
        + ["model.width=8", "model.depth=2", "train.steps=2", "train.batch_size=2"],
        None,
    ),
    "img2img": (
        "scenes-sr4",
        ["data.size=[32, 32]", "data.train_size=4", "data.val_size=2", "data.test_size=2", "model.width=4"]
        + ["model.depth=2", "model.d_width=4", "model.d_layers=2", "train.steps=2", "train.batch_size=2"],
        None,
    ),
    "drive": (
        "highway-fast-cnn",
        ["data.episodes=3", "data.frames=2", "data.size=[32, 32]", "data.eval_episodes=0", "model.channels=[4,8]"]
        + ["model.dense=[8]", "train.steps=2", "train.batch_size=8"],
        lambda tmp: [f"data.path={tmp / 'rollouts'}"],  # three expert episodes recorded here
    ),
    "pretrain": (
        "scenes-simclr",
        ["data.size=[32, 32]", "data.train_size=8", "data.val_size=4", "pretrain.proj_hidden=16", "pretrain.proj_dim=8"]
        + ["train.steps=2", "train.batch_size=4"],
        None,
    ),
    "masked": (
        "scenes-masked",
        ["data.size=[32, 32]", "data.train_size=8", "data.val_size=4", "model.decoder=[16,8,8,8,4]"]
        + ["train.steps=2", "train.batch_size=4"],
        None,
    ),
    "video": (
        "moving-digits-c3d",
        ["data.frames=8", "data.train_size=8", "data.val_size=4", "data.test_size=4", "train.steps=2"]
        + ["train.batch_size=4"],
        None,
    ),
}


def test_every_registered_family_has_a_case_here():
    assert set(CASES) == set(FAMILIES), "a new family needs a serve case in tests/test_serve_families.py"


@pytest.fixture
def served(tmp_path):
    """served(task) -> (TestClient of the run's app, (cfg, spec, model, rt, family) loaded independently)."""
    clients = []

    def make(task: str):
        recipe, overrides, extra = CASES[task]
        run = tmp_path / f"run-{task}"
        sets = [*FAST, *overrides, *(extra(tmp_path) if extra else [])]
        assert main(["train", recipe, "--out", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
        client = TestClient(build_app(str(run), *open_run(str(run), "cpu", "fp32"), ServeOptions(token="tk")))
        clients.append(client.__enter__())
        client.headers["Authorization"] = "Bearer tk"
        client.run = run
        return client, open_run(str(run), "cpu", "fp32")

    yield make
    for c in clients:
        c.__exit__(None, None, None)
    torch.set_grad_enabled(True)  # in case loading a run turns autograd off for the process


def from_png64(text: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(text))))


@pytest.mark.parametrize("task", sorted(FAMILIES))
def test_each_task_lists_its_endpoints_and_needs_the_token(served, task):
    c, _ = served(task)
    info = c.get("/info").json()
    assert info["task"] == task and info["endpoints"], info
    for w in info["endpoints"]:  # every advertised endpoint exists and refuses a request without the token
        assert c.post(w["path"], headers={"Authorization": ""}).status_code == 401, w
    assert "/docs" in c.get("/").text  # the page is served


def test_lm_streams_what_the_model_samples(served):
    from deeprecipe.data.text import tokenizer_from_spec
    from deeprecipe.families.lm import start_ids, stream_text

    c, (cfg, spec, model, rt, family) = served("lm")
    body = {"prompt": "the lazy ", "max_tokens": 25, "temperature": 0.9, "top_k": 5, "seed": 3}
    with c.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        got = "".join(r.iter_text())
    tok = tokenizer_from_spec(spec)
    want = "".join(stream_text(model, tok, start_ids(tok, "the lazy "), 25, 0.9, 5, 1.0, 3))
    assert got == want and len(got) == 25  # one character per token
    r = c.post("/generate", json={"prompt": "zebra €", "max_tokens": 5})  # '€' is not in the corpus
    assert r.status_code == 400 and "vocabulary lacks" in r.json()["detail"]


def test_translate_answers_what_translate_lines_gives(served):
    from deeprecipe.families.translate import translate_lines

    c, (cfg, spec, model, rt, family) = served("translate")
    for text in ["a big dog", "the man sits", "red"]:  # one at a time: an untrained net's near-ties can flip
        want = translate_lines(model, spec, [text], rt, beam=2, alpha=cfg.model.length_penalty)[0]  # with padding
        r = c.post("/translate", json={"text": text})
        assert r.status_code == 200 and r.json() == {"text": text, "translation": want}
    assert c.post("/translate", json={"text": ""}).status_code == 422


def test_gan_samples_are_the_generator_images(served):
    from deeprecipe.families.gan import generate

    c, (cfg, spec, model, rt, family) = served("gan")
    images = c.post("/sample", json={"n": 3, "seed": 5}).json()["images"]
    want = (torch.cat(list(generate(model, 3, 5, rt))) + 1) / 2  # (3, 1, 8, 8) in [0, 1]
    got = np.stack([from_png64(b) for b in images])  # (3, 8, 8) uint8
    np.testing.assert_allclose(got, (want[:, 0] * 255).round().numpy(), atol=1)
    assert c.post("/sample", json={"n": 0}).status_code == 422


def test_embed_gives_the_trunk_features_of_the_image(served):
    """/embed answers the projector's input (the trunk's features, what fine-tuning keeps) for the upload made as
    the training images were: the oracle runs the trunk's layers by hand on an independently loaded model."""
    from deeprecipe.data import image_ops

    c, (cfg, spec, model, rt, family) = served("pretrain")
    data = png(32, 32, 3, seed=2)
    got = c.post("/embed", files={"image": ("x.png", data, "image/png")}).json()
    img = image_ops.for_model(image_ops.decode(data, spec.in_channels), spec)
    x = family.prepare((img[None],), spec, None)[0]
    with torch.no_grad():
        t = model.eval()
        h = t.avgpool(t.layer4(t.layer3(t.layer2(t.layer1(t.maxpool(t.relu(t.bn1(t.conv1(x)))))))))
    assert got["dim"] == 512
    np.testing.assert_allclose(got["features"], h.flatten().numpy(), atol=1e-4)
    assert c.post("/embed", files={"image": ("x.txt", b"hello", "text/plain")}).status_code == 415


def test_segment_gives_the_label_map_at_the_upload_size(served, monkeypatch):
    from deeprecipe.families import segment
    from deeprecipe.families.segment import segment_images

    c, (cfg, spec, model, rt, family) = served("segment")
    data = png(30, 50, 3, seed=1)
    r = c.post("/segment", files={"image": ("street.png", data, "image/png")})
    assert r.status_code == 200, r.text
    res = r.json()
    img = torch.from_numpy(np.array(Image.open(io.BytesIO(data)))).permute(2, 0, 1)
    want = segment_images(model, spec, rt, [img])[0]
    labels = from_png64(res["labels"])
    assert labels.shape == (30, 50) and np.array_equal(labels, want.numpy())
    assert from_png64(res["overlay"]).shape == (30, 50, 3)
    assert sum(res["fractions"].values()) == pytest.approx(1, abs=1e-3)
    for name, frac in res["fractions"].items():
        k = spec.class_names.index(name)
        assert frac == pytest.approx(float((want == k).float().mean()), abs=1e-4)
    monkeypatch.setattr(segment, "SERVE_SIDE", 40)  # a bigger upload is answered at a long side of 40
    big = c.post("/segment", files={"image": ("big.png", png(60, 100, 3, seed=2), "image/png")}).json()
    assert from_png64(big["labels"]).shape == (24, 40) and from_png64(big["overlay"]).shape == (24, 40, 3)
    bad = c.post("/segment", files={"image": ("x.png", b"not an image", "image/png")})
    assert bad.status_code == 400 and "could not be decoded" in bad.json()["detail"]


def image_file(path: Path, h: int, w: int, channels: int, seed: int) -> Path:
    """A random image written with Pillow, PNG or JPEG by the file's suffix."""
    g = torch.Generator().manual_seed(seed)
    Image.fromarray(torch.randint(0, 256, (h, w, channels), dtype=torch.uint8, generator=g).squeeze(-1).numpy()).save(
        path
    )
    return path


@pytest.mark.parametrize("task", ["classify", "segment"])
def test_predict_and_the_endpoint_give_the_same_answer_for_the_same_file(served, task, tmp_path, capsys):
    """`deeprecipe predict RUN FILES --json` and the HTTP endpoint decode, resize and run a file the same way: the
    same probabilities (classify) and the same label map (segment), for a PNG at the model's size and a JPEG at
    another size (so resizing is exercised) and with other channels than the model's."""
    c, (cfg, spec, model, rt, family) = served(task)
    h, w = spec.image_size
    files = [
        image_file(tmp_path / "same.png", h, w, spec.in_channels, seed=1),
        image_file(tmp_path / "other.jpg", 2 * h + 3, w + 5, 4 - spec.in_channels, seed=2),  # gray <-> RGB
    ]
    capsys.readouterr()
    top = ["--top", str(spec.num_classes)] if task == "classify" else []
    code = main(["predict", str(c.run), *map(str, files), "--json", "--device", "cpu", "--out", "masks", *top])
    out, err = capsys.readouterr()
    assert code == 0, err
    predicted = json.loads(out)
    assert [r["file"] for r in predicted] == [str(f) for f in files]
    for f, want in zip(files, predicted):
        upload = {"image": (f.name, f.read_bytes(), "image/png" if f.suffix == ".png" else "image/jpeg")}
        if task == "classify":
            r = c.post(f"/classify?top={spec.num_classes}", files=upload)
            assert r.status_code == 200, r.text
            got = r.json()
            assert len(got["top"]) == spec.num_classes
            assert got == {k: want[k] for k in ("label", "prob", "top")}, f.name
        else:
            r = c.post("/segment", files=upload)
            assert r.status_code == 200, r.text
            got = from_png64(r.json()["labels"])
            labels = np.array(Image.open(want["labels"]))
            size = Image.open(f).size[::-1]  # (h, w)
            assert got.shape == labels.shape == size, f.name
            assert np.array_equal(got, labels), f.name
            assert r.json()["fractions"] == {k: round(v, 5) for k, v in want["fractions"].items()}


def test_video_classification_matches_predict_and_refuses_bad_files(served, tmp_path):
    pytest.importorskip("av")
    from deeprecipe.data.video import MovingDigitsData
    from test_video import encode

    c, (cfg, spec, model, rt, family) = served("video")
    clip = MovingDigitsData(frames=8, train_size=1, val_size=0, test_size=0).build().train.tensors[0][0, 0]
    path = Path(encode(tmp_path / "digit.mp4", clip[..., None].expand(-1, -1, -1, 3).numpy().copy()))
    r = c.post("/classify-video?top=3", files={"video": ("digit.mp4", path.read_bytes(), "video/mp4")})
    assert r.status_code == 200, r.text
    with torch.no_grad():
        want = family.predict(model, spec, cfg, rt, [str(path)], PredictOptions(top=3))[0]
    assert r.json()["label"] == want["label"]
    assert [t["label"] for t in r.json()["top"]] == [t["label"] for t in want["top"]]
    for a, b in zip(r.json()["top"], want["top"]):
        assert a["prob"] == pytest.approx(b["prob"], abs=1e-3)
    bad = c.post("/classify-video", files={"video": ("x.mp4", b"not a video at all", "video/mp4")})
    assert bad.status_code == 400 and bad.json()["detail"].startswith("video: ")
    assert "deeprecipe-upload" not in bad.json()["detail"]  # no server-side path in the message
    wrong = c.post("/classify-video", files={"video": ("x.txt", b"hello", "text/plain")})
    assert wrong.status_code == 415


@pytest.mark.slow
@pytest.mark.parametrize("task", ["lm", "segment"])
def test_web_page_streams_text_and_shows_an_overlay(served, task, tmp_path):
    """Headless Chromium on the page at /: type a prompt and watch the text arrive; upload a street image and
    see the class shares and the overlay; both equal what the API answers."""
    from test_serve import CHROMIUM, DRIVER, browser

    if not (CHROMIUM.exists() and DRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    c, _ = served(task)
    with browser(c.app, tmp_path) as (driver, url):
        driver.get(url)
        wait = WebDriverWait(driver, 30)
        driver.find_element(By.ID, "token").send_keys("tk\t")
        if task == "lm":
            with c.stream("POST", "/generate", json={"prompt": "the ", "max_tokens": 300}) as r:
                want = "the " + "".join(r.iter_text())  # the page asks for 300 tokens with the default seed
            wait.until(lambda d: d.find_elements(By.ID, "prompt-0"), "no prompt box")
            driver.find_element(By.ID, "prompt-0").send_keys("the ")
            driver.find_element(By.ID, "go-0").click()
            wait.until(lambda d: len(d.find_element(By.ID, "result-0").text) >= len(want.strip()), "no text")
            assert driver.find_element(By.ID, "result-0").text == want.strip()
        else:
            image = tmp_path / "street.png"
            image.write_bytes(png(30, 50, 3, seed=2))
            want = c.post("/segment", files={"image": ("s.png", image.read_bytes(), "image/png")}).json()
            wait.until(lambda d: d.find_elements(By.ID, "file-0"), "no upload widget")
            driver.find_element(By.ID, "file-0").send_keys(str(image))
            driver.find_element(By.ID, "go-0").click()
            wait.until(lambda d: d.find_elements(By.ID, "overlay-0"), "no overlay shown")
            assert driver.find_element(By.ID, "result-0").text == want["text"]
            src = driver.find_element(By.ID, "overlay-0").get_attribute("src")
            assert src == "data:image/png;base64," + want["overlay"]


def test_masked_reconstructs_what_the_model_fills_in(served):
    from deeprecipe.families.masked import reconstruct_image

    c, (cfg, spec, model, rt, family) = served("masked")
    r = c.post("/reconstruct", files={"image": ("s.png", png(32, 32, 3, seed=4), "image/png")})
    assert r.status_code == 200, r.text
    img = torch.from_numpy(np.array(Image.open(io.BytesIO(png(32, 32, 3, seed=4))))).permute(2, 0, 1)
    with torch.no_grad():
        want = reconstruct_image(model, spec, cfg, img)
    got = r.json()
    assert got["psnr"] == pytest.approx(want["psnr"], abs=1e-3)
    np.testing.assert_allclose(
        from_png64(got["reconstruction"]), (want["reconstruction"] * 255).round().permute(1, 2, 0).numpy(), atol=1
    )
    hidden = from_png64(got["hidden"])
    assert (hidden != np.array(Image.open(io.BytesIO(png(32, 32, 3, seed=4))))).any()  # cells were hidden
