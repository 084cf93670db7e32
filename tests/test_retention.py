"""Retention: what ended long ago is purged in slices, and what stays stays consistent."""

from __future__ import annotations

import functools
import itertools
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

from banyan import protocol
from banyan.broker.retention import purge
from banyan.broker.server import Broker, BrokerConfig
from banyan.broker.state import Config, Core
from banyan.broker.store import Store
from banyan.errors import NotFound
from tests.cluster import Cluster, scaled, wait_for
from tests.statekit import ALICE, BOB, Harness, after, spec
from tests.storecheck import assert_consistent

DAY = 86400.0
KEEP = 30 * DAY


@pytest.fixture
def h(tmp_path: Path):
    harness = Harness(tmp_path / "store")
    harness.add_worker("w", cpus=64)
    yield harness
    harness.store.close()


def purge_all(h: Harness, keep: float = KEEP) -> None:
    with h.store.write() as tx:
        assert purge(tx, h.now - keep, lambda: True).done


def allow(n: int) -> Callable[[], bool]:
    """A purge's `more` that says yes n times."""
    asked = itertools.count()
    return lambda: next(asked) < n


def cancel(job_ids: list[int], core: Core) -> dict[str, list[int]]:
    return core.cancel(ALICE, job_ids, [], None)


def run(h: Harness, *job_ids: int, exit_code: int = 0) -> None:
    got = {a["job"]: a for a in h.claim("w", 64)}
    for job_id in job_ids:
        h.finish("w", got[job_id], exit_code)


def test_ended_jobs_older_than_the_retention_are_purged_with_what_hangs_on_them(h):
    a, b = h.submit(
        spec(groups=["nightly"]), spec(groups=["nightly"]), groups=[{"name": "nightly"}]
    )
    (failed,) = h.submit(spec())
    (doomed,) = h.submit(spec(depends_on=after(failed)))  # cancelled when `failed` fails
    (keyed,) = h.submit(spec(), key="k1")
    (long_running,) = h.submit(spec())
    (held,) = h.submit(spec(hold=True))
    run(h, a, b, keyed)  # its claim starts `failed` and `long_running` too
    token = h.job(failed).token
    assert token is not None and h.state(long_running) == "running"
    h.do(lambda c: c.result("w", failed, token, "exited", 1, None))
    assert h.state(doomed) == "cancelled"
    h.now += 20 * DAY
    (recent,) = h.submit(spec())
    run(h, recent)

    h.now += 11 * DAY  # 31 days after the first batch ended, 11 after `recent`
    purge_all(h)
    with h.store.read() as tx:
        for gone in (a, b, failed, doomed, keyed):
            assert tx.get_job(gone) is None
            assert tx.attempts_of(gone) == []
            assert tx.dependents("job", gone) == []
        assert tx.group_by_name("nightly") is None  # every member gone: the group too
        for kept in (long_running, held, recent):
            assert tx.get_job(kept) is not None
        assert tx.events_from(0, 1)[0].time >= h.now - KEEP  # older events are gone
        assert tx.tally("alice").counts == {"running": 1, "inactive": 1, "terminated": 1}
    assert_consistent(h.store)
    # The name is free again; the key is forgotten, so the same key makes a new job.
    (again,) = h.submit(spec(groups=["nightly"]), groups=[{"name": "nightly"}])
    (rekeyed,) = h.submit(spec(), key="k1")
    assert rekeyed != keyed and again > recent
    # A purged job: a dependency on it is refused, saying why; cancelling it is a success.
    with pytest.raises(NotFound, match=f"job {failed} ended long ago and was purged"):
        h.submit(spec(depends_on=after(failed)))
    cancelled = h.do(lambda c: c.cancel(ALICE, [failed], [], None))
    assert cancelled == {"cancelled": [], "pending": [], "already": [failed]}
    with pytest.raises(NotFound, match="no job 999"):
        h.do(lambda c: c.cancel(ALICE, [999], [], None))
    assert_consistent(h.store)


def test_a_group_stays_while_it_has_members_or_is_open(h):
    done, waits = h.submit(
        spec(groups=["half"]), spec(groups=["half"], hold=True), groups=[{"name": "half"}]
    )
    (member,) = h.submit(spec(groups=["open"]), groups=[{"name": "open", "open": True}])
    (downstream,) = h.submit(spec(depends_on=[{"kind": "after", "group": "half"}]))
    run(h, done, member)
    h.now += KEEP + DAY
    purge_all(h)
    with h.store.read() as tx:
        half, still_open = tx.group_by_name("half"), tx.group_by_name("open")
        assert half is not None and list(tx.group_members(half.id)) == [waits]
        assert half.ended == 1 and half.total == 2  # its counts stay as they were
        assert still_open is not None and list(tx.group_members(still_open.id)) == []
        assert h.job(downstream).pending == 1
    assert_consistent(h.store)


def test_groups_that_never_had_a_member_go_after_the_retention(h):
    """A submission of groups alone: sealed or open, they go once older than the retention,
    unless a job depends on one; newer ones stay, and each pass starts where the last ended."""
    h.submit(groups=[{"name": f"empty-{i}"} for i in range(150)])
    h.submit(groups=[{"name": "empty-open", "open": True}, {"name": "awaited", "open": True}])
    (waiting,) = h.submit(spec(depends_on=[{"kind": "after", "group": "awaited"}]))
    h.now += KEEP + DAY
    h.submit(groups=[{"name": "fresh"}])
    with h.store.write() as tx:  # a slice at a time: 2 looks at the keys, then 1 at groups
        assert not purge(tx, h.now - KEEP, allow(3)).done
    purge_all(h)
    with h.store.read() as tx:
        names = {g.name for g in tx.groups()}
    assert names == {"awaited", "fresh"}
    assert h.job(waiting).pending == 1
    h.submit(groups=[{"name": "empty-3"}])  # its name is free again
    assert_consistent(h.store)


def test_an_exported_environment_goes_with_the_last_job_that_names_it(h):
    env = {"PATH": "/usr/bin", "PROJECT": "x"}

    def submit(n: int) -> list[int]:
        jobs = [spec() for _ in range(n)]
        return list(h.do(lambda c: c.submit(ALICE, jobs, [], None, environment=env))["jobs"])

    old = submit(2)
    run(h, *old)
    h.now += KEEP + DAY
    (young,) = submit(1)
    assert_consistent(h.store)  # three jobs name it
    purge_all(h)
    with h.store.read() as tx:
        assert tx.get_environment(h.job(young).environ or "") == env
    assert_consistent(h.store)  # one does
    run(h, young)
    h.now += KEEP + DAY
    purge_all(h)
    with h.store.read() as tx:
        assert tx.first_job() is None
    assert_consistent(h.store)  # none does: it is gone


def test_numbers_are_never_reused_when_everything_is_purged(h):
    ids = h.submit(spec(), spec())
    run(h, *ids)
    with h.store.read() as tx:
        last_event = tx.last_id("event")
    h.now += KEEP + DAY
    purge_all(h)
    with h.store.read() as tx:
        assert tx.first_job() is None and tx.events_from(0, 1) == []
        assert tx.last_id("event") == last_event and tx.next_job_id() == ids[-1] + 1
    (new,) = h.submit(spec())
    assert new == ids[-1] + 1
    with h.store.read() as tx:
        assert tx.events_from(0, 1)[0].seq == last_event + 1
    h.store.close()
    h.store = type(h.store)(h.path, sync=False)  # and after a restart
    with h.store.read() as tx:
        assert tx.next_job_id() == new + 1


def test_a_purge_goes_in_slices_and_each_leaves_the_store_consistent(h):
    jobs = h.submit(*[spec(groups=["g"])] * 40, groups=[{"name": "g"}])
    chained = h.submit(*[spec(depends_on=after(j)) for j in jobs[:20]], actor=BOB)
    run(h, *jobs)
    h.now += 1
    run(h, *chained)
    h.now += KEEP + 1
    slices = 0
    while True:
        with h.store.write() as tx:
            done = purge(tx, h.now - KEEP, allow(7))
        slices += 1
        assert_consistent(h.store)
        if done.done:
            break
        assert slices < 100
    assert slices > 5  # seven events a slice: it really went in slices
    with h.store.read() as tx:
        assert tx.first_job() is None and tx.group_by_name("g") is None


def test_the_broker_purges_in_the_background_a_slice_per_turn(tmp_path: Path):
    """Through the server, on its own injected clocks: a purge of thousands of old jobs goes in
    slices across turns, and a request sent meanwhile is answered at the next turn."""
    h = Harness(tmp_path / "state")
    h.add_worker("w", cpus=5000)
    h.submit(*[spec()] * 4000)
    got = h.claim("w", 5000)
    with h.store.write() as tx:  # all the results in one go: quicker than one by one
        core = Core(tx, h.now)
        for a in got:
            core.result("w", a["job"], a["token"], "exited", 0, None)
    h.now += 1.5 * DAY
    (young,) = h.submit(spec(), key="young")
    run(h, young)
    h.store.close()

    clock = [h.now + 0.6 * DAY]  # `old` ended 2.1 days ago, `young` 0.6
    config = BrokerConfig(
        state_dir=str(tmp_path / "state"),
        client_port=0,
        worker_port=0,
        core=Config(retention=DAY),
        sync=False,
        secure=False,
    )
    broker = Broker(config, clock=lambda: clock[0], wall=lambda: clock[0])
    client = broker.ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(f"tcp://127.0.0.1:{broker.client_port}")
    try:

        def kept() -> int:
            with broker.store.read() as tx:
                return sum(tx.state_counts().values())

        answered = 0
        counts = [kept()]
        for turn in range(1, 10_000):
            client.send(protocol.encode("ping", {}, turn))
            broker.step(timeout=0.2)
            if client.poll(int(scaled(1) * 1000)):
                protocol.decode(client.recv(), protocol.CLIENT_REPLIES)
                answered += 1
            counts.append(kept())
            if counts[-1] == 1:
                break
        assert counts[-1] == 1  # only `young` is left
        assert len(counts) > 5 and all(a >= b for a, b in itertools.pairwise(counts))
        assert answered == len(counts) - 1  # the loop answered at every turn
        assert_consistent(broker.store)
        client.send(protocol.encode("stats", {}, 1))
        broker.step(timeout=0.2)
        store = protocol.decode(client.recv(), protocol.CLIENT_REPLIES).body["store"]
        assert store["jobs"] == 1 and store["oldest_job"]["id"] == young
        assert store["retention"] == DAY and store["used"] <= store["file"]
        # `young` comes of age a day after it ended; the purge waits for it, then takes it.
        clock[0] += 0.3 * DAY
        broker.step(timeout=0)
        assert kept() == 1
        clock[0] += 0.2 * DAY
        broker.step(timeout=0)
        assert kept() == 0
        with broker.store.read() as view:
            assert view.get_submit_key("alice", "young") is None
    finally:
        client.close()
        broker.close()


def test_a_broker_killed_in_the_middle_of_a_purge_comes_back_consistent(tmp_path: Path):
    """kill -9 while thousands of old jobs are being purged: the store is consistent, and the
    restarted broker finishes the purge."""
    c = Cluster(tmp_path)
    h = Harness(c.state_dir)
    h.now = time.time() - 3 * DAY
    h.add_worker("w", cpus=2000)
    ran = h.submit(*[spec()] * 2000)
    got = h.claim("w", 2000)
    with h.store.write() as tx:
        core = Core(tx, h.now)
        for a in got:
            core.result("w", a["job"], a["token"], "exited", 0, None)
    queued = h.submit(*[spec(groups=["batch"])] * 16_000, groups=[{"name": "batch"}])
    for lo in range(0, len(queued), 1000):  # a thousand a request
        h.do(functools.partial(cancel, queued[lo : lo + 1000]))
    live = h.submit(*[spec(hold=True)] * 5)
    h.store.close()
    total = len(ran) + len(queued) + len(live)
    c.broker_args = ["--retention", "1d"]
    try:
        c.start_broker(wait=False)  # it starts purging at once: watch its log
        sliced = re.compile("purged [1-9][0-9]* jobs")
        wait_for(lambda: sliced.search(c.log("broker")), 20, interval=0.002, what="a slice")
        c.kill("broker", signal.SIGKILL)
        c.procs.pop("broker")
        store = Store(c.state_dir, sync=False)
        try:
            midway = len(assert_consistent(store))
        finally:
            store.close()
        assert len(live) < midway < total  # killed in the middle
        c.start_broker()
        client = c.client()

        def kept() -> int:
            return sum(sum(u["jobs"].values()) for u in client.users())

        wait_for(lambda: kept() == len(live), 30, what="the purge to finish")
        (new,) = client.submit("true", hold=True).jobs
        assert new == live[-1] + 1
        c.kill("broker", signal.SIGTERM)
        c.procs.pop("broker")
        store = Store(c.state_dir, sync=False)
        try:
            assert sorted(assert_consistent(store)) == [*live, new]
        finally:
            store.close()
    finally:
        c.stop()
