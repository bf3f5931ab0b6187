"""The training step as one CUDA graph: captured once, replayed every step.

A small network's step on a GPU is bound by the host: hundreds of kernel launches, each a few microseconds of
Python and driver work, for kernels that run for less. Captured as a CUDA graph, the forward, backward, gradient
clipping and the fused optimizer of every part are one launch. What makes a step capturable is checked, not
assumed:

- the micro-batches are tuples of CUDA tensors only (a family that passes other objects, such as a GAN's
  noise draws, runs eagerly), with the same shapes as the captured ones (a batch of another shape runs eagerly:
  padded text of varying length replays only when the length repeats);
- the step reads nothing back to the host (`.item()`, `float(t)`, `if t:`): the loop's non-finite check lives on
  the device (the fused optimizer skips the update itself), and a step that syncs fails its capture, which is
  reported once as a note and leaves the run eager;
- the optimizer is capturable with its learning rate in a device tensor (engine/optim.py).

The first WARM steps run eagerly on a side stream (kernel autotuning, cuDNN algorithm choice, lazy optimizer
state, torch.compile), then the next step is captured and replayed; a captured step also needs the gradients
unset (the step ends with zero_grad(set_to_none=True)). Dropout stays random: the graph advances the CUDA
generator at every replay.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

WARM = 3  # eager steps before the capture


def leaves(batches: list) -> list[torch.Tensor] | None:
    """The tensors of a list of micro-batches (tuples of tensors), or None when any item is not a CUDA tensor."""
    out = []
    for batch in batches:
        for t in batch if isinstance(batch, (tuple, list)) else (batch,):
            if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
                return None
            out.append(t)
    return out


def signature(tensors: list[torch.Tensor]) -> tuple:
    return tuple((t.shape, t.dtype, t.stride()) for t in tensors)


class GraphedStep:
    """`step(batches) -> result` replayed from a CUDA graph where it can be (see the module docstring); `reset()`
    runs between the capture attempt that failed and the eager step that follows it (drops the gradients)."""

    def __init__(self, step: Callable[[list], object], reset: Callable[[], None]):
        self.step, self.reset = step, reset
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []
        self.key: tuple | None = None
        self.out = None
        self.calls, self.last, self.off = 0, None, False
        self.replays = 0

    def __call__(self, batches: list):
        self.calls += 1
        tensors = leaves(batches)
        key = signature(tensors) if tensors is not None else None
        if self.graph is not None and key == self.key:
            for dst, src in zip(self.inputs, tensors):
                dst.copy_(src, non_blocking=True)
            self.graph.replay()
            self.replays += 1
            return self.out
        if self.graph is None and not self.off and key is not None and self.calls > WARM and key == self.last:
            out = self._capture(batches, tensors, key)
            if out is not None:
                return out
        self.last = key
        if self.graph is None and self.calls <= WARM:  # warm-up on a side stream, as CUDA graph capture asks
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(batches)
            torch.cuda.current_stream().wait_stream(side)
            return out
        return self.step(batches)

    def _capture(self, batches: list, tensors: list[torch.Tensor], key: tuple):
        inputs = [t.clone() for t in tensors]
        it = iter(inputs)
        static = [tuple(next(it) for _ in b) if isinstance(b, (tuple, list)) else next(it) for b in batches]
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self.step(static)
        except Exception as e:  # a host read or an uncapturable op inside the step: eager from here on
            self.off = True
            torch.cuda.synchronize()
            self.reset()
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warnings.warn(f"the training step runs without a CUDA graph (its capture failed: {first})", stacklevel=2)
            return None
        self.graph, self.inputs, self.key, self.out = graph, inputs, key, out
        graph.replay()  # capture records, it does not run: this step's update happens here
        self.replays += 1
        return out
