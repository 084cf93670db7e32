"""The broker's side of long operations (bulk.py): one at a time, a slice each turn.

What clients see, while an operation runs (docs/cli.md, "Many jobs at once"):

- It acts as one step taken between its request and its reply. No job it means is handed to a
  worker, and every request that reads or changes existing jobs (`PARKED`) waits until it has
  ended, then runs, in the order they came. Everything else (ping, submit, workers, drain,
  logs, events) is answered as usual, and workers' reports are applied as they arrive: a running
  job that ends by itself before the operation reaches it is "already over".
- Each turn gives it about `SLICE_SECONDS` of the loop, after the turn's messages; its progress
  commits with that slice's changes. The reply goes out with the commit of the last slice.
- A broker restarted in the middle finds the operation in the store and finishes it first. The
  requester's connection died with the old broker, so nobody is answered; repeating the request
  is harmless (cancelling what is over is a success; a modify sets the same values again).

Everything here that a turn decides is staged in that turn's `Staged` and applied only after the
turn commits (`commit`), because a turn is run again from scratch when the store had to grow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from banyan import protocol
from banyan.broker import bulk
from banyan.broker.state import Actor, Core
from banyan.broker.store import WriteTx
from banyan.errors import BanyanError, BrokerUnavailable

log = logging.getLogger("banyan.broker")

# Requests that wait while an operation runs: they read or change jobs it may mean.
PARKED = frozenset({"status", "wait", "cancel", "modify", "modify_many", "close_group", "stats"})
# The requests that start an operation.
STARTS = frozenset({"cancel", "modify_many"})
# Loop time per turn for the running operation: with the turn's other work and its commit,
# a turn stays well inside the 100 ms the loop may be held (SPEC §6).
SLICE_SECONDS = 0.025
# Jobs per step between looks at the clock: a cancel costs about 30 µs a job.
STEP_JOBS = 128
# After a slice finds the store full, the next is tried this much later (not in a busy loop).
STALL_SECONDS = 1.0
# Requests kept waiting at most; past this a parked kind of request is refused as unavailable
# until the operation ends (each client may have only 64 in flight; this bounds them all).
MAX_PARKED = 10_000

Inbound = tuple[str, list[bytes], str | None]  # as server.Inbound: socket, frames, user


@dataclass
class Running:
    """The operation being carried out, and who waits for its reply."""

    op: bulk.Op
    identity: bytes | None  # None: admitted before a restart, nobody to answer
    req: int
    lists: dict[str, list[Any]] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)

    def add(self, done: bulk.Done) -> None:
        """Fold in a step's lists: each job once, under what was first done to it."""
        if not self.lists:
            self.lists = bulk.empty(self.op)
        for what, items in done.lists.items():
            for item in items:
                job_id = item[0] if isinstance(item, list) else item
                if job_id not in self.seen:
                    self.seen.add(job_id)
                    self.lists[what].append(item)


@dataclass
class Staged:
    """What one turn did to operations, applied after its commit."""

    head: Running | None = None  # the running operation as this turn left it
    ended: bool = False  # the one running at the start of the turn ended
    parked: list[Inbound] = field(default_factory=list)

    def copy(self) -> Staged:
        return Staged(self.head, self.ended, list(self.parked))


class LongOps:
    def __init__(self) -> None:
        self.queue: list[Running] = []  # the first runs; any others were recovered and wait
        self.parked: list[Inbound] = []
        self.resume_at = 0.0  # after a slice found the store full: no slice before this

    def ready(self, now: float) -> bool:
        """Whether an operation is due a slice now."""
        return bool(self.queue) and now >= self.resume_at

    def stall(self, now: float) -> None:
        """A slice could not commit (the store is full): try again in a while, not at once."""
        self.resume_at = now + STALL_SECONDS

    def recover(self, rows: list[list[Any]]) -> None:
        """Operations a previous broker left unfinished, to be finished first."""
        self.queue = [Running(bulk.Op.unpack(row), None, 0) for row in rows]
        for run in self.queue:
            log.info("resuming %s operation %d of %s", run.op.kind, run.op.id, run.op.actor)

    def current(self, staged: Staged) -> Running | None:
        """The running operation as of this point of the turn."""
        if staged.head is not None:
            return staged.head
        if staged.ended or not self.queue:
            return None
        return self.queue[0]

    def parks(self, mtype: str, staged: Staged) -> bool:
        """Whether a request of this type must wait: an operation runs, or requests that came
        before it still wait for one."""
        if mtype not in PARKED:
            return False
        return self.current(staged) is not None or bool(self.parked or staged.parked)

    def park(self, inbound: Inbound, staged: Staged) -> None:
        if len(self.parked) + len(staged.parked) >= MAX_PARKED:
            raise BrokerUnavailable("the broker is busy with a long operation; try again shortly")
        staged.parked.append(inbound)

    def admit(
        self,
        tx: WriteTx,
        core_of: Callable[[WriteTx], Core],
        actor: Actor,
        identity: bytes,
        msg: protocol.Message,
        staged: Staged,
    ) -> tuple[Core, bytes | None]:
        """Admit a `cancel` or `modify_many` (none runs: they are PARKED) and do its first
        slice in a child transaction. Returns the slice's Core and the reply if it is already
        done. A refusal raises, and the child leaves nothing behind."""
        kind = bulk.CANCEL if msg.type == "cancel" else bulk.MODIFY
        with tx.child() as child:
            core = core_of(child)
            run = Running(bulk.admit(core, actor, kind, msg.body), identity, msg.req)
            reply = self._slice(child, core, run)
        if reply is None:
            staged.head = run
        return core, reply

    def work(
        self, tx: WriteTx, core_of: Callable[[WriteTx], Core], staged: Staged
    ) -> tuple[Core | None, list[tuple[bytes, bytes]]]:
        """A slice of the running operation, if any; returns its Core and the replies to send.
        It works on a copy: a turn run again (the store grew) starts from the same place."""
        before = self.current(staged)
        if before is None:
            return None, []
        op = replace(before.op, opened=list(before.op.opened))  # _seal appends to it
        run = replace(before, op=op, seen=set(before.seen))
        run.lists = {k: list(v) for k, v in before.lists.items()}
        try:
            with tx.child() as child:
                core = core_of(child)
                reply = self._slice(child, core, run)
        except BanyanError as e:  # a named job was missing or not the actor's: nothing changed
            with tx.child() as child:
                child.delete_op(run.op.id)
            log.info("%s operation %d refused: %s", run.op.kind, run.op.id, e.message)
            self._end(staged)
            reply = protocol.encode("error", {"code": e.code, "message": e.message}, run.req)
            return None, [] if run.identity is None else [(run.identity, reply)]
        if reply is None:
            staged.head = run
            return core, []
        self._end(staged)
        return core, [] if run.identity is None else [(run.identity, reply)]

    @staticmethod
    def _end(staged: Staged) -> None:
        staged.head, staged.ended = None, True

    def _slice(self, tx: WriteTx, core: Core, run: Running) -> bytes | None:
        """Steps until the slice's time is up or the operation is done; saves its progress, or
        removes it and returns the reply when done."""
        deadline = time.monotonic() + SLICE_SECONDS
        while True:
            done = bulk.step(core, run.op, STEP_JOBS)
            run.add(done)
            if done.finished:
                tx.delete_op(run.op.id)
                return protocol.encode(REPLIES[run.op.kind], run.lists, run.req)
            if time.monotonic() >= deadline:
                tx.put_op(run.op.id, run.op.pack())
                return None

    def held(self, staged: Staged) -> Callable[[Core], None]:
        """Ready a turn's matching Core: claims pass over what the running operation means."""
        run = self.current(staged)
        if run is None:
            return lambda core: None
        op = run.op

        def ready(core: Core) -> None:
            core.held = lambda job_id: op.holds(core, job_id)

        return ready

    def commit(self, staged: Staged) -> list[Inbound]:
        """After the turn's commit: take on what it staged; returns the parked requests that
        may run now, oldest first, for the next turn."""
        self.parked += staged.parked
        if staged.ended:
            self.queue.pop(0)
        if staged.head is not None:
            if self.queue and self.queue[0].op.id == staged.head.op.id:
                self.queue[0] = staged.head
            else:
                self.queue.insert(0, staged.head)
        if self.queue or not self.parked:
            return []
        free, self.parked = self.parked, []
        return free


REPLIES = {bulk.CANCEL: "cancelled", bulk.MODIFY: "modified"}
