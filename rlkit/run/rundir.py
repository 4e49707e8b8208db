"""The run directory: one run at a time in it, and a path that can be one.

A run holds an exclusive lock on `RUN_DIR/.rlkit.lock` (fcntl.flock) from before it looks at
the directory until it ends, so a second run on the same directory fails at once, naming the
first one's process, instead of both starting and the second deleting the first's metrics. The
kernel drops the lock when the process dies, however it dies: a stale lock file is harmless.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from rlkit.api.errors import RlkitError

LOCK_NAME = ".rlkit.lock"


class RunDirError(RlkitError):
    """The run directory cannot be used: taken by another run, or not a directory."""


class RunLock:
    """The lock on a run directory, held until `release` (or the process's end)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 64).decode(errors="replace").strip() or "unknown"
            self.release()
            raise RunDirError(
                f"{run_dir} is in use by another run (process {holder}, lock {self.path}); "
                "wait for it to end, or choose another hydra.run.dir"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def check_dir_path(key: str, path: str | Path) -> None:
    """A RunDirError when `path` (the value of `key`) or one of its parents exists and is not a
    directory: Hydra would fail creating it with a traceback."""
    path = Path(path).expanduser()
    for part in [path, *path.parents]:
        if part.exists() and not part.is_dir():
            where = "" if part == path else f" (its parent {part} is a file)"
            raise RunDirError(f"{key}={path} cannot be a run directory: it is a file{where}")
