"""Where a model runs: the device, the autocast dtype and the process's place among data-parallel processes.

A leaf below the family contract (imports torch only), so every hook is typed `rt: Runtime`; `engine/device.py`
makes one (`setup`: device, precision and process group) and re-exports the class.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype (None: fp32)
    rank: int = 0
    world: int = 1
    why: str = ""  # how the dtype was chosen, one line (engine/device.py pick_dtype)

    @property
    def main(self) -> bool:  # only the main process writes files
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling; bf16 and fp32 do not."""
        return torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
