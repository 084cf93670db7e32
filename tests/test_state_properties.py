"""Random sequences of operations against the state machine, with invariants after every step."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from banyan.broker.records import JobState, Tx
from banyan.errors import BanyanError
from tests.statekit import ALICE, ROOT, Harness

S = JobState
ALL_STATES = [s.value for s in S]
WORKERS = ["w0", "w1", "w2"]


def all_jobs(tx: Tx) -> list[int]:
    return sorted(j for s in ALL_STATES for j in tx.jobs_in_state(s))


class Machine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="banyan-prop-"))
        self.h = Harness(self.dir / "store")
        self.terminal: dict[int, list[Any]] = {}
        self.groups = 0
        for i, name in enumerate(WORKERS):
            self.h.add_worker(name, cpus=1 + i, memory=1000, gpus=i)

    def teardown(self) -> None:
        before = self.h.store.dump()
        self.h.store.close()
        reopened = Harness(self.dir / "store")
        try:
            assert reopened.store.dump() == before
        finally:
            reopened.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _try(self, fn: Any) -> Any:
        try:
            return self.h.do(fn)
        except BanyanError:
            return None

    def _ids(self) -> list[int]:
        with self.h.store.read() as tx:
            return all_jobs(tx)

    @rule(
        n=st.integers(1, 4),
        data=st.data(),
        hold=st.booleans(),
        group=st.booleans(),
    )
    def submit(self, n: int, data: st.DataObject, hold: bool, group: bool) -> None:
        existing = self._ids()
        jobs = []
        for i in range(n):
            deps: list[dict[str, Any]] = []
            for _ in range(data.draw(st.integers(0, 2))):
                kind = data.draw(st.sampled_from(["after", "after_any", "after_fail"]))
                choices = (["job"] if existing else []) + (["local"] if i else [])
                if self.groups:
                    choices.append("group")
                if not choices:
                    break
                target = data.draw(st.sampled_from(choices))
                if target == "job":
                    deps.append({"kind": kind, "job": data.draw(st.sampled_from(existing))})
                elif target == "local":
                    deps.append({"kind": kind, "local": data.draw(st.integers(0, i - 1))})
                else:
                    deps.append(
                        {"kind": kind, "group": f"g{data.draw(st.integers(1, self.groups))}"}
                    )
            jobs.append(
                {
                    "command": "true",
                    "hold": hold and data.draw(st.booleans()),
                    "cpus": data.draw(st.sampled_from([0.5, 1.0, 2.0])),
                    "gpus": data.draw(st.integers(0, 1)),
                    "max_attempts": data.draw(st.integers(1, 3)),
                    "depends_on": deps,
                    "groups": [f"g{self.groups + 1}"] if group else [],
                }
            )
        groups = [{"name": f"g{self.groups + 1}"}] if group else []
        if self._try(lambda c: c.submit(ALICE, jobs, groups, None)) is not None and group:
            self.groups += 1

    @rule(data=st.data())
    def release_or_hold(self, data: st.DataObject) -> None:
        ids = self._ids()
        if ids:
            job = data.draw(st.sampled_from(ids))
            hold = data.draw(st.booleans())
            self._try(lambda c: c.modify(ALICE, job, {}, hold=hold, release=not hold))

    @rule(worker=st.sampled_from(WORKERS), count=st.integers(1, 3))
    def claim(self, worker: str, count: int) -> None:
        self._try(lambda c: c.claim(worker, count))
        self.h.take("assign")

    @rule(data=st.data())
    def result(self, data: st.DataObject) -> None:
        with self.h.store.read() as tx:
            live = [(w.name, j, t) for w in tx.workers() for j, t in w.running.items()]
        if not live:
            return
        name, job, token = data.draw(st.sampled_from(live))
        outcome = data.draw(st.sampled_from(["exited", "exited", "timeout", "cancelled"]))
        code = data.draw(st.sampled_from([0, 0, 1]))
        self._try(lambda c: c.result(name, job, token, outcome, code, None))

    @rule(data=st.data(), by_group=st.booleans())
    def cancel(self, data: st.DataObject, by_group: bool) -> None:
        if by_group and self.groups:
            g = f"g{data.draw(st.integers(1, self.groups))}"
            self._try(lambda c: c.cancel(ROOT, [], [g], None))
            return
        ids = self._ids()
        if ids:
            job = data.draw(st.sampled_from(ids))
            self._try(lambda c: c.cancel(ALICE, [job], [], None))

    @rule(worker=st.sampled_from(WORKERS))
    def lose_and_return(self, worker: str) -> None:
        self._try(lambda c: c.worker_lost(worker, "test"))
        i = WORKERS.index(worker)
        self._try(lambda c: c.register(worker, "h", (1.0 + i, 1000, i), [], []))

    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: str) -> None:
        with self.h.store.read() as tx:
            w = tx.get_worker(worker)
            held = list(w.running.items()) if w else []
        self._try(lambda c: c.heartbeat(worker, [(j, t, 1.0, 1) for j, t in held]))

    @invariant()
    def consistent(self) -> None:
        with self.h.store.read() as tx:
            check(tx, self.terminal)


def check(tx: Tx, terminal: dict[int, list[Any]]) -> None:
    holders: dict[int, str] = {}
    for w in tx.workers():
        used = sum((tx.get_job(j).cpus for j in w.running), 0.0)  # type: ignore[union-attr]
        assert abs(w.used_cpus - used) < 1e-6, (w.name, w.used_cpus, used)
        assert w.used_cpus <= w.cpus + 1e-9 and len(w.used_gpus) <= w.gpus
        assert len(set(w.used_gpus)) == len(w.used_gpus)
        for j, t in w.running.items():
            assert j not in holders, f"job {j} held by two workers"
            holders[j] = w.name
            job = tx.get_job(j)
            assert job is not None and job.token == t
    eligible = {j for j, _ in tx.eligible()}
    tallies: dict[str, dict[str, int]] = {}
    for job_id in all_jobs(tx):
        job = tx.get_job(job_id)
        assert job is not None
        mine = tallies.setdefault(job.owner, {})
        mine[job.state] = mine.get(job.state, 0) + 1
        live_attempts = [a for a in tx.attempts_of(job_id) if a.ended is None]
        assert len(live_attempts) <= 1
        if job.st in (S.RUNNING, S.PENDING_CANCELLATION):
            assert holders.get(job_id) == job.worker and len(live_attempts) == 1
        else:
            assert job_id not in holders and not live_attempts
        if job.st.terminal:
            packed = job.pack()
            assert terminal.setdefault(job_id, packed) == packed, f"terminal job {job_id} changed"
            continue
        unfinished = 0
        for _kind, target, tid in job.depends_on:
            if target == "job":
                dep = tx.get_job(tid)
                unfinished += dep is not None and not dep.st.terminal
            else:
                group = tx.get_group(tid)
                unfinished += group is not None and not group.complete
        assert job.pending == unfinished, (job_id, job.pending, unfinished)
        assert (job_id in eligible) == (job.st == S.AVAILABLE and unfinished == 0)
    for owner, counts in tallies.items():
        assert tx.tally(owner).counts == counts


Machine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestStateMachine = Machine.TestCase
