"""The training recipe as checks (see docs/architecture.md, "Checks"): each is a plain function
`check(ctx) -> Verdict`; CHECKS lists them in the order they run, data first."""

from __future__ import annotations

import time
from collections.abc import Callable

from deeprecipe.checks import data as _d
from deeprecipe.checks import training as _t
from deeprecipe.checks.core import Ctx, Verdict, init_head_from_priors
from deeprecipe.core import UserError

CHECKS: dict[str, Callable[[Ctx], Verdict]] = {
    "files": _d.files,  # every file decodes
    "labels": _d.labels,  # label ids in range
    "balance": _d.balance,  # class counts
    "duplicates": _d.duplicates,  # exact/near duplicates inside train, conflicting labels
    "leakage": _d.leakage,  # val/test examples also in train
    "batch": _d.batch,  # pictures of the batch as it enters the net; input statistics
    "seed": _t.seed,  # same seed, same losses
    "init_loss": _t.init_loss,  # loss at init vs its closed form (ln C)
    "init_prior": _t.init_prior,  # mean prediction at init vs label priors
    "dependency": _t.dependency,  # no mixing across the batch (and no peeking at the future)
    "overfit": _t.overfit,  # a few examples to ~0 loss
    "loss_down": _t.loss_down,  # the loss falls at the recipe's lr
    "baseline": _t.baseline,  # real inputs beat zeroed inputs
    "dynamics": _t.dynamics,  # predictions on a fixed held-out batch improve
    "grad_flow": _t.grad_flow,  # every parameter trains
    "saliency": _t.saliency,  # Grad-CAM after the short run passes the saliency sanity check
}
DATA_FREE = {"files"}  # checks that run even when the data set does not build


def run_checks(
    ctx: Ctx,
    only: list[str] | None = None,
    skip: list[str] | None = None,
    progress: Callable[[Verdict], None] | None = None,
) -> list[Verdict]:
    """Run the checks (the family's EXTRA_CHECKS after the built-in ones); a check that raises is a failure."""
    checks = {**CHECKS, **ctx.family.EXTRA_CHECKS}
    for name in list(only or []) + list(skip or []):
        if name not in checks:
            raise UserError(f"unknown check '{name}': the checks are {', '.join(checks)}")
    not_for_task = ctx.family.CHECKS_SKIP  # name -> why it does not apply
    out, data_error = [], None
    for name, fn in checks.items():
        t0 = time.perf_counter()
        if (only and name not in only) or name in (skip or []):
            v = Verdict(name, "skip", advice="not selected")
        elif name in not_for_task:
            v = Verdict(name, "skip", advice=not_for_task[name] or f"does not apply to task '{ctx.cfg.task}'")
        elif data_error is not None and name not in DATA_FREE:
            v = Verdict(name, "skip", advice="the data set did not build")
        else:
            if name not in DATA_FREE and data_error is None:
                try:
                    ctx.data  # noqa: B018 (builds the data once)
                except UserError as e:
                    data_error = e
                    out.append(Verdict("data", "fail", str(e), "the data set builds", "fix the data set"))
                    v = Verdict(name, "skip", advice="the data set did not build")
                    out.append(v)
                    if progress:
                        progress(out[-2]), progress(v)
                    continue
            try:
                v = fn(ctx)
            except Exception as e:  # a model that cannot run is itself a finding
                msg = str(e).splitlines()[0] if str(e) else ""
                v = Verdict(
                    name,
                    "fail",
                    f"raised {type(e).__name__}: {msg}"[:300],
                    "runs",
                    "the check could not run this model/data (rerun with --debug for the traceback)",
                )
                if ctx.debug:
                    raise
        v.seconds = time.perf_counter() - t0
        out.append(v)
        if progress:
            progress(v)
    return out


__all__ = ["CHECKS", "Ctx", "Verdict", "run_checks", "init_head_from_priors"]
