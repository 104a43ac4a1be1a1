"""One run per run folder: an exclusive lock on ``RUN/.lock`` for the life of the run.

The main process takes an ``flock`` on the file (the OS releases it when the process dies,
so a run killed with ``kill -9`` leaves no stale lock) and writes its pid and host into it.
A second run naming the same ``output_dir`` is refused with the holder's pid and host. This
also covers the workers of a killed ``accelerate launch``, which start in a session of their
own and keep running: while they live, their folder stays theirs.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from ..errors import UserError

LOCK_NAME = ".lock"
_HELD: dict[Path, int] = {}  # run folders this process holds: one process may run again there


class RunLocked(UserError):
    """Another live process holds the run folder."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``RunLocked`` naming the holder (never waits). A process
        that holds it already (an earlier run in the same process) keeps it."""
        key = self.path.resolve()
        if key in _HELD:
            self._fd = _HELD[key]
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(
                f"output_dir={str(self.path.parent)!r} is in use by another run (pid "
                f"{holder.get('pid', '?')} on host {holder.get('host', '?')}): wait for it to "
                "end or stop it, or choose another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        os.fsync(fd)
        self._fd = _HELD[key] = fd

    def release(self) -> None:
        if self._fd is not None:
            _HELD.pop(self.path.resolve(), None)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
