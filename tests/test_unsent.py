"""An assignment that never reached its worker (SPEC §5): the broker recorded it, then died
before sending it, or sent it on a connection that was gone. The same worker process
registers again without it: the job is queued again spending nothing, and nobody is told the
worker restarted. A new worker process without it did lose it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.statekit import ALICE, Harness, spec
from tests.test_broker_clock import Site


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "store")
    yield harness
    harness.store.close()


def register(h: Harness, instance: str, running: list[tuple[int, int]] | None = None) -> None:
    h.do(lambda c: c.register("w", "host", (2, 1000, 0), [], running or [], instance=instance))
    h.take("registered")


def test_the_same_worker_process_without_it_never_got_it(h: Harness) -> None:
    register(h, "first")
    (job,) = h.submit(spec(max_attempts=1))
    (a,) = h.claim("w")
    register(h, "first")
    j = h.job(job)
    assert (j.state, j.attempts, j.requeues, j.worker, j.token) == ("available", 0, 0, None, None)
    with h.store.read() as tx:
        (att,) = tx.attempts_of(job)
    assert att.outcome == "returned"
    assert att.reason == "the assignment never reached worker w"
    assert h.worker("w").running == {} and h.worker("w").used_cpus == 0
    (again,) = h.claim("w")  # the same attempt number, a new token; it runs as attempt 1
    assert (again["job"], again["attempt"]) == (job, 1) and again["token"] != a["token"]


def test_a_new_worker_process_without_it_lost_it(h: Harness) -> None:
    register(h, "first")
    (job,) = h.submit(spec())
    h.claim("w")
    register(h, "second")
    j = h.job(job)
    assert (j.state, j.attempts, j.requeues) == ("available", 1, 1)
    with h.store.read() as tx:
        (att,) = tx.attempts_of(job)
    assert (att.outcome, att.reason) == ("lost", "worker w restarted without it")


def test_one_being_cancelled_is_cancelled(h: Harness) -> None:
    register(h, "first")
    (job,) = h.submit(spec())
    h.claim("w")
    h.do(lambda c: c.cancel(ALICE, [job], [], "enough"))
    assert h.state(job) == "pending_cancellation"
    register(h, "first")
    assert h.state(job) == "cancelled"
    assert h.job(job).attempts == 0


def test_what_it_does_list_it_keeps(h: Harness) -> None:
    register(h, "first")
    h.submit(spec(), spec())
    first, second = h.claim("w", 2)
    register(h, "first", [(first["job"], first["token"])])
    assert h.state(first["job"]) == "running"
    assert h.state(second["job"]) == "available"


def test_a_broker_that_died_before_sending_an_assignment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real broker commits an assignment and dies before its send; restarted on the same
    store, the worker process that claimed registers again and gets the job afresh."""
    ctx: zmq.Context[Any] = zmq.Context()
    site = Site(tmp_path, ctx)
    try:
        w = site.worker("w1", instance="one")
        (job,) = site.ask("submit", {"jobs": [{"command": "true"}]})["jobs"]
        turns: list[Any] = []
        monkeypatch.setattr(site.broker, "_send", turns.append)  # dies between commit and send
        w.send("claim", {"max": 1})
        for _ in range(200):
            site.broker.step(0.005)
            if any(e.type == "assign" for t in turns for e in t.effects):
                break
        assert any(e.type == "assign" for t in turns for e in t.effects)
        assert not [m for m in w.take() if m.type == "assign"]
        site.close()
        site = Site(tmp_path, ctx)  # the restart, from the store
        assert site.job(job)["state"] == "running"
        w = site.worker("w1", instance="one")  # the same process, holding nothing
        info = site.job(job)
        assert (info["state"], info["attempts"]) == ("available", 0)
        w.send("claim", {"max": 1})
        (a,) = w.expect(site.broker, "assign")["jobs"]
        assert (a["job"], a["attempt"]) == (job, 1)
        history = site.ask("status", {"jobs": [job], "detail": True})["jobs"][0]["history"]
        assert "restarted" not in str(history)
    finally:
        site.close()
        ctx.term()
