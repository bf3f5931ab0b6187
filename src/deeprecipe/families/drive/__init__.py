"""Driving in closed loop: a policy that perceives from stacked frames, decides, and is judged by what the car does.

Perception is the network (a CNN or ResNet of the model registry) over S stacked grayscale frames; its output is
the decision: a discrete meta-action (classification against the expert's choice) or, on the track scenes, a
steering command (regression). Control is the simulator's (data/sim.py). Training is behaviour cloning on expert
rollouts (data/drive.py); `deeprecipe dagger RUN` then lets the learner drive, has the expert label what it saw,
and trains on the grown data (DAgger). The verdict is closed-loop: `evaluate(final=True)`, `eval` and
`deeprecipe drive RUN` drive held-out seeds and report collision rate, mean speed, distance, return, episode
length (and on the track scenes lane offset and the fraction of episodes that leave the road), against the expert
and a random policy in one table, with an MP4 of an episode and the action drawn on each frame.

A batch is (frames uint8 (B, S, H, W), label (B,) long meta-action or float steering). The offline metric is
`agreement`: the fraction of frames where the learner's action is the expert's (steering: within 0.1 of it).
(No `from __future__ import annotations` here: FastAPI reads the serve hook's endpoint annotations at runtime,
and UploadFile is imported inside that hook.)
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.config import Config
from deeprecipe.core import ConfigError, DataSpec, UserError
from deeprecipe.data.core import Data, Draws, eval_batches
from deeprecipe.data.image_ops import denormalize, normalize
from deeprecipe.families.drive import checks
from deeprecipe.family import Family, PredictOptions, ServeContext
from deeprecipe.runtime import Runtime

STEER_TOLERANCE = 0.1  # a steering command within this of the expert's counts as agreeing


def is_steer(spec: DataSpec) -> bool:
    return spec.extra.get("control") == "steer"


def prepare(batch, spec: DataSpec, draws: Draws | None = None):
    x, y = batch
    return normalize(x, spec).contiguous(memory_format=torch.channels_last), y


def decide(out: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """Network output -> the action: the argmax meta-action (B,), or the steering command in [-1, 1] (B,)."""
    return out[:, 0].float().clamp(-1, 1) if is_steer(spec) else out.argmax(-1)


@torch.no_grad()
def act(model: nn.Module, spec: DataSpec, rt: Runtime, stacks: list[torch.Tensor]) -> list[dict]:
    """Frame stacks uint8 (S, H, W) -> {"action": index or steering, "probs": per meta-action (discrete)}; what
    the closed loop, predict and /act all run."""
    x, _ = prepare((torch.stack(stacks).to(rt.device), None), spec)
    with rt.autocast():
        out = model(x).float().cpu()
    if is_steer(spec):
        return [{"action": float(v)} for v in decide(out, spec)]
    probs = out.softmax(-1)
    return [{"action": int(p.argmax()), "probs": p.tolist()} for p in probs]


def policy_of(model: nn.Module, spec: DataSpec, rt: Runtime):
    """The network as a closed-loop policy: frames (S, H, W) numpy -> action."""
    model.eval()

    def policy(frames: np.ndarray):
        return act(model, spec, rt, [torch.from_numpy(np.ascontiguousarray(frames))])[0]["action"]

    return policy


def summarize(stats: list[dict]) -> dict:
    """Per-episode stats (data/sim.py Episode.stats) -> the closed-loop metrics over the episodes."""
    mean = lambda k: float(np.mean([s[k] for s in stats]))  # noqa: E731
    return {
        "collision_rate": mean("collision"),
        "offroad_rate": mean("offroad"),
        "speed": mean("speed"),
        "distance": mean("distance"),
        "return": mean("return"),
        "return_std": float(np.std([s["return"] for s in stats])),
        "length": mean("length"),
        "lane_offset": mean("lane_offset"),
        "episodes": len(stats),
    }


def closed_loop(
    env: str,
    spec: DataSpec,
    policies: dict,
    episodes: int,
    first_seed: int,
    video: Path | None = None,
    rt: Runtime | None = None,
) -> dict[str, dict]:
    """Drive `episodes` seeds (first_seed..) with each policy (name -> model, "expert" or "random"); the metrics of
    each. With `video`, the first policy's first episode is written there as an MP4 with its actions drawn."""
    from deeprecipe.data import sim

    s = sim.make_env(env, spec.in_channels, tuple(spec.image_size))
    out = {}
    try:
        for i, (name, p) in enumerate(policies.items()):
            if p == "expert":
                drive = sim.expert(s)
            elif p == "random":
                drive = sim.random_policy(s, first_seed)
            else:
                drive = policy_of(p, spec, rt)
            stats = []
            for k in range(episodes):
                ep = sim.rollout(s, drive, first_seed + k, keep=(video is not None and i == 0 and k == 0))
                if ep.frames:
                    write_video(ep, s, video)
                stats.append(ep.stats())
            out[name] = summarize(stats)
    finally:
        s.close()
    return out


def record_learner(
    model: nn.Module, spec: DataSpec, rt: Runtime, env: str, path: Path, episodes: int, first_seed: int, source: str
):
    """DAgger's data: the learner drives `episodes` seeds (first_seed..), the expert labels every state it visited;
    the labelled frames are written as one shard at `path` (data/drive.py write_shard, its policy named `source`).
    Returns the episodes (sim.Episode: frames, actions, labels, crashed)."""
    from deeprecipe.data import sim
    from deeprecipe.data.drive import shard_meta, write_shard

    s = sim.make_env(env, spec.in_channels, tuple(spec.image_size))
    try:
        learner, expert = policy_of(model, spec, rt), sim.expert(s)
        eps = [sim.rollout(s, learner, first_seed + i, label=expert, keep=True) for i in range(episodes)]
        write_shard(path, eps, shard_meta(s, source))
    finally:
        s.close()
    return eps


def action_text(a, names: list[str]) -> str:
    return f"steer {float(a):+.2f}" if not names else names[int(a)]


def write_video(ep, s, path: Path, scale: int = 4, fps: int = 0) -> Path:
    """An episode's frames (the newest of each stack, scaled up) with the action taken written on each, as MP4
    (PyAV, H.264), written under a temporary name and renamed."""
    import os

    import av
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.mp4")
    h, w = ep.frames[0].shape[-2:]
    H, W = (h * scale + 1) // 2 * 2, (w * scale + 1) // 2 * 2
    rate = fps or max(1, round(s.frequency))
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for t, (frames, a) in enumerate(zip(ep.frames, ep.actions)):
            img = Image.fromarray(frames[-1]).convert("RGB").resize((W, H), Image.NEAREST)
            d = ImageDraw.Draw(img)
            d.rectangle((0, 0, W, 14), fill=(0, 0, 0))
            d.text((4, 2), f"t={t / s.frequency:5.1f}s  {action_text(a, s.actions)}", fill=(255, 255, 0))
            for pkt in stream.encode(av.VideoFrame.from_image(img)):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)
    os.replace(tmp, path)
    return path


def table(results: dict[str, dict]) -> str:
    """The closed-loop metrics of several policies as a fixed-width text table."""
    cols = ["collision_rate", "offroad_rate", "speed", "distance", "return", "length", "lane_offset"]
    head = f"{'policy':<10}" + "".join(f"{c:>15}" for c in cols)
    rows = [f"{name:<10}" + "".join(f"{r[c]:>15.3f}" for c in cols) for name, r in results.items()]
    n = next(iter(results.values()))["episodes"] if results else 0
    return "\n".join([f"closed loop over {n} held-out seeds", head, *rows])


class Drive(Family):
    """Driving in closed loop (see the module docstring)."""

    METRIC = ("agreement", "max")
    CHECK_DEFAULTS = {"overfit_examples": 4}
    EXTRA_CHECKS = {"leakage": checks.leakage}

    prepare = staticmethod(prepare)

    def check_config(self, cfg: Config) -> None:
        if not hasattr(cfg.data, "eval_episodes") or not hasattr(cfg.data, "env"):
            raise ConfigError("task 'drive' needs driving data (data.name: driving)")

    def loss(self, model: nn.Module, batch, cfg: Config, part: str):
        x, y = batch
        out = model(x).float()
        if y.is_floating_point():  # steering
            return F.mse_loss(out[:, 0], y), {}
        return F.cross_entropy(out, y, label_smoothing=cfg.optim.label_smoothing), {}

    def per_example_loss(self, model: nn.Module, batch, cfg: Config) -> torch.Tensor:
        x, y = batch
        out = model(x).float()
        if y.is_floating_point():
            return (out[:, 0] - y) ** 2
        return F.cross_entropy(out, y, reduction="none")

    def expected_init_loss(self, spec: DataSpec, cfg: Config):
        return None if is_steer(spec) else super().expected_init_loss(spec, cfg)

    def evaluate(self, model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, final: bool) -> dict:
        """Offline agreement with the expert on `split`; at a final evaluation of the test split (val when there is
        none) also the closed loop over data.eval_episodes held-out seeds (collision rate, speed, distance, return,
        length, ...)."""
        from deeprecipe.data.drive import EVAL_SEED

        spec = data.spec
        outs, labels = [], []
        for batch in eval_batches(data.split(split), cfg.train.eval_batch_size, rt.device, cfg.train.limit_eval):
            x, y = prepare(batch, spec)
            outs.append(model(x).float().cpu())
            labels.append(y.cpu())
        out, y = torch.cat(outs), torch.cat(labels)
        if is_steer(spec):
            err = (out[:, 0].clamp(-1, 1) - y).abs()
            m = {"loss": F.mse_loss(out[:, 0], y).item(), "mae": err.mean().item()}
            m["agreement"] = (err <= STEER_TOLERANCE).float().mean().item()
        else:
            m = {"loss": F.cross_entropy(out, y).item(), "agreement": (out.argmax(-1) == y).float().mean().item()}
        last = data.final_split()  # the closed loop is one, whatever the split: drive once
        if final and cfg.data.eval_episodes > 0 and split == last:
            loop = closed_loop(cfg.data.env, spec, {"learner": model}, cfg.data.eval_episodes, EVAL_SEED, rt=rt)
            m |= {k: v for k, v in loop["learner"].items() if k != "episodes"}
        return m

    def finish(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run_dir: Path, results: dict) -> dict:
        """The closed-loop table of the learner, the expert and a random policy on the same held-out seeds
        (plots/closed_loop.txt), and an MP4 of the learner's first episode (plots/episode.mp4)."""
        from deeprecipe.data.drive import EVAL_SEED

        n = cfg.data.eval_episodes
        if n <= 0:
            return {}
        plots = Path(run_dir) / "plots"
        res = closed_loop(
            cfg.data.env,
            data.spec,
            {"learner": model, "expert": "expert", "random": "random"},
            n,
            EVAL_SEED,
            video=plots / "episode.mp4",
            rt=rt,
        )
        (plots / "closed_loop.txt").write_text(table(res) + "\n")
        out = {f"closed_loop_{k}": v for k, v in res["learner"].items()}
        e = res["expert"]
        out["expert_collision_rate"], out["expert_return"] = e["collision_rate"], e["return"]
        return out

    def predict(
        self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: PredictOptions
    ) -> list[dict]:
        """Frame-stack images (the S frames one above the other, grayscale, S*H x W) -> the action of each."""
        from deeprecipe.data import image_ops

        stacks = [stack_of(image_ops.read(f, 1), spec, f) for f in files]
        names = [] if is_steer(spec) else spec.class_names
        results = []
        for f, r in zip(files, act(model, spec, rt, stacks)):
            r = r | {"file": f, "label": action_text(r["action"], names)}
            r["text"] = f"{f}: {r['label']}" + ("" if "probs" not in r else f" ({max(r['probs']):.3f})")
            results.append(r)
        return results

    def show_batch(self, batch, spec: DataSpec):
        """The newest frame of each stack, captioned with the expert's action."""
        x, y = batch
        names = [] if is_steer(spec) else spec.class_names
        return denormalize(x, spec)[:, -1:].clamp(0, 1), [action_text(v, names) for v in y.tolist()]

    def serve(self, ctx: ServeContext) -> None:
        """POST /act: a frame-stack image (S frames one above the other) -> the action and its probabilities."""
        from fastapi import File, HTTPException, UploadFile

        spec = ctx.spec
        batch = ctx.batcher("act", lambda stacks: act(ctx.model, spec, ctx.rt, stacks))
        names = [] if is_steer(spec) else spec.class_names

        @ctx.router.post("/act", summary="Drive: a frame stack in, an action and its probabilities out")
        async def act_endpoint(frames: UploadFile = File(..., description="S frames stacked vertically, S*H x W")):
            img = await ctx.read_image(frames, channels=1, size=(0, 0))
            try:
                stack = stack_of(img, spec, "frames")
            except UserError as e:
                raise HTTPException(422, str(e)) from None
            r = await batch(stack)
            if "probs" not in r:  # steering: the page shows `text`
                return {"action": r["action"], "text": action_text(r["action"], names)}
            probs = {n: round(p, 4) for n, p in zip(names, r["probs"])}
            top = sorted(({"label": n, "prob": p} for n, p in probs.items()), key=lambda t: -t["prob"])
            label = action_text(r["action"], names)
            return {"action": r["action"], "label": label, "prob": probs[label], "probs": probs, "top": top}

        ctx.widget(
            "/act", "image", "Drive: the action for a frame stack (S frames one above the other)", field="frames"
        )


def stack_of(img: torch.Tensor, spec: DataSpec, where: str) -> torch.Tensor:
    """A grayscale image (1, S*H, W) of S frames one above the other -> the stack (S, H, W), or a UserError."""
    s, (h, w) = spec.in_channels, spec.image_size
    if tuple(img.shape) != (1, s * h, w):
        raise UserError(
            f"{where}: a {tuple(img.shape[1:])} image; the policy reads {s} frames of {h}x{w} stacked vertically "
            f"({s * h}x{w}, grayscale)"
        )
    return img.view(s, h, w)


def stack_image(frames: np.ndarray) -> np.ndarray:
    """A frame stack (S, H, W) -> the image (S*H, W) that predict and /act read."""
    return frames.reshape(-1, frames.shape[-1])
