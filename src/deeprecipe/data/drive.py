"""Driving data: expert rollouts recorded to disk as shards, split by episode seed, never by frame.

A shard is one safetensors file (no pickle) of the frames a policy saw and what the expert would do there:
`frames` uint8 (N, S, H, W) (S stacked grayscale frames, see data/sim.py), `label` (N,) the expert's action
(int64 meta-action index, or float32 steering in [-1, 1]), `action` (N,) what was executed (the expert when
recording, with steering noise on the track scenes; the learner in DAgger rounds), `episode` (N,) int64 the
episode's seed, `step` (N,) int64; its metadata names the environment, the control, the action names and the
pixels per metre. Shards of `path` (recorded with the expert, `episodes` episodes from seed `seed`, the first
time the folder is used) and of every folder or file in `include` (DAgger rounds) are read together.

Splits: an episode's seed decides its split (val when hash(seed) % 10 == 0, test when == 1, else train), so
every frame of an episode lands in the same split. The closed-loop evaluation drives fresh seeds from 20,000,000
on (`EVAL_SEED`), which no recording uses.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from deeprecipe.config import ranged
from deeprecipe.core import DataError, DataSpec
from deeprecipe.data.core import Data, TensorSplit
from deeprecipe.data.scenes import hash_ints
from deeprecipe.data.sim import DEFAULT_SCALING, SCENES, frame_hz_of, scaling_of

EVAL_SEED = 20_000_000  # first seed of the closed-loop evaluation episodes (never recorded)
DAGGER_SEED = 10_000_000  # first seed of the DAgger rounds' episodes
SHARD_KEYS = {"frames": torch.uint8, "episode": torch.int64, "step": torch.int64}
SHARD_EPISODES = 25  # episodes per shard when recording


class EpisodeSplit(TensorSplit):
    """A TensorSplit (frames, label) that also knows each example's episode seed (the leakage check reads it)."""

    def __init__(self, frames: torch.Tensor, label: torch.Tensor, episode: torch.Tensor):
        super().__init__(frames, label)
        self.episodes = episode


def episode_split(seeds: torch.Tensor) -> torch.Tensor:
    """0 train, 1 val, 2 test for each episode seed (a hash of the seed, so the split never looks at frames)."""
    h = hash_ints(seeds.long()) % 10
    return torch.where(h == 0, 1, torch.where(h == 1, 2, 0))


def write_shard(path: Path, episodes: list, meta: dict) -> None:
    """Episodes (data/sim.py Episode with frames and labels) -> one shard, written under a temporary name and
    renamed, so a killed recording never leaves a half-written shard."""
    from safetensors.torch import save_file

    frames = np.stack([f for ep in episodes for f in ep.frames])
    steer = meta["control"] == "steer"
    dtype = torch.float32 if steer else torch.int64

    def col(name: str) -> torch.Tensor:
        return torch.tensor([v for ep in episodes for v in getattr(ep, name)], dtype=dtype)

    tensors = {
        "frames": torch.from_numpy(frames),
        "label": col("labels"),
        "action": col("actions"),
        "episode": torch.tensor([ep.seed for ep in episodes for _ in ep.frames], dtype=torch.int64),
        "step": torch.tensor([i for ep in episodes for i in range(len(ep.frames))], dtype=torch.int64),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def shard_meta(s, policy: str) -> dict:
    """A shard's metadata for rollouts of the Sim `s` (data/sim.py) driven by `policy`."""
    meta = {"env": s.name, "control": s.control, "actions": s.actions, "policy": policy}
    return meta | {"scaling": s.scaling, "frame_hz": s.frame_hz}


def read_shard(path: Path) -> tuple[dict, dict]:
    """One shard's tensors and metadata, checked; a corrupt or foreign file is a DataError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise DataError(
            f"{path}: not a readable rollout shard ({str(e).splitlines()[0][:120]}); delete it and record again"
        ) from None
    if not isinstance(meta, dict) or "env" not in meta:
        raise DataError(f"{path}: a safetensors file without rollout metadata (env, control, actions)")
    missing = [k for k in (*SHARD_KEYS, "label", "action") if k not in tensors]
    if missing:
        raise DataError(f"{path}: rollout shard without {', '.join(missing)}")
    n = len(tensors["frames"])
    bad = [k for k, t in tensors.items() if len(t) != n]
    if bad or tensors["frames"].ndim != 4:
        raise DataError(f"{path}: rollout shard with inconsistent tensors ({', '.join(bad) or 'frames not 4-D'})")
    for k, dt in SHARD_KEYS.items():
        if tensors[k].dtype != dt:
            raise DataError(f"{path}: '{k}' is {tensors[k].dtype}, expected {dt}")
    return tensors, meta


def shards_of(where: Path) -> list[Path]:
    return sorted(where.glob("*.safetensors")) if where.is_dir() else [where]


STEER_NOISE, NOISE_MEMORY = 0.25, 0.8  # recording noise on steering: stationary std, AR(1) coefficient


def noisy(policy, seed: int, std: float = STEER_NOISE, memory: float = NOISE_MEMORY):
    """`policy` plus AR(1) Gaussian noise of stationary std `std` (the episode's seed draws it), clipped to
    [-1, 1]: a correlated drift that takes the car off the expert's line for a few steps at a time."""
    rng, state = np.random.default_rng(seed), [0.0]

    def act(frames: np.ndarray) -> float:
        state[0] = memory * state[0] + float(np.sqrt(1 - memory**2)) * std * rng.standard_normal()
        return float(np.clip(policy(frames) + state[0], -1.0, 1.0))

    return act


def jittered(policy, seed: int, actions: int, p: float):
    """`policy`, except that with probability `p` per step (the episode's seed draws it) a uniformly random one of
    `actions` discrete actions is executed: the car tailgates, brakes or changes lane when the expert would not."""
    rng = np.random.default_rng(seed)

    def act(frames: np.ndarray) -> int:
        a = policy(frames)
        return int(rng.integers(actions)) if rng.random() < p else int(a)

    return act


def default_noise(env: str) -> float:
    """The recording noise of `env`'s control (see `record`): STEER_NOISE on the track scenes, none on the others
    (on highway-fast, behaviour cloning on 600 episodes recorded with random actions at p = 0.2 drove no better
    in closed loop than on 600 clean ones: bench/RESULTS.md)."""
    return STEER_NOISE if SCENES.get(env, ("",))[0] == "steer" else 0.0


def shard_noise(meta: dict) -> float:
    """The noise a shard was recorded with (shards of older versions say it only in words)."""
    if "noise" in meta:
        return float(meta["noise"])
    return STEER_NOISE if "noise" in meta.get("policy", "") else 0.0


def record(
    env: str,
    folder: Path,
    episodes: int,
    first_seed: int,
    frames: int,
    size: tuple[int, int],
    log=None,
    noise: float | None = None,
) -> None:
    """Drive `episodes` expert episodes (seeds first_seed..) and write them as shards into `folder`.

    The expert's executed action carries noise while its label stays the expert's choice in the state reached
    (noise injection into the demonstrator, as DART does): every episode would otherwise follow the expert's own
    line, and a learner that strays from it meets states no label covers (close behind a slower car, half a lane
    off). On steering scenes the noise is correlated (`noisy`, stationary std `noise`); on meta-action scenes a
    random action replaces the expert's with probability `noise` (`jittered`). `noise=0` records the expert as it
    drives; None takes the scene's default (`default_noise`)."""
    from deeprecipe.data.sim import expert, make_env, rollout

    s = make_env(env, frames, size)
    try:
        drive = expert(s)
        steer = s.control == "steer"
        noise = default_noise(env) if noise is None else float(noise)
        if not steer and noise > 1:
            raise DataError(f"data.noise={noise}: on {env} it is the probability of a random action, in [0, 1]")
        meta = shard_meta(s, "expert") | {"size": list(size), "noise": noise}
        if noise and steer:
            meta["policy"] = f"expert, executed with AR(1) steering noise of std {noise}"
        elif noise:
            meta["policy"] = f"expert, a random action executed instead with probability {noise}"
        for start in range(0, episodes, SHARD_EPISODES):
            seeds = range(first_seed + start, first_seed + min(episodes, start + SHARD_EPISODES))
            eps = []
            for seed in seeds:
                if not noise:
                    ep = rollout(s, drive, seed, keep=True)
                    ep.labels = list(ep.actions)  # the expert drove: its labels are its actions
                else:
                    act = noisy(drive, seed, noise) if steer else jittered(drive, seed, len(s.actions), noise)
                    ep = rollout(s, act, seed, label=drive, keep=True)
                eps.append(ep)
            write_shard(folder / f"expert-{seeds[0]:08d}.safetensors", eps, meta)
            if log:
                log(f"recorded {seeds[-1] - first_seed + 1}/{episodes} expert episodes of {env}")
    finally:
        s.close()


@dataclass
class DriveData:
    """Expert rollouts of a driving simulator (see the module docstring); recorded on first use."""

    name: str = "driving"
    env: str = "highway-fast-v0"  # a highway-env scene (data/sim.py SCENES) or a gymnasium id
    path: str = ""  # the rollout folder ("": $DEEPRECIPE_DATA/driving/<env>-<episodes>ep-seed<seed>)
    episodes: int = 200  # expert episodes recorded when `path` holds no shard yet
    seed: int = 0  # first episode seed of the recording
    frames: int = ranged(4, "> 0")  # stacked frames per observation
    size: tuple[int, int] = ranged((64, 128), "> 0")  # frame (H, W)
    include: list[str] = field(default_factory=list)  # more shard files or folders (DAgger rounds)
    noise: float | None = ranged(None, ">= 0")  # recording noise (data.drive.record; None: control's default, 0: none)
    eval_episodes: int = 20  # closed-loop episodes of a final evaluation (held-out seeds)

    def folder(self) -> Path:
        if self.path:
            return Path(self.path).expanduser()
        root = Path(os.environ.get("DEEPRECIPE_DATA", "data")).expanduser()
        name = f"{self.env}-{self.episodes}ep-seed{self.seed}-{self.size[0]}x{self.size[1]}"
        if self.recording_noise() != default_noise(self.env):
            name += f"-noise{self.recording_noise()}"
        return root / "driving" / name

    def recording_noise(self) -> float:
        return default_noise(self.env) if self.noise is None else float(self.noise)

    def build(self) -> Data:
        folder = self.folder()
        if not list(folder.glob("*.safetensors")):
            if self.path and folder.exists() and any(folder.iterdir()):
                raise DataError(f"data.path {folder}: no rollout shards (*.safetensors) in it")
            warnings.warn(f"recording {self.episodes} expert episodes of {self.env} into {folder} (once)", stacklevel=2)
            # recorded under a name of this process, then renamed: a killed recording never passes for a whole one
            work = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
            shutil.rmtree(work, ignore_errors=True)
            record(self.env, work, self.episodes, self.seed, self.frames, tuple(self.size), noise=self.noise)
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
            try:
                work.rename(folder)
            except OSError:  # another process recorded the same episodes first
                shutil.rmtree(work, ignore_errors=True)
        files = shards_of(folder)
        recorded = len(files)
        for extra in self.include:
            p = Path(extra).expanduser()
            if not p.exists():
                raise DataError(f"data.include {extra}: no such file or folder")
            files += shards_of(p)
        parts, meta0 = [], None
        for i, f in enumerate(files):
            t, meta = read_shard(f)
            if (
                i < recorded
                and meta.get("policy", "").startswith("expert")
                and shard_noise(meta) != self.recording_noise()
            ):
                raise DataError(
                    f"{f}: expert rollouts recorded with noise {shard_noise(meta)}, but data.noise is "
                    f"{self.recording_noise()}: set data.noise={shard_noise(meta)}, or point data.path at a new folder"
                )
            if meta0 is None:
                meta0 = (f, meta)
            elif (meta["env"], meta["control"], meta["actions"]) != (
                meta0[1]["env"],
                meta0[1]["control"],
                meta0[1]["actions"],
            ):
                raise DataError(
                    f"{f}: rollouts of {meta['env']} ({meta['control']}), but {meta0[0]} has {meta0[1]['env']}"
                )
            want = scaling_of(self.env)
            if want and meta.get("scaling", DEFAULT_SCALING) != want:
                raise DataError(
                    f"{f}: frames drawn at {meta.get('scaling', DEFAULT_SCALING)} px/m, but {self.env} is now "
                    f"rendered at {want} px/m: delete {f.parent} to record it again"
                )
            hz = frame_hz_of(self.env)
            if hz and meta.get("frame_hz", 1.0) != hz:  # shards of older versions: one frame per 1 Hz decision
                raise DataError(
                    f"{f}: frames stacked at {meta.get('frame_hz', 1.0)} Hz, but {self.env} is now observed at "
                    f"{hz} Hz: delete {f.parent} to record it again"
                )
            if t["frames"].shape[1:] != (self.frames, *self.size):
                raise DataError(
                    f"{f}: frames {tuple(t['frames'].shape[1:])}, but the data config asks for "
                    f"({self.frames}, {self.size[0]}, {self.size[1]}): set data.frames / data.size to match"
                )
            parts.append(t)
        if not parts or meta0 is None:
            raise DataError(f"{folder}: no rollout shards")
        meta = meta0[1]
        if meta["env"] != self.env:
            raise DataError(f"{meta0[0]}: rollouts of {meta['env']}, but data.env is {self.env}")
        cat = {k: torch.cat([p[k] for p in parts]) for k in ("frames", "label", "episode")}
        which = episode_split(cat["episode"])
        steer = meta["control"] == "steer"
        label = cat["label"].float() if steer else cat["label"].long()
        splits = [
            EpisodeSplit(cat["frames"][which == i], label[which == i], cat["episode"][which == i]) for i in range(3)
        ]
        train = splits[0]
        if len(train) == 0:
            raise DataError(f"{folder}: every recorded episode fell in val/test: record more episodes")
        x = train.tensors[0][:: max(1, len(train) // 2000)].float() / 255
        mean = tuple(float(v) for v in x.mean((0, 2, 3)))
        std = tuple(max(float(v), 1e-3) for v in x.std((0, 2, 3)))
        names = list(meta["actions"])
        spec = DataSpec(
            num_classes=1 if steer else len(names),
            class_names=["steering"] if steer else names,
            in_channels=self.frames,
            image_size=tuple(self.size),
            mean=mean,
            std=std,
            extra={"env": self.env, "control": meta["control"], "episodes": int(cat["episode"].unique().numel())},
        )
        return Data(spec, train, splits[1] if len(splits[1]) else None, splits[2] if len(splits[2]) else None)
