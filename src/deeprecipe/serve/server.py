"""The HTTP server of a trained run: FastAPI endpoints from the family, batching, limits, token, metrics, a page.

`build_app(run, ...)` takes a loaded run (safetensors weights, never unpickled), makes a `ServeContext` and calls
the family's `serve(ctx)` hook, which adds the family's endpoints in a few lines with the helpers below:
    ctx.batcher(name, fn)        requests arriving together run as one batch: fn(list of items) -> list of results
    await ctx.locked(fn, *args)  an unbatched endpoint's model call: in a worker thread, one at a time
    ctx.router                   a FastAPI APIRouter whose routes require the token (when one is set)
    await ctx.read_image(file)   an uploaded image, validated, as uint8 (C, H, W) with the spec's channels/size
    ctx.widget(path, kind, ...)  what the web page at / shows for the endpoint (kind: image | mask | text | stream |
                                 sample; an image widget uploads form field `field` (default image) of types
                                 `accept`; a mask widget sends `image` and the `mask` painted over it, same size)
    ctx.text_generation / ctx.translation / ctx.image_sampler   whole endpoints for the generative families
Always there: GET /health (public), / (the page, static), /docs (Swagger UI, its files served from the
fastapi-offline package: no CDN) and /openapi.json (the API description), GET /info and /metrics (Prometheus
text from prometheus_client: request counts by route and status, latency and batch-size histograms, queue depths,
process metrics). A batched endpoint holds at most max_queue waiting requests, and the whole-endpoint helpers
(generation, sampling) as many at the model; past that a request is answered 503 with Retry-After. Every endpoint
takes one file per form field: a field sent twice (two images to /classify) is a 422, not a silent answer for the
last one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from deeprecipe.config import Config
from deeprecipe.core import DataSpec, UserError
from deeprecipe.data import image_ops
from deeprecipe.runtime import Runtime
from deeprecipe.serve.schemas import GenerateRequest, SampleRequest, TextRequest

log = logging.getLogger("deeprecipe.serve")
DOCS_STATIC = "/docs/static"  # Swagger UI's own files (fastapi-offline bundles them)
PUBLIC = {"/health", "/", "/docs", "/openapi.json", "/docs/oauth2-redirect", DOCS_STATIC}  # static or liveness only
IMAGE_TYPES = {
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/bmp",
    "image/webp",
    "image/tiff",
    "application/octet-stream",
}  # the decoder decides; octet-stream is what many clients send


@dataclass
class ServeOptions:
    max_batch: int = 32  # most requests run together in one forward pass
    max_queue: int = 256  # most requests waiting per batched endpoint; past that 503 with Retry-After
    wait_ms: float = 5.0  # how long the first request of a batch waits for others to join it
    max_bytes: int = 8 * 2**20  # largest request body
    max_pixels: int = image_ops.MAX_PIXELS  # largest decoded image (a small PNG can claim a huge size)
    token: str | None = None  # bearer token required on every endpoint but the public ones
    log_every: float = 10.0  # seconds between summary lines in the log


# ------------------------------------------------------------------------------------------ monitoring


class Metrics:
    """Prometheus metrics of one app, in a registry of its own (several apps in one process do not clash):
    request counts by route and status, latency histograms by route, batch-size histograms and queue depths by
    batched endpoint, and prometheus_client's process, platform and garbage-collector collectors."""

    LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # seconds; streams run long
    BATCH = (1, 2, 4, 8, 16, 32, 64, 128)

    def __init__(self):
        self.registry = reg = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=reg)
        self.requests = Counter(
            "deeprecipe_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=reg,
        )
        self.latency = Histogram(
            "deeprecipe_request_seconds",
            "Time from a request's arrival to the end of its answer, by route.",
            ["route"],
            buckets=self.LATENCY,
            registry=reg,
        )
        self.batches = Histogram(
            "deeprecipe_batch_size",
            "Requests per model call, by batched endpoint.",
            ["endpoint"],
            buckets=self.BATCH,
            registry=reg,
        )
        self.queued = Gauge(
            "deeprecipe_queue_depth",
            "Requests waiting for a batch, by batched endpoint.",
            ["endpoint"],
            registry=reg,
        )
        self.last_logged = 0.0

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def batch(self, name: str, size: int) -> None:
        self.batches.labels(name).observe(size)

    def queue(self, name: str, depth: Callable[[], int]) -> None:
        """Report `depth()` as the queue depth of batched endpoint `name` at each scrape."""
        self.queued.labels(name).set_function(depth)

    def prometheus(self) -> bytes:
        return generate_latest(self.registry)

    def samples(self, name: str) -> dict[tuple, float]:
        """{(sample name, *label values): value} of metric `name` (the log line and tests read them)."""
        return {
            (smp.name, *smp.labels.values()): smp.value
            for metric in self.registry.collect()
            if metric.name == name
            for smp in metric.samples
        }

    def summary(self) -> str | None:
        """One log line since the last one, or None when nothing happened."""
        counts = self.samples("deeprecipe_requests")
        total = sum(v for (n, *_), v in counts.items() if n.endswith("_total"))
        if total == self.last_logged:
            return None
        new, self.last_logged = total - self.last_logged, total
        errors = sum(v for (n, _, status), v in counts.items() if n.endswith("_total") and int(status) >= 400)
        parts = [f"requests +{new:.0f} (total {total:.0f}, 4xx/5xx {errors:.0f})"]
        for metric, say in [
            ("deeprecipe_request_seconds", lambda key, mean: f"{key} mean {1000 * mean:.1f} ms"),
            ("deeprecipe_batch_size", lambda key, mean: f"{key} mean batch {mean:.1f}"),
        ]:
            s = self.samples(metric)
            for (_, key), count in sorted((k, v) for k, v in s.items() if k[0] == metric + "_count"):
                parts.append(say(key, s[(metric + "_sum", key)] / max(count, 1)))
        return "; ".join(parts)


# ------------------------------------------------------------------------------------------ batching


class Batcher:
    """An asyncio queue and one worker: it takes what is waiting (up to max_batch), waits up to wait_ms for
    more when the batch is not full, and runs fn on the whole batch in a thread so the server keeps accepting.
    Under load, requests pile up while the model runs, so batches grow with the load by themselves. At most
    max_queue requests wait: past that a request is answered at once with 503 and Retry-After (the client
    comes back later) rather than waiting without bound while memory and latency grow."""

    def __init__(
        self,
        name: str,
        fn: Callable[[list], list],
        max_batch: int,
        wait_ms: float,
        metrics: Metrics,
        max_queue: int = 256,
    ):
        self.name, self.fn, self.max_batch, self.wait = name, fn, max(1, max_batch), wait_ms / 1000
        self.max_queue = max(1, max_queue)
        self.metrics = metrics
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue | None = None
        metrics.queue(name, lambda: self.queue.qsize() if self.queue is not None else 0)

    def _start(self) -> None:  # one queue and worker per event loop (test clients may make several)
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            self.loop, self.queue = loop, asyncio.Queue(self.max_queue)
            self.worker = loop.create_task(self._work())

    async def __call__(self, item: Any) -> Any:
        self._start()
        fut = self.loop.create_future()  # type: ignore[union-attr]
        try:
            self.queue.put_nowait((item, fut))  # type: ignore[union-attr]
        except asyncio.QueueFull:
            raise queue_full(self.name, self.max_queue) from None
        return await fut

    async def _work(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            batch = [(item, fut) for item, fut in batch if not fut.done()]  # drop requests whose client left
            if not batch:
                continue
            self.metrics.batch(self.name, len(batch))
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in batch])
                for (_, fut), r in zip(batch, results):
                    if not fut.done():
                        fut.set_result(r)
            except Exception as e:  # the batch fails, the server does not
                log.exception("batch of %s failed", self.name)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)


def queue_full(name: str, max_queue: int) -> HTTPException:
    """The answer to a request that finds `max_queue` others waiting: 503, come back in a second (a full queue
    drains in a few batches)."""
    return HTTPException(
        503,
        f"{name}: {max_queue} requests are already waiting (the server's --max-queue); retry later",
        headers={"Retry-After": "1"},
    )


# ------------------------------------------------------------------------------------------ limits and timing


class Guard:
    """ASGI middleware: rejects bodies over max_bytes with 413 (by Content-Length, or while reading a chunked
    body), and times every request for the metrics."""

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, state = time.perf_counter(), {"status": 500, "sent": False, "seen": 0, "rejected": False}

        async def reject():
            state["rejected"] = True
            body = json.dumps({"detail": f"request body is larger than the limit of {self.max_bytes} bytes"}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            state["status"], state["sent"] = 413, True

        async def limited_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                state["seen"] += len(msg.get("body", b""))
                if state["seen"] > self.max_bytes:
                    if not state["sent"]:
                        await reject()
                    return {"type": "http.disconnect"}  # the app stops reading; its reply is dropped below
            return msg

        async def guarded_send(msg):
            if state["rejected"]:
                return
            if msg["type"] == "http.response.start":
                state["status"], state["sent"] = msg["status"], True
            await send(msg)

        length = dict(scope["headers"]).get(b"content-length")
        try:
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                await reject()
            else:
                await self.app(scope, limited_receive, guarded_send)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.request(name, state["status"], time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ the context


@dataclass
class ServeContext:
    """What a family's serve(ctx) hook gets: the model and its spec, and helpers to add endpoints."""

    model: torch.nn.Module
    spec: DataSpec
    cfg: Config
    rt: Runtime
    options: ServeOptions
    router: Any  # fastapi.APIRouter: routes on it require the token
    metrics: Metrics
    widgets: list[dict] = field(default_factory=list)
    batchers: dict[str, Batcher] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one model call at a time
    waiting: dict[str, int] = field(default_factory=dict)  # whole-endpoint requests at the model, by path

    def batcher(self, name: str, fn: Callable[[list], list], max_batch: int | None = None) -> Batcher:
        def locked(items):
            with self.lock, torch.no_grad():
                return fn(items)

        b = Batcher(
            name,
            locked,
            max_batch or self.options.max_batch,
            self.options.wait_ms,
            self.metrics,
            self.options.max_queue,
        )
        self.batchers[name] = b
        return b

    def admit(self, path: str) -> Callable[[], None]:
        """A request of a whole-endpoint helper (no batcher) that will hold or wait for the model: with max_queue
        of them there already it is answered 503 with Retry-After, as a full batch queue answers. Returns the
        release to call on the event loop once its model call is over."""
        if self.waiting.get(path, 0) >= self.options.max_queue:
            raise queue_full(path, self.options.max_queue)
        self.waiting[path] = self.waiting.get(path, 0) + 1
        return lambda: self.waiting.__setitem__(path, self.waiting[path] - 1)

    async def locked(self, fn: Callable[..., Any], *args: Any, bad: int | None = None) -> Any:
        """fn(*args) in a worker thread holding the model lock: one model call at a time, as the batched endpoints
        make theirs, while the event loop keeps accepting requests. The one way an unbatched endpoint runs the
        model. With `bad`, a UserError of fn (the request was wrong, not the server) is answered with that status.
        Grad mode is left as it is: explain needs gradients; fn turns them off when it wants."""

        def hold():
            with self.lock:
                return fn(*args)

        try:
            return await asyncio.to_thread(hold)
        except UserError as e:
            if bad is None:
                raise
            raise HTTPException(bad, str(e)) from None

    def widget(self, path: str, kind: str, title: str, **params: Any) -> None:
        self.widgets.append({"path": path, "kind": kind, "title": title, **params})

    async def read_upload(self, upload, types: set[str], what: str) -> bytes:
        ctype = (upload.content_type or "").split(";")[0].strip().lower()
        if ctype not in types:
            raise HTTPException(
                415, f"{what}: content type '{ctype or 'none'}' is not accepted; send one of {', '.join(sorted(types))}"
            )
        data = await upload.read()
        if not data:
            raise HTTPException(400, f"{what}: the uploaded file is empty")
        return data

    async def read_image(
        self, upload, channels: int | None = None, size: tuple[int, int] | None = None, max_side: int = 0
    ) -> torch.Tensor:
        """Uploaded image -> uint8 (C, H, W) with the spec's channels, made as the training images were at the
        spec's size (image_ops.for_model, as predict does: a drawing for a digits model is cropped to its ink), or
        resized to `size` ((0, 0) keeps the image's own size, scaled down to a long side of `max_side` when set)."""
        data = await self.read_upload(upload, IMAGE_TYPES, "image")
        try:
            x = image_ops.decode(data, channels or self.spec.in_channels, "image", self.options.max_pixels)
        except image_ops.ImageError as e:
            raise HTTPException(e.status, str(e)) from None
        x = image_ops.for_model(x, self.spec) if size is None else image_ops.resize(x, size)  # as predict does
        return image_ops.fit_long_side(x, max_side)

    # ---- whole endpoints for the generative families: their serve(ctx) hooks are one call each

    def text_generation(self, path: str, generate: Callable[..., Iterator[str]], title: str = "Generate text"):
        """POST {prompt, max_tokens, temperature, top_k, top_p, seed} -> the text streamed as it is generated.
        `generate(prompt, max_tokens, temperature, top_k, top_p, seed)` returns an iterator of pieces of text; it
        may raise UserError for a bad prompt (400) before the iterator starts."""
        from fastapi.responses import StreamingResponse

        async def endpoint(req: GenerateRequest):
            try:  # a generator: this checks the request (a 400 says what is wrong); the model runs as it streams
                pieces = generate(**req.model_dump())
            except UserError as e:
                raise HTTPException(400, str(e)) from None
            release = self.admit(path)
            return StreamingResponse(
                stream_in_thread(lambda: pieces, self.lock, release), media_type="text/plain; charset=utf-8"
            )

        self.router.add_api_route(path, endpoint, methods=["POST"], summary=title, response_class=StreamingResponse)
        self.widget(path, "stream", title)

    def translation(self, path: str, translate: Callable[[list[str]], list[str]], title: str = "Translate"):
        """POST {text} -> {translation}; concurrent requests are translated as one batch."""
        batch = self.batcher(path.strip("/"), translate)

        async def endpoint(req: TextRequest):
            return {"text": req.text, "translation": await batch(req.text)}

        self.router.add_api_route(path, endpoint, methods=["POST"], summary=title)
        self.widget(path, "text", title)

    def image_sampler(self, path: str, sample: Callable[[int, int], torch.Tensor], title: str = "Sample images"):
        """POST {n, seed} -> {images: [PNG as base64]}; `sample(n, seed)` gives uint8 or [0, 1] (N, C, H, W)."""

        def run(n: int, seed: int) -> list[str]:
            with torch.no_grad():
                return [image_ops.png_base64(img) for img in sample(n, seed)]

        async def endpoint(req: SampleRequest):
            release = self.admit(path)
            try:
                return {"images": await self.locked(run, req.n, req.seed)}
            finally:
                release()

        self.router.add_api_route(path, endpoint, methods=["POST"], summary=title)
        self.widget(path, "sample", title)


async def stream_in_thread(
    make: Callable[[], Iterator[str]], lock: threading.Lock, release: Callable[[], None] = lambda: None
):
    """Run a (blocking) generator of text pieces in a thread and yield its pieces as they come; `release` runs on
    the event loop when the thread is done with the model."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    done = object()

    def pump():
        try:
            with lock, torch.no_grad():
                for piece in make():
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
        except Exception as e:
            log.exception("text generation failed")
            loop.call_soon_threadsafe(queue.put_nowait, f"\n[error: {type(e).__name__}]")
        finally:
            loop.call_soon_threadsafe(release)
            loop.call_soon_threadsafe(queue.put_nowait, done)

    threading.Thread(target=pump, daemon=True).start()
    while (piece := await queue.get()) is not done:
        yield piece


# ------------------------------------------------------------------------------------------ the app


def create_app(model, spec, cfg, rt: Runtime, family, options: ServeOptions | None = None, info: dict | None = None):
    """The FastAPI app for a loaded model and its family (deeprecipe/family.py), whose serve hook adds the
    endpoints (build_app makes one for a run folder)."""
    from fastapi import APIRouter
    from fastapi_offline import FastAPIOffline

    options = options or ServeOptions()
    metrics = Metrics()
    router = APIRouter(dependencies=_guards(options))
    ctx = ServeContext(model, spec, cfg, rt, options, router, metrics)
    family.serve(ctx)
    app = FastAPIOffline(  # /docs from local files (Swagger UI from a CDN is a blank page offline); no /redoc
        redoc_url=None,
        static_url=DOCS_STATIC,
        title=f"deeprecipe: {cfg.task} ({cfg.model.name})",
        lifespan=_lifespan(metrics, options),
        description="Endpoints of a trained deeprecipe run. "
        "Send 'Authorization: Bearer <token>' when the server was started with --token.",
    )
    about = {
        "task": cfg.task,
        "model": cfg.model.name,
        "recipe": cfg.recipe,
        "classes": spec.class_names,
        "in_channels": spec.in_channels,
        "image_size": list(spec.image_size),
        "endpoints": ctx.widgets,
        "max_batch": options.max_batch,
        "max_queue": options.max_queue,
        "wait_ms": options.wait_ms,
        "max_bytes": options.max_bytes,
        "token_required": options.token is not None,
        **(info or {}),
    }
    _add_routes(app, router, about, metrics)
    app.include_router(router)
    app.add_middleware(Guard, max_bytes=options.max_bytes, metrics=metrics)
    app.state.ctx = ctx
    return app


def _guards(options: ServeOptions) -> list:
    """The dependencies of every route on the router: the bearer token (when one is set), one file per field."""
    import hmac

    from fastapi import Depends
    from fastapi.security import HTTPBearer

    bearer = HTTPBearer(auto_error=False)

    def require_token(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if options.token is None:
            return
        if cred is None or not hmac.compare_digest(cred.credentials.encode(), options.token.encode()):
            raise HTTPException(
                401,
                "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def one_file_per_field(request: Request) -> None:
        """FastAPI keeps the last of two parts with the same name: refuse them instead of answering for one."""
        if request.headers.get("content-type", "").lower().startswith("multipart/"):
            form = await request.form()  # parsed once: FastAPI has read it already for the endpoint's parameters
            for key in dict.fromkeys(form.keys()):
                if (n := len(form.getlist(key))) > 1:
                    raise HTTPException(
                        422,
                        f"bad request: {key}: sent {n} times; send one per request (requests sent together run as "
                        "one batch)",
                    )

    return [Depends(require_token), Depends(one_file_per_field)]


def _lifespan(metrics: Metrics, options: ServeOptions):
    """The app's lifespan: a summary line in the log every options.log_every seconds, and one at shutdown."""
    from contextlib import asynccontextmanager

    async def summary_logger():
        while True:
            await asyncio.sleep(options.log_every)
            line = metrics.summary()
            if line:
                log.info(line)

    @asynccontextmanager
    async def lifespan(app):
        t = asyncio.create_task(summary_logger())
        yield
        t.cancel()
        line = metrics.summary()
        if line:
            log.info(line)

    return lifespan


def _add_routes(app, router, about: dict, metrics: Metrics) -> None:
    """GET /info and /metrics on the router (behind the token), /health and the page / on the app (public), and
    the one-line 422 of a request whose parameters do not validate."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

    @router.get("/info", summary="What this server runs: task, model, classes, endpoints, limits")
    async def get_info():
        return about

    @router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def get_metrics():
        return Response(metrics.prometheus(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", summary="Liveness (no token needed)")
    async def health():
        return {"status": "ok"}

    page = (Path(__file__).parent / "page.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    @app.exception_handler(RequestValidationError)
    async def bad_params(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        msg = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p not in ('body', 'query'))}: {e['msg']}" for e in errs[:3]
        )
        return JSONResponse(
            status_code=422,
            # an input of NaN or 1e999 comes back as text: JSON has no such numbers (the body must encode)
            content={
                "detail": f"bad request: {msg}",
                "errors": json.loads(json.dumps(errs, default=str), parse_constant=str),
            },
        )


def build_app(run: str, cfg, spec, model, rt: Runtime, family, options: ServeOptions | None = None):
    """The app of run folder `run`, whose model the caller loaded (engine.run.load_run, with its family)."""
    from deeprecipe.engine.checkpoint import model_weights
    from deeprecipe.serve.drift import watch

    about = model_weights(Path(run), load=False)[1]  # the weights load_run loaded, and their step
    info = {"run": Path(run).name, "step": about.step, "weights": about.text, "drift": {}}
    # a rolling drift window per image endpoint: gauges on /metrics, info["drift"] filled in as /info shows it
    return watch(create_app(model, spec, cfg, rt, family, options, info=info), Path(run), info["drift"])
