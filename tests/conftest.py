"""Shared fixtures: tiny runs, the CLI in-process, a subprocess environment, and the shared data folder.

Every test runs in its own temporary working directory, so runs/ and data-*.png never land in the repository.
Torch uses one thread per test process: `pytest -n 2` on a 2-core machine would otherwise oversubscribe, and
the exact-resume test compares runs that must use the same number of threads.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import deeprecipe

torch.set_num_threads(1)
SRC = str(Path(list(deeprecipe.__path__)[0]).resolve().parent)  # the deeprecipe under test, for subprocesses

# a run that takes a second: fp32 on the CPU, few steps, small batches, nothing streamed through workers
TINY = [
    "train.device=cpu",
    "train.precision=fp32",
    "train.steps=4",
    "train.batch_size=16",
    "train.eval_every=0",
    "train.ckpt_every=2",
    "train.log_every=1",
    "train.eval_batch_size=256",
    "train.workers=0",
]


def sets(*overrides: str) -> list[str]:
    """['--set', a, '--set', b, ...] for the CLI."""
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster than two on a CPU shared with other jobs (a test module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def cli(capsys):
    """Run `deeprecipe ARGS` in this process: returns (exit code, stdout, stderr)."""
    from deeprecipe.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def subenv() -> dict[str, str]:
    """Environment for a `python -m deeprecipe.cli` subprocess: this source tree, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def shared_data() -> Path:
    """$DEEPRECIPE_DATA (tinyshakespeare, multi30k, ...), or skip with the reason."""
    root = os.environ.get("DEEPRECIPE_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("DEEPRECIPE_DATA is not set to the shared data folder (e.g. export DEEPRECIPE_DATA=../shared/data)")
    return Path(root)


PYTHON = sys.executable
