"""Scenarios 2 and 7: a worker killed mid-job, and jobs that try to outlive their cancel."""

from __future__ import annotations

import shlex
import shutil
import statistics
import time
from pathlib import Path

from tests.cluster import (
    HEARTBEAT,
    LIVENESS,
    Cluster,
    have_cgroups,
    scaled,
    shrunk,
    wait_for,
)
from tests.faults.conftest import Summary
from tests.faults.harness import JobLog, audit, gone_at, job_processes, runs_of, size

WINDOW = HEARTBEAT * LIVENESS


def test_worker_crash(fleet: Cluster, summary: Summary) -> None:
    """2. `kill -9` a worker mid-job: its jobs run to completion elsewhere without spending a
    retry, and nothing of theirs survives the worker."""
    t0 = time.monotonic()
    n = int(size(16, 4))
    log = JobLog(fleet.root / "jobs.log")
    fleet.start_broker()
    fleet.start_worker("w1", cpus=n)
    c = fleet.client()
    # The first run would outlive the test unless the worker's death takes it along.
    body = 'if [ "$BANYAN_ATTEMPT" = 1 ]; then sleep 600; else sleep 1; fi'
    ids = c.submit(jobs=[{"command": log.command(body)} for _ in range(n)]).jobs
    first = wait_for(lambda: runs_of(log, "w1", n), 20, what="every job to start on w1")
    fleet.start_worker("w2", cpus=n)
    killed = time.time()
    fleet.kill("w1")
    gone = gone_at(fleet.root, "w1", WINDOW + 5)
    ends = {(r.job, r.attempt): gone for r in first}
    reruns = wait_for(lambda: runs_of(log, "w2", n), WINDOW + 20, what="every job on w2")
    delays = [r.start - killed for r in reruns]
    a = audit(c, "2 worker crash", log, ids, n, fleet.root, ends=ends)
    a.row.seconds = time.monotonic() - t0
    a.row.note = (
        f"kill -> rerun: median {statistics.median(delays):.2f} s, max {max(delays):.2f} s "
        f"(liveness window {WINDOW:g} s); old runs gone {gone - killed:.2f} s "
        "after the kill"
    )
    summary.add(a.row)
    a.check()
    for job_id in ids:
        history = a.jobs[job_id]["history"]
        assert [h["outcome"] for h in history] == ["lost", "success"], history
        assert a.jobs[job_id]["max_attempts"] == 1  # the lost run did not spend the one try
    assert max(delays) < scaled(WINDOW + 3)


def hostile(sleeper: Path, started: Path, cleared: bool) -> str:
    """A job that ignores SIGTERM and hides: a tree of grandchildren in its own group, a child in
    a session of its own, a double-forked daemon, and (`cleared`) one that also clears its
    environment, which only a cgroup can still tell apart.

    Every long-lived process is `sleeper`, a link to sleep(1) whose path names the scenario, so
    the test can find each one however well it hid. SIGTERM stays ignored across exec."""
    s = shlex.quote(str(sleeper))
    lines = [
        "trap '' TERM",
        f"for i in 1 2 3; do ( for j in 1 2; do {s} 1000 & done; wait ) & done",
        f"setsid {s} 1000 &",
        f'setsid sh -c "{s} 1000 & exit" &',
        f'env -i setsid sh -c "{s} 1000 & exit" &' if cleared else "",
        f"touch {shlex.quote(str(started))}",
        "wait",
    ]
    return "\n".join(lines)


def test_hostile_jobs(fleet: Cluster, summary: Summary) -> None:
    """7. Cancel jobs that fork trees, ignore SIGTERM and escape their process group and
    session (setsid, double fork, cleared environment): every process is gone once
    `cancel_grace` has passed."""
    t0 = time.monotonic()
    n = int(size(6, 2))
    grace = 1.0
    cleared = have_cgroups()
    if not cleared:
        shrunk("without a cgroup2 hierarchy the env -i escapee is left out")
    expected = 3 * 2 + 2 + cleared  # sleepers per job: the tree, setsid, double fork, env -i
    hides = "tree, setsid, double fork" + (", env -i" if cleared else "; no cgroup2 here")
    sleeper = fleet.root / "hostile-sleep"
    sleeper.symlink_to(shutil.which("sleep") or "/bin/sleep")
    log = JobLog(fleet.root / "jobs.log")
    fleet.start_broker()
    fleet.start_worker("w1", cpus=n)
    c = fleet.client()
    flags = [fleet.root / f"started-{i}" for i in range(n)]
    jobs = [
        {"command": log.command(hostile(sleeper, f, cleared)), "cancel_grace": grace} for f in flags
    ]
    ids = c.submit(jobs=jobs).jobs

    def hiding() -> list[int]:
        return [p.pid for p in job_processes(fleet.root) if str(sleeper) in p.info["cmdline"]]

    wait_for(lambda: all(f.exists() for f in flags), 20, what="every hostile job to start")
    wait_for(lambda: len(hiding()) >= n * expected, 10, what="every process to hide")
    escaped = len(hiding())
    cancelled = time.monotonic()
    c.cancel(ids)
    wait_for(lambda: not hiding(), grace + 10, interval=0.01, what="every hostile process gone")
    gone = time.monotonic() - cancelled
    a = audit(c, "7 hostile jobs", log, ids, n, fleet.root, ends={})
    a.row.seconds = time.monotonic() - t0
    a.row.note = (
        f"{escaped} processes ({expected} per job: {hides}) ignoring "
        f"SIGTERM, all gone {gone:.2f} s after the cancel (cancel_grace {grace:g} s); "
        f"{a.outcomes['cancelled']} jobs cancelled"
    )
    summary.add(a.row)
    a.check()
    assert a.outcomes == {"cancelled": n}
    assert grace <= gone < grace + scaled(1.5)
