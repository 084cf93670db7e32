"""The LMDB store on a real environment: records, indexes, transactions, growth, dumps."""

from __future__ import annotations

import collections
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest

from banyan.broker.records import (
    Attempt,
    DepKind,
    Event,
    Group,
    Job,
    JobState,
    Tally,
    Tx,
    User,
    Worker,
)
from banyan.broker.store import (
    MapGrown,
    ReadOnly,
    ReadTx,
    Store,
    StoreError,
    StoreFull,
    WriteTx,
)

AVAILABLE, RUNNING = JobState.AVAILABLE.value, JobState.RUNNING.value


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db", sync=False)
    yield s
    s.close()


def job(job_id: int, **kw: Any) -> Job:
    kw.setdefault("command", "true")
    kw.setdefault("owner", "ann")
    return Job(id=job_id, name=f"j{job_id}", submitted=1.0, **kw)


def put(store: Store, *jobs: Job) -> None:
    with store.write() as tx:
        for j in jobs:
            tx.put_job(j)


def eligible_ids(store: Store) -> list[int]:
    with store.read() as tx:
        return [job_id for job_id, _ in tx.eligible()]


def check_indexes(store: Store) -> None:
    """Every index equals what the job records alone imply."""
    with store.read() as tx:
        jobs = [tx.get_job(i) for i in range(1, 1000)]
        present = [j for j in jobs if j is not None]
        queues: dict[tuple[Any, ...], list[Job]] = {}
        for j in present:
            if j.eligible:
                shape = (j.owner, j.cpus, j.memory, j.gpus, *sorted(set(j.tags)))
                queues.setdefault(shape, []).append(j)
        listed = [job_id for job_id, _ in tx.eligible()]
        # Each queue is one run of entries, best first; its head is its first entry.
        runs = [sorted(q, key=lambda j: (-j.priority, j.id)) for q in queues.values()]
        runs.sort(key=lambda run: listed.index(run[0].id))
        assert list(tx.eligible()) == [
            (j.id, (j.cpus, j.memory, j.gpus, j.tags)) for run in runs for j in run
        ]
        heads = tx.queue_heads()
        assert [(h.job, h.owner, h.priority) for h in heads] == [
            (run[0].id, run[0].owner, run[0].priority) for run in runs
        ]
        for head in heads:
            assert tx.queue_head(head.queue) == head
        for state in JobState:
            assert list(tx.jobs_in_state(state.value)) == [
                j.id for j in present if j.state == state.value
            ]
            assert tx.state_counts()[state.value] == sum(j.state == state.value for j in present)
        for group_id in range(1, 6):
            assert list(tx.group_members(group_id)) == [
                j.id for j in present if group_id in j.groups
            ]
            assert tx.group_counts(group_id) == {
                s.value: sum(j.state == s.value and group_id in j.groups for j in present)
                for s in JobState
            }
        for owner in {j.owner for j in present} | {"nobody"}:
            assert tx.owner_counts(owner) == {
                s.value: sum(j.state == s.value and j.owner == owner for j in present)
                for s in JobState
            }
            for state in JobState:
                ids = [j.id for j in present if j.owner == owner and j.state == state.value]
                assert list(tx.owner_ids(owner, state.value)) == ids
                assert list(tx.owner_ids(owner, state.value, descending=True)) == ids[::-1]
            owned = [j for j in present if j.owner == owner]
            tally = tx.tally(owner)
            assert tally.counts == dict(collections.Counter(j.state for j in owned))
            assert tally.cpus == pytest.approx(
                sum(j.cpus for j in owned if j.state in (RUNNING, "pending_cancellation"))
            )


# -- records and counters ------------------------------------------------------------------


def test_next_id_counters_start_at_one_and_are_independent(store: Store) -> None:
    with store.write() as tx:
        assert [tx.next_id("group") for _ in range(3)] == [1, 2, 3]
        assert tx.next_id("token") == 1
    with store.write() as tx:
        assert tx.next_id("group") == 4
        assert tx.next_id("token", 5) == 2
        assert tx.last_id("token") == 6


def test_job_ids_and_event_seqs_follow_their_tables(store: Store) -> None:
    with store.write() as tx:
        assert (tx.next_job_id(), tx.last_id("job"), tx.last_id("event")) == (1, 0, 0)
        tx.put_job(job(7))
        assert (tx.next_job_id(), tx.last_id("job")) == (8, 7)
        assert tx.append_events([(1.0, 7, None, AVAILABLE, None)] * 2) == 1
        assert tx.append_event(2.0, 7, AVAILABLE, RUNNING, None) == 3
        assert tx.last_id("event") == 3
        for counter in ("job", "event"):
            with pytest.raises(StoreError, match="from their table"):
                tx.next_id(counter)


def test_job_round_trip_and_missing(store: Store) -> None:
    j = job(7, env={"A": "1"}, tags=["x"], groups=[2], depends_on=[["after", "job", 3]])
    put(store, j)
    with store.read() as tx:
        assert tx.get_job(7) == j
        assert tx.get_job(8) is None


def test_attempts_by_job_in_number_order(store: Store) -> None:
    with store.write() as tx:
        for job_id, number in [(1, 2), (256, 1), (1, 1), (2, 1), (1, 10)]:
            tx.put_attempt(Attempt(job_id, number, token=number, worker="w", claimed=0.0))
        tx.put_attempt(Attempt(1, 2, token=99, worker="w", claimed=0.0, gpu_ids=[0, 1]))
    with store.read() as tx:
        assert [a.number for a in tx.attempts_of(1)] == [1, 2, 10]
        assert [a.job for a in tx.attempts_of(256)] == [256]
        assert tx.attempts_of(3) == []
        assert tx.get_attempt(1, 2) == Attempt(1, 2, 99, "w", 0.0, gpu_ids=[0, 1])
        assert tx.get_attempt(1, 3) is None


def test_dependents_by_target_in_dependent_order(store: Store) -> None:
    with store.write() as tx:
        tx.add_dependent("job", 5, 9, DepKind.AFTER.value)
        tx.add_dependent("job", 5, 6, DepKind.AFTER_FAIL.value)
        tx.add_dependent("job", 5, 300, DepKind.AFTER_ANY.value)
        tx.add_dependent("group", 5, 7, DepKind.AFTER.value)
        tx.add_dependent("job", 6, 8, DepKind.AFTER.value)
    with store.read() as tx:
        assert tx.dependents("job", 5) == [(6, "after_fail"), (9, "after"), (300, "after_any")]
        assert tx.dependents("group", 5) == [(7, "after")]
        assert tx.dependents("group", 6) == []


def test_groups_by_id_by_name_and_all(store: Store) -> None:
    with store.write() as tx:
        tx.put_group(Group(2, "b", "ann", 1.0, open=True))
        tx.put_group(Group(1, "a", "ann", 1.0))
    with store.write() as tx:
        g = tx.get_group(2)
        assert g is not None
        g.total, g.name = 3, "renamed"
        tx.put_group(g)
    with store.read() as tx:
        assert [g.id for g in tx.groups()] == [1, 2]
        assert tx.group_by_name("renamed") == Group(2, "renamed", "ann", 1.0, open=True, total=3)
        assert tx.group_by_name("b") is None
        assert tx.get_group(3) is None


def test_workers_and_claimers(store: Store) -> None:
    with store.write() as tx:
        tx.put_worker(Worker("w2", "h", 4, 1024, 0, wants=2, running={5: 17}))
        tx.put_worker(Worker("w1", "h", 4, 1024, 0, wants=1))
        tx.put_worker(Worker("w3", "h", 4, 1024, 0))
    with store.write() as tx:
        assert tx.claimers() == ["w1", "w2"]
        w = tx.get_worker("w1")
        assert w is not None
        w.wants = 0
        tx.put_worker(w)
    with store.read() as tx:
        assert tx.claimers() == ["w2"]
        assert [w.name for w in tx.workers()] == ["w1", "w2", "w3"]
        w2 = tx.get_worker("w2")
        assert w2 is not None and w2.running == {5: 17}  # int map keys survive
        assert tx.get_worker("nobody") is None


def test_submit_keys_and_meta(store: Store) -> None:
    with store.write() as tx:
        assert tx.get_submit_key("ann", "k") is None
        tx.put_submit_key("ann", "k", {"jobs": [1, 2], "groups": {"g": 3}}, 1.0)
        tx.put_submit_key("bob", "k", [9], 1.0)
        tx.put_meta("version", 1)
        tx.put_meta("blob", b"\x00\xff")
    with store.read() as tx:
        assert tx.get_submit_key("ann", "k") == {"jobs": [1, 2], "groups": {"g": 3}}
        assert tx.get_submit_key("bob", "k") == [9]
        assert tx.get_submit_key("ann", "other") is None
        assert tx.get_meta("version") == 1
        assert tx.get_meta("blob") == b"\x00\xff"
        assert tx.get_meta("missing") is None


def test_long_names_fit_lmdb_keys(store: Store) -> None:
    # 256 four-byte characters is past LMDB's 511-byte key limit.
    long_a, long_b = "𝄞" * 256, "𝄞" * 255 + "x"
    with store.write() as tx:
        tx.put_group(Group(1, long_a, "ann", 1.0))
        tx.put_group(Group(2, long_b, "ann", 1.0))
        tx.put_worker(Worker(long_a, "h", 1, 1, 0, wants=1))
        tx.put_submit_key(long_a, long_b, 1, 1.0)
        tx.put_submit_key(long_a, long_a, 2, 1.0)
    with store.read() as tx:
        assert [g.id for g in (tx.group_by_name(long_a), tx.group_by_name(long_b)) if g] == [1, 2]
        assert tx.claimers() == [long_a]
        assert tx.get_worker(long_a) is not None
        assert [tx.get_submit_key(long_a, k) for k in (long_b, long_a)] == [1, 2]


def test_events_in_order_from_seq_inclusive(store: Store) -> None:
    with store.write() as tx:
        seqs = [
            tx.append_event(float(i), i, None if i == 0 else AVAILABLE, RUNNING, None)
            for i in range(5)
        ]
        assert seqs == [1, 2, 3, 4, 5]
    with store.write() as tx:
        assert tx.append_event(9.0, 9, RUNNING, "terminated", "done") == 6
    with store.read() as tx:
        assert tx.events_from(0, 100)[0] == Event(1, 0.0, 0, None, RUNNING, None)
        assert [e.seq for e in tx.events_from(3, 2)] == [3, 4]
        assert tx.events_from(6, 10) == [Event(6, 9.0, 9, RUNNING, "terminated", "done")]
        assert tx.events_from(7, 10) == []
        assert tx.events_from(1, 0) == []


# -- job indexes ---------------------------------------------------------------------------


def test_eligible_order_priority_desc_then_id(store: Store) -> None:
    priorities = {1: 0, 2: 5, 3: -3, 4: 5, 5: 2**31 - 1, 6: -(2**31), 7: 0, 8: -1, 300: 5}
    put(store, *(job(i, priority=p) for i, p in sorted(priorities.items(), reverse=True)))
    assert eligible_ids(store) == [5, 2, 4, 300, 1, 7, 8, 3, 6]
    check_indexes(store)


def test_eligible_carries_the_request(store: Store) -> None:
    put(store, job(1, cpus=2.5, memory=512, gpus=1, tags=["gpu", "fast"]))
    with store.read() as tx:
        assert list(tx.eligible()) == [(1, (2.5, 512, 1, ["gpu", "fast"]))]
    with store.write() as tx:
        j = tx.get_job(1)
        assert j is not None
        j.memory, j.tags = 1024, []
        tx.put_job(j)
    with store.read() as tx:
        assert list(tx.eligible()) == [(1, (2.5, 1024, 1, []))]


def test_state_changes_keep_indexes_in_step(store: Store) -> None:
    put(store, job(1), job(2), job(3, pending=1), job(4, state=JobState.INACTIVE.value))
    assert eligible_ids(store) == [1, 2]
    with store.read() as tx:
        assert tx.state_counts() == {
            "inactive": 1, "available": 3, "running": 0,
            "pending_cancellation": 0, "terminated": 0, "cancelled": 0,
        }  # fmt: skip

    with store.write() as tx:  # claim job 1
        j = tx.get_job(1)
        assert j is not None
        j.state = RUNNING
        tx.put_job(j)
    assert eligible_ids(store) == [2]

    with store.write() as tx:  # job 3's dependency ends; job 1 finishes
        j3, j1 = tx.get_job(3), tx.get_job(1)
        assert j3 is not None and j1 is not None
        j3.pending = 0
        j1.state = JobState.TERMINATED.value
        tx.put_job(j3)
        tx.put_job(j1)
    assert eligible_ids(store) == [2, 3]
    with store.read() as tx:
        assert list(tx.jobs_in_state(AVAILABLE)) == [2, 3]
        assert list(tx.jobs_in_state("terminated")) == [1]
        assert list(tx.jobs_in_state(RUNNING)) == []
        counts = tx.state_counts()
        assert (counts["available"], counts["running"], counts["terminated"]) == (2, 0, 1)
    check_indexes(store)


def test_priority_change_reorders(store: Store) -> None:
    put(store, job(1), job(2), job(3))
    with store.write() as tx:
        j = tx.get_job(3)
        assert j is not None
        j.priority = 10
        tx.put_job(j)
    assert eligible_ids(store) == [3, 1, 2]
    with store.write() as tx:
        j = tx.get_job(3)
        assert j is not None
        j.priority = -10
        tx.put_job(j)
    assert eligible_ids(store) == [1, 2, 3]
    check_indexes(store)


def test_pending_jobs_are_not_eligible(store: Store) -> None:
    put(store, job(1, pending=2, priority=100), job(2))
    assert eligible_ids(store) == [2]
    with store.write() as tx:
        j = tx.get_job(1)
        assert j is not None
        j.pending = 0
        tx.put_job(j)
    assert eligible_ids(store) == [1, 2]


def test_group_member_index(store: Store) -> None:
    put(store, job(1, groups=[1]), job(2, groups=[1, 2]), job(3, groups=[2]))
    with store.write() as tx:
        j = tx.get_job(2)
        assert j is not None
        j.groups = [2, 3]
        tx.put_job(j)
    with store.read() as tx:
        assert list(tx.group_members(1)) == [1]
        assert list(tx.group_members(2)) == [2, 3]
        assert list(tx.group_members(3)) == [2]
        assert list(tx.group_members(4)) == []
    check_indexes(store)


def test_rewriting_the_same_record_changes_nothing(store: Store) -> None:
    put(store, job(1))
    before = store.dump()
    put(store, job(1))
    assert store.dump() == before
    with store.read() as tx:
        assert tx.state_counts()["available"] == 1


def test_priority_outside_int32_is_refused(store: Store) -> None:
    with pytest.raises(ValueError), store.write() as tx:
        tx.put_job(job(1, priority=2**31))
    assert eligible_ids(store) == []


def test_claiming_while_iterating_eligible(store: Store) -> None:
    """The claim loop writes while it walks the index: each job is seen once, in order."""
    put(store, *(job(i, priority=i % 3) for i in range(1, 201)))
    expected = eligible_ids(store)
    seen = []
    with store.write() as tx:
        for job_id, _ in tx.eligible():
            seen.append(job_id)
            j = tx.get_job(job_id)
            assert j is not None
            j.state = RUNNING
            tx.put_job(j)
            tx.put_job(job(1000 + job_id, priority=-5))  # new work lands behind the cursor
            if len(seen) == 200:
                break
    assert seen == expected
    assert eligible_ids(store) == list(range(1001, 1201))


def test_rewriting_while_iterating_states_and_groups(store: Store) -> None:
    put(store, *(job(i, groups=[1]) for i in range(1, 101)))
    with store.write() as tx:
        for job_id in tx.jobs_in_state(AVAILABLE):
            j = tx.get_job(job_id)
            assert j is not None
            j.state = JobState.CANCELLED.value
            tx.put_job(j)
        assert list(tx.jobs_in_state(AVAILABLE)) == []
        members = []
        for job_id in tx.group_members(1):
            members.append(job_id)
            j = tx.get_job(job_id)
            assert j is not None
            j.groups = [2]
            tx.put_job(j)
        assert members == list(range(1, 101))
        for g in tx.groups():
            tx.put_group(g)


def test_random_histories_keep_indexes_consistent(store: Store) -> None:
    rng = random.Random(7)
    states = [s.value for s in JobState]
    for _ in range(30):
        with store.write() as tx:
            for _ in range(20):
                job_id = rng.randint(1, 60)
                if rng.random() < 0.1:
                    there = tx.get_job(job_id)
                    assert tx.delete_job(job_id) == there
                    continue
                j = tx.get_job(job_id) or job(job_id, owner=rng.choice(["ann", "bo", "a" * 500]))
                j.state = rng.choice(states)
                j.pending = rng.choice([0, 0, 1])
                j.priority = rng.randint(-3, 3)
                j.groups = rng.sample(range(1, 6), rng.randint(0, 2))
                j.cpus = rng.choice([1.0, 2.0])
                tx.put_job(j)
        check_indexes(store)


# -- transactions --------------------------------------------------------------------------


def test_outer_abort_leaves_store_untouched(store: Store) -> None:
    put(store, job(1))
    before = store.dump()
    with pytest.raises(RuntimeError), store.write() as tx:
        tx.put_job(job(2))
        tx.put_group(Group(1, "g", "ann", 1.0))
        tx.next_id("group")
        raise RuntimeError("refused")
    assert store.dump() == before
    with store.write() as tx:
        assert tx.next_id("group") == 1
        assert tx.group_by_name("g") is None


def test_child_abort_leaves_parent_untouched_and_commit_merges(store: Store) -> None:
    with store.write() as tx:
        tx.put_job(job(1))
        with pytest.raises(RuntimeError), tx.child() as child:
            j = child.get_job(1)
            assert j is not None
            j.state = RUNNING
            child.put_job(j)
            child.put_job(job(2))
            assert child.next_id("token") == 1
            raise RuntimeError("refused")
        assert tx.get_job(2) is None
        assert list(tx.eligible()) == [(1, (1.0, 0, 0, []))]
        assert tx.state_counts()["running"] == 0
        with tx.child() as child:
            child.put_job(job(3))
            assert child.next_id("token") == 1
            with child.child() as grandchild:
                grandchild.put_job(job(4))
        assert [i for i, _ in tx.eligible()] == [1, 3, 4]
        assert tx.next_id("token") == 2
    assert eligible_ids(store) == [1, 3, 4]


def test_a_scan_survives_children_writing_under_it(store: Store) -> None:
    put(store, *(job(i) for i in range(1, 11)))
    with store.write() as tx:
        scan = tx.eligible()
        assert [next(scan)[0] for _ in range(3)] == [1, 2, 3]
        with tx.child() as child:
            for i in (4, 5):
                j = child.get_job(i)
                assert j is not None
                j.state = RUNNING
                child.put_job(j)
        with pytest.raises(RuntimeError), tx.child() as child:
            child.put_job(job(6, state=RUNNING))
            raise RuntimeError
        assert [i for i, _ in scan] == [6, 7, 8, 9, 10]


def test_many_children_share_one_commit(store: Store) -> None:
    with store.write() as tx:
        for i in range(1, 11):
            try:
                with tx.child() as child:
                    child.put_job(job(i))
                    if i % 2:
                        raise ValueError("odd jobs refused")
            except ValueError:
                pass
        assert eligible_ids(store) == []  # nothing durable before the outer commit
    assert eligible_ids(store) == [2, 4, 6, 8, 10]


def test_reopen_shows_exactly_what_was_committed(tmp_path: Path) -> None:
    with Store(tmp_path / "db") as s:
        put(s, job(1, groups=[1]), job(2, pending=1))
        with s.write() as tx:
            tx.put_group(Group(1, "g", "ann", 1.0))
            tx.add_dependent("job", 1, 2, "after")
            tx.put_attempt(Attempt(1, 1, 5, "w", 2.0))
            tx.append_event(1.0, 1, None, AVAILABLE, None)
            tx.put_worker(Worker("w", "h", 1, 1, 0, wants=1))
            tx.put_meta("m", [1])
        with pytest.raises(RuntimeError), s.write() as tx:
            tx.put_job(job(3))
            raise RuntimeError
        s.sync()
        dump = s.dump()
    with Store(tmp_path / "db") as s:
        assert s.dump() == dump
        assert eligible_ids(s) == [1]
        with s.write() as tx:
            assert tx.get_job(3) is None
            assert list(tx.group_members(1)) == [1]
            assert tx.dependents("job", 1) == [(2, "after")]
            assert len(tx.events_from(1, 10)) == 1
            assert tx.claimers() == ["w"]
            assert tx.get_meta("m") == [1]
            assert tx.last_id("event") == 1


def test_read_view_is_a_snapshot_and_refuses_writes(store: Store) -> None:
    put(store, job(1))
    with store.read() as view:
        put(store, job(2))
        assert view.get_job(2) is None
        assert [i for i, _ in view.eligible()] == [1]
        for write in (
            lambda: view.put_job(job(3)),
            lambda: view.next_id("token"),
            lambda: view.put_new_jobs([]),
            lambda: view.put_user(User("ann")),
            lambda: view.put_attempt(Attempt(1, 1, 1, "w", 0.0)),
            lambda: view.add_dependent("job", 1, 2, "after"),
            lambda: view.put_group(Group(1, "g", "ann", 1.0)),
            lambda: view.put_worker(Worker("w", "h", 1, 1, 0)),
            lambda: view.put_submit_key("ann", "k", 1, 1.0),
            lambda: view.append_event(1.0, 1, None, AVAILABLE, None),
            lambda: view.put_meta("k", 1),
        ):
            with pytest.raises(ReadOnly):
                write()
    assert eligible_ids(store) == [1, 2]


def test_views_satisfy_the_tx_protocol(store: Store) -> None:
    def count(tx: Tx) -> int:
        return sum(tx.state_counts().values())

    put(store, job(1))
    with store.write() as wtx:
        assert count(wtx) == 1
        assert isinstance(wtx, WriteTx)
    with store.read() as rtx:
        assert count(rtx) == 1
        assert isinstance(rtx, ReadTx)


def test_nested_write_is_refused(store: Store) -> None:
    with store.write(), pytest.raises(StoreError), store.write():
        pass


# -- growth and running out of room --------------------------------------------------------


def big_job(i: int) -> Job:
    return job(i, command="x" * 200, groups=[i % 7], priority=i % 11)


def test_write_batch_grows_the_map_and_keeps_everything(tmp_path: Path) -> None:
    with Store(tmp_path / "db", map_size=64 * 1024, sync=False) as s:
        start = s.map_size
        runs = 0

        def fill(tx: WriteTx, lo: int, hi: int) -> int:
            nonlocal runs
            runs += 1
            for i in range(lo, hi):
                tx.put_job(big_job(i))
                tx.put_attempt(Attempt(i, 1, i, "w", 0.0, stdout_tail="y" * 100))
            return hi - lo

        assert s.write_batch(lambda tx: fill(tx, 1, 3001)) == 3000
        assert s.write_batch(lambda tx: fill(tx, 3001, 6001)) == 3000
        assert s.map_size >= 8 * start  # at least three doublings
        assert runs > 2  # batches were re-run from scratch after growing
        with s.read() as tx:
            assert tx.state_counts()["available"] == 6000
            assert all(tx.get_job(i) == big_job(i) for i in range(1, 6001))
            assert len(list(tx.eligible())) == 6000
            assert len(list(tx.group_members(3))) == len(range(3, 6001, 7))
        dump = s.dump()
    with Store(tmp_path / "db", map_size=64 * 1024) as s:
        assert s.dump() == dump


def test_write_raises_map_grown_then_succeeds(tmp_path: Path) -> None:
    with Store(tmp_path / "db", map_size=64 * 1024, sync=False) as s:
        with pytest.raises(MapGrown), s.write() as tx:
            for i in range(1, 2001):
                tx.put_job(big_job(i))
        assert eligible_ids(s) == []
        grown = s.map_size
        assert grown >= 2 * 64 * 1024
        while True:
            try:
                with s.write() as tx:
                    for i in range(1, 2001):
                        tx.put_job(big_job(i))
                break
            except MapGrown:
                assert s.map_size > grown
                grown = s.map_size
        assert len(eligible_ids(s)) == 2000


def test_map_full_swallowed_in_a_child_still_dooms_the_batch(tmp_path: Path) -> None:
    with Store(tmp_path / "db", map_size=64 * 1024, sync=False) as s:
        answers: list[str] = []

        def handle_messages(tx: WriteTx) -> list[str]:
            answers.clear()
            for i in range(1, 41):
                try:  # a broker answers each message, even "internal error"
                    with tx.child() as child:
                        for k in range(100):
                            child.put_job(big_job(i * 100 + k))
                    answers.append("ok")
                except Exception:
                    answers.append("error")
            return list(answers)

        assert s.write_batch(handle_messages) == ["ok"] * 40
        assert len(eligible_ids(s)) == 4000


def test_store_full_at_max_size_and_still_usable(tmp_path: Path) -> None:
    with Store(tmp_path / "db", map_size=128 * 1024, max_map_size=256 * 1024, sync=False) as s:
        put(s, job(1))
        with pytest.raises(StoreFull):
            s.write_batch(lambda tx: [tx.put_job(big_job(i)) for i in range(2, 100_000)])
        assert s.map_size == 256 * 1024
        assert eligible_ids(s) == [1]  # the failed batch left no trace
        put(s, job(2))
        assert eligible_ids(s) == [1, 2]


def test_the_map_does_not_move_under_a_read_view(tmp_path: Path) -> None:
    with Store(tmp_path / "db", map_size=64 * 1024, sync=False) as s, s.read():
        with pytest.raises(StoreError) as caught:
            s.write_batch(lambda tx: [tx.put_job(big_job(i)) for i in range(1, 5000)])
        assert not isinstance(caught.value, StoreFull | MapGrown)
        assert s.map_size == 64 * 1024


class FailingTxn:
    """Stands in for an LMDB transaction whose puts fail (by default: the disk is full)."""

    def __init__(self, txn: Any, error: Exception | None = None) -> None:
        self._txn = txn
        self._error = error or lmdb.DiskError("mdb_put: No space left on device")

    def put(self, *args: Any, **kwargs: Any) -> Any:
        raise self._error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)


def test_disk_full_on_write_is_store_full_without_retry(store: Store) -> None:
    put(store, job(1))
    runs = 0

    def fn(tx: WriteTx) -> None:
        nonlocal runs
        runs += 1
        tx.put_job(job(2))
        tx._txn = FailingTxn(tx._txn)  # type: ignore[assignment]
        with pytest.raises(StoreFull):
            tx.put_meta("k", 1)

    size = store.map_size
    with pytest.raises(StoreFull):
        store.write_batch(fn)
    assert runs == 1 and store.map_size == size
    assert eligible_ids(store) == [1]


def test_other_lmdb_errors_are_store_errors(store: Store) -> None:
    with pytest.raises(StoreError) as caught, store.write() as tx:
        tx.put_job(job(1))
        tx._txn = FailingTxn(tx._txn, lmdb.BadValsizeError("mdb_put"))  # type: ignore[assignment]
        tx.put_meta("k", 1)
    assert not isinstance(caught.value, StoreFull | MapGrown)
    assert eligible_ids(store) == []


@pytest.mark.parametrize("in_child", [False, True])
def test_disk_full_on_commit_is_store_full(
    store: Store, monkeypatch: pytest.MonkeyPatch, in_child: bool
) -> None:
    def commit(self: WriteTx) -> None:
        raise lmdb.Error("mdb_txn_commit: No space left on device")

    with pytest.raises(StoreFull), store.write() as tx:
        tx.put_job(job(1))
        with tx.child() as child:
            child.put_job(job(2))
            if in_child:
                monkeypatch.setattr(WriteTx, "_commit", commit)
        monkeypatch.setattr(WriteTx, "_commit", commit)  # the outer commit
    monkeypatch.undo()
    assert eligible_ids(store) == []
    put(store, job(3))
    assert eligible_ids(store) == [3]


# -- dumps ---------------------------------------------------------------------------------


def build(s: Store) -> None:
    with s.write() as tx:
        for i in (3, 1, 2):
            tx.put_job(job(i, groups=[1], priority=i))
        tx.put_group(Group(1, "g", "ann", 1.0, total=3))
        tx.add_dependent("group", 1, 3, "after_any")
        tx.put_attempt(Attempt(1, 1, 1, "w", 0.0))


def test_dump_is_deterministic(tmp_path: Path) -> None:
    with Store(tmp_path / "a") as a, Store(tmp_path / "b") as b:
        build(a)
        with b.write() as tx:  # other workers and events do not count
            tx.put_worker(Worker("w", "h", 1, 1, 0))
            tx.append_event(1.0, 1, None, AVAILABLE, None)
        build(b)
        assert a.dump() == b.dump()
        assert a.dump() == a.dump()
        with b.write() as tx:
            tx.add_dependent("job", 1, 2, "after")
        assert a.dump() != b.dump()


# -- new jobs, notes and the layout ---------------------------------------------------------


def test_put_new_jobs_keeps_the_same_indexes_as_put_job(tmp_path: Path) -> None:
    rng = random.Random(7)
    jobs = [
        job(
            i,
            state=rng.choice([AVAILABLE, JobState.INACTIVE.value]),
            pending=rng.choice([0, 0, 1]),
            priority=rng.randint(-2, 2),
            cpus=rng.choice([1.0, 2.0]),
            tags=rng.choice([[], ["ssd"]]),
            groups=rng.choice([[], [1], [1, 2]]),
            owner=rng.choice(["ann", "bo"]),
        )
        for i in range(1, 200)
    ]
    with Store(tmp_path / "a", sync=False) as a, Store(tmp_path / "b", sync=False) as b:
        put(a, *jobs)
        with b.write() as tx:
            tx.put_new_jobs([j.pack() for j in jobs[:50]])
            with tx.child() as child:
                child.put_new_jobs([j.pack() for j in jobs[50:]])
        assert a.dump() == b.dump()
        assert eligible_ids(a) == eligible_ids(b)
        for s in (a, b):
            check_indexes(s)
        with a.read() as ta, b.read() as tb:
            assert ta.state_counts() == tb.state_counts()
            assert list(ta.group_members(2)) == list(tb.group_members(2))


def test_put_new_jobs_refuses_a_taken_id(store: Store) -> None:
    put(store, job(5))
    with pytest.raises(StoreError, match="already taken"), store.write() as tx:
        tx.put_new_jobs([job(5, command="again").pack()])
    with pytest.raises(StoreError, match="already taken"), store.write() as tx:
        tx.put_new_jobs([job(3).pack()])  # below the last id, but free: taken without appending
        tx.put_new_jobs([job(3).pack()])
    assert eligible_ids(store) == [5]
    with store.read() as view:
        assert view.get_job(5) == job(5)


def test_counts_written_once_by_the_outer_transaction(store: Store) -> None:
    with store.write() as tx:
        with tx.child() as child:
            child.put_job(job(1))
            with child.child() as grandchild:
                grandchild.put_job(job(2))
                assert grandchild.state_counts()[AVAILABLE] == 2
        with pytest.raises(RuntimeError), tx.child() as child:
            child.put_job(job(3))
            raise RuntimeError
        assert tx.state_counts()[AVAILABLE] == 2
    with store.read() as view:
        assert view.state_counts()[AVAILABLE] == 2


def test_owner_tallies_follow_children_and_aborts(store: Store) -> None:
    with store.write() as tx:
        with tx.child() as child:
            child.put_job(job(1, cpus=0.5))
            child.put_new_jobs([job(2, cpus=2.0).pack(), job(3, owner="bo").pack()])
            with child.child() as grandchild:
                j = grandchild.get_job(1)
                assert j is not None
                j.state = RUNNING
                grandchild.put_job(j)
                assert grandchild.tally("ann") == Tally("ann", {AVAILABLE: 1, RUNNING: 1}, 0.5)
        with pytest.raises(RuntimeError), tx.child() as child:
            child.put_job(job(4))
            raise RuntimeError
        assert tx.tally("ann") == Tally("ann", {AVAILABLE: 1, RUNNING: 1}, 0.5)
    with store.read() as view:
        assert view.tally("ann") == Tally("ann", {AVAILABLE: 1, RUNNING: 1}, 0.5)
        assert sorted(t.owner for t in view.tallies()) == ["ann", "bo"]
        assert view.tally("nobody") == Tally("nobody", {}, 0.0)
    check_indexes(store)


def test_queues_split_by_owner_and_shape(store: Store) -> None:
    put(
        store,
        job(1, cpus=4.0, priority=9),
        job(2, tags=["b", "a"]),
        job(3),
        job(4, cpus=4.0),
        job(5, owner="bo"),
        job(6, tags=["a", "b"], priority=1),
    )
    with store.read() as tx:
        heads = {h.job: h for h in tx.queue_heads()}
        assert sorted(heads) == [1, 3, 5, 6]  # tags are a set: 2 and 6 share a queue
        assert heads[6].request == (1.0, 0, 0, ["a", "b"]) and heads[6].priority == 1
        assert heads[5].owner == "bo"
    with store.write() as tx:  # taking a head uncovers the next one in its queue
        j = tx.get_job(1)
        assert j is not None
        j.state = RUNNING
        tx.put_job(j)
        after = tx.queue_head(heads[1].queue)
        assert after is not None and after.job == 4
    check_indexes(store)


def test_a_store_from_the_older_layout_is_converted(tmp_path: Path) -> None:
    with Store(tmp_path / "db") as s:
        put(s, job(1), job(2, state=RUNNING), job(3))
        with s.write() as tx:
            tx.append_events([(1.0, 1, None, AVAILABLE, "submitted")] * 3)
            expected = tx.state_counts()
    # Rewrite it as the previous broker kept it: counts in their own table, and counters for
    # job ids and event seqs in `ids`.
    env = lmdb.open(str(tmp_path / "db"), max_dbs=20)
    with env.begin(write=True) as txn:
        by_state = env.open_db(b"by_state", txn=txn)
        counts = env.open_db(b"counts", txn=txn)
        ids = env.open_db(b"ids", txn=txn)
        for state, n in expected.items():
            if n:
                assert txn.pop(state.encode(), db=by_state) is not None
                txn.put(state.encode(), n.to_bytes(8, "big"), db=counts)
        txn.put(b"job", (3).to_bytes(8, "big"), db=ids)
        txn.put(b"event", (3).to_bytes(8, "big"), db=ids)
    env.close()
    with Store(tmp_path / "db") as s:
        with s.write() as tx:
            assert tx.state_counts() == expected
            assert (tx.next_job_id(), tx.last_id("event")) == (4, 3)
            tx.put_job(job(4))
        with s.read() as view:
            assert view.state_counts()[AVAILABLE] == expected[AVAILABLE] + 1
    env = lmdb.open(str(tmp_path / "db"), max_dbs=20)
    with env.begin() as txn:
        assert txn.get(b"counts") is None  # the old table is gone from the main DB
        assert txn.get(b"job", db=env.open_db(b"ids", txn=txn)) is None
    env.close()


# -- ids by index, in either order, within bounds -------------------------------------------


def test_ids_in_bounds_either_way(store: Store) -> None:
    put(store, *(job(i, groups=[1] if i % 2 else []) for i in (3, 5, 6, 9, 10, 12)))
    with store.read() as tx:
        assert list(tx.job_ids()) == [3, 5, 6, 9, 10, 12]
        assert list(tx.job_ids(5, 10, descending=True)) == [10, 9, 6, 5]
        assert list(tx.job_ids(4, 11)) == [5, 6, 9, 10]
        assert list(tx.job_ids(7, 8)) == list(tx.job_ids(8, 7)) == []
        assert list(tx.job_ids(13, descending=True)) == []
        assert list(tx.job_ids(hi=4, descending=True)) == [3]
        assert list(tx.state_ids(AVAILABLE, 4, 9, descending=True)) == [9, 6, 5]
        assert list(tx.member_ids(1, descending=True)) == [9, 5, 3]
        assert list(tx.member_ids(1, 4)) == [5, 9]
        assert list(tx.owner_ids("ann", AVAILABLE, 6, 11)) == [6, 9, 10]


@pytest.mark.parametrize("descending", [False, True])
def test_ids_survive_changes_made_while_walking(store: Store, descending: bool) -> None:
    put(store, *(job(i) for i in range(1, 301)))
    walked = []
    with store.write() as tx:
        for job_id in tx.state_ids(AVAILABLE, 1, 300, descending=descending):
            walked.append(job_id)
            j = tx.get_job(job_id)
            assert j is not None
            j.state = JobState.CANCELLED.value
            tx.put_job(j)
            tx.put_job(job(300 + job_id))  # and something new, elsewhere in the index
    assert walked == (list(range(300, 0, -1)) if descending else list(range(1, 301)))
    check_indexes(store)


def test_first_submitted_since_finds_the_edge(store: Store) -> None:
    times = {1: 10.0, 2: 10.0, 4: 11.0, 7: 12.5, 8: 13.0, 20: 20.0}
    put(store, *(Job(i, "", "true", "ann", t) for i, t in times.items()))
    with store.read() as tx:
        for when in (0.0, 10.0, 10.5, 11.0, 12.0, 13.0, 19.9, 20.0, 21.0):
            edge = tx.first_submitted_since(when)
            assert list(tx.job_ids(edge)) == [i for i, t in times.items() if t >= when]
            assert list(tx.job_ids(hi=edge - 1)) == [i for i, t in times.items() if t < when]
    with Store(store._env.path() + "-empty", sync=False) as empty, empty.read() as tx:
        assert tx.first_submitted_since(5.0) == 1


def test_a_format_1_store_gets_queues_and_tallies(tmp_path: Path) -> None:
    with Store(tmp_path / "db") as s:
        put(
            s,
            job(1, priority=3, groups=[2]),
            job(2, owner="bo", cpus=2.0),
            job(3, state=RUNNING, cpus=1.5),
            job(4, pending=1),
            job(5, state="terminated"),
        )
    # Rewrite it as format 1 kept it: one eligible index, best first, no owners, and no owner
    # entries or group counts in by_state.
    env = lmdb.open(str(tmp_path / "db"), max_dbs=30)
    with env.begin(write=True) as txn:
        by_state = env.open_db(b"by_state", txn=txn)
        for key in [k for k, _ in txn.cursor(by_state) if k[:1] in (b"\x01", b"\x02")]:
            txn.delete(key, db=by_state)
        for name in (b"owners", b"owner_names", b"shapes"):
            txn.drop(env.open_db(name, txn=txn), delete=True)
        txn.delete(b"format", db=env.open_db(b"meta", txn=txn))
        eligible = env.open_db(b"eligible", txn=txn)
        txn.drop(eligible, delete=False)
        for job_id, priority, request in ((1, 3, [1.0, 0, 0, []]), (2, 0, [2.0, 0, 0, []])):
            key = (2**31 - 1 - priority).to_bytes(4, "big") + job_id.to_bytes(8, "big")
            txn.put(key, msgpack.packb(request), db=eligible)
    env.close()
    with Store(tmp_path / "db") as s:
        check_indexes(s)
        with s.read() as view:
            assert view.get_meta("format") == 2
            counts = {AVAILABLE: 2, RUNNING: 1, "terminated": 1}
            assert view.tally("ann") == Tally("ann", counts, 1.5)
            assert sorted(h.job for h in view.queue_heads()) == [1, 2]
            assert view.group_counts(2)[AVAILABLE] == 1
            assert list(view.owner_ids("ann", AVAILABLE)) == [1, 4]


def test_delete_job_undoes_every_index_put_job_keeps(store: Store) -> None:
    put(
        store,
        job(1, groups=[1, 2]),
        job(2, state=RUNNING, cpus=2.0),
        job(3, depends_on=[["after", "job", 1], ["after", "group", 2]], pending=2),
        job(4, state="terminated", owner="bo"),
    )
    with store.write() as tx:
        tx.add_dependent("job", 1, 3, "after")
        tx.add_dependent("group", 2, 3, "after")
        tx.put_attempt(Attempt(2, 1, 7, "w", 1.0))
        tx.put_group(Group(2, "g2", "ann", 1.0))
        assert tx.delete_job(9) is None
        for job_id in (1, 2, 4):
            assert tx.delete_job(job_id) is not None
        assert tx.attempts_of(2) == [] and tx.dependents("job", 1) == []
        assert tx.dependents("group", 2) == [(3, "after")]  # job 3 still waits for the group
        assert tx.delete_job(3) is not None
        assert tx.dependents("group", 2) == []
        tx.delete_group(2)
        assert tx.group_by_name("g2") is None and tx.get_group(2) is None
    check_indexes(store)
    with store.read() as tx:
        assert tx.state_counts() == dict.fromkeys(tx.state_counts(), 0)
        assert (tx.tally("ann"), tx.tally("bo")) == (Tally("ann", {}, 0.0), Tally("bo", {}, 0.0))
        assert tx.next_job_id() == 5  # the last job's number stays taken


def test_events_and_submit_keys_are_deleted_oldest_first(store: Store) -> None:
    with store.write() as tx:
        tx.append_events([(float(t), 1, None, AVAILABLE, None) for t in range(5)])
        for t in range(4):
            tx.put_submit_key("ann", f"k{t}", t, float(t))
        assert tx.delete_events_through(2) == 2 and tx.events_from(0, 9)[0].seq == 3
        assert tx.expire_submit_keys(2.5, 10) == 3
        assert [tx.get_submit_key("ann", f"k{t}") for t in range(4)] == [None, None, None, 3]
        assert tx.expire_submit_keys(9.0, 10) == 1
        assert tx.delete_events_through(99) == 3 and tx.events_from(0, 9) == []
        assert tx.append_event(9.0, 1, None, AVAILABLE, None) == 6  # numbers are not reused
