"""A wall-clock budget for a run (train.minutes): where the lr schedule stands, and when to stop.

Under a budget the schedule is placed by the run's progress, the larger of the share of the time spent and the
share of train.steps done (then an upper bound), instead of by the step alone: the warmup, the decay and the last
step all land inside the budget on whatever machine runs it, without guessing a step count beforehand. The time
counts the loop (steps, evaluations, checkpoints) from its first step, not building the data or the final
evaluation; a resumed run goes on from the seconds its checkpoint recorded. Between two readings of the clock the
progress is extrapolated at the run's mean seconds per step so far, so that under DistributedDataParallel every
process takes the same lr and stops at the same step: there the clock is read only at log steps, where rank 0's
reading is shared (one broadcast of one number).
"""

from __future__ import annotations

import time

import torch

now = time.perf_counter  # the clock read (tests put a fake one here)


class Clock:
    """Made just before the loop's first step; `spent`: the seconds a resumed run had used before."""

    def __init__(self, minutes: float, steps: int, start: int, spent: float = 0.0, world: int = 1, device=None):
        self.budget, self.steps, self.world, self.device = 60.0 * minutes, steps, world, device
        self.t0 = now() - spent
        self.read_step, self.read_s, self.pos = start, spent, 0.0

    def seconds(self) -> float:
        """Seconds of the budget used, at the last reading."""
        return self.read_s

    def per_step(self) -> float:
        """Mean seconds per step since the run's step 0 (a resumed run's earlier part included; 0 before any)."""
        return self.read_s / self.read_step if self.read_step else 0.0

    def _at(self, steps: int) -> float:
        """Seconds spent after `steps` steps: the last reading, extrapolated at the mean step so far."""
        return self.read_s + (steps - self.read_step) * self.per_step()

    def position(self, step: int) -> float:
        """The run's progress in [0, 1] at the end of optimizer step `step` (0-based), estimated before it runs from
        the last reading and the mean step so far; never below an earlier answer. With steps of d seconds each and
        no other cost this is (step + 1) * d / budget: the step schedule of the budget / d steps that fit."""
        self.pos = max(self.pos, min(1.0, max(self._at(step + 1) / self.budget, (step + 1) / self.steps)))
        return self.pos

    def tick(self, done: int, at_log: bool) -> None:
        """After step `done`: read the clock, in one process at every step, across processes at log steps (rank
        0's reading, broadcast)."""
        if self.world > 1 and not at_log:
            return
        seconds = now() - self.t0
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
            dist.broadcast(t, 0)
            seconds = float(t)
        self.read_step, self.read_s = done, seconds

    def over(self, done: int) -> bool:
        """Whether step `done` ends the run: train.steps done, or the budget spent to within half a mean step (so
        that the run ends at the step whose end lies nearest the budget)."""
        return done >= self.steps or self._at(done) >= self.budget - 0.5 * self.per_step()
