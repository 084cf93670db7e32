"""The broker's side of long operations (bulk.py): one at a time, a slice each turn.

What clients see, while an operation runs (docs/cli.md, "Many jobs at once"):

- It acts as one step taken between its request and its reply. No job it means is handed to a
  worker, and every request that reads or changes existing jobs (`PARKED`) waits until it has
  ended. Everything else (ping, submit, workers, drain, logs, events) is answered as usual, and
  workers' reports are applied as they arrive: a running job that ends by itself before the
  operation reaches it is "already over".
- When it ends, the waiting requests that are not operations run first, each client's in its
  own order (a request waits behind an earlier operation of its own client), and then one
  waiting operation starts: the first of the user whose operation started longest ago, so
  users take turns. A user may have `MAX_WAITING_PER_USER` operations waiting; more are
  refused (`Busy`).
- Each turn gives it about `SLICE_SECONDS` of the loop, after the turn's messages; its progress
  commits with that slice's changes. The reply goes out with the commit of the last slice.
- A broker restarted in the middle finds the operation in the store and finishes it first. The
  requester's connection died with the old broker, so nobody is answered; repeating the request
  is harmless (cancelling what is over is a success; a modify sets the same values again).
- The cascade (cascade.py), what a job's end does to many dependents, runs as an operation that
  nobody asked for and nobody is answered for: it joins the queue in the turn whose message
  started it (`notice`), so the requests after that message in the same turn wait for it too.
  While it is queued, a submit that depends on jobs or joins a group waits as well, and a wait
  whose timeout runs out is answered once it has ended (server.py).

Everything here that a turn decides is staged in that turn's `Staged` and applied only after the
turn commits (`commit`), because a turn is run again from scratch when the store had to grow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from banyan import protocol
from banyan.broker import bulk, cascade, submission
from banyan.broker.state import Actor, Core
from banyan.broker.store import ReadTx, WriteTx
from banyan.errors import BanyanError, BrokerUnavailable, Busy

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
# Operations one user may have waiting behind the running one: enough for a few shells at once,
# few enough that one user's queue costs the others no more than a few operations' time.
MAX_WAITING_PER_USER = 4

Inbound = tuple[str, list[bytes], str | None]  # as server.Inbound: socket, frames, user


@dataclass(frozen=True)
class Parked:
    """A request waiting for the running operation to end."""

    inbound: Inbound
    client: bytes  # its connection's routing id: a client's requests keep their order
    user: str  # who sent it: users' operations take turns
    op: bool  # it starts an operation
    submit: bool = False  # that operation is a submission


class Operation(Protocol):
    """What runs a slice at a time: bulk.Op (cancel, modify), submission.Submission or
    cascade.Cascade."""

    @property
    def id(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def actor(self) -> str: ...
    def pack(self) -> list[Any]: ...
    def copy(self) -> Operation: ...  # what a slice changes, so a turn run again starts afresh
    def step(self, core: Core, budget: int) -> bulk.Done: ...  # about `budget` jobs' work
    def holds(self, core: Core, job_id: int) -> bool: ...  # claims pass the job over
    def reply(self, lists: dict[str, list[Any]]) -> dict[str, Any]: ...  # the reply's body


@dataclass
class Running:
    """The operation being carried out, and who waits for its reply."""

    op: Operation
    identity: bytes | None  # None: admitted before a restart, nobody to answer
    req: int
    lists: dict[str, list[Any]] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)

    def add(self, done: bulk.Done) -> None:
        """Fold in a step's lists: each job once, under what was first done to it."""
        for what, items in done.lists.items():
            mine = self.lists.setdefault(what, [])
            for item in items:
                job_id = item[0] if isinstance(item, list) else item
                if job_id not in self.seen:
                    self.seen.add(job_id)
                    mine.append(item)


@dataclass
class Staged:
    """What one turn did to operations, applied after its commit."""

    head: Running | None = None  # the running operation as this turn left it
    ended: bool = False  # the one running at the start of the turn ended
    parked: list[Parked] = field(default_factory=list)
    cascade: Running | None = None  # a cascade this turn's messages started

    def copy(self) -> Staged:
        return Staged(self.head, self.ended, list(self.parked), self.cascade)


class LongOps:
    def __init__(self) -> None:
        self.queue: list[Running] = []  # the first runs; any others were recovered and wait
        self.parked: list[Parked] = []
        # The frames (by id) of requests let go after an operation ended: they run without
        # being held again, until their turn has committed (a deferred one keeps its pass).
        self.cleared: set[int] = set()
        self.turns: dict[str, int] = {}  # user -> when an operation of theirs last started
        self.started = 0  # operations started so far, the clock of `turns`
        self.resume_at = 0.0  # after a slice found the store full: no slice before this

    def ready(self, now: float) -> bool:
        """Whether an operation is due a slice now."""
        return bool(self.queue) and now >= self.resume_at

    def stall(self, now: float) -> None:
        """A slice could not commit (the store is full): try again in a while, not at once."""
        self.resume_at = now + STALL_SECONDS

    def recover(self, view: ReadTx) -> None:
        """Operations a previous broker left unfinished, to be finished first."""
        for row in view.ops():
            op: Operation
            if row[1] == cascade.Cascade.kind:
                op = cascade.Cascade.unpack(row)
            elif row[1] == submission.SUBMIT:
                request = view.get_op_request(row[0])
                assert request is not None  # stored with the operation, deleted with it
                op = submission.Submission.unpack(row, request)
            else:
                op = bulk.Op.unpack(row)
            self.queue.append(Running(op, None, 0))
            log.info("resuming %s operation %d of %s", op.kind, op.id, op.actor)

    def submitting(self) -> bool:
        """Whether a submission is being made or waits to be, or the cascade has work:
        retention holds off meanwhile, so that nothing a submission's jobs depend on is purged
        between its admission and their making, and no job whose dependents the cascade has
        still to settle is purged with its edges to them."""
        kinds = (submission.Submission, cascade.Cascade)
        return any(isinstance(r.op, kinds) for r in self.queue) or any(
            p.op and p.submit for p in self.parked
        )

    def cascading(self) -> bool:
        """Whether the cascade is queued."""
        return any(isinstance(r.op, cascade.Cascade) for r in self.queue)

    def _cascade_queued(self, staged: Staged) -> bool:
        """Whether the cascade is queued as of this point of the turn."""
        queued = self.queue[1:] if staged.ended else self.queue
        return staged.cascade is not None or any(isinstance(r.op, cascade.Cascade) for r in queued)

    def notice(self, tx: WriteTx, staged: Staged) -> None:
        """Queue the cascade if the turn's messages so far have started it (left it work)."""
        if self._cascade_queued(staged) or not cascade.waiting(tx):
            return
        staged.cascade = Running(cascade.Cascade(), None, 0)

    def _keys(self, staged: Staged) -> set[tuple[str, str]]:
        """The (user, submit key) of each submission admitted and not yet made."""
        runs = [*self.queue, *([staged.head] if staged.head is not None else [])]
        return {
            (r.op.actor, r.op.key)
            for r in runs
            if isinstance(r.op, submission.Submission) and r.op.key is not None
        }

    def current(self, staged: Staged) -> Running | None:
        """The running operation as of this point of the turn (after one ended, the next
        queued; else a cascade the turn started)."""
        if staged.head is not None:
            return staged.head
        queued = self.queue[1:] if staged.ended else self.queue
        return queued[0] if queued else staged.cascade

    def parks(
        self,
        mtype: str,
        op: bool,
        client: bytes,
        frames: list[bytes],
        staged: Staged,
        key: tuple[str, str] | None = None,
        reads: bool = False,
    ) -> bool:
        """Whether a request must wait: a PARKED kind while an operation runs, or behind an
        earlier operation of its own client; an operation (`op`) also while others wait for
        their turn; a submit whose (user, submit key) a submission being made has, so that it
        finds that submission's reply; a submit that `reads` existing jobs (depends on some,
        or joins a group) while the cascade is queued, whose dependencies it may not see half
        settled. A request let go after an operation ended runs."""
        if not op and mtype not in PARKED:
            if reads and id(frames) not in self.cleared and self._cascade_queued(staged):
                return True
            return key is not None and key in self._keys(staged)
        if self.current(staged) is not None:
            return True
        if id(frames) in self.cleared:
            return False
        waiting = (*self.parked, *staged.parked)
        return any(p.op and (op or p.client == client) for p in waiting)

    def park(self, parked: Parked, staged: Staged) -> None:
        """Keep a request until the running operation ends; refuses one past the limits."""
        waiting = (*self.parked, *staged.parked)
        if len(waiting) >= MAX_PARKED:
            raise BrokerUnavailable("the broker is busy with a long operation; try again shortly")
        if parked.op:
            mine = sum(1 for p in waiting if p.op and p.user == parked.user)
            if mine >= MAX_WAITING_PER_USER:
                raise Busy(
                    f"{parked.user} has {mine} long operations waiting already, at most "
                    f"{MAX_WAITING_PER_USER} (MAX_WAITING_PER_USER); try again when one has ended"
                )
        staged.parked.append(parked)

    def admit(
        self,
        tx: WriteTx,
        core_of: Callable[[WriteTx], Core],
        actor: Actor,
        identity: bytes,
        msg: protocol.Message,
        staged: Staged,
        request: bytes,
    ) -> tuple[Core, bytes | None]:
        """Admit a `cancel`, a `modify_many` or a big `submit` (none runs: they wait for their
        turn) and do its first slice in a child transaction. Returns the slice's Core and the
        reply if it is already done. A refusal raises, and the child leaves nothing behind.
        `request` is the message as it came: a submission keeps it, for a restart."""
        with tx.child() as child:
            core = core_of(child)
            op: Operation
            if msg.type == "submit":
                admitted = submission.admit(core, actor, msg.body, request)
                if isinstance(admitted, dict):  # its submit key's first reply
                    return core, protocol.encode("submitted", admitted, msg.req)
                op = admitted
            else:
                kind = bulk.CANCEL if msg.type == "cancel" else bulk.MODIFY
                op = bulk.admit(core, actor, kind, msg.body)
            run = Running(op, identity, msg.req)
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
        run = replace(before, op=before.op.copy(), seen=set(before.seen))
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
            done = run.op.step(core, STEP_JOBS)
            run.add(done)
            if done.finished:
                tx.delete_op(run.op.id)
                if run.identity is None:
                    return b""  # nobody to answer
                return protocol.encode(REPLIES[run.op.kind], run.op.reply(run.lists), run.req)
            if time.monotonic() >= deadline:
                tx.put_op(run.op.id, run.op.pack())
                return None

    def held(self, staged: Staged) -> Callable[[Core], None]:
        """Ready a turn's matching Core: claims pass over what the running operation means."""
        run = self.current(staged)
        if run is None or isinstance(run.op, cascade.Cascade):  # it holds nothing
            return lambda core: None
        op = run.op

        def ready(core: Core) -> None:
            core.held = lambda job_id: op.holds(core, job_id)

        return ready

    def commit(self, staged: Staged, left: list[Inbound]) -> list[Inbound]:
        """After the turn's commit: take on what it staged. `left` are requests the turn left
        for the next; returns them with the parked requests that may run now, in the order the
        next turn takes them: when an operation has ended, the requests it let go that start
        none, then `left` (those too came before the next operation starts), then that one."""
        self.parked += staged.parked
        if staged.ended:
            self.queue.pop(0)
        if staged.head is not None:
            if self.queue and self.queue[0].op.id == staged.head.op.id:
                self.queue[0] = staged.head
            else:
                self.queue.insert(0, staged.head)
                self.started += 1
                self.turns[staged.head.op.actor] = self.started
        if staged.cascade is not None:
            self.queue.append(staged.cascade)
        self.cleared &= {id(frames) for _, frames, _ in left}
        if self.queue or not self.parked:
            return left
        free, chosen = self._release()
        return free + left + chosen

    def _release(self) -> tuple[list[Inbound], list[Inbound]]:
        """No operation runs: let go every waiting request that no operation of its own client
        stands before, then the next operation, the first waiting one of the user whose
        operation started longest ago (a client's first waiting operation is its next)."""
        blocked: set[bytes] = set()
        free: list[Parked] = []
        kept: list[Parked] = []
        nexts: list[Parked] = []
        for p in self.parked:
            if p.client in blocked:
                kept.append(p)
            elif p.op:
                blocked.add(p.client)
                nexts.append(p)
                kept.append(p)
            else:
                free.append(p)
        chosen: list[Parked] = []
        if nexts:
            chosen = [min(nexts, key=lambda p: self.turns.get(p.user, 0))]  # first of equals
            kept.remove(chosen[0])
        self.parked = kept
        self.cleared |= {id(p.inbound[1]) for p in free + chosen}
        return [p.inbound for p in free], [p.inbound for p in chosen]


REPLIES = {bulk.CANCEL: "cancelled", bulk.MODIFY: "modified", submission.SUBMIT: "submitted"}


def starts(msg: protocol.Message) -> bool:
    """Whether a request is carried out as a long operation."""
    return msg.type in STARTS or (msg.type == "submit" and submission.big(msg.body))
