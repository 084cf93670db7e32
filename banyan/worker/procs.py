"""Processes as the worker sees them: one pass over /proc, markers, signals, reaping.

A job's processes are found by session and group, by descent, and by the `BANYAN_MARKER`
variable in their environment (see runner.py); the watchdog uses the same table and markers.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections import defaultdict
from collections.abc import Iterable
from typing import NamedTuple

MARKER_VAR = "BANYAN_MARKER"
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class Stat(NamedTuple):
    ppid: int
    pgid: int
    sid: int
    start: int  # boot-relative start time: tells a process from a later one with its pid
    zombie: bool


NOBODY = Stat(0, 0, 0, 0, True)


class ProcTable:
    """One pass over /proc: who is whose child, in which group and session."""

    def __init__(self) -> None:
        self.procs: dict[int, Stat] = {}
        self.children: dict[int, list[int]] = defaultdict(list)
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    data = f.read()
                rest = data[data.rindex(b")") + 2 :].split()
                st = Stat(int(rest[1]), int(rest[2]), int(rest[3]), int(rest[19]), rest[0] in b"ZX")
            except (OSError, ValueError, IndexError):
                continue
            self.procs[int(name)] = st
            self.children[st.ppid].append(int(name))

    def subtree(self, roots: Iterable[int]) -> set[int]:
        """Living processes among roots and their descendants."""
        seen: set[int] = set()
        todo = [pid for pid in roots if pid in self.procs]
        while todo:
            pid = todo.pop()
            if pid not in seen:
                seen.add(pid)
                todo.extend(self.children.get(pid, ()))
        return {pid for pid in seen if not self.procs[pid].zombie}


def exited_children(pid: int) -> list[tuple[int, int]] | None:
    """(pid, session) of each child of process `pid` that has exited and awaits reaping, from
    /proc/PID/task/*/children: a few small reads, not a pass over /proc. None where the
    kernel does not list children (built without CONFIG_PROC_CHILDREN)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    kids: list[bytes] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                kids += f.read().split()
        except FileNotFoundError:
            if tid == str(pid):  # the main thread has no such file: the kernel lacks it
                return None
        except OSError:
            continue  # a thread that ended meanwhile
    exited = []
    for kid in kids:
        try:
            with open(b"/proc/%s/stat" % kid, "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if rest and rest[0] in b"ZX":
            exited.append((int(kid), int(rest[3])))
    return exited


def marker_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = b"\0" + f.read()
    except OSError:
        return None
    key = b"\0" + MARKER_VAR.encode() + b"="
    start = env.find(key)
    if start < 0:
        return None
    start += len(key)
    end = env.find(b"\0", start)
    return env[start : end if end >= 0 else len(env)].decode("utf-8", "replace")


def signal_group(pgid: int, sig: int) -> bool:
    """Signal a process group; False when it no longer has members (ESRCH means gone)."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def alive(pid: int, start: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
        return int(rest[19]) == start and rest[0] not in b"ZX"
    except (OSError, IndexError, ValueError):
        return False


def peek_exit(pid: int) -> tuple[int | None, int | None] | None:
    """(exit code, signal) of an exited child, left unreaped; None while it runs."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None, None  # someone else reaped it: ended, status unknown
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        return info.si_status, None
    return None, info.si_status


def reap_some(target: int) -> bool:
    """Reap exited children: a pid, or a process group as -pgid. False once none is left."""
    while True:
        try:
            pid, _ = os.waitpid(target, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
        if target > 0:
            return False
