"""Drift of what a server is sent: a rolling window of each batched image endpoint's inputs, tested against the
run's reference statistics (engine/drift.py, as `deeprecipe monitor` tests a folder) and shown on /metrics
(Prometheus gauges labelled by endpoint) and under "drift" in /info.

The statistics come from the batch the endpoint runs anyway: forward pre-hooks on the model's top-level layers
catch the head's input (the penultimate features) and a forward hook its output (the predicted class), recording
only on the thread of a batch being watched, so other callers of the model (explain's many passes) leave no trace.
A window keeps the last WINDOW images; from MIN_IMAGES on it is tested again every EVERY new images, in the batch's
worker thread after the answers are computed (a test of 64 against 512 examples takes milliseconds).
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import Any

import torch
from prometheus_client import Gauge

from deeprecipe.engine import drift
from deeprecipe.engine.embed import pooled

WINDOW = 64
MIN_IMAGES = 32
EVERY = 16


class Window:
    """The last WINDOW images of one endpoint (features, channel means, predicted class) and their last test,
    kept in `live` (a dict /info shows as it is)."""

    def __init__(self, ref: dict[str, torch.Tensor], live: dict, alpha: float = 0.01):
        self.ref, self.live, self.alpha = ref, live, alpha
        self.rows: deque = deque(maxlen=WINDOW)
        self.seen = self.tested = 0
        live.update(images=0, seen=0, mmd2=None, p_features=None, p_inputs=None, p_classes=None, drift=False)

    def add(self, features: torch.Tensor, means: torch.Tensor, predicted: torch.Tensor) -> None:
        self.rows.extend(zip(features, means, predicted))
        self.seen += len(features)
        self.live.update(images=len(self.rows), seen=self.seen)
        if len(self.rows) >= MIN_IMAGES and self.seen - self.tested >= EVERY:
            f, m, p = zip(*self.rows)
            new = {"features": torch.stack(f), "channel_mean": torch.stack(m), "predicted": torch.stack(p)}
            r = drift.score(self.ref, new, self.alpha)
            self.live.update({k: r[k] for k in ("mmd2", "p_features", "p_inputs", "p_classes", "drift")})
            self.tested = self.seen


def watch(app: Any, run_dir: Path, live: dict, alpha: float = 0.01) -> Any:
    """Watch every batched endpoint of `app` (serve.server.create_app) whose items are uint8 images (C, H, W),
    against the reference statistics of `run_dir`; `live` (shown by /info) gets one dict per endpoint. A run
    without drift_reference.safetensors is left unwatched ({"reference": None}). Returns the app."""
    if not (Path(run_dir) / drift.FILE).is_file():
        live["reference"] = None
        return app
    ctx = app.state.ctx
    ref = drift.load_reference(Path(run_dir))
    live["reference"] = drift.FILE
    rec = threading.local()

    def catch(kind: str):
        def hook(module, args, out=None):
            got = getattr(rec, kind, None)
            if got is not None:
                got.append(args[0] if kind == "inputs" else out)

        return hook

    for m in ctx.model.children():
        if any(True for _ in m.parameters()):
            m.register_forward_pre_hook(catch("inputs"))
    ctx.model.register_forward_hook(catch("outputs"))
    labels = ("mmd2", "p_features", "p_inputs", "drift", "images")
    gauges = {
        k: Gauge(
            f"deeprecipe_drift_{k}",
            f"Drift of the last {WINDOW} inputs: {k}.",
            ["endpoint"],
            registry=ctx.metrics.registry,
        )
        for k in labels
    }
    for name, batcher in ctx.batchers.items():
        window = Window(ref, live.setdefault(name, {}), alpha)
        inner = batcher.fn

        def fn(items: list, inner=inner, window=window) -> list:
            if not all(isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.ndim == 3 for x in items):
                return inner(items)
            rec.inputs, rec.outputs = [], []
            try:
                results = inner(items)
                inputs, outputs = rec.inputs, rec.outputs
            finally:
                rec.inputs = rec.outputs = None
            if inputs and outputs and len(inputs[-1]) == len(items):
                means = torch.stack([drift.channel_means(x) for x in items])
                window.add(pooled(inputs[-1]), means, drift.predicted(outputs[-1], len(items), ctx.spec.num_classes))
            return results

        batcher.fn = fn
        for k, g in gauges.items():
            g.labels(name).set_function(lambda k=k, live=window.live: float(live[k] if live[k] is not None else "nan"))
    return app
