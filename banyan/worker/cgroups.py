"""One cgroup (v2) per job, where the kernel lets the worker make them.

No process leaves its cgroup by forking, setsid, double forks or clearing its environment, so
a job's cgroup holds exactly the job's processes, and `cgroup.kill` ends them all at once with
no window for a fork to slip through. The worker makes `banyan-NONCE` under its own cgroup and
one child per attempt. The job starts inside it (launcher.py) where moving a process is slow;
elsewhere the job's shell moves itself in before it runs anything.

Where there is no writable cgroup2 hierarchy (cgroup v1 only, no permission, a container
without delegation) `Cgroups.make` says None, and the runner relies on sessions, the marker
variable and the subreaper alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import time

_ROUNDS = 20  # kill rounds without cgroup.kill (kernels before 5.14): forks race the kill
# A worker's own cgroup: `banyan-` and the runner's nonce, its pid and 8 hex digits.
_WORKER_CGROUP = re.compile(r"banyan-(\d+)-[0-9a-f]{8}")


def _hierarchy() -> str | None:
    """The directory of this process's own cgroup in the cgroup2 hierarchy, if mounted."""
    found = _mount()
    return found[0] if found else None


def _mount() -> tuple[str, str, list[str]] | None:
    """This process's cgroup2 directory, and the mount point and options of its hierarchy."""
    try:
        with open("/proc/self/cgroup") as f:
            own = next((line[3:].strip() for line in f if line.startswith("0::")), None)
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    if own is None:
        return None
    for fields in mounts:
        sep = fields.index("-") if "-" in fields else -1
        if sep < 0 or fields[sep + 1] != "cgroup2":
            continue
        root, point = fields[3], fields[4]
        if own == root or own.startswith(root.rstrip("/") + "/"):
            return point + own[len(root.rstrip("/")) :], point, fields[sep + 3].split(",")
    return None


def remount_hint(features: str = "/sys/kernel/cgroup/features") -> str | None:
    """The command that makes moves into cgroups cheap, if the kernel (6.0 and later) offers
    `favordynmods` and the cgroup2 hierarchy is mounted without it. Without it a move waits
    for an RCU grace period (10-40 ms when the machine was idle); with it, ~0.2 ms."""
    found = _mount()
    try:
        with open(features) as f:
            offered = "favordynmods" in f.read().split()
    except OSError:
        return None
    if found is None or not offered or "favordynmods" in found[2]:
        return None
    return f"mount -o remount,favordynmods {found[1]}"


def move_time(base: str) -> float | None:
    """Seconds one move of a process into a cgroup under `base` takes here, measured on a
    throwaway `sleep`; None if it could not be measured."""
    probe = os.path.join(base, "probe")
    try:
        os.mkdir(probe)
        pid = os.posix_spawn("/bin/sleep", ["sleep", "60"], {}, setsid=True)
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(probe)
        return None
    try:
        started = time.perf_counter()
        with open(os.path.join(probe, "cgroup.procs"), "w") as f:
            f.write(str(pid))
        return time.perf_counter() - started
    except OSError:
        return None
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            os.rmdir(probe)


class Cgroups:
    """The worker's `banyan-NONCE` cgroup and one child per attempt."""

    def __init__(self, base: str) -> None:
        self.base = base

    @classmethod
    def make(cls, nonce: str) -> Cgroups | None:
        own = _hierarchy()
        if own is None:
            return None
        stale = remove_stale(own)
        if stale:
            logging.getLogger("banyan.worker").info(
                "removed %d empty cgroups of workers that are gone", len(stale)
            )
        base = os.path.join(own, f"banyan-{nonce}")
        try:
            os.mkdir(base)
        except OSError:
            return None
        return cls(base)

    def create(self, job: int, token: int) -> str | None:
        path = os.path.join(self.base, f"job-{job}-{token}")
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except OSError:
            return None
        return path

    def close(self) -> None:
        """Kill whatever is left in any job's cgroup and remove them all (worker exit)."""
        kill(self.base)
        remove(self.base)


def remove_stale(parent: str) -> list[str]:
    """Remove the empty cgroups that workers killed outright left under `parent`.

    A worker's watchdog removes its cgroups when the worker dies, but gives up while zombies of
    its jobs keep them populated. Only `banyan-PID-NONCE` cgroups whose PID no longer runs are
    touched, and only if empty: a populated one may still be in its watchdog's hands. (Workers
    that share a cgroup are taken to share a PID namespace.)
    """
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        found = _WORKER_CGROUP.fullmatch(name)
        if found is None or _running(int(found[1])):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and remove(path):
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's, alive
    return True


def join_script(path: str) -> str:
    """Shell that moves the job's shell into its cgroup before anything else runs; silent if
    the kernel refuses (the job then runs without)."""
    return f"{{ echo $$ > {shlex.quote(os.path.join(path, 'cgroup.procs'))}; }} 2>/dev/null; "


def members(path: str) -> list[int]:
    """Pids in the cgroup (not in its children)."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def populated(path: str) -> bool:
    """Whether any process is in the cgroup or below it (True when that cannot be read)."""
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            return "populated 0" not in f.read()
    except OSError:
        return True


def kill(path: str) -> None:
    """SIGKILL every process in the cgroup and below it."""
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
        return
    except OSError:
        pass
    for _ in range(_ROUNDS):
        pids = [p for d, _, _ in os.walk(path) for p in members(d)]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def remove(path: str) -> bool:
    """Remove the cgroup and its children, deepest first; False while processes remain."""
    try:
        os.rmdir(path)  # the usual case: one empty cgroup, no children
        return True
    except FileNotFoundError:
        return True
    except OSError:
        pass
    for d, _, _ in sorted(os.walk(path), key=lambda w: -w[0].count(os.sep)):
        try:
            os.rmdir(d)
        except FileNotFoundError:
            continue
        except OSError:
            return False
    return True
