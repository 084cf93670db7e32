"""Every rule of SPEC §2–§5, driven through the pure state machine; no sockets anywhere."""

from __future__ import annotations

import functools
import operator

import pytest

from banyan.broker.records import JobState, WorkerState
from banyan.broker.state import TRANSITIONS, Config
from banyan.broker.views import waiting_reason
from banyan.errors import BadRequest, Conflict, Forbidden, NotFound
from tests.statekit import ALICE, BOB, ROOT, Harness, after, spec

S = JobState


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path / "store")
    yield harness
    harness.store.close()


# ---- submission ------------------------------------------------------------------------------


def test_ids_increase_and_jobs_start_available(h):
    a, b = h.submit(spec(), spec())
    (c,) = h.submit(spec())
    assert a < b < c
    assert h.state(a) == "available" and h.job(a).eligible
    assert h.job(a).owner == "alice"


def test_hold_creates_inactive_and_release_makes_claimable(h):
    h.add_worker("w")
    (j,) = h.submit(spec(hold=True))
    assert h.state(j) == "inactive"
    assert h.claim("w") == []
    h.do(lambda c: c.modify(ALICE, j, {}, release=True))
    assert h.assigned("w") == [j]  # the waiting claim is answered


def test_unknown_dependency_refused_and_nothing_lands(h):
    with pytest.raises(NotFound, match=r"jobs\[1\]\.depends_on\[0\]: no job 99"):
        h.submit(spec(), spec(depends_on=after(99)))
    with pytest.raises(NotFound, match="no group 'nope'"):
        h.submit(spec(depends_on=[{"kind": "after", "group": "nope"}]))
    with pytest.raises(BadRequest, match="local 0 is not another job"):
        h.submit(spec(depends_on=[{"local": 0}]))
    with h.store.read() as tx:
        assert sum(tx.state_counts().values()) == 0


def test_local_cycle_refused(h):
    # Named as the request has them: their ids were never given out.
    said = r"dependency cycle: jobs\[0\] -> jobs\[1\] \(b\) -> jobs\[0\]$"
    with pytest.raises(Conflict, match=said):
        h.submit(spec(depends_on=[{"local": 1}]), spec(depends_on=[{"local": 0}], name="b"))
    with h.store.read() as tx:
        assert sum(tx.state_counts().values()) == 0


def test_cycle_through_open_group_refused(h):
    (_x,) = h.submit(spec(groups=["g"]), groups=[{"name": "g", "open": True}])
    (y,) = h.submit(spec(depends_on=[{"kind": "after", "group": "g"}]))
    # joining g while depending on y (which waits for g) would close a loop
    with pytest.raises(Conflict, match="cycle"):
        h.submit(spec(groups=["g"], depends_on=after(y)))
    assert h.job(y).pending == 1


def test_modify_depends_on_cycle_refused(h):
    a, b = h.submit(spec(hold=True), spec(hold=True, depends_on=[{"local": 0}]))
    with pytest.raises(Conflict, match="cycle"):
        h.do(lambda c: c.modify(ALICE, a, {"depends_on": after(b)}))
    assert h.job(a).depends_on == []


def test_submit_key_is_idempotent(h):
    first = h.submit(spec(), spec(), key="k1")
    again = h.submit(spec(), spec(), key="k1")
    assert first == again
    with h.store.read() as tx:
        assert tx.state_counts().get("available") == 2


def test_dependency_counts(h):
    a, b = h.submit(spec(), spec())
    (c,) = h.submit(spec(depends_on=after(a, b) + after(a)))  # duplicate collapses
    assert h.job(c).pending == 2
    assert not h.job(c).eligible


def test_sealed_group_refuses_members_and_open_group_accepts(h):
    h.submit(spec(groups=["sealed"]), groups=[{"name": "sealed"}])
    with pytest.raises(Conflict, match="sealed"):
        h.submit(spec(groups=["sealed"]))
    h.submit(spec(groups=["o"]), groups=[{"name": "o", "open": True}])
    h.submit(spec(groups=["o"]))
    with h.store.read() as tx:
        g = tx.group_by_name("o")
        assert g is not None and g.total == 2


# ---- claims and matching ---------------------------------------------------------------------


def test_priority_then_fifo(h):
    h.add_worker("w", cpus=1)
    low, high1, high2 = h.submit(spec(priority=0), spec(priority=5), spec(priority=5))
    order = [h.run_one("w") for _ in range(3)]
    assert order == [high1, high2, low]


def test_resources_cpus_memory_gpus_tags(h):
    h.add_worker("w", cpus=4, memory=1000, gpus=2, tags=["ssd"])
    big, mem, gpu, tagged, other = h.submit(
        spec(cpus=8), spec(memory=2000), spec(gpus=2), spec(tags=["ssd"]), spec(tags=["a100"])
    )
    got = {a["job"]: a for a in h.claim("w", 10)}
    assert set(got) == {gpu, tagged}
    assert got[gpu]["gpu_ids"] == [0, 1]
    w = h.worker("w")
    assert w.used_cpus == 2 and len(w.used_gpus) == 2
    workers = [w]
    assert "needs 8 cpus, largest worker has 4" in (waiting_reason(h.job(big), workers) or "")
    assert "2000 MiB" in (waiting_reason(h.job(mem), workers) or "")
    assert "tag a100; no worker carries it" in (waiting_reason(h.job(other), workers) or "")


def test_claim_fills_free_capacity_only(h):
    h.add_worker("w", cpus=2)
    h.submit(*[spec() for _ in range(5)])
    assert len(h.claim("w", 10)) == 2
    assert h.worker("w").used_cpus == 2


def test_gpu_ids_distinct_per_job(h):
    h.add_worker("w", cpus=8, gpus=3)
    h.submit(spec(gpus=1), spec(gpus=2))
    ids = [a["gpu_ids"] for a in h.claim("w", 5)]
    assert sorted(functools.reduce(operator.iadd, ids, [])) == [0, 1, 2]


def test_claim_waits_until_a_job_is_submitted(h):
    h.add_worker("w")
    assert h.claim("w") == []
    (j,) = h.submit(spec())
    assert h.assigned("w") == [j]
    assert h.state(j) == "running"


def test_a_standing_claim_takes_the_first_job_that_could_fit(h):
    h.add_worker("w", cpus=2, tags=["ssd"])
    h.submit(spec(cpus=4), spec(tags=["gpu"]))
    assert h.claim("w") == [] and h.claim("w", 3) == []
    (fits,) = h.submit(spec(cpus=2))  # a new eligible job: the standing claim takes it
    assert h.assigned("w") == [fits]


def test_a_claim_is_answered_once_the_worker_has_more_room(h):
    h.add_worker("w", cpus=2)
    first, second = h.submit(spec(cpus=1), spec(cpus=2))
    (a,) = h.claim("w", 2)
    assert a["job"] == first
    assert h.claim("w") == []  # 1 cpu free, the queued job wants 2
    h.finish("w", a)
    assert [b["job"] for b in h.claim("w")] == [second]


def test_a_priority_change_reaches_a_standing_claim(h):
    h.add_worker("w", cpus=1)
    _, wanted = h.submit(spec(cpus=2), spec(cpus=1, priority=-5, hold=True))
    assert h.claim("w") == []
    h.do(lambda c: c.modify(ALICE, wanted, {"priority": 5}, release=True))
    assert h.assigned("w") == [wanted]


def test_no_number_of_jobs_that_do_not_fit_holds_back_one_that_does(h):
    """Head-of-line blocking: 9,000 older, higher-priority jobs that need more cpus or a tag
    than the claiming worker has stand ahead of one it can run."""
    h.add_worker("big", cpus=8, tags=["gpu"])
    h.add_worker("small", cpus=1)
    (busy,) = h.submit(spec(cpus=8, priority=9))
    assert [a["job"] for a in h.claim("big")] == [busy]  # big is full from now on
    h.submit(*[spec(cpus=4, priority=5)] * 4500, *[spec(tags=["gpu"], priority=5)] * 4500)
    assert h.claim("small") == []
    (fits,) = h.submit(spec(priority=-1))
    assert h.assigned("small") == [fits]
    (later,) = h.submit(spec())
    assert h.claim("small") == []  # full again
    with h.store.read() as tx:
        job = tx.get_job(later)
        assert job is not None
        assert waiting_reason(job, list(tx.workers())) == "waiting for free resources"


# ---- results, retries, fencing ---------------------------------------------------------------


def test_success_and_failure_outcomes(h):
    h.add_worker("w")
    ok, bad = h.submit(spec(), spec(max_attempts=1))
    h.run_one("w", 0)
    h.run_one("w", 3)
    assert (h.state(ok), h.job(ok).outcome) == ("terminated", "success")
    assert (h.state(bad), h.job(bad).outcome, h.job(bad).exit_code) == ("terminated", "failed", 3)


def test_timeout_outcome(h):
    h.add_worker("w")
    (j,) = h.submit(spec(time_limit=1))
    (a,) = h.claim("w")
    h.finish("w", a, exit_code=None, outcome="timeout")
    assert h.job(j).outcome == "timeout"


def test_retry_succeeds_on_second_attempt(h):
    h.add_worker("w")
    (j,) = h.submit(spec(max_attempts=3))
    h.run_one("w", 1)
    assert h.state(j) == "available" and h.job(j).failures == 1
    h.run_one("w", 0)
    job = h.job(j)
    assert (job.state, job.outcome, job.attempts) == ("terminated", "success", 2)
    with h.store.read() as tx:
        assert [a.outcome for a in tx.attempts_of(j)] == ["failed", "success"]


def test_final_failure_cancels_whole_downstream(h):
    h.add_worker("w")
    (a,) = h.submit(spec(max_attempts=2))
    (b,) = h.submit(spec(depends_on=after(a)))
    (c,) = h.submit(spec(depends_on=after(b)))
    h.run_one("w", 1)
    assert h.state(b) == "available"  # untouched until the final outcome
    h.run_one("w", 1)
    assert h.job(a).outcome == "failed"
    assert h.state(b) == h.state(c) == "cancelled"
    assert h.job(b).cancel_reason == f"dependency {a} failed"
    assert f"dependency {b}" in (h.job(c).cancel_reason or "")


def test_dependency_released_only_on_success(h):
    h.add_worker("w")
    (a,) = h.submit(spec())
    (b,) = h.submit(spec(depends_on=after(a)))
    assert h.job(b).pending == 1
    assert h.run_one("w") == a
    assert h.job(b).pending == 0 and h.job(b).eligible
    assert h.run_one("w") == b


def test_stale_token_refused_and_killed(h):
    h.add_worker("w")
    (j,) = h.submit(spec())
    (a,) = h.claim("w")
    h.do(lambda c: c.result("w", j, a["token"] + 100, "exited", 0, None))
    assert h.state(j) == "running"
    (kill,) = h.take("kill_stale", "w")
    assert kill.body == {"job": j, "token": a["token"] + 100}


def test_other_workers_attempt_refused(h):
    h.add_worker("w1")
    h.add_worker("w2")
    (j,) = h.submit(spec())
    (a,) = h.claim("w1")
    h.do(lambda c: c.result("w2", j, a["token"], "exited", 0, None))
    assert h.state(j) == "running"
    assert h.take("kill_stale", "w2")


def test_duplicate_result_is_acked_again(h):
    h.add_worker("w")
    (_j,) = h.submit(spec())
    (a,) = h.claim("w")
    h.finish("w", a)
    h.take("ack")
    h.finish("w", a)
    assert h.take("ack", "w") and not h.take("kill_stale")
    assert h.worker("w").completed == 1


def test_progress_recorded(h):
    h.add_worker("w")
    (j,) = h.submit(spec())
    (a,) = h.claim("w")
    h.do(lambda c: c.progress("w", j, a["token"], 42.5, "epoch 3/10", (12.0, 1 << 20)))
    job = h.job(j)
    assert (job.progress, job.progress_message) == (42.5, "epoch 3/10")


# ---- lost workers ----------------------------------------------------------------------------


def test_lost_worker_requeues_without_spending_retry(h):
    h.add_worker("w1")
    h.add_worker("w2")
    (j,) = h.submit(spec(max_attempts=1))
    h.claim("w1")
    h.do(lambda c: c.worker_lost("w1", "silent for 5 s"))
    job = h.job(j)
    assert (job.state, job.failures, job.requeues) == ("available", 0, 1)
    assert h.worker("w1").state == "lost"
    assert h.run_one("w2") == j
    assert h.job(j).outcome == "success"


def test_lost_three_times_then_terminated_lost(h):
    (j,) = h.submit(spec())
    for n in range(4):
        h.add_worker(f"w{n}")
        assert h.claim(f"w{n}")
        h.do(lambda c, n=n: c.worker_lost(f"w{n}", "gone"))
    job = h.job(j)
    assert (job.state, job.outcome, job.requeues) == ("terminated", "lost", 3)


def test_reregister_keeps_held_attempts_and_fences_others(h):
    h.add_worker("w")
    _a, _b = h.submit(spec(), spec())
    got = h.claim("w", 2)
    held = [(x["job"], x["token"]) for x in got]
    # comes back holding only the first, plus a made-up attempt
    h.do(lambda c: c.register("w", "host", (2, 1024, 0), [], [held[0], (999, 7)]))
    assert h.state(held[0][0]) == "running"
    assert h.state(held[1][0]) == "available"  # it lost that one: requeued
    assert h.job(held[1][0]).requeues == 1
    kills = h.take("kill_stale", "w")
    assert [k.body for k in kills] == [{"job": 999, "token": 7}]
    assert h.worker("w").used_cpus == 1


# ---- cancellation ----------------------------------------------------------------------------


def test_cancel_inactive_and_available_go_straight_to_cancelled(h):
    a, b = h.submit(spec(hold=True), spec())
    out = h.do(lambda c: c.cancel(ALICE, [a, b], [], None))
    assert out["cancelled"] == [a, b]
    assert h.state(a) == h.state(b) == "cancelled"
    assert h.job(a).cancel_reason == "cancelled by alice"


def test_cancel_running_goes_pending_then_settles(h):
    h.add_worker("w")
    x, y = h.submit(spec(), spec())
    got = h.claim("w", 2)
    out = h.do(lambda c: c.cancel(ALICE, [x, y], [], "no longer needed"))
    assert out["pending"] == [x, y]
    assert h.state(x) == "pending_cancellation"
    cancels = h.take("cancel", "w")
    assert {e.body["job"] for e in cancels} == {x, y}
    by_job = {a["job"]: a for a in got}
    h.finish("w", by_job[x], exit_code=None, outcome="cancelled")
    h.finish("w", by_job[y], exit_code=0)  # it had already ended by itself
    assert h.state(x) == "cancelled"
    assert (h.state(y), h.job(y).outcome) == ("terminated", "success")


def test_cancel_turns_off_retries(h):
    h.add_worker("w")
    (j,) = h.submit(spec(max_attempts=5))
    (a,) = h.claim("w")
    h.do(lambda c: c.cancel(ALICE, [j], [], None))
    h.finish("w", a, exit_code=1)
    assert (h.state(j), h.job(j).outcome) == ("terminated", "failed")


def test_cancel_is_idempotent_on_terminal(h):
    h.add_worker("w")
    (j,) = h.submit(spec())
    h.run_one("w")
    out = h.do(lambda c: c.cancel(ALICE, [j], [], None))
    assert out == {"cancelled": [], "pending": [], "already": [j]}
    assert h.job(j).outcome == "success"


def test_cancel_cascade_depth_one_and_two_with_shared_child(h):
    a, b = h.submit(spec(hold=True), spec(hold=True))
    (c1,) = h.submit(spec(depends_on=after(a)))
    (shared,) = h.submit(spec(depends_on=after(a, b)))  # b is alive, a is not
    (d2,) = h.submit(spec(depends_on=after(c1)))
    h.do(lambda c: c.cancel(ALICE, [a], [], None))
    assert h.state(c1) == h.state(shared) == h.state(d2) == "cancelled"
    assert h.job(c1).cancel_reason == f"dependency {a} was cancelled"
    assert h.state(b) == "inactive"


def test_cancel_of_running_cancels_downstream_at_request_time(h):
    h.add_worker("w")
    (a,) = h.submit(spec())
    (b,) = h.submit(spec(depends_on=after(a)))
    h.claim("w")
    h.do(lambda c: c.cancel(ALICE, [a], [], None))
    assert h.state(a) == "pending_cancellation"
    assert h.state(b) == "cancelled"


def test_pending_cancellation_job_lost_becomes_cancelled(h):
    h.add_worker("w")
    (j,) = h.submit(spec())
    h.claim("w")
    h.do(lambda c: c.cancel(ALICE, [j], [], None))
    h.do(lambda c: c.worker_lost("w", "gone"))
    assert h.state(j) == "cancelled"


def test_heartbeat_resends_cancel(h):
    h.add_worker("w")
    (j,) = h.submit(spec())
    (a,) = h.claim("w")
    h.do(lambda c: c.cancel(ALICE, [j], [], None))
    h.take("cancel")
    h.do(lambda c: c.heartbeat("w", [(j, a["token"], 1.0, 100)]))
    assert [e.body["job"] for e in h.take("cancel", "w")] == [j]


def test_unknown_job_cancel_refused_whole(h):
    (j,) = h.submit(spec())
    with pytest.raises(NotFound):
        h.do(lambda c: c.cancel(ALICE, [j, 12345], [], None))
    assert h.state(j) == "available"


# ---- dependency kinds and groups -------------------------------------------------------------


def test_after_any_runs_after_failure(h):
    h.add_worker("w")
    (a,) = h.submit(spec())
    (b,) = h.submit(spec(depends_on=after(a, kind="after_any")))
    h.run_one("w", 1)
    assert h.job(b).eligible


def test_after_fail_runs_only_on_failure(h):
    h.add_worker("w")
    a, b = h.submit(spec(), spec())
    (fa,) = h.submit(spec(depends_on=after(a, kind="after_fail")))
    (fb,) = h.submit(spec(depends_on=after(b, kind="after_fail")))
    h.run_one("w", 0)
    h.run_one("w", 2)
    assert h.state(fa) == "cancelled" and "after_fail" in (h.job(fa).cancel_reason or "")
    assert h.job(fb).eligible


def test_dependency_on_already_failed_job_is_born_cancelled(h):
    h.add_worker("w")
    (a,) = h.submit(spec())
    h.run_one("w", 1)
    (b,) = h.submit(spec(depends_on=after(a)))
    assert h.state(b) == "cancelled"
    (c,) = h.submit(spec(depends_on=after(a, kind="after_any")))
    assert h.job(c).eligible


def test_a_dependency_that_can_never_be_met_cancels_alike_at_submit_and_at_modify(h):
    """One rule (docs/workflow.md): the job is accepted and cancelled with the reason, as if
    the dependency had failed after it was made."""
    h.add_worker("w")
    (a,) = h.submit(spec())
    h.run_one("w", 1)
    (born,) = h.submit(spec(depends_on=after(a)))
    held, other = h.submit(spec(hold=True), spec(hold=True))
    (child,) = h.submit(spec(depends_on=after(held)))
    h.do(lambda c: c.modify(ALICE, held, {"depends_on": after(a)}))
    for j in (born, held):
        job = h.job(j)
        assert (job.state, job.cancel_reason) == ("cancelled", f"dependency {a} did not succeed")
    assert h.state(child) == "cancelled"  # and downstream with it, as ever
    h.do(lambda c: c.modify(ALICE, other, {"depends_on": after(a, kind="after_any")}))
    assert (h.state(other), h.job(other).pending) == ("inactive", 0)


def test_a_group_member_that_outran_its_cancel_lets_the_group_succeed(h):
    """The cancel reached a member that had already ended by itself in success (SPEC §3):
    what was cancelled at request time stays cancelled, but the group has fully succeeded."""
    h.add_worker("w", cpus=1)
    m1, m2 = h.submit(spec(groups=["g"]), spec(groups=["g"]), groups=[{"name": "g"}])
    (early,) = h.submit(spec(depends_on=[{"group": "g"}]))
    (a,) = h.claim("w")
    h.do(lambda c: c.cancel(ALICE, [m1], [], None))
    assert h.state(m1) == "pending_cancellation" and h.state(early) == "cancelled"
    h.finish("w", a, exit_code=0)
    assert (h.state(m1), h.job(m1).outcome) == ("terminated", "success")
    assert h.run_one("w") == m2
    with h.store.read() as tx:
        group = tx.group_by_name("g")
    assert group is not None and (group.succeeded, group.total, group.doomed) == (2, 2, 0)
    (late,) = h.submit(spec(depends_on=[{"group": "g"}]))
    assert h.state(late) == "available" and h.job(late).eligible


def test_group_barrier(h):
    h.add_worker("w", cpus=1)
    ids = h.submit(*[spec(groups=["sweep"]) for _ in range(3)], groups=[{"name": "sweep"}])
    (reduce,) = h.submit(spec(depends_on=[{"kind": "after", "group": "sweep"}]))
    for _ in range(2):
        h.run_one("w")
        assert not h.job(reduce).eligible
    h.run_one("w")
    assert h.job(reduce).eligible
    assert h.run_one("w") == reduce
    assert set(ids) < {reduce, *ids}


def test_group_member_failure_cancels_group_dependents(h):
    h.add_worker("w", cpus=1)
    h.submit(spec(groups=["g"]), spec(groups=["g"]), groups=[{"name": "g"}])
    (red,) = h.submit(spec(depends_on=[{"group": "g"}]))
    (on_fail,) = h.submit(spec(depends_on=[{"kind": "after_fail", "group": "g"}]))
    h.run_one("w", 1)
    assert h.state(red) == "cancelled"
    assert "group 'g'" in (h.job(red).cancel_reason or "")
    assert not h.job(on_fail).eligible  # waits for the group to end
    h.run_one("w", 0)
    assert h.job(on_fail).eligible


def test_group_in_same_submission_as_dependent(h):
    ids = h.submit(
        spec(groups=["g"]),
        spec(groups=["g"]),
        spec(depends_on=[{"group": "g"}]),
        groups=[{"name": "g"}],
    )
    assert h.job(ids[2]).pending == 1


def test_cancel_group_cancels_members_and_downstream(h):
    h.add_worker("w", cpus=1)
    m1, m2 = h.submit(spec(groups=["g"]), spec(groups=["g"]), groups=[{"name": "g"}])
    (red,) = h.submit(spec(depends_on=[{"group": "g"}]))
    h.claim("w")
    out = h.do(lambda c: c.cancel(ALICE, [], ["g"], None))
    assert out == {"cancelled": [m2], "pending": [m1], "already": []}
    assert h.state(m1) == "pending_cancellation"
    assert h.state(m2) == h.state(red) == "cancelled"


def test_cancel_lists_each_job_once(h):
    """A job named twice (in a group and by id) is in one list of the reply, under what its
    first cancel did."""
    m1, m2 = h.submit(spec(groups=["g"]), spec(groups=["g"]), groups=[{"name": "g"}])
    out = h.do(lambda c: c.cancel(ALICE, [m2, m1, m2], ["g", "g"], None))
    assert out == {"cancelled": [m1, m2], "pending": [], "already": []}


def test_cancelling_an_open_group_settles_its_dependents_once(h):
    """Cancelling an open group closes it. A member ending in the cancel completes it, or the
    closing does if every member had ended: either way its dependents count it done once."""
    h.add_worker("w")
    h.submit(spec(groups=["done"]), groups=[{"name": "done", "open": True}])
    h.run_one("w")  # the only member of "done" ends; the group stays open
    h.submit(spec(groups=["o"]), groups=[{"name": "o", "open": True}])
    ids = h.submit(
        spec(hold=True, depends_on=[{"kind": "after_any", "group": "o"}]),
        spec(hold=True, depends_on=[{"kind": "after_any", "group": "done"}]),
    )
    h.do(lambda c: c.cancel(ALICE, [], ["o", "done"], None))
    assert [h.job(j).pending for j in ids] == [0, 0]


def test_open_group_completes_when_closed(h):
    h.add_worker("w", cpus=1)
    h.submit(spec(groups=["o"]), groups=[{"name": "o", "open": True}])
    (red,) = h.submit(spec(depends_on=[{"group": "o"}]))
    h.run_one("w")
    assert not h.job(red).eligible  # open: more members may come
    h.do(lambda c: c.close_group(ALICE, "o"))
    assert h.job(red).eligible


# ---- editing fields in each state ------------------------------------------------------------


def test_modify_rules_per_state(h):
    h.add_worker("w")
    (j,) = h.submit(spec(hold=True))
    h.do(lambda c: c.modify(ALICE, j, {"cpus": 0.5, "command": "echo hi", "priority": 3}))
    assert (h.job(j).cpus, h.job(j).command, h.job(j).priority) == (0.5, "echo hi", 3)
    h.do(lambda c: c.modify(ALICE, j, {}, release=True))
    h.do(lambda c: c.modify(ALICE, j, {"priority": 9}))  # allowed while available
    with pytest.raises(Conflict, match=r"cpus: may only be changed while the job is inactive"):
        h.do(lambda c: c.modify(ALICE, j, {"cpus": 2.0}))
    h.claim("w")
    with pytest.raises(Conflict, match="priority: may only be changed"):
        h.do(lambda c: c.modify(ALICE, j, {"priority": 1}))
    with pytest.raises(Conflict, match="only an available job can be held"):
        h.do(lambda c: c.modify(ALICE, j, {}, hold=True))
    assert h.job(j).priority == 9


def test_modify_unknown_field_refused(h):
    (j,) = h.submit(spec(hold=True))
    with pytest.raises(BadRequest, match="owner: not a field"):
        h.do(lambda c: c.modify(ALICE, j, {"owner": "mallory"}))


def test_hold_and_release_available_job(h):
    (j,) = h.submit(spec())
    h.do(lambda c: c.modify(ALICE, j, {}, hold=True))
    assert h.state(j) == "inactive" and not h.job(j).eligible
    h.do(lambda c: c.modify(ALICE, j, {}, release=True))
    assert h.job(j).eligible


def test_owner_rules(h):
    (j,) = h.submit(spec(), actor=ALICE)
    with pytest.raises(Forbidden, match="belongs to alice"):
        h.do(lambda c: c.cancel(BOB, [j], [], None))
    with pytest.raises(Forbidden):
        h.do(lambda c: c.modify(BOB, j, {"priority": 1}))
    h.do(lambda c: c.cancel(ROOT, [j], [], None))
    assert h.state(j) == "cancelled"


# ---- workers, drain --------------------------------------------------------------------------


def test_drain_finishes_running_then_drained(h):
    h.add_worker("w")
    h.submit(spec(), spec())
    (a,) = h.claim("w")
    h.do(lambda c: c.drain(ROOT, "w", False))
    assert h.worker("w").state == "draining"
    assert h.claim("w") == []  # claims nothing new
    h.finish("w", a)
    assert h.worker("w").state == "drained"
    h.do(lambda c: c.drain(ROOT, "w", True))
    assert h.worker("w").state == WorkerState.ACTIVE.value
    with pytest.raises(Forbidden):
        h.do(lambda c: c.drain(ALICE, "w", False))


def test_worker_cold_stop_requeues(h):
    h.add_worker("w")
    (j,) = h.submit(spec())
    (a,) = h.claim("w")
    h.finish("w", a, exit_code=None, outcome="cancelled")
    assert h.state(j) == "available" and h.job(j).failures == 0


def test_waiting_reasons(h):
    (a,) = h.submit(spec())
    (b,) = h.submit(spec(depends_on=after(a)))
    (c,) = h.submit(spec(hold=True))
    assert waiting_reason(h.job(a), []) == "no workers connected"
    assert waiting_reason(h.job(b), []) == "waiting for 1 dependency"
    assert waiting_reason(h.job(c), []) == "held"


def test_transition_table_refuses_illegal_moves():
    assert S.RUNNING not in TRANSITIONS[S.INACTIVE]
    assert all(not TRANSITIONS[s] for s in (S.TERMINATED, S.CANCELLED))


def test_reopen_shows_committed_state(tmp_path):
    h = Harness(tmp_path / "s", Config())
    h.add_worker("w")
    (j,) = h.submit(spec())
    h.claim("w")
    before = h.store.dump()
    h.store.close()
    h2 = Harness(tmp_path / "s")
    assert h2.store.dump() == before
    assert h2.state(j) == "running"
    h2.store.close()


def test_queued_only_while_a_worker_that_takes_jobs_has_room(h):
    h.add_worker("gpu", cpus=4, gpus=1)
    h.add_worker("cpu", cpus=1)
    (wide,) = h.submit(spec(cpus=2, hold=True))
    (gpu,) = h.submit(spec(gpus=1, hold=True))

    def reason(job_id: int) -> str | None:
        with h.store.read() as tx:
            return waiting_reason(h.job(job_id), list(tx.workers()))

    h.do(lambda c: c.drain(ROOT, "gpu", resume=False))
    for j in (wide, gpu):
        h.do(lambda c, j=j: c.modify(ALICE, j, {}, release=True))
        # Only the drained worker could run it, and it has room: not "queued".
        said = "every worker that could run it is drained: gpu (banyan-workers --resume)"
        assert reason(j) == said
    h.do(lambda c: c.drain(ROOT, "gpu", resume=True))
    assert reason(wide) == reason(gpu) == "queued"  # the next claim from gpu takes them


def test_a_result_that_waited_for_the_broker_is_dated_by_its_run(h):
    """A job that ran 4 s and whose result reached the broker 20 s after it started (the
    broker was away): its attempt ended at its start + 4 s, and its owner is charged 4 s."""
    h.add_worker("w1")
    (job,) = h.submit(spec("sleep 4", cpus=2))
    (a,) = h.claim("w1")
    h.now += 1
    h.do(lambda c: c.started("w1", job, a["token"], age=0.5))
    h.now += 20
    h.do(lambda c: c.result("w1", job, a["token"], "exited", 0, None, ("", ""), runtime=4.0))
    with h.store.read() as tx:
        attempt = tx.get_attempt(job, 1)
        user = tx.get_user(ALICE.name)
    assert attempt.started == 1000.5 and attempt.ended == 1004.5
    assert user is not None and user.usage == pytest.approx(2 * 4.0, rel=1e-3)


def test_a_long_cycle_is_named_by_its_start(h):
    n = 50  # each job after the next, the last after the first
    jobs = [spec(depends_on=[{"local": (i + 1) % n}]) for i in range(n)]
    with pytest.raises(Conflict) as e:
        h.submit(*jobs)
    said = str(e.value)
    assert said.startswith("dependency cycle: jobs[0] -> jobs[1] -> ")
    assert said.endswith(" -> jobs[9] -> ... (50 jobs and groups in all)"), said
