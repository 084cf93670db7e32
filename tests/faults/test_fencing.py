"""Scenarios 3 and 4: a worker cut off past the liveness window, by a real network partition
between namespaces or by SIGSTOP, then let back.

Its jobs are requeued elsewhere without spending a retry; when it returns, the results it
kept are refused by token and the runs it still has are killed (SPEC §5 fencing); nothing
succeeds twice. While it is away its jobs keep running, as SPEC §5 asks of a worker that loses
the broker, so a job may run on both sides for that long: SPEC §7 allows this rerun, and the
audit checks that every such overlap pairs a fenced (lost) run with its successor.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from tests.cluster import HEARTBEAT, LIVENESS, Cluster, cannot_run, wait_for
from tests.faults.conftest import Summary
from tests.faults.harness import JobLog, Row, audit, gone_at, overlapping, runs_of, size
from tests.faults.netns import NetnsUnavailable, Network

WINDOW = HEARTBEAT * LIVENESS
# The first run ends while cut off (a late result) or is still running when let back.
SHORT, LONG = 1.0, 600.0


def first_run(seconds: float) -> str:
    """Sleep that long on the first attempt; a rerun is quick."""
    return f'if [ "$BANYAN_ATTEMPT" = 1 ]; then sleep {seconds:g}; else sleep 0.5; fi'


FENCED = re.compile(r"job (\d+) token \d+ is not ours any more")


def fence_scenario(
    fleet: Cluster,
    summary: Summary,
    scenario: str,
    isolate: Callable[[], None],
    heal: Callable[[], None],
) -> None:
    t0 = time.monotonic()
    half = int(size(8, 2))
    n = 2 * half
    log = JobLog(fleet.root / "jobs.log")
    fleet.start_broker()
    fleet.start_worker("w1", cpus=n, tags=("w1",))
    c = fleet.client()
    jobs = [{"command": log.command(first_run(d))} for d in [SHORT] * half + [LONG] * half]
    ids = c.submit(jobs=jobs).jobs
    wait_for(lambda: runs_of(log, "w1", n), 20, what="every job to start on w1")
    fleet.start_worker("w2", cpus=n)
    cut = time.time()
    isolate()
    reruns = wait_for(lambda: runs_of(log, "w2", n), WINDOW + 20, what="every job on w2")
    # Away past the window, and until the short runs on w1 have ended: results it must keep.
    wait_for(
        lambda: (
            time.time() > cut + SHORT + 0.5
            and len([r for r in log.runs() if r.worker == "w1" and r.end]) >= half
        ),
        SHORT + 10,
        what="w1's short runs to end",
    )
    away = time.time() - cut
    heal()
    healed = time.time()
    stale_gone = gone_at(fleet.root, "w1", 30) - healed
    wait_for(lambda: len(fenced(fleet)) >= n, 30, what="w1 to be told about every attempt")
    # Back in service: a job only w1 can run.
    ids += c.submit(log.command(), tags=["w1"]).jobs
    a = audit(c, scenario, log, ids, n + 1, fleet.root, ends={})
    a.row.seconds = time.monotonic() - t0
    late = [r for r in a.runs if r.worker == "w1" and r.end is not None and r.job != ids[-1]]
    rerun = max(r.start for r in reruns) - cut
    a.row.note = (
        f"away {away:.1f} s (window {WINDOW:g} s); rerun on w2 {rerun:.2f} s after the cut; "
        f"{len(late)} late results refused; stale runs killed "
        f"{stale_gone:.2f} s after it came back"
    )
    summary.add(a.row)
    for job_id in overlapping(a.runs):
        first = a.jobs[job_id]["history"][0]
        assert first["worker"] == "w1" and first["outcome"] == "lost", first
    a.check(allow_concurrent=True)
    assert [h["worker"] for h in a.jobs[ids[-1]]["history"]] == ["w1"]
    for job_id in ids[:-1]:
        history = a.jobs[job_id]["history"]
        assert [(h["worker"], h["outcome"]) for h in history] == [
            ("w1", "lost"),
            ("w2", "success"),
        ], history
    assert len(late) == half
    assert fenced(fleet) == set(ids[:-1])


def fenced(fleet: Cluster) -> set[int]:
    return {int(m.group(1)) for m in FENCED.finditer(fleet.log("w1"))}


@pytest.fixture
def network(fleet: Cluster, summary: Summary) -> Iterator[Network]:
    net = Network(["w1", "w2"])
    try:
        net.open()
    except NetnsUnavailable as e:
        summary.add(Row("3 partition (netns)", note=f"SKIPPED: no network namespaces here: {e}"))
        cannot_run(f"network namespaces are unavailable here: {e}")
    try:
        fleet.host = net.broker_for_clients
        fleet.broker_args = ["--bind", "0.0.0.0"]
        fleet.prefix = {"broker": net.prefix(net.broker)}
        for name, ns in net.workers.items():
            fleet.prefix[name] = net.prefix(ns)
            fleet.worker_hosts[name] = net.broker_for(name)
        yield net
    finally:
        fleet.stop()
        net.close()


def test_partition(fleet: Cluster, network: Network, summary: Summary) -> None:
    """3. Broker and workers in their own network namespaces; w1's link is cut past the
    liveness window, then restored."""
    fence_scenario(
        fleet,
        summary,
        "3 partition (netns)",
        lambda: network.cut("w1"),
        lambda: network.restore("w1"),
    )


def test_sigstop(fleet: Cluster, summary: Summary) -> None:
    """4. w1 frozen with SIGSTOP past the liveness window, then SIGCONT."""
    fence_scenario(
        fleet,
        summary,
        "4 worker SIGSTOP/SIGCONT",
        lambda: fleet.kill("w1", signal.SIGSTOP),
        lambda: fleet.kill("w1", signal.SIGCONT),
    )
