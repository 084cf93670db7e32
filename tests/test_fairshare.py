"""Fair share and per-user limits, on the pure state machine with a stepped clock."""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from banyan.broker.matching import decayed, factors
from banyan.broker.records import User
from banyan.broker.state import Actor, Config, Core
from banyan.broker.store import Store
from banyan.broker.views import held_back, waiting_reason
from banyan.errors import Conflict, Forbidden
from tests.statekit import ALICE, BOB, ROOT, Harness, spec

DAY = 86400.0


@dataclass
class Cluster:
    """Workers that run each job for its given number of seconds, one step per second; every
    step is one transaction: the results that are due, the claims, then a match."""

    store: Store
    config: Config = field(default_factory=Config)
    now: float = 0.0
    running: list[tuple[float, str, int, int]] = field(default_factory=list)  # end, worker, job
    runs: list[tuple[str, float, float]] = field(default_factory=list)  # owner, start, end
    workers: list[str] = field(default_factory=list)
    seconds: dict[int, float] = field(default_factory=dict)  # each job's run time
    owners: dict[int, str] = field(default_factory=dict)

    def step(self, submit: Sequence[tuple[Actor, list[float]]] = ()) -> None:
        with self.store.write() as tx:
            core = Core(tx, self.now, self.config)
            for actor, lengths in submit:
                ids = core.submit(actor, [spec() for _ in lengths], [])["jobs"]
                self.seconds.update(zip(ids, lengths, strict=True))
                self.owners.update((j, actor.name) for j in ids)
            while self.running and self.running[0][0] <= self.now:
                _, worker, job, token = heapq.heappop(self.running)
                core.result(worker, job, token, "exited", 0, None)
            for name in self.workers:
                core.claim(name, 1024)
            core.match()
        for effect in core.effects:
            if effect.type != "assign":
                continue
            for a in effect.body["jobs"]:
                end = self.now + self.seconds[a["job"]]
                heapq.heappush(self.running, (end, effect.worker, a["job"], a["token"]))
                self.runs.append((self.owners[a["job"]], self.now, end))

    def add_workers(self, count: int, cpus: float) -> None:
        with self.store.write() as tx:
            core = Core(tx, self.now, self.config)
            for _ in range(count):
                name = f"w{len(self.workers)}"
                core.register(name, "sim", (cpus, 1 << 20, 0), [], [])
                self.workers.append(name)

    def run_until(self, done: float | None = None, limit: int = 100_000) -> None:
        """Step a second at a time until `done` or no job runs; at most `limit` steps."""
        for _ in range(limit):
            self.now += 1.0
            self.step()
            if not self.running or (done is not None and self.now >= done):
                return
        raise AssertionError("the simulation did not finish")

    def cpu_seconds(self, until: float) -> dict[str, float]:
        """Cpu-seconds each owner held from the start until `until`."""
        out: dict[str, float] = {}
        for owner, start, end in self.runs:
            out[owner] = out.get(owner, 0.0) + max(0.0, min(end, until) - start)
        return out

    def last_start(self, owner: str) -> float:
        return max(start for o, start, _ in self.runs if o == owner)


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(Store(tmp_path / "store", sync=False))
    yield c
    c.store.close()


def lengths(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [float(rng.randint(1, 20)) for _ in range(n)]


def test_two_users_one_after_the_other_share_the_cluster_equally(cluster):
    """10,000 jobs each, alice's submitted first: while both have jobs waiting, they get the
    same cpu-time within 10% (first come, first served would give alice all of it)."""
    cluster.add_workers(10, cpus=32)
    cluster.step([(ALICE, lengths(10_000, 1))])  # alice takes every cpu at once
    cluster.now += 1
    cluster.step([(BOB, lengths(10_000, 2))])
    cluster.run_until()
    assert len(cluster.runs) == 20_000
    # Until the first of them has nothing left waiting.
    until = min(cluster.last_start("alice"), cluster.last_start("bob"))
    held = cluster.cpu_seconds(until)
    assert abs(held["alice"] - held["bob"]) <= 0.1 * max(held.values()), held


def test_capacity_follows_the_shares(cluster):
    with cluster.store.write() as tx:
        Core(tx, 0.0).set_user(ROOT, "bob", {"shares": 3.0})
    cluster.add_workers(4, cpus=16)
    cluster.step([(ALICE, lengths(3000, 3)), (BOB, lengths(3000, 4))])
    cluster.run_until()
    until = min(cluster.last_start("alice"), cluster.last_start("bob"))
    held = cluster.cpu_seconds(until)
    assert 2.7 <= held["bob"] / held["alice"] <= 3.3, held


def test_recent_usage_lowers_a_users_share_until_it_decays(cluster):
    cluster.config = Config(half_life=DAY)
    cluster.add_workers(2, cpus=16)
    cluster.step([(ALICE, lengths(2000, 5))])  # alice alone: the whole cluster
    cluster.run_until()
    alone = cluster.now
    cluster.runs.clear()
    cluster.step([(ALICE, lengths(1000, 6)), (BOB, lengths(1000, 7))])
    cluster.run_until(done=cluster.now + 200)
    held = cluster.cpu_seconds(cluster.now)
    assert held["bob"] > 2 * held["alice"], held  # alice pays for what she just ran
    cluster.run_until()
    # A week (seven half-lives) later, alice's past weighs 1/128 of what it did: as soon as
    # both run again, their new usage outweighs it.
    cluster.now = alone + 7 * DAY
    cluster.runs.clear()
    cluster.step([(ALICE, lengths(1000, 8)), (BOB, lengths(1000, 9))])
    cluster.run_until(done=cluster.now + 200)
    held = cluster.cpu_seconds(cluster.now)
    assert abs(held["bob"] - held["alice"]) < 0.1 * held["bob"], held


def test_usage_halves_every_half_life():
    user = User("u", usage=100.0, usage_at=10.0)
    assert decayed(user, 10.0, 60.0) == 100.0
    assert decayed(user, 70.0, 60.0) == pytest.approx(50.0)
    assert decayed(user, 190.0, 60.0) == pytest.approx(12.5)
    assert decayed(None, 190.0, 60.0) == 0.0
    equal = factors({"a": User("a", usage=5.0), "b": User("b", usage=5.0)}, 0.0, 60.0)
    assert equal == {"a": 0.5, "b": 0.5}  # usage in proportion to shares: Slurm's 0.5
    fresh = factors({"a": None, "b": User("b", shares=2.0)}, 0.0, 60.0)
    assert fresh == {"a": 1.0, "b": 1.0}  # nobody used anything yet


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path / "store")
    yield harness
    harness.store.close()


def test_priority_decides_within_one_user_not_across_users(h):
    h.add_worker("w", cpus=1)
    a_low, a_high = h.submit(spec(priority=0), spec(priority=9))
    (b_low,) = h.submit(spec(priority=-5), actor=BOB)
    order = []
    for _ in range(3):
        (a,) = h.claim("w")
        h.now += 10  # each runs 10 s: its owner's usage grows
        h.finish("w", a)
        order.append(a["job"])
    # Alice's priority 9 goes before her older job, but not before bob's turn.
    assert order == [a_high, b_low, a_low]


def test_max_running_holds_a_users_jobs_back_and_says_so(h):
    h.add_worker("w", cpus=4)
    h.do(lambda c: c.set_user(ROOT, "alice", {"max_running": 2}))
    mine = h.submit(*[spec()] * 5)
    (theirs,) = h.submit(spec(), actor=BOB)
    got = {a["job"]: a for a in h.claim("w", 10)}
    assert sorted(got) == [*mine[:2], theirs]  # one cpu stays free
    with h.store.read() as tx:
        reason = waiting_reason(h.job(mine[2]), list(tx.workers()), held_back(tx, "alice"))
    assert reason == "alice is at max_running (2 of 2 running)"
    h.finish("w", got[mine[0]])
    assert [a["job"] for a in h.claim("w", 10)] == [mine[2]]
    h.do(lambda c: c.set_user(ROOT, "alice", {"max_running": None}))
    assert h.assigned("w") == [mine[3]]  # the one cpu left


def test_max_queued_refuses_a_submission_that_goes_past_it(h):
    h.do(lambda c: c.set_user(ROOT, "alice", {"max_queued": 3}))
    h.submit(spec(), spec(hold=True))
    with pytest.raises(Conflict, match=r"max_queued: alice may have at most 3 jobs waiting"):
        h.submit(spec(), spec())
    h.add_worker("w", cpus=1)
    h.claim("w")  # one starts: it no longer waits
    assert len(h.submit(spec(), spec())) == 2
    h.submit(spec(), actor=BOB)  # bob has no limit


def test_only_admins_set_users(h):
    with pytest.raises(Forbidden, match="for admins"):
        h.do(lambda c: c.set_user(ALICE, "alice", {"max_running": 100}))
    user = h.do(lambda c: c.set_user(ROOT, "carol", {"shares": 2.5, "max_queued": 10}))
    assert (user.shares, user.max_queued, user.max_running) == (2.5, 10, None)
    with h.store.read() as tx:
        assert tx.get_user("carol") == user
