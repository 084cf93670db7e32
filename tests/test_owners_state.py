"""SPEC §6, jobs run as their owner: the state machine's side, with no socket and no account.

Which account each job runs as, which workers run whose jobs, hand-backs of jobs a worker
cannot run, why such jobs wait, and the submitters' environments that travel with jobs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from banyan.broker import matching, owners
from banyan.broker.records import Job
from banyan.broker.state import Actor
from banyan.broker.views import job_info, waiting_reason
from tests.statekit import ALICE, BOB, ROOT, Harness, spec

CAROL = Actor("carol", "user", "cwong")  # a key named carol, bound to the account cwong


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "store")
    yield harness
    harness.store.close()


def register(h: Harness, name: str, runs: owners.Runs, cpus: float = 2) -> None:
    h.do(lambda c: c.register(name, "host", (cpus, 1024, 0), [], [], runs))
    h.take("registered", name)


def reason(h: Harness, job_id: int) -> str | None:
    with h.store.read() as tx:
        return waiting_reason(h.job(job_id), list(tx.workers()))


def hand_back(h: Harness, worker: str, a: dict[str, Any], why: str) -> None:
    h.do(lambda c: c.hand_back(worker, a["job"], a["token"], why))


def test_each_job_records_the_account_its_owner_is_bound_to(h: Harness) -> None:
    (a,) = h.submit(spec(), actor=ALICE)
    (c,) = h.submit(spec(), actor=CAROL)
    assert (h.job(a).owner, h.job(a).account) == ("alice", "alice")
    assert (h.job(c).owner, h.job(c).account, h.job(c).runs_as) == ("carol", "cwong", "cwong")
    h.add_worker("w")
    (assignment,) = h.claim("w")
    assert assignment["account"] == "alice"
    with h.store.read() as tx:
        assert job_info(tx, h.job(c), [])["account"] == "cwong"


def test_a_job_stored_before_accounts_runs_as_its_owners_name(h: Harness) -> None:
    row = Job(1, "", "true", "dave", 0.0).pack()
    old = row[: Job.names().index("account")]  # as an older broker wrote it
    with h.store.write() as tx:
        tx.put_new_jobs([old])
    assert h.job(1).account is None and h.job(1).runs_as == "dave"
    register(h, "w", owners.Runs(only_account="dave"))  # matching reads the stored row
    (a,) = h.claim("w")
    assert (a["job"], a["account"]) == (1, "dave")


def test_a_worker_bound_to_one_account_is_never_offered_others(h: Harness) -> None:
    register(h, "mine", owners.Runs(only_account="alice"))
    (theirs,) = h.submit(spec(), actor=BOB)
    (ours,) = h.submit(spec(), actor=ALICE)
    assert [a["job"] for a in h.claim("mine", 5)] == [ours]
    assert h.state(theirs) == "available" and h.job(theirs).attempts == 0
    assert reason(h, theirs) == (
        "worker mine runs only alice's jobs (it is not root, and was not started with "
        "--run-any-owner)"
    )


def test_a_handed_back_job_is_queued_again_unspent_and_goes_elsewhere(h: Harness) -> None:
    register(h, "w1", owners.Runs())
    (j,) = h.submit(spec(max_attempts=1), actor=BOB)
    (a,) = h.claim("w1")
    why = "account bob does not exist on worker w1"
    hand_back(h, "w1", a, why)
    job = h.job(j)
    assert (job.state, job.attempts, job.failures, job.token, job.worker) == (
        "available",
        0,
        0,
        None,
        None,
    )
    assert job.started is None
    w1 = h.worker("w1")
    assert w1.refused == {"bob": why} and w1.running == {} and w1.used_cpus == 0
    assert w1.wants == 1  # its claim stands: the slot it was given is free again
    assert h.assigned("w1") == []  # not offered bob's job again
    assert reason(h, j) == why
    (mine,) = h.submit(spec(), actor=ALICE)
    assert h.assigned("w1") == [mine]  # other accounts' jobs still go there
    register(h, "w2", owners.Runs())
    (again,) = h.claim("w2")
    assert again["job"] == j and again["attempt"] == 1  # the returned attempt was not spent
    with h.store.read() as tx:
        (attempt,) = tx.attempts_of(j)  # its record, reused by the real first attempt
    assert attempt.token == again["token"] and attempt.worker == "w2"


def test_no_worker_for_an_account_says_so_for_each(h: Harness) -> None:
    register(h, "w1", owners.Runs(refused={"bob": "account bob does not exist on worker w1"}))
    register(h, "w2", owners.Runs(only_account="alice"))
    (j,) = h.submit(spec(), actor=BOB)
    assert h.claim("w1") == [] and h.claim("w2") == []
    text = reason(h, j)
    assert text is not None and text.startswith("no worker can run jobs of account bob: ")
    assert "account bob does not exist on worker w1" in text and "runs only alice's" in text


def test_a_stale_hand_back_changes_nothing(h: Harness) -> None:
    h.add_worker("w1")
    h.add_worker("w2")
    (j,) = h.submit(spec())
    (a,) = h.claim("w1")
    h.take()
    hand_back(h, "w2", a, "not mine")  # w2 does not hold it
    assert h.take("kill_stale", "w2") and h.state(j) == "running"
    assert h.worker("w2").refused == {}


def test_a_hand_back_of_a_job_being_cancelled_ends_it(h: Harness) -> None:
    h.add_worker("w1")
    (j,) = h.submit(spec())
    (a,) = h.claim("w1")
    h.do(lambda c: c.cancel(ALICE, [j], [], None))
    assert h.state(j) == "pending_cancellation"
    hand_back(h, "w1", a, "account alice does not exist on worker w1")
    assert h.state(j) == "cancelled" and h.worker("w1").running == {}


def test_registering_again_replaces_what_a_worker_refuses(h: Harness) -> None:
    register(h, "w1", owners.Runs(refused={"bob": "missing"}))
    (j,) = h.submit(spec(), actor=BOB)
    assert h.claim("w1") == []  # remembered as an empty scan for this worker
    register(h, "w1", owners.Runs())  # bob exists there now
    assert [a["job"] for a in h.claim("w1")] == [j]


def test_root_jobs_wait_for_a_worker_that_allows_them(h: Harness) -> None:
    why = "worker w1 does not run jobs as root (start it with --allow-root-jobs)"
    register(h, "w1", owners.Runs(refused={"root": why}))
    (j,) = h.submit(spec(), actor=ROOT)
    assert h.claim("w1") == []
    assert reason(h, j) == why


def test_the_environment_is_stored_once_and_travels_with_assignments(h: Harness) -> None:
    env = {"PATH": "/opt/x/bin:/usr/bin", "LANG": "C.UTF-8"}
    (a,) = h.do(lambda c: c.submit(ALICE, [spec()], [], None, environment=env))["jobs"]
    (b,) = h.do(lambda c: c.submit(ALICE, [spec()], [], None, environment=dict(env)))["jobs"]
    (plain,) = h.submit(spec())
    key = owners.environment_key(env)
    assert h.job(a).environ == h.job(b).environ == key and h.job(plain).environ is None
    h.add_worker("w", cpus=3)
    h.do(lambda c: c.claim("w", 3))
    (assign,) = h.take("assign", "w")
    assert assign.body["environments"] == {key: env}
    assert [x["environ"] for x in assign.body["jobs"]] == [key, key, None]


def test_assignments_split_when_their_environments_are_big(h: Harness) -> None:
    big = "x" * (owners.ASSIGN_ENVIRONMENT_BYTES // 2)

    def submit(env: dict[str, str]) -> int:
        return int(h.do(lambda c: c.submit(ALICE, [spec()], [], None, environment=env))["jobs"][0])

    ids = [submit({"V": f"{i}{big}"}) for i in range(3)]
    h.add_worker("w", cpus=3)
    h.do(lambda c: c.claim("w", 3))
    bodies = [e.body for e in h.take("assign", "w")]
    assert len(bodies) == 3  # no two of them fit in one message
    assert [j["job"] for b in bodies for j in b["jobs"]] == ids
    for b in bodies:
        assert set(b["environments"]) == {j["environ"] for j in b["jobs"]}


def test_umask_is_kept_and_editable_while_held(h: Harness) -> None:
    (j,) = h.submit(spec(umask=0o077, hold=True))
    assert h.job(j).umask == 0o077
    h.do(lambda c: c.modify(ALICE, j, {"umask": 0o027}, release=True))
    h.add_worker("w")
    (a,) = h.claim("w")
    assert a["umask"] == 0o027


def test_a_rebound_keys_new_jobs_are_not_held_back_by_its_old_ones(h: Harness) -> None:
    """carol's key was bound to a missing account, then rebound: her older jobs can run
    nowhere, and the newer ones (same shape, so the same queue, behind them) go at once."""
    old = [h.submit(spec(), actor=Actor("carol", "user", "ghost"))[0] for _ in range(5)]
    new = h.submit(spec(), spec(), actor=CAROL)
    register(h, "w1", owners.Runs(refused={"ghost": "account ghost does not exist on worker w1"}))
    assert sorted(int(a["job"]) for a in h.claim("w1", 2)) == new
    assert all(h.state(j) == "available" for j in old)
    assert "ghost does not exist" in (reason(h, old[0]) or "")


def test_the_walk_past_refused_jobs_is_bounded_per_claim(h: Harness) -> None:
    """Past REFUSED_WALK refused entries in a claim, a queue waits: a claim costs bounded
    reads however many jobs no worker runs."""
    for _ in range(matching.REFUSED_WALK + 1):
        h.submit(spec(), actor=Actor("carol", "user", "ghost"))
    (late,) = h.submit(spec(), actor=CAROL)
    register(h, "w1", owners.Runs(refused={"ghost": "account ghost does not exist on worker w1"}))
    assert h.claim("w1", 1) == []
    assert h.state(late) == "available"
