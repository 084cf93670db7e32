"""One broker per state directory. LMDB lets several processes open one store, and a second
broker would take the first one's workers for lost, requeue their jobs and fence them: so
each broker holds an exclusive lock on `broker.lock` in its state directory for as long as it
runs, and one that cannot take it refuses to start, naming the holder."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StateInUse(OSError):
    """Another live broker holds this state directory."""


def take(state_dir: Path) -> int:
    """Lock the state directory; the descriptor that holds the lock (the kernel lets it go when
    the process ends, however it ends)."""
    path = state_dir / "broker.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StateInUse(
            f"{state_dir} is in use by another broker (pid {holder}): one broker per state "
            "directory; stop that one first, or give this one its own --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
