"""Driving simulators: gymnasium environments that show a policy camera-like pixels, the experts that drive them
from the simulator's own state, and the closed-loop rollout that both recording and evaluation run.

The world is highway-env (gymnasium): its scenes render top-down frames headless (SDL's offscreen driver), and
`make_env` asks for stacked grayscale frames of `size` (H, W) as the observation, so a policy perceives from
pixels only. Frames are handed out as uint8 (S, H, W) in the usual image orientation (highway-env's own array is
(S, W, H)). On the meta-action scenes the camera runs at CAMERA_HZ while decisions keep the scene's 1 Hz
(`decisions_every`: the car moves exactly as under the scene's own steps). Any other gymnasium environment id
whose observation is a uint8 image stack plugs in by name.

The chain of a driving system, as this module splits it:
- perception: the policy network, from the stacked frames (trained by the `drive` family);
- decision: its output, a discrete meta-action (lane left / idle / lane right / faster / slower) on the
  highway scenes, or a steering command on the track scenes;
- control: the simulator's low-level controllers turn a meta-action into steering and throttle (a lane-change
  steering law and a speed tracker); on the track scenes the steering command drives the wheels directly.

Experts, from privileged state (never from pixels):
- `plan_action` (meta-actions): value iteration over highway-env's time-to-collision grid (lanes x ego speeds x
  1 s steps, every other car assumed to keep its speed and lane), with a collision cost `caution` times the
  environment's own, so that the planner trades speed for safety more than the reward does;
- `steer_action` (track scenes): the lane-following law of highway-env's controlled vehicles (lateral offset ->
  heading reference -> heading rate -> wheel angle) on the ego's current lane, as a steering command in [-1, 1].
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from deeprecipe.core import UserError

INSTALL_HINT = "highway-env is not installed: pip install 'deeprecipe[drive]' (or pip install highway-env)"
# highway-env scenes: id -> (control, overrides of the scene's own config). "meta": discrete meta-actions;
# "steer": continuous steering only (speed held by the simulator).
SCENES: dict[str, tuple[str, dict]] = {
    "highway-fast-v0": ("meta", {}),
    "highway-v0": ("meta", {}),
    "merge-v0": ("meta", {}),
    "roundabout-v0": ("meta", {}),
    "intersection-v0": ("meta", {}),
    "racetrack-v0": (
        "steer",
        {
            "duration": 40,
            "other_vehicles": 0,
            "action": {"type": "ContinuousAction", "longitudinal": False, "lateral": True},
        },
    ),
    "lane-keeping-v0": ("steer", {}),
}
# frames per second of the camera on the meta-action scenes, whose decisions come at 1 Hz: stacked 1 s apart, the
# frames hide the ego's own speed (the lane dashes repeat every 7.33 m, so 22 and 29.3 m/s look the same) that the
# expert's choice between idle, faster and slower rests on; 0.2 s apart, a dash moves 4-6 m at 20-30 m/s
CAMERA_HZ = 5
# pixels per metre of the rendered frames: the highway scenes need a long view ahead (64x128 px at 1.75 px/m sees
# 73 m); lane keeping needs the ego's offset in its lane to span pixels (at 4 px/m a 5 m lane is 20 px wide)
SCALING = {"racetrack-v0": 4.0, "lane-keeping-v0": 4.0}
DEFAULT_SCALING = 1.75
GRAY = [0.2989, 0.5870, 0.1140]  # RGB -> luma weights
META_NAMES = ["lane left", "idle", "lane right", "faster", "slower"]  # highway-env's DiscreteMetaAction order
PREFERENCE = [1, 3, 4, 0, 2]  # among equally good meta-actions: idle, faster, slower, lane left, lane right


def highway():
    """Import gymnasium with highway-env's scenes registered (headless), or say how to install them."""
    # SDL's offscreen driver draws without a display; highway-env turns its drawing off under the "dummy" driver
    # (every frame would be black), so that one is replaced
    if os.environ.get("SDL_VIDEODRIVER", "offscreen") == "dummy":
        warnings.warn(
            "SDL_VIDEODRIVER=dummy makes highway-env draw nothing: using SDL's offscreen driver", stacklevel=2
        )
    if os.environ.get("SDL_VIDEODRIVER", "dummy") == "dummy":
        os.environ["SDL_VIDEODRIVER"] = "offscreen"
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    try:
        import gymnasium
        import highway_env  # noqa: F401  (registers the scenes)
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return gymnasium


def decisions_every(gym, every: int, idle: int):
    """A gymnasium wrapper that decides once every `every` camera frames: the env runs at the camera's rate (its
    policy_frequency raised to it, one frame observed per step) and a decision is the action on the first frame
    and `idle` (keep the targets) on the rest, as highway-env applies a meta-action on the first simulation frame
    of its step only, so the car moves exactly as at the scene's own rate; the reward is the scene's for the
    decision's action, in the state reached."""

    class Decisions(gym.Wrapper):
        def step(self, action):
            u = self.env.unwrapped
            for i in range(every):
                obs, _, terminated, truncated, info = self.env.step(action if i == 0 else idle)
                if terminated or truncated:
                    break
            u.time = round(u.time, 6)  # 1/5 s added five times is not 1 s in floating point
            return obs, float(u._reward(action)), terminated, truncated or u._is_truncated(), info

    return Decisions


@dataclass
class Sim:
    """One environment as the driving family sees it: frames uint8 (S, H, W), the action space as names."""

    env: object
    name: str
    control: str  # "meta" | "steer" | "discrete" (another gymnasium env with discrete actions)
    actions: list[str] = field(default_factory=list)  # names of the discrete actions ([] for steering)
    frequency: float = 1.0  # policy decisions per simulated second
    scaling: float = 0.0  # pixels per metre of the frames (highway-env scenes; 0: the environment's own)
    frame_hz: float = 0.0  # camera frames per simulated second (0: one per decision)

    def reset(self, seed: int) -> np.ndarray:
        obs, _ = self.env.reset(seed=int(seed))
        frames = self.frames(obs)
        if not frames.any():
            raise UserError(
                f"{self.name} rendered a black frame: the simulator draws nothing (with highway-env, unset "
                "SDL_VIDEODRIVER=dummy; SDL's offscreen driver draws without a display)"
            )
        return frames

    def step(self, action) -> tuple[np.ndarray, float, bool, dict]:
        a = np.asarray([float(action)], dtype=np.float32) if self.control == "steer" else int(action)
        obs, reward, terminated, truncated, info = self.env.step(a)
        return self.frames(obs), float(reward), bool(terminated or truncated), info

    def frames(self, obs) -> np.ndarray:
        obs = np.asarray(obs)
        if self.name in SCENES:  # highway-env: (S, W, H) -> (S, H, W)
            obs = obs.transpose(0, 2, 1)
        return np.ascontiguousarray(obs, dtype=np.uint8)

    @property
    def state(self):
        """The simulator's own state (what the experts read): highway-env's environment object."""
        return self.env.unwrapped

    def close(self) -> None:
        self.env.close()


def scaling_of(name: str) -> float:
    """Pixels per metre that `make_env(name)` renders at (0 for environments that draw their own frames)."""
    return SCALING.get(name, DEFAULT_SCALING) if name in SCENES else 0.0


def frame_hz_of(name: str) -> float:
    """Camera frames per second that `make_env(name)` stacks (0 where frames come once per decision)."""
    return float(CAMERA_HZ) if SCENES.get(name, ("",))[0] == "meta" else 0.0


def known_envs() -> list[str]:
    return list(SCENES)


def make_env(name: str, frames: int = 4, size: tuple[int, int] = (64, 128), scaling: float = 0.0) -> Sim:
    """The environment `name` with stacked grayscale frames of `size` (H, W) as observations: a highway-env
    scene (at `scaling` pixels per metre, 0: the scene's SCALING), or any registered gymnasium id whose
    observation is a uint8 image stack (S, H, W)."""
    gym = highway()
    h, w = int(size[0]), int(size[1])
    if name in SCENES:
        control, extra = SCENES[name]
        scaling = float(scaling or scaling_of(name))
        config: dict = {
            "observation": {
                "type": "GrayscaleObservation",
                "observation_shape": (w, h),  # highway-env takes (width, height)
                "stack_size": int(frames),
                "weights": GRAY,
                "scaling": scaling,
            },
            **extra,
        }
        env = gym.make(name, config=config)
        u = env.unwrapped
        freq = float(u.config["policy_frequency"])
        if control == "steer":
            return Sim(env, name, control, [], freq, scaling)
        every, sim_hz = CAMERA_HZ / freq, u.config["simulation_frequency"]
        if every != int(every) or sim_hz % CAMERA_HZ:
            raise UserError(
                f"{name}: decisions at {freq} Hz and simulation at {sim_hz} Hz do not fit a {CAMERA_HZ} Hz camera"
            )
        u.configure({"policy_frequency": CAMERA_HZ})
        env = decisions_every(gym, int(every), u.action_type.actions_indexes["IDLE"])(env)
        names = [u.action_type.actions[i] for i in range(env.action_space.n)]
        pretty = {"LANE_LEFT": "lane left", "IDLE": "idle", "LANE_RIGHT": "lane right"}
        names = [pretty.get(n, n.lower()) for n in names]
        return Sim(env, name, control, names, freq, scaling, float(CAMERA_HZ))
    if name not in gym.registry:
        raise UserError(
            f"unknown environment '{name}': highway-env scenes are {', '.join(SCENES)}; any registered gymnasium "
            "id with a uint8 image-stack observation also works"
        )
    env = gym.make(name)
    space = env.observation_space
    if getattr(space, "dtype", None) != np.uint8 or len(getattr(space, "shape", ())) != 3:
        env.close()
        raise UserError(
            f"environment '{name}' observes {space}, not a uint8 image stack (S, H, W): wrap it with "
            "gymnasium's grayscale and frame-stack wrappers first"
        )
    if not hasattr(env.action_space, "n"):
        env.close()
        raise UserError(f"environment '{name}' has actions {env.action_space}: only discrete actions plug in by name")
    return Sim(env, name, "discrete", [f"action {i}" for i in range(env.action_space.n)])


# ------------------------------------------------------------------------------------------ experts


def plan_action(sim: Sim, caution: float = 5.0, gamma: float = 0.9, horizon: float = 10.0) -> int:
    """The meta-action of value iteration over the time-to-collision grid of the current state (see the module
    docstring), among the actions the scene offers."""
    from highway_env.envs.common.finite_mdp import compute_ttc_grid, transition_model

    env = sim.state
    grid = compute_ttc_grid(env, 1.0, horizon)  # (speeds, lanes, time): collision risk per cell
    v, lanes, t = grid.shape
    n = len(META_NAMES)
    nxt = np.fromfunction(lambda h, i, j, a: transition_model(h, i, j, a, grid), (*grid.shape, n), dtype=int)
    nxt = nxt.reshape(-1, n)  # (states, actions) -> next state
    c = env.config
    lane_value = np.arange(lanes) / max(lanes - 1, 1)
    speed_value = np.arange(v) / max(v - 1, 1)
    reward = (
        caution * c.get("collision_reward", -1.0) * grid
        + c.get("right_lane_reward", 0.0) * lane_value[None, :, None]
        + c.get("high_speed_reward", 0.0) * speed_value[:, None, None]
    ).reshape(-1)
    change = c.get("lane_change_reward", 0.0)
    r = reward[:, None] + np.array([change, 0.0, change, 0.0, 0.0])[None, :]
    terminal = ((grid >= 1) | (np.arange(t) == t - 1)[None, None, :]).reshape(-1)
    value = np.zeros(v * lanes * t)
    q = r
    for _ in range(t + 1):
        q = r + gamma * value[nxt] * ~terminal[nxt]
        value = q.max(1)
    ego = env.vehicle
    lane = min(int(ego.lane_index[2]), lanes - 1)
    state = np.ravel_multi_index((int(ego.speed_index), lane, 0), grid.shape)
    offered = env.action_type.actions_indexes  # name -> index in this scene's action space
    names = ["LANE_LEFT", "IDLE", "LANE_RIGHT", "FASTER", "SLOWER"]
    allowed = [k for k in PREFERENCE if names[k] in offered]
    top = max(q[state, k] for k in allowed)
    # ties (faster at top speed is idle, a lane change off the road stays put) go to the plainest action, so the
    # labels are a function of the state that a network can learn
    best = next(k for k in allowed if q[state, k] >= top - 1e-9)
    return int(offered[names[best]])


def steer_action(sim: Sim) -> float:
    """The lane-following steering command of the ego's current lane, in [-1, 1] of the action's range."""
    from highway_env import utils
    from highway_env.vehicle.controller import ControlledVehicle as CV

    env = sim.state
    ego = env.vehicle
    lane = env.road.network.get_lane(ego.lane_index)
    s, lateral = lane.local_coordinates(ego.position)
    speed = max(abs(ego.speed), 1e-3)
    future = lane.heading_at(s + speed * CV.TAU_PURSUIT)
    heading_cmd = np.arcsin(np.clip(-CV.KP_LATERAL * lateral / speed, -1, 1))
    heading_ref = future + np.clip(heading_cmd, -np.pi / 4, np.pi / 4)
    rate = CV.KP_HEADING * utils.wrap_to_pi(heading_ref - ego.heading)
    slip = np.arcsin(np.clip(ego.LENGTH / 2 / speed * rate, -1, 1))
    angle = np.arctan(2 * np.tan(slip))
    lo, hi = env.action_type.steering_range
    return float(np.clip(angle / hi if angle >= 0 else angle / -lo, -1.0, 1.0))


def expert(sim: Sim) -> Callable[[np.ndarray], float]:
    """The expert of this environment's control: frames are ignored, the state is read."""
    if sim.control == "meta":
        return lambda frames: plan_action(sim)
    if sim.control == "steer":
        return lambda frames: steer_action(sim)
    raise UserError(
        f"environment '{sim.name}' has no expert (experts drive the highway-env scenes: {', '.join(SCENES)}); "
        "record rollouts of your own and point data.path at them"
    )


def random_policy(sim: Sim, seed: int) -> Callable[[np.ndarray], float]:
    rng = np.random.default_rng(seed)
    if sim.control == "steer":
        return lambda frames: float(rng.uniform(-1, 1))
    return lambda frames: int(rng.integers(len(sim.actions)))


# ------------------------------------------------------------------------------------------ rollouts


@dataclass
class Episode:
    """One closed-loop episode: what the car did, and (when recorded) every frame stack it saw."""

    seed: int
    frames: list[np.ndarray] = field(default_factory=list)  # (S, H, W) uint8 per step
    actions: list[float] = field(default_factory=list)  # what was executed
    labels: list[float] = field(default_factory=list)  # the expert's choice in the same state (when labelled)
    ret: float = 0.0
    length: int = 0
    crashed: bool = False
    offroad: bool = False
    speed_sum: float = 0.0
    offset_sum: float = 0.0  # |lateral offset from the lane centre| summed over the steps [m]
    distance: float = 0.0  # metres driven (speed x decision period, summed)

    def stats(self) -> dict:
        n = max(self.length, 1)
        return {
            "return": self.ret,
            "length": self.length,
            "collision": float(self.crashed),
            "offroad": float(self.offroad),
            "speed": self.speed_sum / n,
            "distance": self.distance,
            "lane_offset": self.offset_sum / n,
        }


def rollout(
    sim: Sim,
    policy: Callable[[np.ndarray], float],
    seed: int,
    label: Callable[[np.ndarray], float] | None = None,
    keep: bool = False,
    max_steps: int = 10_000,
) -> Episode:
    """Drive one episode of `seed` with `policy(frames)`; `label(frames)` (the expert) is asked in every visited
    state before the step (DAgger's labels). `keep` keeps the frames (recording, videos)."""
    ep = Episode(seed=int(seed))
    frames = sim.reset(seed)
    for _ in range(max_steps):
        if label is not None:
            ep.labels.append(label(frames))
        action = policy(frames)
        if keep:
            ep.frames.append(frames)
        ep.actions.append(action)
        frames, reward, done, info = sim.step(action)
        ego = sim.state.vehicle
        ep.ret += reward
        ep.length += 1
        speed = float(info.get("speed", getattr(ego, "speed", 0.0)))
        ep.speed_sum += speed
        ep.distance += speed / sim.frequency
        ep.crashed |= bool(info.get("crashed", getattr(ego, "crashed", False)))
        on_road = bool(getattr(ego, "on_road", True))
        ep.offroad |= not on_road
        if ego is not None and getattr(ego, "lane", None) is not None:
            ep.offset_sum += abs(float(ego.lane.local_coordinates(ego.position)[1]))
        if done:
            break
    return ep
