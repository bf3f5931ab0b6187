"""Side by side: the same CNN, batch size and number of steps on Fashion-MNIST, trained by

  deeprecipe   the engine (data as tensors on the device, per-batch augmentation, channels_last, bf16 autocast)
  plain        a plain PyTorch loop written the usual way (DataLoader over a TensorDataset, fp32, eager)
  lightning    PyTorch Lightning's Trainer over the same DataLoader
  keras        Keras 3 `fit` on the torch backend, the same architecture in Keras layers

Each contender runs in its own subprocess (Keras needs its backend chosen before import). Throughput is
images/s over steps [10, N) (the first steps include warm-up); accuracy is on the 10k test split.

    python bench/classify_speed.py [--steps 1000] [--batch 128] [--only NAME]
    python bench/classify_speed.py --device cuda --contenders deeprecipe,plain --set train.cuda_graph=false

On a GPU the plain loop moves each batch to the device the usual way (`.to(device)` after the DataLoader);
`--set` passes config overrides to deeprecipe's run (ablations: train.cuda_graph=false, train.precision=fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

WARM = 10


def machine() -> str:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def fashion(limit_train: int = 0):
    import deeprecipe

    d = deeprecipe.dataset("fashion-mnist-cnn", {"data.val_fraction": 0.0})
    x, y = d.train.tensors
    tx, ty = d.test.tensors
    return d.spec, x, y, tx, ty


def plain_tensors(spec, x):
    mean, std = spec.mean[0], spec.std[0]
    return (x.float() / 255 - mean) / std


def run_deeprecipe(steps: int, batch: int, device: str = "cpu", sets: tuple = ()) -> dict:
    import tempfile

    import deeprecipe

    sets = [
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        "optim.lr=0.004",  # the plain loop's (on CUDA the recipe's cuda section would raise it)
        "train.eval_every=0",
        f"train.ckpt_every={steps}",
        "train.log_every=10",
        "data.val_fraction=0",
        f"train.device={device}",
        *sets,
    ]
    with tempfile.TemporaryDirectory() as d:
        run = deeprecipe.train("fashion-mnist-cnn", sets, out=f"{d}/run")
        final, rows = run.final, [r for r in run.metrics if "examples_per_s" in r]
        # the choices the engine made on this machine (precision auto -> ..., and why): config.yaml's comment lines
        why = " ".join(ln[2:].strip() for ln in (run.dir / "config.yaml").read_text().splitlines() if ln[:2] == "# ")
    first = next(r for r in rows if r["step"] >= WARM)
    last = rows[-1]
    ips = (last["step"] - first["step"]) * batch / (last["time"] - first["time"])
    return {"images_per_s": ips, "test_acc": final["test_acc"], "dtype": why}


def evaluate_torch(model, tx, ty, device: str = "cpu") -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(tx), 1000):
            logits = model(tx[i : i + 1000].to(device))
            correct += (logits.argmax(-1).cpu() == ty[i : i + 1000]).sum().item()
    return correct / len(tx)


def run_plain(steps: int, batch: int, device: str = "cpu", sets: tuple = ()) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import deeprecipe

    spec, x, y, tx, ty = fashion()
    torch.manual_seed(0)
    model = deeprecipe.model("fashion-mnist-cnn", spec).to(device)  # the recipe's CNN (dropout 0.1)
    loader = DataLoader(TensorDataset(plain_tensors(spec, x), y), batch_size=batch, shuffle=True, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    step, t0 = 0, None
    model.train()
    while step < steps:
        for xb, yb in loader:
            if step == WARM:
                if device != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step == steps:
                break
    if device != "cpu":
        torch.cuda.synchronize()
    ips = (steps - WARM) * batch / (time.perf_counter() - t0)
    return {
        "images_per_s": ips,
        "test_acc": evaluate_torch(model, plain_tensors(spec, tx), ty, device),
        "dtype": "fp32",
    }


def run_lightning(steps: int, batch: int, device: str = "cpu", sets: tuple = ()) -> dict:
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import deeprecipe

    spec, x, y, tx, ty = fashion()
    torch.manual_seed(0)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = deeprecipe.model("fashion-mnist-cnn", spec)
            self.t0 = None

        def training_step(self, b, i):
            if self.global_step == WARM:
                self.t0 = time.perf_counter()
            return F.cross_entropy(self.net(b[0]), b[1])

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=4e-3, weight_decay=5e-4)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    m = Module()
    loader = DataLoader(TensorDataset(plain_tensors(spec, x), y), batch_size=batch, shuffle=True, drop_last=True)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(m, loader)
    ips = (steps - WARM) * batch / (time.perf_counter() - m.t0)
    return {"images_per_s": ips, "test_acc": evaluate_torch(m.net, plain_tensors(spec, tx), ty), "dtype": "fp32"}


def run_keras(steps: int, batch: int, device: str = "cpu", sets: tuple = ()) -> dict:
    os.environ["KERAS_BACKEND"] = "torch"
    import keras
    import numpy as np
    from keras import layers

    spec, x, y, tx, ty = fashion()
    keras.utils.set_random_seed(0)
    xs = plain_tensors(spec, x).permute(0, 2, 3, 1).numpy()  # Keras convs are NHWC
    txs = plain_tensors(spec, tx).permute(0, 2, 3, 1).numpy()

    def conv(c):
        return [layers.Conv2D(c, 3, padding="same", use_bias=False), layers.BatchNormalization(), layers.ReLU()]

    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            *conv(32),
            layers.MaxPooling2D(),
            *conv(64),
            layers.MaxPooling2D(),
            *conv(128),
            layers.Flatten(),
            layers.Dropout(0.1),
            layers.Dense(64, activation="relu"),
            layers.Dropout(0.1),
            layers.Dense(10),
        ]
    )
    sched = keras.optimizers.schedules.CosineDecay(3e-4, steps, warmup_target=3e-3, warmup_steps=steps // 4)
    model.compile(
        optimizer=keras.optimizers.AdamW(sched, weight_decay=5e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )

    class Clock(keras.callbacks.Callback):
        t0 = None

        def on_train_batch_begin(self, b, logs=None):
            if self.t0 is None and b >= WARM:
                self.t0 = time.perf_counter()

    clock = Clock()
    per_epoch = len(xs) // batch
    epochs = -(-steps // per_epoch)
    model.fit(
        xs,
        y.numpy(),
        batch_size=batch,
        epochs=epochs,
        steps_per_epoch=min(per_epoch, steps),
        verbose=0,
        callbacks=[clock],
        shuffle=True,
    )
    done = min(per_epoch, steps) * epochs
    ips = (done - WARM) * batch / (time.perf_counter() - clock.t0)
    acc = float(np.mean(model.predict(txs, batch_size=1000, verbose=0).argmax(-1) == ty.numpy()))
    return {"images_per_s": ips, "test_acc": acc, "steps": done, "dtype": "fp32"}


RUNNERS = {"deeprecipe": run_deeprecipe, "plain": run_plain, "lightning": run_lightning, "keras": run_keras}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--only", choices=list(RUNNERS))
    ap.add_argument("--contenders", default=",".join(RUNNERS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (lightning and keras: cpu only)")
    ap.add_argument("--set", action="append", default=[], help="a config override for deeprecipe's run")
    a = ap.parse_args()
    if a.only:
        print("RESULT " + json.dumps(RUNNERS[a.only](a.steps, a.batch, a.device, tuple(a.set))), flush=True)
        return
    print(f"machine: {machine()}")
    print(f"command: python {' '.join(sys.argv)}")
    results = {}
    for name in a.contenders.split(","):
        try:
            out = subprocess.run(
                [sys.executable, __file__, "--only", name, "--steps", str(a.steps), "--batch", str(a.batch)]
                + ["--device", a.device]
                + [x for s in a.set for x in ("--set", s)],
                capture_output=True,
                text=True,
                timeout=3600,
            )
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                print(f"{name}: failed\n{out.stderr[-2000:]}")
                continue
            results[name] = json.loads(line[-1][7:])
        except ImportError as e:
            print(f"{name}: not installed ({e})")
            continue
        r = results[name]
        shown = f"{r['images_per_s']:8.0f} images/s   test acc {r['test_acc']:.4f}   {r.get('dtype', '')}"
        print(f"{name:<11} {shown}", flush=True)
    if "deeprecipe" in results:
        base = results["deeprecipe"]["images_per_s"]
        for name, r in results.items():
            if name != "deeprecipe":
                print(f"deeprecipe / {name}: {base / r['images_per_s']:.2f}x images/s")


if __name__ == "__main__":
    main()
