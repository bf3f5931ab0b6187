"""`deeprecipe drive RUN`: the closed-loop table (learner, expert, random) and an MP4; `deeprecipe dagger RUN`:
rounds of DAgger, each a normal run folder.

A DAgger round: the current policy drives `--episodes` fresh seeds (10,000,000 + 100,000 x round + i), the expert
labels every state the learner visited, the labelled frames are written as a shard into the new run's
`rollouts/` folder, and the new run trains from the previous weights (finetune.init_from) on the recorded
expert data plus every round's shards so far (data.include).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from deeprecipe.cli.runs import add_run_args, family_of, open_run
from deeprecipe.core import UserError


def cmd_drive(args) -> None:
    from deeprecipe.data.drive import EVAL_SEED
    from deeprecipe.families import drive

    if args.episodes < 1:
        raise UserError(f"--episodes {args.episodes}: drive at least one episode")
    cfg, spec, model, rt, _ = open_run(args.run, args.device, task="drive")
    env = args.env or cfg.data.env
    policies = {"learner": model}
    if not args.no_baselines:
        policies |= {"expert": "expert", "random": "random"}
    video = None if args.no_video else Path(args.video or Path(args.run) / "plots" / "drive.mp4")
    seed = EVAL_SEED if args.seed is None else args.seed
    res = drive.closed_loop(env, spec, policies, args.episodes, seed, video=video, rt=rt)
    if args.json:
        print(json.dumps({"env": env, "first_seed": seed, "results": res}))
        return
    print(f"{env}: " + drive.table(res))
    if video is not None:
        print(f"video: {video}")


def dagger_round(run: str, out: Path, episodes: int, first_seed: int, device: str) -> Path:
    """The learner of `run` drives, the expert labels: one shard in out/rollouts; the shard's path."""
    from deeprecipe.families import drive

    cfg, spec, model, rt, _ = open_run(run, device, task="drive")
    path = out / "rollouts" / f"learner-{first_seed:08d}.safetensors"
    eps = drive.record_learner(model, spec, rt, cfg.data.env, path, episodes, first_seed, f"learner of {run}")
    crashes = sum(ep.crashed for ep in eps)
    frames = sum(len(e.frames) for e in eps)
    print(f"{run} drove {episodes} episodes, {crashes} collisions, {frames} frames labelled: {path}", file=sys.stderr)
    return path


def cmd_dagger(args) -> None:
    from deeprecipe.data.drive import DAGGER_SEED
    from deeprecipe.engine.loop import train
    from deeprecipe.engine.run import read_config

    if args.rounds < 1 or args.episodes < 1:
        raise UserError("--rounds and --episodes must be at least 1")
    prev = args.run
    base = read_config(prev)
    if base.task != "drive":
        raise UserError(f"{prev} is a '{base.task}' run; dagger needs a driving run (task: drive)")
    include = list(base.data.include)
    for r in range(1, args.rounds + 1):
        out = Path(f"{Path(args.out or args.run)}-dagger{r}")  # runs/x/ -> runs/x-dagger1
        if (out / "config.yaml").exists():
            raise UserError(f"{out} already holds a run: give another --out")
        shard = dagger_round(prev, out, args.episodes, DAGGER_SEED + 100_000 * r, args.device)
        include.append(str(shard.resolve()))
        overrides = [f"data.include={json.dumps(include)}", f"finetune.init_from={prev}"]
        if args.steps:
            overrides.append(f"train.steps={args.steps}")
        overrides += list(args.set or [])
        cfg = read_config(prev, overrides)
        command = shlex.join(["deeprecipe", "dagger", args.run, "--rounds", str(args.rounds)])
        final = train(cfg, family_of(cfg), out, command=command)
        shown = {k: round(v, 4) for k, v in final.items() if isinstance(v, float) and "closed_loop" in k}
        print(f"round {r}: {out} {shown}")
        prev = str(out)


def add_parsers(sub) -> None:
    d = sub.add_parser("drive", help="drive held-out seeds with a driving run: closed-loop table and an MP4")
    add_run_args(d, run="a driving run folder (task: drive)")
    d.add_argument("--episodes", type=int, default=20, help="held-out episodes per policy (default 20)")
    d.add_argument("--seed", type=int, help="first episode seed (default 20,000,000: never recorded)")
    d.add_argument("--env", help="another environment with the same frames (default: the run's data.env)")
    d.add_argument("--video", help="MP4 of the learner's first episode (default RUN/plots/drive.mp4)")
    d.add_argument("--no-video", action="store_true", help="write no MP4")
    d.add_argument("--no-baselines", action="store_true", help="drive the learner only (no expert, no random)")
    d.add_argument("--json", action="store_true", help="print the results as one JSON line")
    d.set_defaults(func=cmd_drive)

    g = sub.add_parser("dagger", help="DAgger rounds on a driving run: the learner drives, the expert labels")
    add_run_args(
        g,
        run="a driving run folder (task: drive), e.g. behaviour cloning's",
        overrides="config override for the rounds' runs, e.g. optim.lr=1e-3",
    )
    g.add_argument("--rounds", type=int, default=2, help="DAgger rounds, each a run folder RUN-daggerK (default 2)")
    g.add_argument("--episodes", type=int, default=40, help="episodes the learner drives per round (default 40)")
    g.add_argument("--steps", type=int, default=0, help="training steps per round (default: the run's train.steps)")
    g.add_argument("--out", help="prefix of the rounds' run folders (default: RUN)")
    g.set_defaults(func=cmd_dagger)
