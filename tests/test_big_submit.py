"""Big submissions against a real broker (SPEC §6): made a slice at a time while the broker
keeps answering, seen only whole, and finished by a broker restarted after a kill -9."""

from __future__ import annotations

import time
from pathlib import Path

from banyan import defaults, protocol
from banyan.broker.store import Store
from banyan.client import Client
from tests.cluster import Cluster, pinging, scaled, wait_for

MIB = 1 << 20


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def _submitted_since(client: Client, since: int) -> int:
    """How many `submitted` events the log has from `since` on."""
    n = 0
    for _ in range(1000):
        page, since = client.events(since, defaults.EVENTS_LIMIT)
        n += sum(1 for e in page if e[5] == "submitted")
        if len(page) < defaults.EVENTS_LIMIT:
            return n
    raise AssertionError("the event log did not end")


def test_a_100000_job_array_keeps_the_broker_answering(cluster: Cluster) -> None:
    """A client pinging every 50 ms meanwhile is answered within 200 ms each time (the array
    held the loop for seconds); a status asked meanwhile waits, and sees every job; the
    broker's memory grows by tens of MiB, not hundreds."""
    n = 100_000
    pid = cluster.procs["broker"].pid
    head = cluster.client().events_head()
    before = _peak_rss(pid)
    with pinging(cluster) as latencies:
        started = time.monotonic()
        submitter = cluster.client()
        body = {"jobs": [{"command": "echo {}", "name": "big-{}", "hold": True}], "array": f"1-{n}"}
        submitter.sock.send(protocol.encode("submit", body, 7))
        watcher = cluster.client(timeout=1)
        wait_for(lambda: watcher.events(head, 1)[0], what="the first jobs")
        seen = cluster.client(timeout=1).status(limit=1)  # waited for past its timeout
        assert submitter.sock.poll(int(scaled(60) * 1000)), "no reply to the submit"
        reply = protocol.decode(submitter.sock.recv(), protocol.CLIENT_REPLIES)
        took = time.monotonic() - started
    assert reply.type == "submitted", reply.body
    ids = reply.body["jobs"]
    assert ids == list(range(ids[0], ids[0] + n))
    assert reply.body["groups"] == {f"array-{ids[0]}": reply.body["groups"][f"array-{ids[0]}"]}
    assert (seen.matched, seen.counts) == (n, {"inactive": n})
    assert _submitted_since(watcher, head) == n
    assert len(latencies) >= took / 0.25, "the pinger stalled"
    assert max(latencies) < scaled(0.2), f"slowest ping {max(latencies):.3f} s in {took:.1f} s"
    grown = _peak_rss(pid) - before
    assert grown < 160 * MIB, f"the broker's peak memory grew by {grown / MIB:.0f} MiB"


def test_a_submission_killed_in_the_middle_is_finished_after_restart(cluster: Cluster) -> None:
    """kill -9 while the jobs are being made: the restarted broker makes the rest, each job
    once, and the same submission again (its submit key) gets the same ids."""
    n = 60_000
    watcher = cluster.client()
    head = watcher.events_head()
    submitter = cluster.client()
    jobs = [{"command": "echo {}", "hold": True, "groups": ["big"]}]
    groups = [{"name": "big"}]
    body = {"jobs": jobs, "groups": groups, "array": f"1-{n}", "submit_key": "nightly"}
    submitter.sock.send(protocol.encode("submit", body, 1))
    wait_for(lambda: watcher.events(head, 1)[0], what="the first jobs")
    cluster.kill("broker")
    with Store(cluster.state_dir) as store, store.read() as tx:
        made = tx.state_counts()["inactive"]
        assert len(tx.ops()) == 1
    assert 0 < made < n, f"{made} jobs made before the kill; nothing was tested"
    cluster.start_broker()
    client = cluster.client(timeout=30)
    # The same submission again, as a client that saw no reply would send it: answered with
    # the same ids once they all exist.
    again = client.submit(jobs=jobs, groups=groups, array=f"1-{n}", submit_key="nightly")
    assert _submitted_since(client, head) == n  # each once, and all before that reply
    assert again.jobs == list(range(again.jobs[0], again.jobs[0] + n))
    status = client.status(group="big", limit=1)
    assert status.groups[0]["counts"] == {"inactive": n} and status.groups[0]["total"] == n
    assert status.matched == n and status.jobs[0].id == again.jobs[-1]
    assert client.status(all=True, limit=1).matched == n  # nothing made twice
    assert "resuming submit operation" in cluster.log("broker")
