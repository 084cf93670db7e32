"""Scenarios 2, 4 and 7: a worker killed mid-job, a worker frozen past the liveness window,
and jobs that try to outlive their cancel."""

from __future__ import annotations

import signal
import statistics
import time
from pathlib import Path

from tests.cluster import HEARTBEAT, LIVENESS, Cluster, scaled, wait_for
from tests.faults.conftest import Summary
from tests.faults.harness import JobLog, Run, audit, job_processes, size

WINDOW = HEARTBEAT * LIVENESS


def runs_of(log: JobLog, worker: str, count: int) -> list[Run]:
    runs = [r for r in log.runs() if r.worker == worker and r.end is None]
    return runs if len(runs) >= count else []


def gone_at(root: Path, worker: str, timeout: float) -> float:
    """Wall-clock time at which no process of `worker`'s jobs is left (bounded wait)."""

    def on_worker() -> list[int]:
        spool = str(root / "spool" / worker) + "/"
        procs = []
        for p in job_processes(root):
            try:
                if p.environ().get("BANYAN_PROGRESS_FILE", "").startswith(spool):
                    procs.append(p.pid)
            except Exception:
                continue
        return procs

    wait_for(lambda: not on_worker(), timeout, interval=0.01, what=f"{worker}'s jobs to die")
    return time.time()


def test_worker_crash(fleet: Cluster, summary: Summary) -> None:
    """2. `kill -9` a worker mid-job: its jobs run to completion elsewhere without spending a
    retry, and nothing of theirs survives the worker."""
    t0 = time.monotonic()
    n = int(size(16, 4))
    log = JobLog(fleet.root / "jobs.log")
    fleet.start_broker()
    fleet.start_worker("w1", cpus=n)
    c = fleet.client()
    ids = c.submit(jobs=[{"command": log.command("sleep 2")} for _ in range(n)]).jobs
    first = wait_for(lambda: runs_of(log, "w1", n), 20, what="every job to start on w1")
    fleet.start_worker("w2", cpus=n)
    killed = time.time()
    fleet.kill("w1")
    ends = {(r.job, r.attempt): gone_at(fleet.root, "w1", WINDOW + 5) for r in first}
    reruns = wait_for(lambda: runs_of(log, "w2", n), WINDOW + 20, what="every job on w2")
    delays = [r.start - killed for r in reruns]
    a = audit(c, "2 worker crash", log, ids, n, fleet.root, ends=ends)
    a.row.seconds = time.monotonic() - t0
    a.row.note = (
        f"kill -> rerun: median {statistics.median(delays):.2f} s, max {max(delays):.2f} s "
        f"(liveness window {WINDOW:g} s); old runs gone {max(ends.values()) - killed:.2f} s "
        "after the kill"
    )
    summary.add(a.row)
    a.check()
    for job_id in ids:
        history = a.jobs[job_id]["history"]
        assert [h["outcome"] for h in history] == ["lost", "success"], history
        assert a.jobs[job_id]["max_attempts"] == 1  # the lost run did not spend the one try
    assert max(delays) < scaled(WINDOW + 3)
