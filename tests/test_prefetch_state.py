"""Claim-ahead (SPEC §5), each rule through the pure state machine: jobs held ahead beyond a
worker's free room, never one an idle worker could run now; asked back for a worker with room,
fenced by the holder's word; given back without spending an attempt when the worker is lost,
drains, registers again or the job is cancelled. The property test runs them all together."""

from __future__ import annotations

from typing import Any

import pytest

from banyan.broker.state import Config
from banyan.broker.views import job_info, waiting_reason, worker_info
from tests.statekit import ALICE, ROOT, Harness, spec


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path / "store", Config(prefetch=2))
    yield harness
    harness.store.close()


def busy(h: Harness, name: str, cpus: float = 1) -> list[dict[str, Any]]:
    """A worker of `cpus` cpus, registered and claiming; returns what it was assigned."""
    h.add_worker(name, cpus=cpus)
    return h.claim(name, 100)


def ahead(assignments: list[dict[str, Any]]) -> list[int]:
    return [a["job"] for a in assignments if a["ahead"]]


def now(assignments: list[dict[str, Any]]) -> list[int]:
    return [a["job"] for a in assignments if not a["ahead"]]


def test_jobs_beyond_free_room_are_held_ahead_up_to_prefetch(h):
    jobs = h.submit(*[spec() for _ in range(5)])
    got = busy(h, "w")
    assert now(got) == jobs[:1] and ahead(got) == jobs[1:3]
    w = h.worker("w")
    assert sorted(w.ahead) == jobs[1:3] and w.used_cpus == 1.0  # held ahead: no resources
    assert h.state(jobs[1]) == "running" and h.job(jobs[1]).worker == "w"
    assert h.state(jobs[3]) == "available"
    with h.store.read() as tx:
        info = job_info(tx, h.job(jobs[1]), list(tx.workers()))
    assert info["ahead"] is True and info["reason"] == "assigned to w, waiting for a slot"
    assert worker_info(h.worker("w"))["ahead"] == jobs[1:3]


def test_a_workers_own_prefetch_overrides_the_brokers(h):
    jobs = h.submit(*[spec() for _ in range(5)])
    h.do(lambda c: c.register("w", "host", (1, 1024, 0), [], [], prefetch=0))
    assert ahead(h.claim("w", 100)) == []
    assert h.state(jobs[1]) == "available"


def test_a_claim_says_how_many_to_hold_ahead_within_prefetch(h):
    jobs = h.submit(*[spec() for _ in range(6)])
    h.add_worker("w", cpus=1)
    h.do(lambda c: c.claim("w", 100, ahead=0))  # jobs longer than the horizon: none
    assert ahead(h.take_assigned("w")) == [] and h.state(jobs[1]) == "available"
    h.do(lambda c: c.claim("w", 100, ahead=1))
    assert ahead(h.take_assigned("w")) == jobs[1:2]
    h.do(lambda c: c.claim("w", 100, ahead=50))  # more than its prefetch: the prefetch
    assert ahead(h.take_assigned("w")) == jobs[2:3]
    h.do(lambda c: c.claim("w", 100))  # not said: as it said last
    assert ahead(h.take_assigned("w")) == [] and h.worker("w").hold == 50


def test_no_job_is_held_ahead_that_an_idle_worker_could_run(h):
    h.add_worker("idle", cpus=1)
    a, b, c = h.submit(spec(), spec(), spec())
    got = busy(h, "full")  # "idle" has not claimed yet: it is not asking
    assert now(got) == [a] and ahead(got) == [b, c]
    # The idle worker claims: the jobs held ahead on "full" fit it, so one is asked back.
    assert h.claim("idle", 100) == []
    (revoke,) = h.take("revoke", "full")
    assert revoke.body == {"job": b, "token": h.job(b).token}
    # More jobs than free room: each goes where room is first, only then ahead.
    h.do(lambda c: c.returned("full", b, revoke.body["token"], "asked back"))
    assert h.assigned("idle") == [b] and h.job(b).attempts == 1


def test_jobs_go_ahead_only_beyond_the_free_room_of_every_claimer(h):
    h.add_worker("a", cpus=1)
    h.claim("a", 100)
    h.add_worker("b", cpus=1)
    h.claim("b", 100)
    j1, j2 = h.submit(spec(), spec())
    got = [*h.take("assign", "a"), *h.take("assign", "b")]
    assert sorted(x["job"] for e in got for x in e.body["jobs"] if not x["ahead"]) == [j1, j2]
    assert not any(x["ahead"] for e in got for x in e.body["jobs"])
    (j3,) = h.submit(spec())  # now both are full: it waits ahead on one of them
    assert h.job(j3).worker in ("a", "b") and j3 in h.worker(h.job(j3).worker).ahead


def test_revocation_is_fenced_a_job_started_meanwhile_stays(h):
    first, b = h.submit(spec(), spec())
    got = busy(h, "full")
    h.add_worker("idle", cpus=1)
    h.claim("idle", 100)
    (revoke,) = h.take("revoke", "full")
    token = revoke.body["token"]
    # Before the request arrives, "full" ended its job and started b in the room freed; its
    # result says so, and went first. The request finds b started: it stays where it runs.
    h.do(lambda c: c.result("full", first, got[0]["token"], "exited", 0, None, then=[(b, token)]))
    w = h.worker("full")
    assert b in w.running and b not in w.ahead and not w.revoking and w.used_cpus == 1.0
    # A late give-back for it (or any other of its attempts) changes nothing.
    h.do(lambda c: c.returned("full", b, token, "asked back"))
    assert h.state(b) == "running" and h.job(b).worker == "full" and h.assigned("idle") == []


def test_a_revoked_job_never_starts_there_and_spends_no_attempt(h):
    _first, b = h.submit(spec(max_attempts=1), spec(max_attempts=1))
    busy(h, "full")
    h.add_worker("idle", cpus=1)
    h.claim("idle", 100)
    token = h.take("revoke", "full")[0].body["token"]
    h.do(lambda c: c.returned("full", b, token, "asked back"))
    assert b not in h.worker("full").ahead
    (a,) = [x for e in h.take("assign", "idle") for x in e.body["jobs"]]
    assert a["job"] == b and a["attempt"] == 1 and a["token"] != token
    # The old token is fenced: a start under it is refused and killed.
    h.do(lambda c: c.started("full", b, token))
    assert [e.body for e in h.take("kill_stale", "full")] == [{"job": b, "token": token}]
    h.finish("idle", a)
    assert h.job(b).outcome == "success" and h.job(b).failures == 0


def test_a_lost_worker_gives_back_what_it_held_ahead_spending_nothing(h):
    first, b, c = h.submit(spec(), spec(), spec())
    busy(h, "w")
    moved = h.do(lambda core: core.worker_lost("w", "worker w silent", None))
    assert sorted(moved) == [(first, "available"), (b, "available"), (c, "available")]
    for job_id in (b, c):
        job = h.job(job_id)
        assert (job.attempts, job.requeues, job.unspent, job.failures) == (0, 0, 0, 0)
    assert h.job(first).requeues == 1  # the one it ran is requeued as ever
    assert not h.worker("w").ahead


def test_a_worker_that_drains_itself_gives_back_at_once(h):
    _first, b, c = h.submit(spec(), spec(), spec())
    busy(h, "w")
    h.do(lambda core: core.draining("w"))
    assert h.state(b) == h.state(c) == "available" and not h.worker("w").ahead
    assert h.worker("w").state == "draining"  # it still runs the first


def test_an_admins_drain_has_the_worker_give_back(h):
    first, b, c = h.submit(spec(), spec(), spec())
    got = busy(h, "w")
    h.do(lambda core: core.drain(ROOT, "w", resume=False))
    assert h.take("drain", "w")
    for a in got[1:]:
        h.do(lambda core, a=a: core.returned("w", a["job"], a["token"], "the worker drains"))
    assert h.state(b) == h.state(c) == "available"
    h.finish("w", got[0])
    assert h.worker("w").state == "drained" and h.state(first) == "terminated"


def test_cancel_of_a_job_held_ahead_ends_it_unstarted(h):
    _first, b = h.submit(spec(), spec())
    got = busy(h, "w")
    h.do(lambda c: c.cancel(ALICE, [b], [], None))
    (cancel,) = h.take("cancel", "w")
    assert h.state(b) == "pending_cancellation"
    h.do(lambda c: c.returned("w", b, cancel.body["token"], "cancelled before it started"))
    job = h.job(b)
    assert job.state == "cancelled" and job.attempts == 0 and b not in h.worker("w").ahead
    assert got[1]["job"] == b


def test_registering_again_keeps_what_it_started_and_takes_back_the_rest(h):
    first, b, c = h.submit(spec(), spec(), spec())
    got = busy(h, "w")
    tokens = {a["job"]: a["token"] for a in got}
    # It ended `first` and started b; the broker never heard (it restarted, say). It lists b.
    h.do(lambda core: core.register("w", "host", (1, 1024, 0), [], [(b, tokens[b])]))
    w = h.worker("w")
    assert list(w.running) == [b] and not w.ahead and w.used_cpus == 1.0
    assert h.state(c) == "available" and h.job(c).attempts == 0
    assert h.state(first) == "available" and h.job(first).requeues == 1


def test_a_heartbeat_listing_a_job_held_ahead_means_it_started(h):
    first, b = h.submit(spec(), spec())
    got = busy(h, "w")
    h.do(lambda c: c.result("w", first, got[0]["token"], "exited", 0, None))  # `then` was lost
    h.do(lambda c: c.heartbeat("w", [(b, got[1]["token"], None, None)]))
    assert b in h.worker("w").running and not h.worker("w").ahead


def test_no_gpu_job_is_held_ahead(h):
    h.do(lambda c: c.register("g", "host", (1, 1024, 1), [], []))
    h.submit(spec(gpus=1), spec(gpus=1))
    got = h.claim("g", 100)
    assert now(got) and ahead(got) == []


def test_waiting_reason_of_a_job_held_ahead(h):
    _first, b = h.submit(spec(), spec())
    busy(h, "w")
    with h.store.read() as tx:
        assert waiting_reason(h.job(b), list(tx.workers())) == "assigned to w, waiting for a slot"


def test_a_job_held_ahead_is_dated_from_its_start_not_its_claim(h):
    first, b = h.submit(spec(), spec())
    got = busy(h, "w")
    claimed = h.now
    h.now += 60.0  # it waited a minute for the slot
    h.do(
        lambda c: c.result(
            "w", first, got[0]["token"], "exited", 0, None, then=[(b, got[1]["token"])]
        )
    )
    with h.store.read() as tx:
        attempt = tx.get_attempt(b, 1)
    assert attempt is not None and attempt.claimed == claimed and attempt.started == h.now


def test_a_worker_asks_to_hold_what_its_slots_run_in_the_horizon():
    from banyan.defaults import AHEAD_HORIZON, MAX_PREFETCH
    from banyan.worker.daemon import ahead_wanted

    assert ahead_wanted(None, 2) == 0  # no job ended here yet: nothing known, nothing held
    assert ahead_wanted(AHEAD_HORIZON / 10, 2) == 20  # short jobs: ten per slot
    assert ahead_wanted(AHEAD_HORIZON / 2, 1.5) == 2
    assert ahead_wanted(AHEAD_HORIZON * 2, 64) == 32
    assert ahead_wanted(AHEAD_HORIZON * 1.01, 1) == 0  # longer than the horizon: none
    assert ahead_wanted(0.0, 1) == min(MAX_PREFETCH, int(AHEAD_HORIZON / 1e-4))
