"""Progress a job reports by writing lines like `42.5 epoch 3/10` to $BANYAN_PROGRESS_FILE."""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass

from banyan import defaults

_PROGRESS_READ = 4 * defaults.PROGRESS_MESSAGE_MAX + 64


@dataclass(frozen=True)
class ProgressReport:
    job: int
    token: int
    percent: float | None
    message: str


def parse_progress(data: bytes) -> tuple[float | None, str] | None:
    """The last complete, non-blank line of a progress file: `42.5 epoch 3/10` → (42.5, ...).

    A line still being written (no newline yet) is ignored, so a reader racing `echo 5 > f`
    never sees half a value.
    """
    lines = data.split(b"\n")[:-1]
    for raw in reversed(lines):
        line = "".join(c if c.isprintable() else " " for c in raw.decode("utf-8", "replace"))
        line = line.strip()
        if line:
            break
    else:
        return None
    head, _, rest = line.partition(" ")
    try:
        value = float(head.removesuffix("%"))
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        return None, line[: defaults.PROGRESS_MESSAGE_MAX]
    return min(100.0, max(0.0, value)), rest.strip()[: defaults.PROGRESS_MESSAGE_MAX]


class ProgressWatch:
    """Reads a job's progress file only when it changed, at most once per interval. The file
    is in its owner's directory: only a regular file of `uid` (-1: anyone's) is read, never
    what a link there points to, so a job cannot show others a file only root may read."""

    def __init__(self, path: str, now: float, uid: int = -1) -> None:
        self.path = path
        self.uid = uid
        self.next_check = now
        self.seen: tuple[int, int] | None = None  # (mtime_ns, size) last read
        self.last: tuple[float | None, str] | None = None  # last value reported

    def check(self, now: float) -> tuple[float | None, str] | None:
        if now < self.next_check:
            return None
        self.next_check = now + defaults.PROGRESS_INTERVAL
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or self.uid not in (-1, st.st_uid):
                return None
            if (st.st_mtime_ns, st.st_size) == self.seen:
                return None
            self.seen = (st.st_mtime_ns, st.st_size)
            offset = max(0, st.st_size - _PROGRESS_READ)
            data = os.pread(fd, _PROGRESS_READ, offset)
        except OSError:
            return None
        finally:
            os.close(fd)
        if offset > 0:
            # The window starts mid-line: only lines after its first newline are whole.
            data = data.partition(b"\n")[2]
        value = parse_progress(data)
        if value is None or value == self.last:
            return None
        self.last = value
        return value
