"""Long operations: a cancel or modify of many jobs, done in slices over the broker's turns.

Cancelling a 100,000-job group at once held the broker's loop for tens of seconds. Such a
request is admitted instead as an `Op`, a record that says what it does and how far it has
got, and each `step` does a bounded slice of it, saving its progress in the same transaction as
the slice's changes. A broker killed in the middle finds the record on restart and finishes
the work, so the request is all or nothing: its record never committed and nothing happened,
or it is carried to the end. What the clients see meanwhile is the server's business (see
`held` and banyan/broker/longops.py).

An operation goes through its sources in order, each walked from a cursor:

    check   every named job exists and is the actor's (or the actor is an admin); a refusal
            here refuses the request whole, before anything has changed. A cancel asked
            `each` has no check: a named job or group that is missing or not the actor's is
            listed in the reply's `errors`, and the rest goes ahead
    seal    (cancel) each named group is sealed and given its cancel reason
    group   (cancel) each named group's members, cancelled
    jobs    the named jobs
    select  the jobs the selector matches, among those that existed at admission; for a user,
            only their own

Pure, like state.py: no sockets, no LMDB, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from banyan.broker.records import Job
from banyan.broker.retention import gone, purged
from banyan.broker.selectors import ACTIVE, MAX_ID, Selector
from banyan.broker.state import ADMIN, Actor, Core
from banyan.errors import BadRequest, BanyanError, Forbidden, NotFound

CANCEL, MODIFY = "cancel", "modify"
# What a selector matches when it names no state: for a cancel, what has not ended; for a
# modify, what may still be edited.
DEFAULT_STATES = {CANCEL: ACTIVE, MODIFY: ("inactive", "available")}


@dataclass
class Op:
    """A long operation in progress; stored whole (`pack`) after every slice."""

    id: int
    kind: str  # CANCEL or MODIFY
    actor: str
    role: str
    max_id: int  # the last job id at admission: a selector matches no later job
    jobs: list[int]  # named jobs: each must exist and be the actor's
    groups: list[int]  # named groups (cancel): sealed, then every member cancelled
    select: list[Any] | None  # a packed Selector
    args: dict[str, Any]  # cancel: {reason}; modify: {set, hold, release}
    phase: int = 0  # the source being walked (see sources)
    cursor: int = 0  # where in it: an index into `jobs`, or the last job id done
    opened: list[int] = field(default_factory=list)  # open groups whose sealing completed them
    _named: frozenset[int] | None = field(default=None, repr=False, compare=False)
    _selector: Selector | None = field(default=None, repr=False, compare=False)

    def pack(self) -> list[Any]:
        return [
            *(self.id, self.kind, self.actor, self.role, self.max_id, self.jobs, self.groups),
            *(self.select, self.args, self.phase, self.cursor, self.opened),
        ]

    @classmethod
    def unpack(cls, row: list[Any]) -> Op:
        return cls(*row)

    @property
    def who(self) -> Actor:
        return Actor(self.actor, self.role)

    def copy(self) -> Op:
        return replace(self, opened=list(self.opened))  # _seal appends to it

    def step(self, core: Core, budget: int) -> Done:
        return step(core, self, budget)

    def reply(self, lists: dict[str, list[Any]]) -> dict[str, Any]:
        out = empty(self)
        for what, items in lists.items():
            out[what] = out.get(what, []) + items
        return out

    @property
    def selector(self) -> Selector | None:
        if self._selector is None and self.select is not None:
            self._selector = Selector.unpack(self.select)
        return self._selector

    def sources(self) -> list[tuple[str, int]]:
        """(kind, group id or 0) for each source, in the order they are walked."""
        out = [("check", 0)] if self.jobs and not self.each else []
        if self.groups:
            out += [("seal", 0)] + [("group", g) for g in self.groups]
        if self.jobs:
            out.append(("jobs", 0))
        if self.select is not None:
            out.append(("select", 0))
        return out

    @property
    def each(self) -> bool:
        """Named targets are answered for one by one (`errors`), not all or nothing."""
        return bool(self.args.get("each"))

    @property
    def applying(self) -> bool:
        """Past the check: changes have begun (or will at the next step)."""
        return not self.jobs or self.phase > 0

    def holds(self, core: Core, job_id: int) -> bool:
        """Whether this operation means `job_id`: it is held back from claims until the
        operation ends, so none of its targets starts in the middle of it."""
        if self._named is None:
            self._named = frozenset(self.jobs)
        if job_id in self._named:
            return True
        if not self.groups and self.select is None:
            return False
        job = core.tx.get_job(job_id)
        if job is None:
            return False
        if any(g in job.groups for g in self.groups):
            return True
        selector = self.selector
        return selector is not None and job_id <= self.max_id and selector.matches(job)


def admit(core: Core, actor: Actor, kind: str, body: dict[str, Any]) -> Op:
    """An operation for a `cancel` or `modify_many` request, checked as far as is cheap: its
    groups exist and are the actor's, its selector is one the actor may use. Nothing is
    written; the caller stores it (`Core.tx.put_op`) unless its first steps finish it."""
    tx = core.tx
    each = kind == CANCEL and bool(body.get("each"))
    groups: list[int] = []
    errors: list[list[Any]] = []
    for ref in body.get("groups", ()):
        group = tx.get_group(ref) if isinstance(ref, int) else tx.group_by_name(ref)
        try:
            if group is None:
                raise NotFound(f"no group {ref!r}")
            if not actor.may_touch(group.owner):
                raise Forbidden(f"group {group.name!r} belongs to {group.owner}")
        except BanyanError as e:
            if not each:
                raise
            errors.append([ref, e.code, e.message])
            continue
        if group.id not in groups:
            groups.append(group.id)
    select = body.get("select")
    selector = None if select is None else _selector(core, actor, kind, select)
    if kind == CANCEL:
        args: dict[str, Any] = {"reason": body.get("reason")}
        if each:
            args |= {"each": True, "errors": errors}
    else:
        args = {"set": body["set"], "hold": body["hold"], "release": body["release"]}
        if body["hold"] and body["release"]:
            raise BadRequest("hold and release together make no sense")
        if not body["set"] and not body["hold"] and not body["release"]:
            raise BadRequest("nothing to change: give set, hold or release")
    return Op(
        id=tx.next_id("op"),
        kind=kind,
        actor=actor.name,
        role=actor.role,
        max_id=tx.last_id("job"),
        jobs=list(dict.fromkeys(body.get("jobs", ()))),
        groups=groups,
        select=None if selector is None else selector.pack(),
        args=args,
    )


def _selector(core: Core, actor: Actor, kind: str, select: dict[str, Any]) -> Selector:
    owner = select.get("owner")
    if actor.role != ADMIN:
        if owner not in (None, actor.name):
            raise Forbidden(f"owner: {owner}'s jobs are for {owner} or an admin to change")
        owner = actor.name  # a user's selector means their own jobs
    group = None
    if select.get("group") is not None:
        ref = select["group"]
        found = core.tx.get_group(ref) if isinstance(ref, int) else core.tx.group_by_name(ref)
        if found is None:
            raise NotFound(f"select.group: no group {ref!r}")
        group = found.id
    state = select.get("state")
    return Selector(
        ranges=tuple((int(a), int(b)) for a, b in select.get("ids", ())),
        owner=owner,
        states=(state,) if state else DEFAULT_STATES[kind],
        name=select.get("name"),
        group=group,
    )


@dataclass
class Done:
    """What one step did, for the reply: job ids by what happened to them."""

    lists: dict[str, list[Any]]
    finished: bool = False


def blank(op: Op) -> dict[str, list[Any]]:
    """A step's lists, empty."""
    if op.kind == CANCEL:
        lists: dict[str, list[Any]] = {"cancelled": [], "pending": [], "already": []}
        return lists | {"errors": []} if op.each else lists
    return {"modified": [], "skipped": []}


def empty(op: Op) -> dict[str, list[Any]]:
    """The reply's lists before the first step: a cancel asked `each` starts with the groups
    it passed over."""
    lists = blank(op)
    if op.each:
        lists["errors"] += op.args["errors"]
    return lists


def step(core: Core, op: Op, budget: int) -> Done:
    """Carry `op` on by about `budget` jobs (each job looked at counts one), moving its
    phase and cursor; raises the BanyanError that refuses it while it is still checking."""
    done = Done(blank(op))
    sources = op.sources()
    left = budget
    while left > 0 and op.phase < len(sources):
        kind, group_id = sources[op.phase]
        left -= _walk(core, op, kind, group_id, left, done)
        if op.cursor == -1:  # that source is done
            op.phase, op.cursor = op.phase + 1, 0
    if op.phase >= len(sources):
        _finish(core, op)
        done.finished = True
    return done


def _walk(core: Core, op: Op, kind: str, group_id: int, budget: int, done: Done) -> int:
    """Walk one source from op.cursor for at most `budget` jobs; returns how many it took and
    leaves op.cursor where it stopped (-1 when the source is done)."""
    if kind == "seal":
        _seal(core, op)
        op.cursor = -1
        return len(op.groups)
    taken = 0
    if kind in ("check", "jobs"):
        for i in range(op.cursor, len(op.jobs)):
            if taken >= budget:
                op.cursor = i
                return taken
            taken += 1
            if kind == "check":
                _check(core, op, op.jobs[i])
            else:
                _apply(core, op, op.jobs[i], None, done)
        op.cursor = -1
        return taken
    if kind == "group":
        walk = core.tx.member_ids(group_id, op.cursor + 1, MAX_ID)
        selector = None
    else:
        selector = op.selector
        assert selector is not None  # sources() lists "select" only with one
        walk = selector.ids(core.tx, op.cursor + 1, op.max_id)
    for job_id in walk:
        if taken >= budget:
            return taken
        taken += 1
        op.cursor = job_id
        _apply(core, op, job_id, group_id if selector is None else selector, done)
    op.cursor = -1
    return taken


def _check(core: Core, op: Op, job_id: int) -> None:
    """A named job exists (or, for a cancel, ended so long ago that it was purged) and the
    actor may act on it."""
    refusal = _refusal(core, op, job_id)
    if refusal is not None:
        raise refusal


def _refusal(core: Core, op: Op, job_id: int) -> BanyanError | None:
    """Why the actor may not act on the named job `job_id`, or None."""
    job = core.tx.get_job(job_id)
    if job is None:
        if op.kind == CANCEL and purged(core.tx, job_id):
            return None
        return NotFound(gone(core.tx, job_id))
    if not op.who.may_touch(job.owner):
        verb = "cancel" if op.kind == CANCEL else "modify"
        return Forbidden(
            f"job {job.id} belongs to {job.owner}; only they or an admin may {verb} it"
        )
    return None


def _seal(core: Core, op: Op) -> None:
    """Seal each named group, so no member joins it from here on, and say why it ends."""
    why = _why(op)
    for group_id in op.groups:
        group = core._group(group_id)
        group.cancel_reason = why
        # Sealing completes an open group whose members have all ended (at the end of the
        # operation); otherwise the last member to end completes it, once.
        if group.open and group.ended == group.total:
            op.opened.append(group.id)
        group.open = False
        core.tx.put_group(group)


def _why(op: Op) -> str:
    reason = op.args.get("reason")
    return f"cancelled by {op.actor}" + (f": {reason}" if reason else "")


def _apply(core: Core, op: Op, job_id: int, via: int | Selector | None, done: Done) -> None:
    """Do the operation to one job; `via` is the group or the selector that found it."""
    job = core.tx.get_job(job_id)
    if via is None and op.each:
        refusal = _refusal(core, op, job_id)
        if refusal is not None:
            done.lists["errors"].append([job_id, refusal.code, refusal.message])
            return
    if job is None:
        if via is None and op.kind == CANCEL:  # a named job, purged: long over
            done.lists["already"].append(job_id)
        return  # else a selector's or a group's, removed since
    if isinstance(via, Selector) and not via.matches(job):
        return
    if op.kind == CANCEL:
        why = _why(op)
        if isinstance(via, int):
            why = f"group {core._group(via).name!r} {why}"
        done.lists[core._cancel(job, why)].append(job_id)
        return
    _modify(core, op, job, done)


def _modify(core: Core, op: Op, job: Job, done: Done) -> None:
    """One job's edit in a child transaction of its own: a job whose state does not allow it
    is skipped whole, with the reason, and the others go on."""
    a = op.args
    try:
        with core.tx.child() as child:
            inner = replace(core, tx=child, effects=[], events=[], wake=False)
            inner.modify(op.who, job.id, dict(a["set"]), a["hold"], a["release"])
    except BanyanError as e:
        done.lists["skipped"].append([job.id, e.message])
        return
    core.effects += inner.effects
    core.events += inner.events
    core.wake = core.wake or inner.wake
    # What it settled counts, and what it left to the cascade keeps its place (Core._walk).
    core.spent, core.inline, core._band = inner.spent, inner.inline, inner._band
    done.lists["modified"].append(job.id)


def _finish(core: Core, op: Op) -> None:
    """A group that sealing completed: settle its dependents, now that the operation ends."""
    for group_id in op.opened:
        core._group_complete(core._group(group_id))
    core.wake = True  # jobs held back from claims are free again
