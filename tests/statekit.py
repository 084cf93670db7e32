"""Drive the pure state machine over a real LMDB store in a temp dir, as the server would."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from banyan.broker import cascade
from banyan.broker.records import Job, Worker
from banyan.broker.state import Actor, Config, Core, Effect
from banyan.broker.store import Store

T = TypeVar("T")
ALICE = Actor("alice", "user")
BOB = Actor("bob", "user")
ROOT = Actor("root", "admin")


class Harness:
    """One `do` = one message: a child transaction, then `match` as the server runs it."""

    def __init__(self, path: Path, config: Config | None = None) -> None:
        self.path = path
        self.store = Store(path, sync=False)
        self.now = 1000.0
        self.config = config or Config()
        self.effects: list[Effect] = []
        self.per_step = 128  # dependents a step of the cascade settles
        self.settle = True  # each `do` carries out the cascade it started

    def do(self, fn: Callable[[Core], T], wake: bool = False) -> T:
        """`wake`: match afterwards whatever the Core said, as the server does after a result.
        What the message left to the cascade is then carried out, a transaction a step as the
        server does, unless `settle` is off (the caller takes the cascade's steps)."""
        with self.store.write() as tx:
            with tx.child() as child:
                core = Core(child, self.now, self.config)
                result = fn(core)
            self.effects += core.effects
            if core.wake or wake:
                matcher = Core(tx, self.now, self.config)
                matcher.match()
                self.effects += matcher.effects
        if self.settle:
            self.cascade()
        return result

    def cascade(self, steps: int | None = None) -> int:
        """Carry out what waits for the cascade, `per_step` dependents a transaction; returns
        the steps taken."""
        for n in range(100_000):
            with self.store.read() as view:
                if not cascade.waiting(view) or n == steps:
                    return n
            with self.store.write() as tx:
                with tx.child() as child:
                    core = Core(child, self.now, self.config)
                    cascade.step(core, self.per_step)
                self.effects += core.effects
                if core.wake:
                    matcher = Core(tx, self.now, self.config)
                    matcher.match()
                    self.effects += matcher.effects
        raise AssertionError("the cascade never ended")

    def restart(self) -> None:
        """The broker stops and starts again: it finds in its store exactly what it committed,
        and, as its recovery does (server.Broker._recover), claims from before are void."""
        before = self.store.dump()
        self.store.close()
        self.store = Store(self.path, sync=False)
        assert self.store.dump() == before, "the store changed across a restart"
        with self.store.write() as tx:
            for worker in list(tx.workers()):
                if worker.wants:
                    worker.wants = 0
                    tx.put_worker(worker)
        self.effects = []  # a turn's messages are sent after its commit, or never

    def take(self, kind: str | None = None, worker: str | None = None) -> list[Effect]:
        """Remove and return the effects sent so far (of one type / to one worker)."""
        keep: list[Effect] = []
        out: list[Effect] = []
        for e in self.effects:
            match = (kind is None or e.type == kind) and (worker is None or e.worker == worker)
            (out if match else keep).append(e)
        self.effects = keep
        return out

    def assigned(self, worker: str) -> list[int]:
        """Job ids assigned to `worker` since the last look."""
        return [int(j["job"]) for e in self.take("assign", worker) for j in e.body["jobs"]]

    def submit(self, *jobs: dict[str, Any], actor: Actor = ALICE, **kw: Any) -> list[int]:
        groups = kw.pop("groups", [])
        result = self.do(lambda c: c.submit(actor, list(jobs), groups, kw.pop("key", None)))
        return list(result["jobs"])

    def job(self, job_id: int) -> Job:
        with self.store.read() as tx:
            job = tx.get_job(job_id)
        assert job is not None
        return job

    def worker(self, name: str) -> Worker:
        with self.store.read() as tx:
            worker = tx.get_worker(name)
        assert worker is not None
        return worker

    def state(self, job_id: int) -> str:
        return self.job(job_id).state

    def add_worker(
        self,
        name: str,
        cpus: float = 2,
        memory: int = 1024,
        gpus: int = 0,
        tags: list[str] | None = None,
    ) -> None:
        self.do(lambda c: c.register(name, "host-" + name, (cpus, memory, gpus), tags or [], []))
        self.take("registered", name)

    def claim(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        """Claim and return the assignments that answered it (now or already pending)."""
        self.do(lambda c: c.claim(name, count))
        return self.take_assigned(name)

    def take_assigned(self, name: str) -> list[dict[str, Any]]:
        """The assignments sent to worker `name` since they were last taken."""
        return [j for e in self.take("assign", name) for j in e.body["jobs"]]

    def finish(
        self,
        name: str,
        assignment: dict[str, Any],
        exit_code: int | None = 0,
        outcome: str = "exited",
    ) -> None:
        job, token = assignment["job"], assignment["token"]
        self.do(lambda c: c.result(name, job, token, outcome, exit_code, None, ("out", "")))

    def run_one(self, name: str, exit_code: int = 0) -> int:
        """Claim one job on `name`, finish it with `exit_code`; returns its id."""
        (a,) = self.claim(name, 1)
        self.finish(name, a, exit_code)
        return int(a["job"])


def spec(command: str = "true", **fields: Any) -> dict[str, Any]:
    return {"command": command, **fields}


def after(*ids: int, kind: str = "after") -> list[dict[str, Any]]:
    return [{"kind": kind, "job": i} for i in ids]
