"""Driving highway-fast-v0 from pixels in closed loop: behaviour cloning + DAgger within a training budget, against
the expert, a random policy and Stable-Baselines3 DQN trained for the same wall time on the same observation.

    PYTHONPATH=src python bench/drive_highway.py [--budget 900] [--episodes 200] [--eval 100] [--rounds 2] [--dqn]

Targets (issue 14): over `--eval` held-out seeds, the learner's collision rate at most 1.5x the expert's and its
mean return at least 90% of the expert's, trained within `--budget` seconds on the 2-core CPU (recording the
expert data is timed apart); with --dqn, DQN (CnnPolicy on the same stacked frames, highway-env's suggested
hyperparameters) trains for the learner's whole wall time (training and DAgger rollouts) and is judged on the same
seeds. Step counts are fitted to the budget from a measured training step, so a slower machine trains fewer steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import deeprecipe
from _budget import machine, step_time
from deeprecipe.data import sim
from deeprecipe.data.drive import DAGGER_SEED, EVAL_SEED
from deeprecipe.families import drive


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dagger_round(run: str, out: Path, episodes: int, first_seed: int) -> Path:
    """What `deeprecipe dagger` does each round: the learner of `run` drives, the expert labels; the shard's path."""
    learner = deeprecipe.load(run, "cpu")
    path = out / "rollouts" / f"learner-{first_seed:08d}.safetensors"
    env = learner.config.data.env
    drive.record_learner(
        learner.model, learner.spec, learner.runtime(), env, path, episodes, first_seed, f"learner of {run}"
    )
    return path


def fit_steps(recipe: str, sets: list[str], seconds: float) -> int:
    _, t_step = step_time(recipe, sets)
    return max(20, int(seconds * 0.93 / t_step))  # what the periodic evaluations and checkpoints leave


def bc_and_dagger(args, data_dir: Path, out: Path) -> tuple[str, float]:
    base = [f"data.path={data_dir}", "data.eval_episodes=0", "train.device=cpu", *args.set]
    t0 = time.time()
    bc_share = args.budget * (1.0 if args.rounds == 0 else args.bc_share)
    steps = fit_steps(args.recipe, base, bc_share - (time.time() - t0))
    sets = [*base, f"train.steps={steps}", f"train.eval_every={max(1, steps // 3)}"]
    log(f"behaviour cloning: {steps} steps")
    run = str(out / "bc")
    final = deeprecipe.train(args.recipe, sets, out=run).final
    log(f"bc: val agreement {final.get('val_agreement', float('nan')):.4f} after {time.time() - t0:.0f} s")
    include: list[str] = []
    for r in range(1, args.rounds + 1):
        left = args.budget - (time.time() - t0)
        per_round = left / (args.rounds - r + 1)
        t1 = time.time()
        nxt = out / f"dagger{r}"
        shard = dagger_round(run, nxt, args.dagger_episodes, DAGGER_SEED + 100_000 * r)
        include.append(str(shard))
        over = [*base, f"data.include={json.dumps(include)}", f"finetune.init_from={run}", *args.dagger_set]
        steps = fit_steps(args.recipe, over, per_round - (time.time() - t1))
        log(f"dagger round {r}: {steps} steps on {len(include)} learner shard(s)")
        deeprecipe.train(args.recipe, [*over, f"train.steps={steps}", f"train.eval_every={steps}"], out=nxt)
        run = str(nxt)
    return run, time.time() - t0


class WallClock:
    """A Stable-Baselines3 callback that stops training after `seconds`."""

    def __init__(self, seconds: float):
        from stable_baselines3.common.callbacks import BaseCallback

        outer = self

        class CB(BaseCallback):
            def _on_step(self) -> bool:
                return time.time() - outer.t0 < seconds

        self.t0 = time.time()
        self.cb = CB()


def dqn(args, seconds: float, spec) -> dict:
    """SB3 DQN with highway-env's suggested CNN hyperparameters, trained for `seconds`, then driven greedily."""
    from stable_baselines3 import DQN

    s = sim.make_env(args.env, spec.in_channels, tuple(spec.image_size))
    model = DQN(
        "CnnPolicy",
        s.env,
        learning_rate=5e-4,
        buffer_size=15_000,
        learning_starts=200,
        batch_size=32,
        gamma=0.8,
        train_freq=1,
        gradient_steps=1,
        target_update_interval=50,
        exploration_fraction=0.7,
        seed=0,
        device="cpu",
        verbose=0,
    )
    clock = WallClock(seconds)
    model.learn(total_timesteps=10**7, callback=clock.cb)
    log(f"dqn: {model.num_timesteps} environment steps in {time.time() - clock.t0:.0f} s")

    def policy(frames: np.ndarray) -> int:
        return int(model.predict(frames.transpose(0, 2, 1), deterministic=True)[0])  # back to highway-env's (S, W, H)

    stats = [sim.rollout(s, policy, EVAL_SEED + k).stats() for k in range(args.eval)]
    s.close()
    return drive.summarize(stats)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=900, help="training seconds (BC + DAgger rollouts and training)")
    p.add_argument("--recipe", default="highway-fast-cnn")
    p.add_argument("--env", default="highway-fast-v0")
    p.add_argument("--episodes", type=int, default=200, help="expert episodes recorded (timed apart)")
    p.add_argument("--rounds", type=int, default=2, help="DAgger rounds after behaviour cloning")
    p.add_argument("--dagger-episodes", type=int, default=30)
    p.add_argument("--bc-share", type=float, default=0.6, help="share of the budget for behaviour cloning")
    p.add_argument("--eval", type=int, default=100, help="held-out closed-loop episodes per policy")
    p.add_argument("--dqn", action="store_true", help="also train SB3 DQN for the same wall time")
    p.add_argument("--data", help="rollout folder (default: a temporary one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dagger-set", action="append", default=[], metavar="KEY=VALUE", help="for the DAgger rounds only")
    args = p.parse_args()
    print(f"machine: {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="drive-bench-"))
    data_dir = Path(args.data) if args.data else tmp / "rollouts"
    t0 = time.time()
    deeprecipe.dataset(
        args.recipe, [f"data.path={data_dir}", f"data.episodes={args.episodes}", f"data.env={args.env}", *args.set]
    )  # records the expert's episodes into data.path
    log(f"expert data: {args.episodes} episodes in {data_dir} ({time.time() - t0:.0f} s, not in the budget)")
    run, wall = bc_and_dagger(args, data_dir, tmp)
    log(f"learner {run}: {wall:.0f} s of training (budget {args.budget:.0f} s)")
    learner = deeprecipe.load(run, "cpu")
    spec, model, rt = learner.spec, learner.model, learner.runtime()
    t1 = time.time()
    res = drive.closed_loop(
        args.env, spec, {"learner": model, "expert": "expert", "random": "random"}, args.eval, EVAL_SEED, rt=rt
    )
    log(f"closed loop: {time.time() - t1:.0f} s")
    print(drive.table(res), flush=True)
    if args.dqn:
        res["sb3-dqn"] = dqn(args, wall, spec)
        print(drive.table(res))
    le, ex = res["learner"], res["expert"]
    ok_c = le["collision_rate"] <= 1.5 * ex["collision_rate"]
    ok_r = le["return"] >= 0.9 * ex["return"]
    limit = 1.5 * ex["collision_rate"]
    print(f"collision rate {le['collision_rate']:.3f} vs 1.5 x expert {limit:.3f}: {'met' if ok_c else 'NOT met'}")
    print(f"return {le['return']:.2f} vs 0.9 x expert {0.9 * ex['return']:.2f}: {'met' if ok_r else 'NOT met'}")
    if "sb3-dqn" in res:
        d = res["sb3-dqn"]
        better = le["return"] > d["return"] and le["collision_rate"] < d["collision_rate"]
        print(
            f"vs DQN at equal wall time: return {le['return']:.2f} / {d['return']:.2f}, collisions "
            f"{le['collision_rate']:.3f} / {d['collision_rate']:.3f}: "
            + ("better on both" if better else "NOT better on both")
        )
    print(json.dumps({"wall_s": round(wall), "results": res}))


if __name__ == "__main__":
    main()
