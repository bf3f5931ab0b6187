"""The HTTP server: answers against the model as oracle, every bad request, the token, batching, metrics,
the generic endpoints of the generative families, and the web page in headless Chromium."""

import asyncio
import contextlib
import io
import re
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from deeprecipe.config import Config
from deeprecipe.data.core import DataSpec
from deeprecipe.engine.device import Runtime
from deeprecipe.families.classify import Classify
from deeprecipe.family import Family
from deeprecipe.models.cnn import CNNConfig
from deeprecipe.serve.server import Batcher, Metrics, ServeOptions, create_app

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = DataSpec(
    num_classes=4, class_names=["ant", "bee", "cat", "dog"], in_channels=1, image_size=(8, 8), mean=(0.5,), std=(0.25,)
)


def make_app(**opts):
    torch.manual_seed(0)
    model = CNNConfig(channels=(4, 8), dense=(8,)).build(SPEC).eval()
    cfg = Config(task="classify", model=CNNConfig())
    return create_app(model, SPEC, cfg, Runtime(torch.device("cpu"), None), Classify(), ServeOptions(**opts)), model


def png(h=8, w=8, c=1, seed=0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (h, w, c), dtype=torch.uint8, generator=g).squeeze(-1).numpy()
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def flat_png(h, w) -> bytes:  # compresses to a few bytes whatever its size: the decompression-bomb shape
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def bomb(kind: str, w=20000, h=10000) -> bytes:
    """A header claiming w x h pixels (over Pillow's own limit of 2 * 89.5 Mpixel) and almost nothing else."""
    if kind == "png":
        chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")
    screen = struct.pack("<HHBBB", w, h, 0, 0, 0)
    return b"GIF89a" + screen + b"," + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x4c\x01\x00;"


def upload(data: bytes, ctype="image/png"):
    return {"image": ("x.png", data, ctype)}


@pytest.fixture(scope="module")
def client():
    app, model = make_app(token=TOKEN, max_bytes=4000, max_pixels=64 * 64)
    with TestClient(app) as c:
        c.model = model
        yield c


def test_classify_answers_what_the_model_says(client):
    for seed in range(3):
        r = client.post("/classify?top=4", files=upload(png(seed=seed)), headers=AUTH)
        assert r.status_code == 200, r.text
        img = torch.from_numpy(np.array(Image.open(io.BytesIO(png(seed=seed)))))[None, None]  # (1, 1, 8, 8)
        with torch.no_grad():
            want = client.model(Classify().prepare((img, None), SPEC, None)[0]).softmax(-1)[0]
        got = {t["label"]: t["prob"] for t in r.json()["top"]}
        assert r.json()["label"] == SPEC.class_names[int(want.argmax())]
        for i, name in enumerate(SPEC.class_names):
            assert got[name] == pytest.approx(float(want[i]), abs=1e-4)


def test_rgb_and_other_sizes_are_converted(client):
    r = client.post("/classify", files=upload(png(20, 13, 3)), headers=AUTH)
    assert r.status_code == 200 and len(r.json()["top"]) == 3


@pytest.mark.parametrize(
    "case, status, words",
    [
        ("wrong type", 415, "content type"),
        ("undecodable", 400, "could not be decoded"),
        ("empty", 400, "empty"),
        ("oversized body", 413, "larger than the limit"),
        ("oversized chunked body", 413, "larger than the limit"),
        ("too many pixels", 413, "pixels"),
        ("a PNG past Pillow's bomb limit", 413, "pixels"),
        ("a GIF past Pillow's bomb limit", 413, "pixels"),
        ("two images", 422, "image: sent 2 times"),
        ("top too large", 422, "top"),
        ("top not a number", 422, "top"),
        ("missing file", 422, "image"),
    ],
)
def test_bad_requests_get_4xx_with_a_clear_message(client, case, status, words):
    post = lambda **kw: client.post("/classify", headers=AUTH, **kw)
    r = {
        "wrong type": lambda: post(files=upload(b"hello", "text/plain")),
        "undecodable": lambda: post(files=upload(b"\x89PNG not really")),
        "empty": lambda: post(files=upload(b"")),
        "oversized body": lambda: post(files=upload(b"\0" * 5000)),
        "oversized chunked body": lambda: client.post(
            "/classify",
            content=iter([b"\0" * 1000] * 5),
            headers={**AUTH, "content-type": "multipart/form-data; boundary=x"},
        ),
        "too many pixels": lambda: post(files=upload(flat_png(65, 65))),
        "a PNG past Pillow's bomb limit": lambda: post(files=upload(bomb("png"))),
        "a GIF past Pillow's bomb limit": lambda: post(files=upload(bomb("gif"), "image/gif")),
        "two images": lambda: post(
            files=[("image", ("a.png", png(), "image/png")), ("image", ("b.png", png(), "image/png"))]
        ),
        "top too large": lambda: client.post("/classify?top=5", files=upload(png()), headers=AUTH),
        "top not a number": lambda: client.post("/classify?top=abc", files=upload(png()), headers=AUTH),
        "missing file": lambda: post(),
    }[case]()
    assert r.status_code == status, (case, r.status_code, r.text)
    assert words in r.json()["detail"]


def test_token_is_required_everywhere_but_health_and_static_pages(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/").status_code == 200 and "<script>" in client.get("/").text
    assert client.get("/openapi.json").status_code == 200
    for method, path in [("get", "/info"), ("get", "/metrics"), ("post", "/classify")]:
        kw = {"files": upload(png())} if method == "post" else {}
        assert getattr(client, method)(path, **kw).status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert getattr(client, method)(path, headers=bad, **kw).status_code == 401
        assert getattr(client, method)(path, headers=AUTH, **kw).status_code == 200
    info = client.get("/info", headers=AUTH).json()
    assert info["classes"] == SPEC.class_names and info["endpoints"][0]["path"] == "/classify"


def test_api_docs_are_served_from_local_files_and_redoc_is_gone(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith("/") for a in assets), assets  # nothing from a CDN: works offline
    for a in assets:
        assert client.get(a).status_code == 200, a
    assert client.get("/redoc").status_code == 404


def test_no_endpoint_takes_a_server_path(client):
    spec = client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for op in ops.values():
            for p in op.get("parameters", []):
                assert p["name"] not in ("path", "file", "filename", "run"), (path, p)


def parse(text: str) -> list:
    """Prometheus text parsed by prometheus_client's own parser: its samples (name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(samples: list, name: str, **labels: str) -> float:
    """The sum over the samples called `name` whose labels include `labels`."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def scrape(client, **kw) -> list:
    r = client.get("/metrics", **kw)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def test_metrics_count_every_request_by_route_and_status_and_every_batch():
    app, _ = make_app(token=TOKEN, max_bytes=4000)  # its own app: the counts are exactly this test's requests
    with TestClient(app) as c:
        for seed in range(3):
            assert c.post("/classify", files=upload(png(seed=seed)), headers=AUTH).status_code == 200
        for _ in range(2):
            assert c.post("/classify", files=upload(png())).status_code == 401  # no token
        assert c.post("/classify", files=upload(b"x" * 5000), headers=AUTH).status_code == 413
        assert c.get("/info", headers=AUTH).status_code == 200
        m = scrape(c, headers=AUTH)
        again = scrape(c, headers=AUTH)  # the first scrape is counted once it is answered
    total = lambda **labels: value(m, "deeprecipe_requests_total", **labels)
    assert total(route="/classify", status="200") == 3 and total(route="/classify", status="401") == 2
    assert total(route="/info", status="200") == 1 and total(status="413") == 1 and total() == 7
    assert value(m, "deeprecipe_request_seconds_count", route="/classify") == 5  # every answer, refusals too
    assert value(m, "deeprecipe_request_seconds_bucket", route="/classify", le="+Inf") == 5
    assert value(m, "deeprecipe_request_seconds_sum", route="/classify") > 0
    assert value(m, "deeprecipe_batch_size_sum", endpoint="classify") == 3  # every answered image, in a batch
    assert 1 <= value(m, "deeprecipe_batch_size_count", endpoint="classify") <= 3
    assert value(m, "deeprecipe_queue_depth", endpoint="classify") == 0
    names = {s.name for s in m}
    assert {"process_cpu_seconds_total", "python_info", "python_gc_collections_total"} <= names  # default collectors
    assert value(again, "deeprecipe_requests_total", route="/metrics", status="200") == 1
    assert c.get("/metrics").status_code == 401  # the token guards the metrics too


def test_concurrent_requests_are_batched_and_answered_correctly():
    app, _ = make_app(max_batch=8, wait_ms=200)
    images = [png(seed=s) for s in range(12)]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            together = await asyncio.gather(*[c.post("/classify", files=upload(b)) for b in images])
            alone = [await c.post("/classify", files=upload(b)) for b in images[:3]]
            return together, alone

    together, alone = asyncio.run(go())
    assert [r.status_code for r in together] == [200] * 12
    for r, a in zip(together, alone):  # a request gets its own answer, batched or not
        assert r.json() == a.json()
    m = parse(app.state.ctx.metrics.prometheus().decode())
    batches = value(m, "deeprecipe_batch_size_count", endpoint="classify")
    assert value(m, "deeprecipe_batch_size_sum", endpoint="classify") == 15 and batches < 15
    assert value(m, "deeprecipe_batch_size_bucket", endpoint="classify", le="2.0") < batches  # a batch held >= 3


class Slow(torch.nn.Module):
    """The model, made slow on purpose: requests pile up while one batch runs."""

    def __init__(self, model, seconds):
        super().__init__()
        self.model, self.seconds = model, seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.model(x)


def test_a_burst_past_the_queue_gets_503_with_retry_after_and_nothing_is_lost():
    app, model = make_app(max_batch=2, max_queue=4, wait_ms=1)
    app.state.ctx.model = Slow(model, 0.2)  # the family's batch function reads ctx.model at each call
    n = 10 * 4
    images = [png(seed=s) for s in range(n)]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            burst = await asyncio.gather(*[c.post("/classify", files=upload(b)) for b in images])
            return burst, await c.get("/metrics")

    burst, metrics = asyncio.run(go())
    codes = Counter(r.status_code for r in burst)
    assert set(codes) == {200, 503} and sum(codes.values()) == n, codes  # every request answered, no other code
    assert codes[200] >= 4 and codes[503] >= n // 2, codes  # the queue's worth (and what ran) got through
    for r in burst:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and "--max-queue" in r.json()["detail"]
    with TestClient(app) as c:  # the answers that got through are the model's, as when asked alone
        for b, r in zip(images, burst):
            if r.status_code == 200:
                assert r.json() == c.post("/classify", files=upload(b)).json()
                break
    m = parse(metrics.text)
    assert value(m, "deeprecipe_requests_total", route="/classify", status="503") == codes[503]
    assert value(m, "deeprecipe_requests_total", route="/classify", status="200") == codes[200]
    assert value(m, "deeprecipe_batch_size_sum", endpoint="classify") == codes[200]


def test_batcher_keeps_order_and_max_batch():
    sizes = []

    def double(xs):
        sizes.append(len(xs))
        return [2 * x for x in xs]

    b = Batcher("t", double, max_batch=4, wait_ms=50, metrics=Metrics())

    async def go():
        return await asyncio.gather(*[b(i) for i in range(10)])

    assert asyncio.run(go()) == [2 * i for i in range(10)]
    assert max(sizes) <= 4 and sum(sizes) == 10


def test_locked_runs_one_model_call_at_a_time_and_answers_a_user_error_with_the_status_asked():
    """ctx.locked (the unbatched endpoints' model call): calls made together each return their own answer and never
    overlap (the model lock); a UserError of the call is the status given as `bad`, and stays a UserError without."""
    from fastapi import HTTPException

    from deeprecipe.core import UserError
    from deeprecipe.serve.server import ServeContext

    ctx = ServeContext(None, None, None, None, ServeOptions(), None, Metrics())
    inside, most = [0], [0]

    def call(x):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.005)  # room for another thread to come in, if the lock let it
        inside[0] -= 1
        return 2 * x

    async def together():
        return await asyncio.gather(*[ctx.locked(call, i) for i in range(8)])

    assert asyncio.run(together()) == [2 * i for i in range(8)] and most[0] == 1

    def refuse():
        raise UserError("nothing detected")

    with pytest.raises(HTTPException) as e:
        asyncio.run(ctx.locked(refuse, bad=422))
    assert (e.value.status_code, e.value.detail) == (422, "nothing detected")
    with pytest.raises(UserError, match="nothing detected"):
        asyncio.run(ctx.locked(refuse))


@pytest.mark.parametrize(
    "missing, verb",
    [("uvicorn", ["serve"]), ("prometheus_client", ["serve"]), ("onnxruntime", ["export"])],
)
def test_a_verb_without_the_serve_extra_names_the_pip_install_in_one_line(cli, monkeypatch, tmp_path, missing, verb):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now fails as if it were not installed
    code, out, err = cli(*verb, tmp_path / "any-run")
    assert code == 2 and not out, (code, out, err)
    assert err.strip().count("\n") == 0 and "pip install 'deeprecipe[serve]'" in err and missing in err, err


class Generative(Family):
    """A stand-in for the language, translation and GAN families, using the documented helpers."""

    def serve(self, ctx):
        ctx.text_generation("/generate", lambda prompt, max_tokens, **kw: iter(prompt[::-1][:max_tokens]))
        ctx.translation("/translate", lambda texts: [t.upper() for t in texts])
        ctx.image_sampler(
            "/sample", lambda n, seed: torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
        )


def test_generic_generation_translation_and_sampling_endpoints():
    model = torch.nn.Linear(1, 1)
    app = create_app(
        model,
        DataSpec(vocab_size=5),
        Config(task="lm", model=CNNConfig()),
        Runtime(torch.device("cpu"), None),
        Generative(),
        ServeOptions(token=TOKEN),
    )
    with TestClient(app) as c:
        with c.stream("POST", "/generate", json={"prompt": "abcdef", "max_tokens": 4}, headers=AUTH) as r:
            assert r.status_code == 200 and "".join(r.iter_text()) == "fedc"
        assert c.post("/translate", json={"text": "ein haus"}, headers=AUTH).json()["translation"] == "EIN HAUS"
        imgs = c.post("/sample", json={"n": 3, "seed": 1}, headers=AUTH).json()["images"]
        assert len(imgs) == 3 and all(i.startswith("iVBOR") for i in imgs)  # base64 of the PNG signature
        for path, body in [
            ("/generate", {"temperature": 0}),
            ("/generate", {"top_p": 2}),
            ("/generate", {"prompt": "x", "oops": 1}),
            ("/translate", {"text": ""}),
            ("/sample", {"n": 1000}),
        ]:
            r = c.post(path, json=body, headers=AUTH)
            assert r.status_code == 422 and r.json()["detail"].startswith("bad request"), (path, body, r.text)
        for path, raw in [  # not JSON numbers a client may still send: a 422 whose body encodes, never a 500
            ("/generate", '{"temperature": NaN}'),
            ("/generate", '{"temperature": 1e999}'),
            ("/generate", '{"top_p": -Infinity}'),
            ("/generate", '{"seed": 18446744073709551616}'),  # 2**64: past what a torch.Generator takes
            ("/sample", '{"seed": 18446744073709551616}'),
            ("/sample", '{"seed": -1}'),
        ]:
            r = c.post(path, content=raw, headers={**AUTH, "content-type": "application/json"})
            field = raw.split('"')[1]
            assert r.status_code == 422 and r.json()["detail"].startswith(f"bad request: {field}"), (path, raw, r.text)
        with c.stream("POST", "/generate", json={"prompt": "ab", "seed": 2**64 - 1}, headers=AUTH) as r:
            assert r.status_code == 200 and "".join(r.iter_text()) == "ba"
        assert c.post("/translate", json={"text": "x"}).status_code == 401
        kinds = {w["path"]: w["kind"] for w in c.get("/info", headers=AUTH).json()["endpoints"]}
        assert kinds == {"/generate": "stream", "/translate": "text", "/sample": "sample"}


class SlowGenerative(Family):
    """Generation and sampling that take a while: requests pile up at the model."""

    def serve(self, ctx):
        def pieces(prompt, **kw):
            time.sleep(0.1)
            yield prompt

        ctx.text_generation("/generate", pieces)
        ctx.image_sampler("/sample", lambda n, seed: time.sleep(0.1) or torch.zeros(n, 1, 2, 2))


def test_a_burst_at_the_whole_endpoint_helpers_gets_503_past_the_queue_and_every_slot_is_given_back():
    model, spec, cfg, rt = torch.nn.Linear(1, 1), DataSpec(vocab_size=5), Config(task="lm", model=CNNConfig()), None
    app = create_app(model, spec, cfg, rt, SlowGenerative(), ServeOptions(max_queue=2))

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            calls = [("/sample", {"n": 1}), ("/generate", {"prompt": "ab"})] * 20
            return await asyncio.gather(*[c.post(path, json=body) for path, body in calls])

    answers = asyncio.run(go())
    for path, got in [("/sample", answers[0::2]), ("/generate", answers[1::2])]:
        codes = Counter(r.status_code for r in got)
        assert set(codes) == {200, 503} and codes[200] >= 2 and codes[503] >= 10, (path, codes)
        assert all(r.text == "ab" for r in got if path == "/generate" and r.status_code == 200)
        assert all(r.headers["retry-after"] == "1" for r in got if r.status_code == 503)
        assert app.state.ctx.waiting[path] == 0  # every admitted request gave its place back


# ------------------------------------------------------------------------------------------ the web page

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and DRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@contextlib.contextmanager
def browser(app, tmp_path):
    """The app served by uvicorn on a free loopback port, and headless Chromium: yields (driver, page url)."""
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]:
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=opts)
    try:
        yield driver, f"http://127.0.0.1:{port}/"
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(10)


@pytest.mark.slow
@needs_chromium
def test_web_page_uploads_an_image_and_shows_the_label(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app, _ = make_app(token=TOKEN)
    image = tmp_path / "digit.png"
    image.write_bytes(png(seed=3))
    want = TestClient(app).post("/classify", files=upload(png(seed=3)), headers=AUTH).json()
    with browser(app, tmp_path) as (driver, url):
        driver.get(url)
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "token" in d.find_element(By.ID, "about").text, "no token prompt")  # /info refused
        box = driver.find_element(By.ID, "token")
        box.send_keys(TOKEN + "\t")  # leaving the box commits it (a change event), as a person would
        wait.until(lambda d: d.find_elements(By.ID, "file-0"), "no upload widget")
        driver.find_element(By.ID, "file-0").send_keys(str(image))
        driver.find_element(By.ID, "go-0").click()
        wait.until(lambda d: "%" in d.find_element(By.ID, "result-0").text, "no label shown")
        shown = driver.find_element(By.ID, "result-0").text
        assert shown.startswith(want["label"] + " ("), (shown, want)


@pytest.mark.slow
@needs_chromium
def test_api_docs_page_renders_the_endpoints_offline(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app, _ = make_app(token=TOKEN)
    with browser(app, tmp_path) as (driver, url):
        driver.get(url + "docs")
        paths = lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")]
        WebDriverWait(driver, 30).until(lambda d: "/classify" in paths(d), "Swagger UI did not render")
        assert "/info" in paths(driver)
