"""Cascades (cascade.py) against a real broker (SPEC §4, §6): one job's end settles tens of
thousands of dependents a slice at a time, while the broker answers pings and workers; a status
asked meanwhile sees all of it or none; the result that started it is acknowledged; a broker
killed in the middle finishes it after a restart. And on the pure state machine: settled a few
at a time, dependents end exactly as settled at once, and a deep chain does too."""

from __future__ import annotations

import time
from pathlib import Path

from banyan import defaults, protocol
from banyan.broker.state import Config
from banyan.broker.store import Store
from banyan.client import Client
from tests.cluster import Cluster, pinging, scaled, wait_for
from tests.statekit import ALICE, Harness, after, spec

# Dependents: a cascade of this many held the broker's loop for about a second at once.
N = 30_000


def _changes(client: Client, since: int, to: str) -> int:
    """How many state changes to `to` the event log has from `since` on."""
    n = 0
    for _ in range(10_000):
        page, since = client.events(since, defaults.EVENTS_LIMIT)
        n += sum(1 for e in page if e[4] == to)
        if len(page) < defaults.EVENTS_LIMIT:
            return n
    raise AssertionError("the event log did not end")


def _reason(client: Client, job: int) -> str:
    (info,) = client.status([job], detail=True).jobs
    return str(info.raw.get("cancel_reason") or info.raw)


def _dependents(client: Client, parent: int, kind: str) -> tuple[str, int]:
    """N jobs that depend on `parent` (an array); returns their group's name and last id."""
    deps = [{"kind": kind, "job": parent}]
    ids = client.submit("true", array=f"1-{N}", depends_on=deps, name="dep-{}").jobs
    assert len(ids) == N
    return f"array-{ids[0]}", ids[-1]


def test_a_cancel_that_cascades_keeps_the_broker_answering(cluster: Cluster) -> None:
    """Cancelling one running job cancels its N `after` dependents: the cancel is answered,
    pings every 50 ms are answered within 200 ms throughout (the cascade held the loop for
    about a second), and a status sent while the cascade is under way waits for it and sees
    every dependent cancelled; so does a wait whose timeout runs out meanwhile, and a
    submission that depends on one of them."""
    cluster.start_worker("w")
    client = cluster.client(timeout=60)
    parent = client.submit("sleep 300").jobs[0]
    group, last = _dependents(client, parent, "after")
    wait_for(lambda: client.status([parent]).jobs[0].state == "running", what="P to run")
    watcher = cluster.client()
    head = watcher.events_head()
    waiting = cluster.client(timeout=60)
    waiting.sock.send(protocol.encode("wait", {"jobs": [last], "groups": [], "timeout": 0.3}, 3))
    with pinging(cluster) as latencies:
        started = time.monotonic()
        done = client.cancel([parent])
        assert done.pending == [parent]
        asking = cluster.client(timeout=60)
        asking.sock.send(protocol.encode("status", {"group": group, "limit": 1}, 9))
        later = cluster.client(timeout=60)
        job = {"command": "true", "depends_on": [{"kind": "after", "job": last}]}
        later.sock.send(protocol.encode("submit", {"jobs": [job]}, 5))
        so_far = _changes(watcher, head, "cancelled")
        assert asking.sock.poll(int(scaled(60) * 1000)), "no reply to the status"
        seen = protocol.decode(asking.sock.recv(), protocol.CLIENT_REPLIES)
        took = time.monotonic() - started
        assert waiting.sock.poll(int(scaled(60) * 1000)), "no reply to the wait"
        waited = protocol.decode(waiting.sock.recv(), protocol.CLIENT_REPLIES)
        assert later.sock.poll(int(scaled(60) * 1000)), "no reply to the submit"
        (after_last,) = protocol.decode(later.sock.recv(), protocol.CLIENT_REPLIES).body["jobs"]
    assert len(latencies) >= took / 0.25, "the pinger stalled"
    assert max(latencies) < scaled(0.2), f"slowest ping {max(latencies):.3f} s in {took:.1f} s"
    assert 0 < so_far < N, f"{so_far} cancelled when the status was sent: nothing was tested"
    assert seen.body["groups"][0]["counts"] == {"cancelled": N}, seen.body["groups"]
    assert [j["state"] for j in waited.body["jobs"]] == ["cancelled"], waited.body
    assert _reason(client, last) == f"dependency {parent} was cancelled"
    # It saw `last` cancelled, not waiting to be (then it would be "... was cancelled").
    assert _reason(client, after_last) == f"dependency {last} did not succeed"


def test_a_result_that_cascades_is_acknowledged_and_recorded(cluster: Cluster) -> None:
    """A job with N `after_fail` dependents succeeds: its result is acked and recorded (the
    worker keeps its session, and is not told the job is no longer its own), the dependents
    are cancelled a slice at a time while pings are answered, and a status sees them all."""
    cluster.start_worker("w")
    client = cluster.client(timeout=60)
    parent = client.submit("sleep 3").jobs[0]
    group, last = _dependents(client, parent, "after_fail")
    wait_for(lambda: client.status([parent]).jobs[0].state == "running", what="P to run")
    with pinging(cluster) as latencies:
        done = cluster.client(timeout=60).wait([parent], timeout=scaled(60))
        counts = client.status(group=group, limit=1).groups[0]["counts"]
    (job,) = done.jobs
    assert (job.state, job.outcome, job.attempts) == ("terminated", "success", 1)
    assert counts == {"cancelled": N}
    assert max(latencies) < scaled(0.2), f"slowest ping {max(latencies):.3f} s"
    reason = f"dependency {parent} succeeded, so after_fail will never run"
    assert _reason(client, last) == reason
    log = cluster.log("w")
    assert "not ours" not in log and "silent" not in log, log[-2000:]
    assert [w.state for w in client.workers()] == ["idle"]


def test_a_cascade_killed_in_the_middle_is_finished_after_restart(cluster: Cluster) -> None:
    """kill -9 while a cancel's cascade is under way: the store holds the cascade and part of
    its work; the restarted broker finishes it, each dependent cancelled once."""
    client = cluster.client(timeout=60)
    parent = client.submit("true", hold=True).jobs[0]
    group, _ = _dependents(client, parent, "after")
    head = client.events_head()
    client.cancel([parent])
    cluster.kill("broker")
    with Store(cluster.state_dir) as store, store.read() as tx:
        cancelled = tx.state_counts()["cancelled"]
        kinds = [row[1] for row in tx.ops()]
    assert 1 < cancelled < N + 1, f"{cancelled} cancelled at the kill; nothing was tested"
    assert kinds == ["cascade"]
    cluster.start_broker()
    client = cluster.client(timeout=60)
    status = client.status(group=group, limit=1)  # waits for the cascade to end
    assert status.groups[0]["counts"] == {"cancelled": N}
    assert _changes(client, head, "cancelled") == N + 1  # each once
    assert "resuming cascade operation" in cluster.log("broker")
    with Store(cluster.state_dir) as store, store.read() as tx:
        assert tx.ops() == []


# ---- the pure state machine (tests/statekit.py drives it as the server does) ----------------


def _chain(h: Harness, n: int) -> list[int]:
    """A held job and n - 1 more, each `after` the one before."""
    deps = [spec(depends_on=[{"kind": "after", "local": i}]) for i in range(n - 1)]
    return h.submit(spec(hold=True), *deps)


def test_a_chain_deeper_than_the_stack_is_settled(tmp_path: Path) -> None:
    """Cancelling the head of a 600-job chain cancels every job after it (settled at once,
    one inside another, it overflowed Python's stack)."""
    h = Harness(tmp_path / "store")
    ids = _chain(h, 600)
    h.do(lambda c: c.cancel(ALICE, [ids[0]], [], None))
    assert {h.state(i) for i in ids} == {"cancelled"}
    assert h.job(ids[-1]).cancel_reason == f"dependency {ids[-2]} was cancelled"


def _workflow(h: Harness) -> tuple[list[int], int]:
    """Fans, chains and groups downstream of one running job P; returns every id and P's."""
    h.add_worker("w", cpus=1)
    (p,) = h.submit(spec())
    (running,) = h.claim("w")
    assert running["job"] == p
    kinds = ["after", "after_any", "after_fail"]
    fan = h.submit(
        *(spec(depends_on=after(p, kind=kinds[i % 3]), groups=["g"]) for i in range(40)),
        groups=[{"name": "g"}],
    )
    ids = [p, *fan, *_chain(h, 30)]
    ids += h.submit(spec(depends_on=[{"group": "g"}]), spec(depends_on=after(fan[1], ids[-1])))
    ids += h.submit(*(spec(depends_on=[{"group": "g", "kind": "after_any"}]) for _ in range(9)))
    return ids, p


def test_a_cascade_in_slices_ends_as_it_would_at_once(tmp_path: Path) -> None:
    """P fails, the chain's head is cancelled: settled three dependents a message and two a
    step, everything ends as settled at once, each job with the same reason."""
    once = _ends(Harness(tmp_path / "once", Config(cascade_jobs=10**9)))
    assert {s for s, _, _ in once} == {"terminated", "cancelled", "available"}
    sliced = Harness(tmp_path / "sliced", Config(cascade_jobs=3))
    sliced.per_step = 2
    assert _ends(sliced) == once


def _ends(h: Harness) -> list[tuple[str, str | None, int]]:
    ids, p = _workflow(h)
    h.do(lambda c: c.result("w", p, 1, "exited", 1, None))
    h.do(lambda c: c.cancel(ALICE, [ids[41]], [], None))
    out = [(j.state, j.cancel_reason, j.pending) for j in map(h.job, ids)]
    h.store.close()
    return out


def test_what_a_cancel_dooms_stays_doomed_when_the_job_then_succeeds(tmp_path: Path) -> None:
    """A running job with many `after` dependents is cancelled, and its worker reports success
    while the cascade is still cancelling them: the cancel's cascade goes on first, so every
    dependent is cancelled as at request time; none is released by the success and started."""
    h = Harness(tmp_path / "store", Config(cascade_jobs=3))
    h.per_step, h.settle = 2, False
    h.add_worker("w", cpus=1)
    (p,) = h.submit(spec())
    (running,) = h.claim("w")
    deps = h.submit(*(spec(depends_on=after(p)) for _ in range(12)))
    h.do(lambda c: c.cancel(ALICE, [p], [], None))
    h.cascade(steps=1)  # the cancel's cascade has begun
    h.finish("w", running)  # the job had ended by itself: success
    h.do(lambda c: c.claim("w", 1), wake=True)
    h.cascade()
    h.do(lambda c: c.claim("w", 1), wake=True)
    assert h.job(p).outcome == "success"
    assert [(h.state(d), h.job(d).cancel_reason) for d in deps] == [
        ("cancelled", f"dependency {p} was cancelled")
    ] * len(deps)
    assert not h.take("assign")


def _two_failures(h: Harness) -> list[str | None]:
    """P and Y fail, in that order; Z waits for P, J for Z and Y: the reasons they end with."""
    h.add_worker("w", cpus=2)
    p, y = h.submit(spec(), spec())
    running = {a["job"]: a for a in h.claim("w", 2)}
    more = h.submit(*(spec(depends_on=after(p)) for _ in range(3)))
    (z,) = h.submit(spec(depends_on=after(p)))
    (j,) = h.submit(spec(depends_on=after(z, y)))
    h.finish("w", running[p], 1)
    h.finish("w", running[y], 1)
    h.cascade()
    reasons = [h.job(i).cancel_reason for i in (*more, z, j)]
    h.store.close()
    return reasons


def test_the_cascade_settles_in_the_order_of_the_ends(tmp_path: Path) -> None:
    """What an earlier end cascades into is settled before what a later end left, however deep:
    J is cancelled because Z was (P's failure, first), not because Y failed, as at once."""
    once = _two_failures(Harness(tmp_path / "once", Config(cascade_jobs=10**9)))
    assert once[-1] == "dependency 6 was cancelled"
    sliced = Harness(tmp_path / "sliced", Config(cascade_jobs=1))
    sliced.per_step, sliced.settle = 1, False
    assert _two_failures(sliced) == once
