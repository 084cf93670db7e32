"""The worker's dead-man switch: when the worker dies, however it dies, its jobs die with it.

Jobs run in sessions of their own, so a worker killed with SIGKILL (or by the OOM killer)
would leave them running unseen while the broker requeues them elsewhere: two runs at once,
and processes nobody will ever stop. So the worker starts this small process with a pipe only
the worker holds open. The pipe reads end-of-file the moment the worker is gone, and the
watchdog then kills everything in the worker's job cgroups (where it has them), and every
process carrying the worker's job marker, with the sessions those processes lead and their
descendants. After a clean exit there is nothing left to kill.

    python -m banyan.worker.watchdog NONCE [CGROUP]   (stdin: the worker's pipe)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

from banyan.worker import cgroups
from banyan.worker.procs import ProcTable, marker_of

log = logging.getLogger("banyan.worker.watchdog")

ROUNDS = 50  # a job forking while it is killed needs another look; bounded all the same
PAUSE = 0.02


def start(nonce: str, cgroup: str | None) -> tuple[subprocess.Popen[bytes], int]:
    """Start the watchdog for jobs marked `nonce:...` and the cgroups under `cgroup`; returns
    it and the pipe end to keep."""
    read, write = os.pipe()  # both close on exec: jobs never hold the worker's end
    argv = [sys.executable, "-m", "banyan.worker.watchdog", nonce, *([cgroup] if cgroup else [])]
    try:
        # A session of its own: a signal to the worker's whole group does not take it along.
        proc = subprocess.Popen(argv, stdin=read, close_fds=True, start_new_session=True)
    finally:
        os.close(read)
    return proc, write


def kill_marked(nonce: str) -> int:
    """SIGKILL every process of the jobs marked `nonce:...`; returns how many were killed."""
    prefix = nonce + ":"
    mine = {os.getpid(), os.getppid()}
    my_sid = os.getsid(0)
    killed: set[int] = set()
    for _ in range(ROUNDS):
        table = ProcTable()
        marked = set()
        for pid, st in table.procs.items():
            if not st.zombie and pid not in mine and (marker_of(pid) or "").startswith(prefix):
                marked.add(pid)
        sessions = {table.procs[p].sid for p in marked} - {my_sid, 0}
        members = {p for p, st in table.procs.items() if st.sid in sessions}
        doomed = table.subtree(marked | members) - mine
        if not doomed:
            break
        for sid in sessions:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(sid, signal.SIGKILL)
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed |= doomed
        time.sleep(PAUSE)
    return len(killed)


def main() -> int:
    # The worker's terminal may signal its whole group; only the pipe says the worker is gone.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    nonce, cgroup = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
    while os.read(0, 4096):
        pass
    if cgroup:
        cgroups.kill(cgroup)
    killed = kill_marked(nonce)
    if killed:
        log.warning("the worker is gone: killed %d processes of its jobs", killed)
    if cgroup:
        for _ in range(ROUNDS):  # empty once its processes have exited
            if cgroups.remove(cgroup):
                break
            time.sleep(PAUSE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
