"""A worker's life as the state machine keeps it (SPEC §5): draining by its own signal or an
admin, a cold stop, a clean stop, loss, forgetting. Pure: no sockets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from banyan.broker.records import WorkerState
from banyan.errors import Conflict, Forbidden
from tests.statekit import ALICE, ROOT, Harness, spec


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "store")
    yield harness
    harness.store.close()


def test_its_own_drain_withdraws_the_claim_at_once(h: Harness) -> None:
    h.add_worker("w")
    h.do(lambda c: c.claim("w", 8))  # a standing claim, nothing to run yet
    h.do(lambda c: c.draining("w"))
    assert h.worker("w").state == WorkerState.DRAINED.value  # it runs nothing
    h.submit(spec())
    assert h.take("assign") == []


def test_a_cold_stop_requeues_elsewhere_spending_nothing(h: Harness) -> None:
    h.add_worker("a")
    h.add_worker("b")
    (job,) = h.submit(spec(max_attempts=1))
    (a,) = h.claim("a")
    h.do(lambda c: c.draining("a"))
    assert h.worker("a").state == WorkerState.DRAINING.value
    h.finish("a", a, exit_code=None, outcome="cancelled")
    moved = h.job(job)
    assert moved.state == "available" and moved.failures == 0 and moved.requeues == 0
    assert h.claim("a") == []  # never handed back to the stopping worker
    (again,) = h.claim("b")
    assert again["job"] == job and again["attempt"] == 2


def test_a_clean_stop_shows_stopped_and_nothing_is_expected_from_it(h: Harness) -> None:
    h.add_worker("w")
    h.do(lambda c: c.draining("w"))
    assert h.do(lambda c: c.stopped("w")) == []
    assert h.worker("w").state == WorkerState.STOPPED.value
    h.do(lambda c: c.worker_lost("w", "silent"))  # a stopped worker is not lost later
    assert h.worker("w").state == WorkerState.STOPPED.value


def test_a_stopping_worker_that_reconnects_stays_draining(h: Harness) -> None:
    h.add_worker("w")
    h.do(lambda c: c.register("w", "host", (2, 1024, 0), [], [], draining=True))
    assert h.worker("w").state == WorkerState.DRAINED.value
    h.do(lambda c: c.stopped("w"))
    h.add_worker("w")  # started again
    assert h.worker("w").state == WorkerState.ACTIVE.value


def test_an_admins_drain_holds_across_restarts_until_resumed(h: Harness) -> None:
    h.add_worker("w")
    h.do(lambda c: c.drain(ROOT, "w", False))
    h.do(lambda c: c.stopped("w"))
    h.add_worker("w")
    assert h.worker("w").state == WorkerState.DRAINED.value
    h.do(lambda c: c.worker_lost("w", "silent"))
    h.add_worker("w")
    assert h.worker("w").state == WorkerState.DRAINED.value
    h.do(lambda c: c.drain(ROOT, "w", True))
    assert h.worker("w").state == WorkerState.ACTIVE.value
    h.do(lambda c: c.stopped("w"))
    h.add_worker("w")
    assert h.worker("w").state == WorkerState.ACTIVE.value


def test_a_lost_worker_says_where_its_jobs_went(h: Harness) -> None:
    h.add_worker("w")
    first, second = h.submit(spec(), spec())
    h.claim("w", 2)
    h.do(lambda c: c.cancel(ROOT, [second], [], None))
    moved = h.do(lambda c: c.worker_lost("w", "silent"))
    assert sorted(moved) == [(first, "available"), (second, "cancelled")]


def test_only_a_gone_worker_may_be_forgotten_and_only_by_an_admin(h: Harness) -> None:
    h.add_worker("w")
    with pytest.raises(Conflict, match="only a lost or stopped worker"):
        h.do(lambda c: c.forget(ROOT, "w"))
    h.do(lambda c: c.worker_lost("w", "silent"))
    with pytest.raises(Forbidden):
        h.do(lambda c: c.forget(ALICE, "w"))
    h.do(lambda c: c.forget(ROOT, "w"))
    with h.store.read() as tx:
        assert tx.get_worker("w") is None and list(tx.workers()) == []


def test_a_cold_stopped_job_only_its_worker_can_run_waits_for_it_to_start_again(
    h: Harness,
) -> None:
    """docs/operations.md, Stopping: the job is not barred from the worker that stopped it."""
    h.add_worker("only", tags=["ssd"])
    h.add_worker("other")
    (job,) = h.submit(spec(tags=["ssd"], max_attempts=1))
    (a,) = h.claim("only")
    h.do(lambda c: c.draining("only"))
    h.finish("only", a, exit_code=None, outcome="cancelled")
    h.do(lambda c: c.stopped("only"))
    assert h.claim("other") == [] and h.state(job) == "available"
    h.add_worker("only", tags=["ssd"])  # started again
    (again,) = h.claim("only")
    assert again["job"] == job


def test_a_lost_worker_was_last_seen_when_last_heard_from_not_when_declared_lost(
    h: Harness,
) -> None:
    h.add_worker("w")  # registered at 1000
    h.now = 1009.0
    h.do(lambda c: c.worker_lost("w", "silent", heard=1004.0))
    assert h.worker("w").last_seen == 1004.0
    # One the broker never heard from since it started keeps what its store says.
    h.add_worker("v")
    h.now = 1020.0
    h.do(lambda c: c.worker_lost("v", "did not come back"))
    assert h.worker("v").last_seen == 1009.0


def test_the_broker_stores_when_it_last_heard_from_each_connected_worker(h: Harness) -> None:
    h.add_worker("w")
    h.add_worker("gone")
    h.do(lambda c: c.worker_lost("gone", "silent", heard=1000.0))
    h.do(lambda c: c.heard({"w": 1003.0, "gone": 1004.0, "unknown": 1005.0}))
    assert h.worker("w").last_seen == 1003.0
    assert h.worker("gone").last_seen == 1000.0  # it is not heard from once gone
    h.do(lambda c: c.heard({"w": 1001.0}))  # a late save never moves it back
    assert h.worker("w").last_seen == 1003.0


@pytest.mark.parametrize("gone", ["stopped", "lost"])
def test_a_gone_worker_drained_by_an_admin_comes_back_drained(h: Harness, gone: str) -> None:
    """docs/operations.md, Upgrading: it can be kept out of work before it is started again."""
    h.add_worker("w")
    h.do(lambda c: c.stopped("w") if gone == "stopped" else c.worker_lost("w", "silent"))
    h.take()
    drained = h.do(lambda c: c.drain(ROOT, "w", False))
    assert drained.state == gone and drained.held
    assert h.take("drain") == []  # nobody to tell: it is not connected
    (job,) = h.submit(spec())
    h.add_worker("w")
    assert h.worker("w").state == WorkerState.DRAINED.value
    assert h.claim("w") == [] and h.state(job) == "available"
    h.do(lambda c: c.drain(ROOT, "w", True))
    assert [a["job"] for a in h.claim("w")] == [job]


def test_a_gone_worker_resumed_before_it_is_back_comes_back_taking_work(h: Harness) -> None:
    h.add_worker("w")
    h.do(lambda c: c.drain(ROOT, "w", False))
    h.do(lambda c: c.worker_lost("w", "silent"))
    h.do(lambda c: c.drain(ROOT, "w", True))
    assert h.worker("w").state == WorkerState.LOST.value and not h.worker("w").held
    h.add_worker("w")
    assert h.worker("w").state == WorkerState.ACTIVE.value
