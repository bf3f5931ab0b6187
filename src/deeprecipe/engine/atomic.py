"""Files of a run folder written atomically: to a temporary name `.NAME.tmp<PID>` beside the target, fsynced, then
renamed onto it (and the folder fsynced), so a crash or a full disk at any moment leaves the previous file whole.
engine/run.py's clean_temporaries removes the temporaries of writers that died."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename in folder `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync it, then rename onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text))
