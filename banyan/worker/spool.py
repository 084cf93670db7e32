"""The spool's retention: job output deleted some time after the job ended, or sooner when
the disk runs low. No blocking work: `step` does a few milliseconds of it at a time.

A job's spool entries share a stem, `JOB.ATTEMPT`, in the directory of the account it ran as
(`SPOOL/ACCOUNT/`; a spool from before those directories has them at its top): its output
files `JOB.ATTEMPT.out` and `.err` (unless the job chose `--output`), its working directory
`JOB.ATTEMPT/` (unless it had a `--cwd`) and its progress file. They go together, once the
newest of them is older than the retention, or oldest first while free space is under the
minimum. Never those of a job this worker runs or whose result the broker has not
acknowledged: the broker keeps each ended attempt's last 4 KiB of output, so `banyan-logs`
still shows that tail. Anything else in the spool is left alone.

An account's directory is that account's, and its jobs may change what is in it while the
worker deletes: links are removed, never followed, and a directory is walked by descriptor
(os.fwalk), so a link swapped in for one mid-walk leads nowhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

from banyan import defaults

log = logging.getLogger("banyan.worker")

Stem = tuple[str, int, int]  # (its directory, job, attempt)
_NAME = re.compile(r"(\d+)\.(\d+)(?:\.(?:out|err|progress))?")
_FILES = (".out", ".err", ".progress")


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass(frozen=True)
class SpoolPolicy:
    retention: float = defaults.SPOOL_RETENTION  # seconds after a job's output last changed
    min_free: int = defaults.SPOOL_MIN_FREE  # bytes free on the spool's filesystem


class Spool:
    def __init__(
        self,
        path: str,
        policy: SpoolPolicy,
        free: Callable[[str], int] = free_bytes,
    ) -> None:
        self.path = path
        self.policy = policy
        self._free = free
        self._work: Iterator[None] | None = None
        self._urgent = False  # the work under way is making room
        self._next_sweep = 0.0
        self._next_check = 0.0
        self._busy: Collection[int] = ()
        self.deleted = 0  # stems deleted so far

    @property
    def urgent(self) -> bool:
        """The disk is low and room is being made: step again soon."""
        return self._work is not None and self._urgent

    def step(self, now: float, wall: float, busy: Collection[int], budget: float) -> None:
        """Go on with the spool's upkeep for about `budget` seconds at most. `now` is the
        monotonic clock (for intervals), `wall` the time files are dated by, `busy` the jobs
        whose output must stay."""
        self._busy = busy
        if now >= self._next_check:
            self._next_check = now + defaults.SPOOL_DISK_CHECK
            if not self._urgent and self._free(self.path) < self.policy.min_free:
                log.warning("spool disk low: deleting the oldest output of ended jobs")
                self._work, self._urgent = self._make_room(), True
        if self._work is None and now >= self._next_sweep:
            self._next_sweep = now + min(defaults.SPOOL_SWEEP, self.policy.retention / 2)
            self._work, self._urgent = self._expire(wall - self.policy.retention), False
        if self._work is None:
            return
        stop = time.monotonic() + budget
        for _ in self._work:
            if time.monotonic() >= stop:
                return
        self._work, self._urgent = None, False

    def _stems(self) -> Iterator[Stem | None]:
        """Each stem in the spool once, in the accounts' directories and at the top (None
        between entries, to share out the work)."""
        seen: set[Stem] = set()
        with os.scandir(self.path) as entries:
            for entry in entries:
                m = _NAME.fullmatch(entry.name)
                if m is None and entry.is_dir(follow_symlinks=False):
                    yield from _stems_in(entry.path, seen)
                    continue
                yield _stem(self.path, m, seen)

    def _newest(self, stem: Stem) -> float | None:
        """When the stem's entries last changed; None when they are all gone."""
        base = os.path.join(stem[0], f"{stem[1]}.{stem[2]}")
        times = []
        for path in (base, *(base + s for s in _FILES)):
            with contextlib.suppress(OSError):
                times.append(os.lstat(path).st_mtime)
        return max(times, default=None)

    def _expire(self, cutoff: float) -> Iterator[None]:
        for stem in self._stems():
            yield
            if stem is None or stem[1] in self._busy:
                continue
            newest = self._newest(stem)
            if newest is not None and newest < cutoff:
                yield from self._delete(stem)

    def _make_room(self) -> Iterator[None]:
        dated: list[tuple[float, Stem]] = []
        for stem in self._stems():
            yield
            if stem is not None:
                newest = self._newest(stem)
                if newest is not None:
                    dated.append((newest, stem))
        dated.sort()
        for _, stem in dated:
            if self._free(self.path) >= self.policy.min_free:
                return
            if stem[1] not in self._busy:  # as of now: a pass takes several steps
                yield from self._delete(stem)
        if self._free(self.path) < self.policy.min_free:
            log.warning("spool disk still low: nothing more of ended jobs to delete")

    def _delete(self, stem: Stem) -> Iterator[None]:
        base = os.path.join(stem[0], f"{stem[1]}.{stem[2]}")
        for suffix in _FILES:
            with contextlib.suppress(OSError):
                os.unlink(base + suffix)
        yield from _remove(base)
        self.deleted += 1


def _stems_in(path: str, seen: set[Stem]) -> Iterator[Stem | None]:
    """The stems in an account's directory (None between entries)."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                yield _stem(path, _NAME.fullmatch(entry.name), seen)
    except OSError:  # gone meanwhile
        return


def _stem(directory: str, m: re.Match[str] | None, seen: set[Stem]) -> Stem | None:
    """The stem an entry's name `m` names, the first time only."""
    stem = (directory, int(m.group(1)), int(m.group(2))) if m else None
    if stem is None or stem in seen:
        return None
    seen.add(stem)
    return stem


def _remove(path: str) -> Iterator[None]:
    """Delete a file or a whole directory tree, a yield between entries. Links are unlinked,
    never followed: os.fwalk opens each directory and checks it is the one it listed, and
    every deletion is relative to that open directory."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if not stat.S_ISDIR(mode):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    for _, dirs, files, fd in os.fwalk(path, topdown=False):
        for name in files:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=fd)
            yield
        for name in dirs:  # emptied by now, or a link fwalk did not follow
            with contextlib.suppress(OSError):
                try:
                    os.rmdir(name, dir_fd=fd)
                except NotADirectoryError:
                    os.unlink(name, dir_fd=fd)
            yield
    with contextlib.suppress(OSError):
        os.rmdir(path)
