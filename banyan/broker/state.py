"""The job state machine (SPEC §3–§5): pure, with no sockets, no LMDB and no clock of its own.

A `Core` is made for one message (or one timer step) over one store transaction `tx` and the
current time `now`. Its handlers read and write records through `tx` and *return* what must be
said to workers as `effects`, plus the `events` they logged; the server sends them only after the
transaction is durable. A handler that refuses raises a `BanyanError` before anything is
written, and the server's child transaction makes even a half-done handler leave nothing behind.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from banyan import defaults
from banyan.broker import owners
from banyan.broker.graph import DepGraph
from banyan.broker.matching import Board, decayed
from banyan.broker.records import (
    NEW_JOB_FIELDS,
    NEW_JOB_TAIL,
    Attempt,
    Dep,
    DepKind,
    Group,
    Job,
    JobState,
    Outcome,
    Tx,
    User,
    Worker,
    WorkerState,
)
from banyan.broker.retention import gone, purged
from banyan.errors import BadRequest, Conflict, Forbidden, NotFound

S = JobState

# The one table of legal moves (SPEC §3). Anything else is an error reply, never an overwrite.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.INACTIVE: frozenset({S.AVAILABLE, S.CANCELLED}),
    S.AVAILABLE: frozenset({S.INACTIVE, S.RUNNING, S.CANCELLED}),
    S.RUNNING: frozenset({S.AVAILABLE, S.TERMINATED, S.PENDING_CANCELLATION}),
    S.PENDING_CANCELLATION: frozenset({S.CANCELLED, S.TERMINATED}),
    S.TERMINATED: frozenset(),
    S.CANCELLED: frozenset(),
}

# Which fields `modify` may write, and in which states (SPEC §2).
EDITABLE: dict[str, frozenset[JobState]] = {
    name: frozenset({S.INACTIVE})
    for name in (
        "name",
        "command",
        "cwd",
        "env",
        "cpus",
        "memory",
        "gpus",
        "tags",
        "max_attempts",
        "time_limit",
        "cancel_grace",
        "output",
        "depends_on",
        "umask",
    )
}
EDITABLE["priority"] = frozenset({S.INACTIVE, S.AVAILABLE})

# Positions in a new job's row that the submission reads back.
_ID, _STATE, _PENDING = (Job.names().index(f) for f in ("id", "state", "pending"))

ADMIN = "admin"
# The names of arrays' own groups (Core._array_group); no other group may take one.
ARRAY_GROUP = re.compile(r"array-\d+(-\d+)?")
USER_SETTINGS = ("shares", "max_running", "max_queued")
# A worker with less free cpu than this is full: a claim from it scans nothing.
MIN_CPUS = 1e-6
# Submissions of at least this many jobs run with the cyclic GC paused (see Core.submit).
GC_PAUSE_JOBS = 256
# Dependents one message may settle (cancel or release) itself, about 30 ms of the loop: what
# lies past them is left to the cascade (see Core._walk and cascade.py), carried out a slice
# at a time, so that one job's end cannot hold the loop for seconds.
CASCADE_JOBS = 1000
# How far down a chain of dependents one settling may go before it leaves the rest to the
# cascade: each step down is a few frames of the Python stack.
CASCADE_DEPTH = 50
# The long operation (longops.py) that carries out what messages left to the cascade; its row
# in the store's operations, under an id that operations admitted for requests never take.
CASCADE = 0
CASCADE_KIND = "cascade"
# What a walk does to each dependent: DOOM cancels the `after` ones of what will never
# succeed; END settles every one of what has ended (see _ended_verdict).
DOOM, END = "doom", "end"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks: the identity and role of the authenticated connection, never message content."""

    name: str
    role: str = ADMIN
    account: str | None = None  # the Unix account the key is bound to; None: `name`

    def may_touch(self, owner: str) -> bool:
        return self.role == ADMIN or self.name == owner

    @property
    def runs_as(self) -> str:
        return self.account or self.name


@dataclass(frozen=True, slots=True)
class Effect:
    """A message for one worker, sent after the commit."""

    worker: str
    type: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Config:
    heartbeat: float = defaults.HEARTBEAT_INTERVAL
    liveness: int = defaults.LIVENESS
    max_lost_requeues: int = defaults.MAX_LOST_REQUEUES
    half_life: float = defaults.USAGE_HALF_LIFE  # of users' usage, for fair share
    retention: float | None = defaults.RETENTION  # how long ended jobs are kept; None: ever
    cascade_jobs: int = CASCADE_JOBS  # dependents one message settles itself (Core._walk)
    # The broker's own Unix account, told to workers: a root worker runs no job as it, as it
    # runs none as root, since such a job could read the broker's keys and state (SPEC §6).
    account: str | None = None
    # Claim-ahead (SPEC §5): how many jobs a worker may hold beyond its free room unless it
    # says otherwise when it registers. 0: none.
    prefetch: int = 0


@dataclass(frozen=True, slots=True)
class NewJobs:
    """What every job of one submission shares, for Core.new_jobs."""

    owner: str
    submitted: float  # when the submission was admitted
    groups: dict[str, int]  # the groups its jobs may name, by name
    mine: list[int]  # groups every job joins (an array's own)
    tail: tuple[Any, ...]  # the row's fields after `pending` (owners.new_job_tail)


@contextmanager
def paused_gc(jobs: int) -> Iterator[None]:
    """Each job made makes a handful of lists; for a big submission that sets off the cyclic
    GC again and again, to find nothing (rows hold no cycles), a third of the time."""
    if jobs < GC_PAUSE_JOBS or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@dataclass(slots=True)
class Logged:
    """A state change this Core logged, for the server's waiters and watchers."""

    seq: int
    job: int
    frm: str | None
    to: str


@dataclass
class Sorted:
    """A cancel's reply: each job once, under what its first cancel did to it."""

    lists: dict[str, list[int]] = field(
        default_factory=lambda: {"cancelled": [], "pending": [], "already": []}
    )
    seen: set[int] = field(default_factory=set)

    def add(self, job_id: int, what: str) -> None:
        self.seen.add(job_id)
        self.lists[what].append(job_id)


@dataclass
class Core:
    tx: Tx
    now: float
    config: Config = field(default_factory=Config)
    effects: list[Effect] = field(default_factory=list)
    events: list[Logged] = field(default_factory=list)
    wake: bool = False  # a job became eligible or a claim arrived: run `match`
    # Jobs that claims pass over for now: the targets of a long operation (bulk.py).
    held: Callable[[int], bool] | None = None
    # The dependents this Core has looked at, and how many it may (None: config.cascade_jobs);
    # `inline` None: whether the cascade has work waiting is yet to be looked up (see _walk).
    spent: int = 0
    limit: int | None = None
    inline: bool | None = None
    _depth: int = 0  # walks under way, one inside another
    _band: int | None = None  # the cascade's band for the walks it leaves itself (see _defer)

    # ---- transitions ------------------------------------------------------------------------

    def _move(self, job: Job, to: JobState, reason: str | None = None) -> None:
        frm = job.st
        if to not in TRANSITIONS[frm]:
            raise Conflict(f"job {job.id}: cannot go from {frm.value} to {to.value}")
        job.state = to.value
        if to.terminal:
            job.ended = self.now
        self.tx.put_job(job)
        self._log(job, frm.value, reason)

    def _load(self, job_id: int) -> Job:
        job = self.tx.get_job(job_id)
        if job is None:
            raise NotFound(gone(self.tx, job_id))
        return job

    def _group(self, ref: str | int) -> Group:
        group = self.tx.get_group(ref) if isinstance(ref, int) else self.tx.group_by_name(ref)
        if group is None:
            raise NotFound(f"no group {ref!r}")
        return group

    # ---- submission -------------------------------------------------------------------------

    def submit(
        self,
        actor: Actor,
        jobs: list[dict[str, Any]],
        groups: list[dict[str, Any]],
        submit_key: str | None = None,
        *,
        array: bool = False,
        environment: dict[str, str] | None = None,
        digest: str | None = None,
    ) -> dict[str, Any]:
        """Create jobs, groups and edges atomically; returns `{jobs: [ids], groups: {name: id}}`.

        Resubmitting with the same `submit_key` returns the first result and creates nothing;
        the same key with a different submission is refused (`digest` says what a submission
        asks for, when not its jobs and groups: an array's template and range). The jobs of an
        `array` also make a group of their own, `array-FIRST` (FIRST being the first job's id),
        sealed: one handle for the whole array. Every job runs as the actor's Unix account,
        with `environment` (the submitter's exported variables) under the account's own.
        """
        if submit_key:
            digest = digest or _digest(jobs, groups)
            prior = self.prior_submission(actor, submit_key, digest)
            if prior is not None:
                return prior
        if not jobs and not groups:
            raise BadRequest("nothing to submit: no jobs and no groups")
        with paused_gc(len(jobs)):
            return self._submit(actor, jobs, groups, submit_key, array, environment, digest)

    def prior_submission(self, actor: Actor, key: str, digest: str) -> dict[str, Any] | None:
        """What the submission first made under `key`, if it was the same one; refuses a
        different submission under a key already used."""
        prior = self.tx.get_submit_key(actor.name, key)
        if prior is None:
            return None
        # Keys stored before digests were kept have none: they match anything.
        if prior.get("digest", digest) != digest:
            raise Conflict(
                f"submit key {key!r} was first used for a different submission "
                f"(jobs {_span(prior['jobs'])}); use a new key for a new submission"
            )
        return {"jobs": prior["jobs"], "groups": prior["groups"]}

    def _submit(
        self,
        actor: Actor,
        jobs: list[dict[str, Any]],
        groups: list[dict[str, Any]],
        submit_key: str | None,
        array: bool = False,
        environment: dict[str, str] | None = None,
        digest: str | None = None,
    ) -> dict[str, Any]:
        if jobs:
            self._check_queued(actor.name, len(jobs))
        by_name, joined = self._open_groups(actor, jobs, groups)
        first = self.tx.next_job_id() if jobs else 0
        ids = list(range(first, first + len(jobs)))
        new: dict[int, list[Dep]] = {}
        members: dict[int, list[int]] = {}
        own = self._array_group(actor, first) if array and jobs else None
        if own is not None:
            by_name[own.name] = own
            members[own.id] = ids
        for i, spec in enumerate(jobs):
            deps = spec.get("depends_on")
            new[ids[i]] = self._resolve_deps(i, spec, by_name, ids) if deps else []
            for name in spec.get("groups", ()):
                members.setdefault(by_name[name].id, []).append(ids[i])
        if any(new.values()):  # with no new edge no cycle can close
            DepGraph(self.tx, lambda job_id: in_request(jobs, job_id - first)).check(
                new, members, joined
            )

        for gid, member_ids in members.items():
            self._group_of(by_name, gid).total += len(member_ids)
        for group in by_name.values():
            self.tx.put_group(group)
        mine = [] if own is None else [own.id]
        tail = owners.new_job_tail(self.tx, actor.runs_as, environment, len(jobs)) if jobs else ()
        groups_by_name = {name: g.id for name, g in by_name.items()}
        made = NewJobs(actor.name, self.now, groups_by_name, mine, tail)
        born_doomed = self.new_jobs(made, ids, jobs, new, ids)
        for job_id, reason in born_doomed:
            self._cancel(self._load(job_id), reason)
        result = {"jobs": ids, "groups": groups_by_name}
        if submit_key:
            digest = digest or _digest(jobs, groups)
            self.tx.put_submit_key(actor.name, submit_key, {**result, "digest": digest}, self.now)
        return result

    def new_jobs(
        self,
        made: NewJobs,
        ids: Sequence[int],
        specs: list[dict[str, Any]],
        deps: dict[int, list[Dep]],
        fresh: Sequence[int],
    ) -> list[tuple[int, str]]:
        """Store the jobs `ids` of a submission from their specs and resolved dependencies,
        with their edges and `submitted` events; returns those born doomed (a dependency that
        can no longer be met), with why, for the caller to cancel once the submission's jobs
        all exist. A dependency on one of `fresh` (this submission's jobs not stored before
        this call) waits for it."""
        rows: list[list[Any]] = []
        born_doomed: list[tuple[int, str]] = []
        owner, submitted, mine, tail = made.owner, made.submitted, made.mine, made.tail
        for job_id, spec in zip(ids, specs, strict=True):
            needs = deps.get(job_id)
            if not needs and not spec.get("groups") and not mine:  # most jobs of a big one
                rows.append(_new_row(job_id, owner, submitted, spec, _NONE, _NONE, 0, tail))
                continue
            pending = 0
            doom = None
            for dep in needs or ():
                verdict = self._verdict(dep, fresh)
                if verdict == WAIT:
                    pending += 1
                    self.tx.add_dependent(dep.target, dep.id, job_id, dep.kind)
                elif verdict != MET and doom is None:
                    doom = verdict
            groups_of = [made.groups[name] for name in spec.get("groups", ())] + mine
            depends_on = [d.pack() for d in needs or ()]
            row = _new_row(job_id, owner, submitted, spec, depends_on, groups_of, pending, tail)
            rows.append(row)
            if doom is not None:
                born_doomed.append((job_id, doom))
        self.tx.put_new_jobs(rows)
        self._log_submitted(rows)
        return born_doomed

    def _log_submitted(self, rows: list[list[Any]]) -> None:
        """The `submitted` events of a submission's new job rows, numbered in one go."""
        if not rows:
            return
        now = self.now
        first = self.tx.append_events([(now, r[_ID], None, r[_STATE], "submitted") for r in rows])
        self.events += [Logged(seq, r[_ID], None, r[_STATE]) for seq, r in enumerate(rows, first)]
        self.wake = self.wake or any(r[_STATE] == _AVAILABLE and not r[_PENDING] for r in rows)

    def _log(self, job: Job, frm: str | None, reason: str | None) -> None:
        seq = self.tx.append_event(self.now, job.id, frm, job.state, reason)
        self.events.append(Logged(seq, job.id, frm, job.state))
        if job.eligible:
            self.wake = True

    def _array_group(self, actor: Actor, first: int) -> Group:
        """An array's own group, named for its first job (and, were that name taken by a group
        from before such names were kept for arrays, for the group's id too)."""
        gid = self.tx.next_id("group")
        name = f"array-{first}"
        if self.tx.group_by_name(name) is not None:
            name = f"array-{first}-{gid}"
        return Group(gid, name, actor.name, self.now, False)

    @staticmethod
    def _group_of(by_name: dict[str, Group], gid: int) -> Group:
        return next(g for g in by_name.values() if g.id == gid)

    def _open_groups(
        self, actor: Actor, jobs: list[dict[str, Any]], groups: list[dict[str, Any]]
    ) -> tuple[dict[str, Group], set[int]]:
        """Create the submission's new groups and find the open ones it joins.

        A listed group that already exists is joined if it is open (and the actor's); a job may
        also name an existing open group without listing it.
        """
        by_name: dict[str, Group] = {}
        joined: set[int] = set()
        wanted = [(spec["name"], bool(spec.get("open", False)), "groups") for spec in groups]
        for i, spec in enumerate(jobs):
            if spec.get("groups"):
                wanted += [(name, False, f"jobs[{i}].groups") for name in spec["groups"]]
        listed = {spec["name"] for spec in groups}
        if len(listed) != len(groups):
            raise BadRequest("groups: a group name is listed twice")
        for name, is_open, where in wanted:
            if name in by_name:
                continue
            existing = self.tx.group_by_name(name)
            if existing is not None:
                if not existing.open:
                    raise Conflict(
                        f"{where}: group {name!r} is sealed; only open groups take new members"
                    )
                if not actor.may_touch(existing.owner):
                    raise Forbidden(f"{where}: group {name!r} belongs to {existing.owner}")
                by_name[name] = existing
                joined.add(existing.id)
            elif name in listed:
                if ARRAY_GROUP.fullmatch(name):
                    raise BadRequest(f"{where}: names like {name!r} are kept for arrays' groups")
                by_name[name] = Group(self.tx.next_id("group"), name, actor.name, self.now, is_open)
            else:
                raise NotFound(f"{where}: no group {name!r} (list it in the submission's groups)")
        return by_name, joined

    def _resolve_deps(
        self, index: int, spec: dict[str, Any], by_name: dict[str, Group], ids: Sequence[int]
    ) -> list[Dep]:
        """Check that every dependency of jobs[index] exists; duplicates collapse."""
        out: dict[tuple[str, int], Dep] = {}
        for k, dep in enumerate(spec.get("depends_on", ())):
            where = f"jobs[{index}].depends_on[{k}]"
            kind = dep.get("kind") or DepKind.AFTER.value
            if dep.get("local") is not None:
                local = int(dep["local"])
                if not 0 <= local < len(ids) or local == index:
                    raise BadRequest(
                        f"{where}: local {local} is not another job of this submission"
                    )
                target, tid = "job", ids[local]
            elif dep.get("job") is not None:
                target, tid = "job", int(dep["job"])
                self._load_ref(tid, where)
            else:
                ref = dep["group"]
                group = by_name.get(ref) if isinstance(ref, str) else None
                target, tid = "group", (group or self._group_ref(ref, where)).id
            out[(target, tid)] = Dep(kind, target, tid)
        return list(out.values())

    def _load_ref(self, job_id: int, where: str) -> Job:
        job = self.tx.get_job(job_id)
        if job is None:
            raise NotFound(f"{where}: {gone(self.tx, job_id)}")
        return job

    def _group_ref(self, ref: str | int, where: str) -> Group:
        try:
            return self._group(ref)
        except NotFound as e:
            raise NotFound(f"{where}: {e}") from None

    def _verdict(self, dep: Dep, new_ids: Sequence[int]) -> str:
        """What a dependency means right now: WAIT, MET (already met) or a cancel reason."""
        if dep.target == "job":
            if new_ids and new_ids[0] <= dep.id <= new_ids[-1]:
                return WAIT
            target = self._load(dep.id)
            if not target.st.terminal:
                if dep.kind == DepKind.AFTER.value and target.doomed:
                    return f"dependency {dep.id} will not succeed"
                return WAIT
            return _ended_verdict(
                dep.kind, target.outcome == Outcome.SUCCESS.value, f"dependency {dep.id}"
            )
        group = self._group(dep.id)
        if dep.kind == DepKind.AFTER.value and group.doomed:
            return f"group {group.name!r} will not fully succeed"
        if not group.complete:
            return WAIT
        return _ended_verdict(dep.kind, group.succeeded == group.total, f"group {group.name!r}")

    # ---- dependencies: what an ending (or a doom) does downstream ----------------------------

    def _doom(self, job: Job, reason: str) -> None:
        """`job` will never succeed: cancel its `after` dependents now (SPEC §4)."""
        if job.doomed:
            return
        job.doomed = True
        self.tx.put_job(job)
        self._walk(["job", job.id, DOOM, f"dependency {job.id} {reason}", False, 0])
        for gid in job.groups:
            group = self._group(gid)
            group.doomed += 1
            self.tx.put_group(group)
            if group.doomed == 1:
                why = f"group {group.name!r}: job {job.id} {reason}"
                self._walk(["group", gid, DOOM, why, False, 0])

    def _reprieve(self, job: Job) -> None:
        """A job doomed by a cancel ended in success after all: it had ended by itself before
        the cancel reached it (SPEC §3). What was cancelled at request time stays cancelled,
        but its groups no longer count it as a member that will not succeed."""
        job.doomed = False
        self.tx.put_job(job)
        for gid in job.groups:
            group = self._group(gid)
            group.doomed -= 1
            self.tx.put_group(group)

    def _ended(self, job: Job) -> None:
        """`job` reached a terminal state: settle its dependents and its groups."""
        success = job.outcome == Outcome.SUCCESS.value
        if not success:
            self._doom(job, _failure_word(job))
        elif job.doomed:
            self._reprieve(job)
        self._walk(["job", job.id, END, f"dependency {job.id}", success, 0])
        for gid in job.groups:
            group = self._group(gid)
            group.ended += 1
            group.succeeded += success
            self.tx.put_group(group)
            self._group_complete(group)

    def _group_complete(self, group: Group) -> None:
        if not group.complete:
            return
        success = group.succeeded == group.total
        self._walk(["group", group.id, END, f"group {group.name!r}", success, 0])

    def _settle(self, job: Job, verdict: str) -> None:
        if verdict != MET:
            self._cancel(job, verdict)
            return
        job.pending -= 1
        self.tx.put_job(job)
        if job.eligible:
            self.wake = True

    def _walk(self, source: list[Any]) -> None:
        """Settle the dependents of a job or group, `source` = [target ("job" or "group"),
        its id, DOOM or END, the reason's text, whether it succeeded (END), the last
        dependent id already settled]. Each dependent counts against the Core's `limit`; what
        lies past it, or deeper than CASCADE_DEPTH, is left to the cascade (`_defer`), and so
        is every walk while the cascade has work waiting and all that follows a walk left to
        it: walks are carried out in the order that settling each at once would take (depth
        first), so a dependent is never released by one end while a cancel from an earlier
        one is still on its way to it.

        The edge index may hold edges a `modify` has since dropped: the dependent's own
        `depends_on` is the truth, and each is read just before it is settled, since settling
        one may already have cascaded into the next."""
        if self.inline is None:
            self.inline = self.tx.get_op(CASCADE) is None
        if not self.inline or self._depth >= CASCADE_DEPTH:
            if next(self.tx.dependents_after(source[0], source[1], source[5]), None):
                self._defer(source)  # (one with nothing to settle is over already)
            return
        limit = self.config.cascade_jobs if self.limit is None else self.limit
        target, target_id, mode, text, success, cursor = source
        self._depth += 1
        try:
            for dep_id, _ in self.tx.dependents_after(target, target_id, cursor):
                if self.spent >= limit or not self.inline:
                    self._defer([target, target_id, mode, text, success, cursor])
                    return
                self.spent += 1
                cursor = dep_id
                job = self.tx.get_job(dep_id)
                if job is None or job.st.terminal:
                    continue
                for kind, t, tid in job.depends_on:
                    if t != target or tid != target_id:
                        continue
                    if mode == END:
                        self._settle(job, _ended_verdict(kind, success, text))
                    elif kind == DepKind.AFTER.value:
                        self._cancel(job, text)
        finally:
            self._depth -= 1

    def _defer(self, source: list[Any]) -> None:
        """Leave a walk to the cascade (a record of its own: walks taken in (band, seq) order;
        the cascade's row keeps the next seq and the lowest band). A message's go after every
        walk kept, since it came later (band 0); those a step of the cascade (`limit` set)
        leaves go before them all, in the order left, since they lie inside the walk it was
        carrying out (a band below any so far). Every walk after it in this Core is left too."""
        row = self.tx.get_op(CASCADE) or [CASCADE, CASCADE_KIND, 0, 0]
        band = 0
        if self.limit is not None:
            if self._band is None:
                self._band = row[3] = row[3] - 1
            band = self._band
        self.tx.put_walk(CASCADE, band, row[2], source)
        row[2] += 1
        self.tx.put_op(CASCADE, row)
        self.inline = False

    # ---- cancellation -----------------------------------------------------------------------

    def cancel(
        self, actor: Actor, job_ids: list[int], group_refs: list[str | int], reason: str | None
    ) -> dict[str, list[int]]:
        """Cancel jobs and groups at once; cancelling what is already over is a success (SPEC
        §8), even once retention has purged it. The broker does the same a slice at a time
        (bulk.py), which must end exactly as this does; tests hold the two to it."""
        over = [j for j in job_ids if purged(self.tx, j)]
        jobs = [self._load(j) for j in job_ids if j not in over]
        groups = [self._group(g) for g in group_refs]
        for job in jobs:
            if not actor.may_touch(job.owner):
                raise Forbidden(
                    f"job {job.id} belongs to {job.owner}; only they or an admin may cancel it"
                )
        for group in groups:
            if not actor.may_touch(group.owner):
                raise Forbidden(f"group {group.name!r} belongs to {group.owner}")
        why = f"cancelled by {actor.name}" + (f": {reason}" if reason else "")
        out = Sorted()
        for group in groups:
            group.cancel_reason = why
            was_open, group.open = group.open, False
            # Closing completes a group whose members have all ended; otherwise the last
            # member to end below completes it, and its dependents must be settled only once.
            closing_completes = group.ended == group.total
            self.tx.put_group(group)
            members = list(self.tx.group_members(group.id))
            for member in members:
                if member not in out.seen:
                    job = self._load(member)
                    out.add(job.id, self._cancel(job, f"group {group.name!r} {why}"))
            if was_open and closing_completes:
                self._group_complete(self._group(group.id))
        for job in jobs:
            if job.id not in out.seen:
                out.add(job.id, self._cancel(self._load(job.id), why))
        for job_id in over:
            if job_id not in out.seen:
                out.add(job_id, "already")
        return out.lists

    def _cancel(self, job: Job, reason: str) -> str:
        """Cancel one job: "cancelled", "pending" (a running job was asked) or "already"."""
        st = job.st
        if st.terminal or st == S.PENDING_CANCELLATION:
            return "already" if st.terminal else "pending"
        job.cancel_reason = reason
        job.cancel_requested = True
        if st == S.RUNNING and job.worker is not None and job.token is not None:
            self._move(job, S.PENDING_CANCELLATION, reason)
            self.effects.append(
                Effect(job.worker, "cancel", {"job": job.id, "token": job.token, "reason": reason})
            )
            self._doom(job, "was cancelled")
            return "pending"
        self._move(job, S.CANCELLED, reason)
        self._ended(job)
        return "cancelled"

    # ---- hold, release, modify --------------------------------------------------------------

    def modify(
        self,
        actor: Actor,
        job_id: int,
        changes: dict[str, Any],
        hold: bool = False,
        release: bool = False,
    ) -> Job:
        """Edit fields under the per-state rules, and hold or release (SPEC §2, §3)."""
        job = self._load(job_id)
        if not actor.may_touch(job.owner):
            raise Forbidden(
                f"job {job.id} belongs to {job.owner}; only they or an admin may modify it"
            )
        if hold and release:
            raise BadRequest("hold and release together make no sense")
        if hold and job.st != S.INACTIVE:
            if job.st != S.AVAILABLE:
                raise Conflict(f"job {job.id} is {job.state}; only an available job can be held")
            self._move(job, S.INACTIVE, f"held by {actor.name}")
        for name in changes:
            allowed = EDITABLE.get(name)
            if allowed is None:
                raise BadRequest(f"{name}: not a field that can be modified")
            if job.st not in allowed:
                states = " or ".join(sorted(s.value for s in allowed))
                raise Conflict(
                    f"{name}: may only be changed while the job is {states} "
                    f"(job {job.id} is {job.state})"
                )
        doom = None
        for name, value in changes.items():
            if name == "depends_on":
                doom = self._replace_deps(job, value)
            else:
                setattr(job, name, value)
        self.tx.put_job(job)
        if release and job.st == S.INACTIVE:
            self._move(job, S.AVAILABLE, f"released by {actor.name}")
        elif release and job.st != S.AVAILABLE:
            raise Conflict(f"job {job.id} is {job.state}; only an inactive job can be released")
        if doom is not None:  # as at submit: accepted, and cancelled with the reason
            self._cancel(job, doom)
        return job

    def _replace_deps(self, job: Job, specs: list[dict[str, Any]]) -> str | None:
        """Set the job's dependencies; returns why it can never run, if one can never be met."""
        deps = self._resolve_deps(0, {"depends_on": specs}, {}, [job.id])
        DepGraph(self.tx).check({job.id: deps}, {}, set(), existing=True)
        pending = 0
        doom = None
        for dep in deps:
            verdict = self._verdict(dep, [])
            if verdict == WAIT:
                pending += 1
                self.tx.add_dependent(dep.target, dep.id, job.id, dep.kind)
            elif verdict != MET and doom is None:
                doom = verdict
        job.depends_on = [d.pack() for d in deps]
        job.pending = pending
        return doom

    def close_group(self, actor: Actor, ref: str | int) -> Group:
        group = self._group(ref)
        if not actor.may_touch(group.owner):
            raise Forbidden(f"group {group.name!r} belongs to {group.owner}")
        if group.open:
            group.open = False
            self.tx.put_group(group)
            self._group_complete(group)
        return group

    # ---- workers ----------------------------------------------------------------------------

    def register(
        self,
        name: str,
        host: str,
        capacity: tuple[float, int, int],
        tags: list[str],
        running: list[tuple[int, int]],
        runs: owners.Runs = owners.ANY_OWNER,
        draining: bool = False,
        address: str = "",
        key: str | None = None,
        spool: str = "",
        instance: str = "",
        prefetch: int | None = None,
    ) -> Worker:
        """A worker (re)connects and lists the attempts it holds (SPEC §5), and whose jobs it
        runs (SPEC §6). One that is stopping (`draining`), or that an admin drained, comes
        back draining. `address` and `key` say where from and with which worker key;
        `prefetch`, how many jobs it may hold ahead (None: the broker's default).

        An attempt it does not list was lost with the worker process if that process is new;
        if it is the same process (`instance`), the assignment never reached it (the broker
        stopped between recording and sending it, or the connection it went on was gone),
        and the job is queued again as if never claimed. A job it held ahead and lists as
        running, it started; one it does not list it never started (a worker drops what it
        holds ahead when it registers): it goes back to the queue spending no attempt."""
        worker = self.tx.get_worker(name)
        cpus, memory, gpus = capacity
        if worker is None:
            worker = Worker(name, host, cpus, memory, gpus, list(tags), registered=self.now)
        worker.host, worker.cpus, worker.memory, worker.gpus = host, cpus, memory, gpus
        worker.tags, worker.spool = list(tags), spool
        worker.only_account, worker.refused = runs.only_account, dict(runs.refused)
        worker.address, worker.key = address, key
        worker.prefetch = prefetch
        worker.registered = worker.last_seen = self.now
        worker.wants = 0
        if draining or worker.held:
            if worker.state != WorkerState.DRAINED.value:
                worker.state = WorkerState.DRAINING.value
        else:
            worker.state = WorkerState.ACTIVE.value
        listed = dict(running)
        same = bool(instance) and instance == worker.instance
        worker.instance = instance
        for job_id, token in list(worker.ahead.items()):
            job = self._load(job_id)
            if listed.get(job_id) == token:
                self._promote(worker, job)
            else:
                self._unclaim(worker, job, f"worker {name} registered again without starting it")
        for job_id, token in list(worker.running.items()):
            if listed.get(job_id) == token:
                continue
            if same:
                self._unsent(worker, job_id, token)
            else:
                self._lose_attempt(worker, job_id, token, f"worker {name} restarted without it")
        for job_id, token in listed.items():
            if worker.running.get(job_id) != token:
                self._kill_stale(name, job_id, token)
        self._recount(worker)
        self._settle_drain(worker)
        self.tx.put_worker(worker)
        self.effects.append(
            Effect(
                name,
                "registered",
                {
                    "heartbeat": self.config.heartbeat,
                    "liveness": self.config.liveness,
                    "broker_account": self.config.account,
                },
            )
        )
        return worker

    def _recount(self, worker: Worker) -> None:
        """Derive the worker's used resources from the attempts it holds."""
        worker.used_cpus, worker.used_memory, worker.used_gpus = 0.0, 0, []
        for job_id, token in worker.running.items():
            job = self.tx.get_job(job_id)
            if job is None or job.token != token:
                continue
            worker.used_cpus += job.cpus
            worker.used_memory += job.memory
            attempt = self.tx.get_attempt(job_id, job.attempts)
            if attempt is not None:
                worker.used_gpus += attempt.gpu_ids

    def heartbeat(
        self, name: str, running: list[tuple[int, int, float | None, int | None]]
    ) -> None:
        """Usage of held attempts; resend lost cancels; fence attempts that are not its own."""
        worker = self._worker(name)
        for job_id, token, cpu, rss in running:
            if worker.ahead.get(job_id) == token:  # its `started` was lost on the way
                self._promote(worker, self._load(job_id))
                self.tx.put_worker(worker)
            if worker.running.get(job_id) != token:
                if self._already_reported(name, job_id, token):
                    # Its result is stored; the ack crossed this heartbeat on the wire.
                    self.effects.append(Effect(name, "ack", {"job": job_id, "token": token}))
                else:
                    self._kill_stale(name, job_id, token)
                continue
            job = self.tx.get_job(job_id)
            if job is None:
                continue
            if job.st == S.PENDING_CANCELLATION:
                self.effects.append(
                    Effect(
                        name,
                        "cancel",
                        {"job": job_id, "token": token, "reason": job.cancel_reason or "cancelled"},
                    )
                )
            attempt = self.tx.get_attempt(job_id, job.attempts)
            if attempt is not None and (attempt.cpu_percent, attempt.rss) != (cpu, rss):
                attempt.cpu_percent, attempt.rss = cpu, rss
                self.tx.put_attempt(attempt)

    def _worker(self, name: str) -> Worker:
        worker = self.tx.get_worker(name)
        if worker is None:
            raise NotFound(f"no worker {name!r}")
        return worker

    def claim(self, name: str, count: int, ahead: int | None = None) -> None:
        """The worker has room for `count` more jobs; they are assigned by `match`. `ahead`:
        how many it asks to have held ahead, within its prefetch (None: not said)."""
        worker = self._worker(name)
        worker.wants = count if worker.state == WorkerState.ACTIVE.value else 0
        if ahead is not None:
            worker.hold = ahead
        self.tx.put_worker(worker)
        self.wake = self.wake or worker.wants > 0

    def match(self) -> int:
        """Answer outstanding claims with the best eligible jobs that fit; returns how many.

        The least loaded claimer goes first, so work spreads. Each claim looks only at the
        heads of the queues (see matching.py), so jobs that fit no worker never hold it up.
        """
        claimers = [w for n in self.tx.claimers() if (w := self.tx.get_worker(n)) is not None]
        claimers.sort(key=lambda w: (w.used_cpus / w.cpus if w.cpus else 1.0, w.name))
        board: Board | None = None
        assigned = 0
        dry: list[Worker] = []  # claimers with room that no eligible job fits
        active: list[Worker] = []
        for worker in claimers:
            if worker.state != WorkerState.ACTIVE.value:
                if worker.wants:
                    worker.wants = 0
                    self.tx.put_worker(worker)
                continue
            active.append(worker)
            if self._room(worker)[0] < MIN_CPUS:  # every job asks for some cpu
                continue
            if board is None:  # read once, only when some claimer has room
                board = self._board()
            batch = self._fill(worker, board)
            assigned += self._send_assign(worker, batch)
            if worker.wants > 0 and self._room(worker)[0] >= MIN_CPUS:
                dry.append(worker)
        # Claim-ahead (SPEC §5): what is still eligible now fits no claimer's free room, so a
        # job held ahead is never one an idle worker could run now.
        for worker in active:
            if worker.wants > 0 and len(worker.ahead) < self._prefetch(worker):
                if board is None:
                    board = self._board()
                assigned += self._send_assign(worker, self._fill_ahead(worker, board))
        if dry:
            # From a draining worker too: its own give-back may not have reached the broker.
            self._revoke_for(dry, [w for w in claimers if w.ahead and not w.gone])
        return assigned

    def _room(self, worker: Worker) -> tuple[float, int, int]:
        """The worker's free room that jobs to run now may take: what its jobs held ahead
        would not. A worker starts those in any room it has, at once, and the broker hears of
        it only after: given to a new job meanwhile, that room would hold two."""
        cpus = worker.cpus - worker.used_cpus
        memory = worker.memory - worker.used_memory
        if cpus < MIN_CPUS:  # full: no need to read what it holds ahead (the usual case)
            return cpus, memory, worker.gpus - len(worker.used_gpus)
        for job_id in worker.ahead:
            job = self.tx.get_job(job_id)
            if job is not None:
                cpus, memory = cpus - job.cpus, memory - job.memory
        return cpus, memory, worker.gpus - len(worker.used_gpus)

    def _send_assign(self, worker: Worker, batch: list[dict[str, Any]]) -> int:
        if batch:
            self.tx.put_worker(worker)
            for body in owners.assignments(self.tx, batch):
                self.effects.append(Effect(worker.name, "assign", body))
        return len(batch)

    def _prefetch(self, worker: Worker) -> int:
        limit = self.config.prefetch if worker.prefetch is None else worker.prefetch
        return limit if worker.hold is None else min(limit, worker.hold)

    def _fill_ahead(self, worker: Worker, board: Board) -> list[dict[str, Any]]:
        """Assign `worker` jobs beyond its free room, up to its prefetch, best first: each
        fits the worker whole, asks for no gpu (which gpu is free is known only at its
        start), and waits there for a slot."""
        runs = owners.filter_for(worker, self.tx)
        refused = None if runs is None else (lambda job_id: not runs(job_id))
        whole = (worker.cpus, worker.memory, 0)
        batch: list[dict[str, Any]] = []
        limit = self._prefetch(worker)
        while worker.wants > 0 and len(worker.ahead) < limit:
            head = board.pick(whole, worker.tags, refused, self.held)
            if head is None:
                break
            batch.append(self._assign(worker, head.job, ahead=True))
            board.took(head)
        return batch

    def _revoke_for(self, dry: list[Worker], holding: list[Worker]) -> None:
        """Each claimer in `dry` has room that no eligible job fits: ask back, from the other
        workers, jobs held ahead that fit that room, as many as the room takes. The holder
        returns each it has not started (`returned`); one it started stays where it runs."""
        holders = [w for w in holding if len(w.ahead) > len(w.revoking)]
        if not holders:
            return
        for worker in dry:
            runs = owners.filter_for(worker, self.tx)
            room = list(self._room(worker))
            for holder in holders:
                if holder is worker:
                    continue
                for job_id in list(holder.ahead):
                    if room[0] < MIN_CPUS:
                        break
                    if job_id in holder.revoking or (self.held and self.held(job_id)):
                        continue
                    job = self._load(job_id)
                    if (
                        job.cpus > room[0] + 1e-9
                        or job.memory > room[1]
                        or job.gpus > room[2]
                        or not all(t in worker.tags for t in job.tags)
                        or (runs is not None and not runs(job_id))
                    ):
                        continue
                    room[0] -= job.cpus
                    room[1] -= job.memory
                    holder.revoking.append(job_id)
                    self.tx.put_worker(holder)
                    self.effects.append(
                        Effect(holder.name, "revoke", {"job": job_id, "token": job.token})
                    )

    def _board(self) -> Board:
        heads = self.tx.queue_heads()
        names = {h.owner for h in heads}
        users = {name: self.tx.get_user(name) for name in names}
        # What an owner holds matters only against other owners, or to its own limit.
        tallies = {
            name: self.tx.tally(name)
            for name, user in users.items()
            if len(names) > 1 or (user is not None and user.max_running is not None)
        }
        return Board.build(
            heads, users, tallies, self.now, self.config.half_life, self.tx.queue_head
        )

    def _fill(self, worker: Worker, board: Board) -> list[dict[str, Any]]:
        """Assign `worker` the best fitting jobs, one at a time, while it wants more and has
        room; returns the assignments. Passed over: jobs of accounts the worker does not run,
        and the targets of a long operation."""
        runs = owners.filter_for(worker, self.tx)
        refused = None if runs is None else (lambda job_id: not runs(job_id))
        batch: list[dict[str, Any]] = []
        while worker.wants > 0:
            room = self._room(worker)
            if room[0] < MIN_CPUS:
                break
            head = board.pick(room, worker.tags, refused, self.held)
            if head is None:
                break
            batch.append(self._assign(worker, head.job))
            board.took(head)
        return batch

    def _assign(self, worker: Worker, job_id: int, ahead: bool = False) -> dict[str, Any]:
        """Open an attempt of the job on `worker`: to run now in its free room, or (`ahead`)
        to wait there for a slot, holding none of its resources until it starts."""
        job = self._load(job_id)
        token = self.tx.next_id("token")
        gpu_ids = [i for i in range(worker.gpus) if i not in worker.used_gpus][: job.gpus]
        job.attempts += 1
        job.token, job.worker = token, worker.name
        job.progress = job.progress_message = None
        self.tx.put_attempt(Attempt(job.id, job.attempts, token, worker.name, self.now, gpu_ids))
        if ahead:
            self._move(job, S.RUNNING, f"assigned to {worker.name}, waiting for a slot")
            worker.ahead[job.id] = token
        else:
            self._move(job, S.RUNNING, f"claimed by {worker.name}")
            worker.used_cpus += job.cpus
            worker.used_memory += job.memory
            worker.used_gpus = sorted(worker.used_gpus + gpu_ids)
            worker.running[job.id] = token
        worker.wants -= 1
        return {
            "job": job.id,
            "token": token,
            "attempt": job.attempts,
            "command": job.command,
            "cwd": job.cwd,
            "env": job.env,
            "gpu_ids": gpu_ids,
            "time_limit": job.time_limit,
            "cancel_grace": job.cancel_grace,
            "output": job.output,
            "account": job.runs_as,
            "environ": job.environ,
            "umask": job.umask,
            "ahead": ahead,
            "cpus": job.cpus,
            "memory": job.memory,
        }

    # ---- reports about attempts -------------------------------------------------------------

    def _held(self, name: str, job_id: int, token: int) -> tuple[Job, Attempt] | None:
        """The live attempt `(job, token)` if `name` holds it; otherwise fence it and say None."""
        job = self.tx.get_job(job_id)
        if (
            job is None
            or job.token != token
            or job.worker != name
            or job.st not in (S.RUNNING, S.PENDING_CANCELLATION)
        ):
            self._kill_stale(name, job_id, token)
            return None
        attempt = self.tx.get_attempt(job_id, job.attempts)
        if attempt is None:  # cannot happen while the store is consistent; fence, don't crash
            self._kill_stale(name, job_id, token)
            return None
        return job, attempt

    def _kill_stale(self, name: str, job_id: int, token: int) -> None:
        self.effects.append(Effect(name, "kill_stale", {"job": job_id, "token": token}))

    def started(self, name: str, job_id: int, token: int, age: float = 0.0) -> None:
        held = self._held(name, job_id, token)
        if held is not None:
            job, attempt = held
            self._started_ahead(name, job)
            attempt.started = max(attempt.claimed, self.now - age)
            self.tx.put_attempt(attempt)
            if job.started is None:  # a job started when its first process did, not its claim
                job.started = attempt.started
                self.tx.put_job(job)

    def _started_ahead(self, name: str, job: Job) -> None:
        """If `name` held the job ahead, it started it: it now holds the job's resources."""
        worker = self._worker(name)
        if worker.ahead.get(job.id) == job.token:
            self._promote(worker, job)
            self.tx.put_worker(worker)

    def _promote(self, worker: Worker, job: Job) -> None:
        """A job held ahead started in a slot that freed. Its gpus: none (see _fill_ahead)."""
        token = worker.ahead.pop(job.id)
        if job.id in worker.revoking:  # asked back too late: it stays where it started
            worker.revoking.remove(job.id)
        worker.running[job.id] = token
        worker.used_cpus += job.cpus
        worker.used_memory += job.memory
        self.wake = True  # room ahead for another
        attempt = self.tx.get_attempt(job.id, job.attempts)
        if attempt is not None and attempt.started is None:
            # Told at once (a `started` report dates it more closely, if one follows): its
            # time waiting for the slot is not charged to its owner (_charge).
            attempt.started = self.now
            self.tx.put_attempt(attempt)

    def returned(self, name: str, job_id: int, token: int, reason: str) -> None:
        """The worker gives back a job it held ahead and never started, nor will (it was asked
        back, cancelled, or the worker drains): queued again spending no attempt, or, if a
        cancel is pending, cancelled. A job it no longer holds ahead (it started it, or it was
        given back already) is left as it is: the holder's word is the fence."""
        worker = self._worker(name)
        if worker.ahead.get(job_id) != token:
            return
        self._unclaim(worker, self._load(job_id), reason)
        self._settle_drain(worker)
        self.tx.put_worker(worker)

    def _unclaim(self, worker: Worker, job: Job, reason: str) -> None:
        """Undo the claim of a job `worker` held ahead and never started."""
        del worker.ahead[job.id]
        if job.id in worker.revoking:
            worker.revoking.remove(job.id)
        attempt = self.tx.get_attempt(job.id, job.attempts)
        if attempt is not None:
            attempt.ended, attempt.reason = self.now, reason
            attempt.outcome = Outcome.RETURNED.value
            self.tx.put_attempt(attempt)
        self._forget_claim(job, reason)

    def _forget_claim(self, job: Job, reason: str) -> None:
        """The job's attempt never ran: the next claim reuses its number (and record)."""
        job.attempts -= 1
        job.token = job.worker = None
        if job.attempts == 0:
            job.started = None
        self.wake = True
        if job.st == S.PENDING_CANCELLATION:
            self._move(job, S.CANCELLED, job.cancel_reason)
            self._ended(job)
        else:
            self._move(job, S.AVAILABLE, reason)

    def hand_back(self, name: str, job_id: int, token: int, reason: str) -> None:
        """The worker cannot run the attempt's Unix account, and never started it (SPEC §6):
        the job is queued again as if it had not been claimed, spending no attempt, and the
        worker is offered none of that account's jobs until it registers again."""
        held = self._held(name, job_id, token)
        if held is None:
            return
        job, attempt = held
        worker = self._worker(name)
        if worker.ahead.pop(job.id, None) is not None:  # held ahead: it held no resources
            if job.id in worker.revoking:
                worker.revoking.remove(job.id)
        else:
            self._release(worker, job)
        owners.refuse(worker, job.runs_as, reason)
        if worker.state == WorkerState.ACTIVE.value:
            worker.wants += 1  # the slot it was given is free for another job
        self._settle_drain(worker)
        self.tx.put_worker(worker)
        self._undo_claim(job, attempt, reason)

    def _unsent(self, worker: Worker, job_id: int, token: int) -> None:
        """The live attempt `(job_id, token)` never reached `worker`: nothing ran, nothing is
        spent. (The caller writes the worker.)"""
        job = self.tx.get_job(job_id)
        live = job is not None and job.token == token
        attempt = self.tx.get_attempt(job_id, job.attempts) if job is not None and live else None
        if job is None or attempt is None:  # not its attempt any more (or no record: fence)
            self._lose_attempt(worker, job_id, token, f"worker {worker.name} does not hold it")
            return
        worker.running.pop(job_id, None)
        self._undo_claim(job, attempt, f"the assignment never reached worker {worker.name}")

    def _undo_claim(self, job: Job, attempt: Attempt, reason: str) -> None:
        """Undo a claim whose attempt never started: the job is queued again (or, if it was
        being cancelled, cancelled) spending no attempt; its next claim reuses the attempt's
        number and record."""
        self.wake = True
        attempt.ended, attempt.outcome, attempt.reason = self.now, Outcome.RETURNED.value, reason
        self.tx.put_attempt(attempt)
        self._forget_claim(job, reason)

    def progress(
        self,
        name: str,
        job_id: int,
        token: int,
        percent: float | None,
        message: str,
        usage: tuple[float | None, int | None] = (None, None),
    ) -> None:
        held = self._held(name, job_id, token)
        if held is None:
            return
        job, attempt = held
        job.progress, job.progress_message = percent, message
        attempt.progress, attempt.progress_message = percent, message
        if usage != (None, None):
            attempt.cpu_percent, attempt.rss = usage
        self.tx.put_job(job)
        self.tx.put_attempt(attempt)

    def result(
        self,
        name: str,
        job_id: int,
        token: int,
        outcome: str,
        exit_code: int | None,
        signal: int | None,
        tails: tuple[str, str] = ("", ""),
        runtime: float | None = None,
        then: Sequence[tuple[int, int]] = (),
    ) -> None:
        """An attempt ended on the worker. Idempotent per token: a repeat is acked again.

        A job that ended before its `started` report was due has only `runtime` to date it.
        `then`: jobs it held ahead and started in the room this one freed (one report, so the
        broker never sees that room both free and taken)."""
        self._result(name, job_id, token, outcome, exit_code, signal, tails, runtime)
        for next_id, next_token in then:
            held = self._held(name, next_id, next_token)
            if held is not None:
                self._started_ahead(name, held[0])

    def _result(
        self,
        name: str,
        job_id: int,
        token: int,
        outcome: str,
        exit_code: int | None,
        signal: int | None,
        tails: tuple[str, str],
        runtime: float | None,
    ) -> None:
        ack = Effect(name, "ack", {"job": job_id, "token": token})
        if self._already_reported(name, job_id, token):
            self.effects.append(ack)
            return
        held = self._held(name, job_id, token)
        if held is None:
            return
        job, attempt = held
        if attempt.started is None and runtime is not None:
            attempt.started = max(attempt.claimed, self.now - runtime)
        if job.started is None:
            job.started = attempt.started
        # Dated by the worker's own measure of the run where it has one: a result that waited
        # for a broker that was away ended when the job did, not when the broker heard of it.
        attempt.ended = self.now
        if runtime is not None and attempt.started is not None:
            attempt.ended = min(self.now, attempt.started + runtime)
        attempt.exit_code, attempt.signal = exit_code, signal
        attempt.stdout_tail, attempt.stderr_tail = tails
        self._charge(job, attempt)
        job.exit_code, job.signal = exit_code, signal
        worker = self._worker(name)
        if worker.ahead.get(job.id) == token:  # it ran one held ahead, its start untold
            self._promote(worker, job)
        self._release(worker, job)
        worker.completed += 1
        self._settle_drain(worker)
        self.tx.put_worker(worker)
        self.effects.append(ack)
        if outcome == "cancelled" and job.st == S.RUNNING:
            # Nobody asked: the worker stopped it (its second SIGTERM). Neither the job's fault
            # nor a lost machine's: it is requeued spending nothing, and as the worker drains,
            # it runs elsewhere.
            attempt.outcome = Outcome.CANCELLED.value
            attempt.reason = f"worker {name} stopped it"
            self.tx.put_attempt(attempt)
            job.token = job.worker = None
            job.unspent += 1
            self._move(job, S.AVAILABLE, f"{attempt.reason}; requeued")
            return
        if outcome == "cancelled":
            attempt.outcome = Outcome.CANCELLED.value
            self.tx.put_attempt(attempt)
            job.token = None
            self._move(job, S.CANCELLED, job.cancel_reason)
            self._ended(job)
            return
        final = _outcome(outcome, exit_code, signal)
        attempt.outcome = final.value
        self.tx.put_attempt(attempt)
        job.token = None
        if final != Outcome.SUCCESS and job.st == S.RUNNING:
            job.failures += 1
            if job.failures < job.max_attempts:
                job.worker = None
                self._move(job, S.AVAILABLE, f"attempt {job.attempts} {final.value}; retrying")
                return
        job.outcome = final.value
        self._move(job, S.TERMINATED, final.value)
        self._ended(job)

    def _already_reported(self, name: str, job_id: int, token: int) -> bool:
        job = self.tx.get_job(job_id)
        if job is None or job.token == token:
            return False
        for attempt in reversed(self.tx.attempts_of(job_id)):
            if attempt.token == token:
                return (
                    attempt.worker == name
                    and attempt.ended is not None
                    and (attempt.reason is None)
                )
        return False

    def _charge(self, job: Job, attempt: Attempt) -> None:
        """Add the ended attempt's cpu-seconds (held, not used) to its owner's usage."""
        start = attempt.started if attempt.started is not None else attempt.claimed
        end = attempt.ended if attempt.ended is not None else self.now
        held = job.cpus * max(0.0, end - start)
        user = self.tx.get_user(job.owner) or User(job.owner)
        user.usage = decayed(user, self.now, self.config.half_life) + held
        user.usage_at = self.now
        self.tx.put_user(user)

    def _release(self, worker: Worker, job: Job) -> None:
        """Give the attempt's resources back to its worker."""
        if worker.running.pop(job.id, None) is None:
            return
        worker.used_cpus = max(0.0, worker.used_cpus - job.cpus)
        worker.used_memory = max(0, worker.used_memory - job.memory)
        attempt = self.tx.get_attempt(job.id, job.attempts)
        if attempt is not None:
            worker.used_gpus = [g for g in worker.used_gpus if g not in attempt.gpu_ids]

    def _settle_drain(self, worker: Worker) -> None:
        if worker.state == WorkerState.DRAINING.value and not worker.running and not worker.ahead:
            worker.state = WorkerState.DRAINED.value

    def drain(self, actor: Actor, name: str, resume: bool) -> Worker:
        """An admin's drain holds the worker drained, across its restarts, until a resume.
        A lost or stopped worker stays so, and comes back drained when it registers again."""
        if actor.role != ADMIN:
            raise Forbidden("draining and resuming workers is for admins")
        worker = self._worker(name)
        worker.held = not resume
        if resume:
            if worker.state in (WorkerState.DRAINING.value, WorkerState.DRAINED.value):
                worker.state = WorkerState.ACTIVE.value
        elif not worker.gone:
            worker.state = WorkerState.DRAINING.value
            worker.wants = 0
            self._settle_drain(worker)
        self.tx.put_worker(worker)
        if not worker.gone:
            self.effects.append(Effect(name, "drain", {"resume": resume}))
        return worker

    # ---- users -------------------------------------------------------------------------------

    def set_user(self, actor: Actor, name: str, changes: dict[str, Any]) -> User:
        """Set a user's shares and limits: `shares`, `max_running`, `max_queued` (None lifts
        a limit). Admins only; the user need not have submitted anything yet."""
        if actor.role != ADMIN:
            raise Forbidden("setting users' shares and limits is for admins")
        user = self.tx.get_user(name) or User(name)
        for key, value in changes.items():
            if key not in USER_SETTINGS:
                raise BadRequest(f"{key}: not a user setting; one of {', '.join(USER_SETTINGS)}")
            setattr(user, key, value)
        self.tx.put_user(user)
        self.wake = True  # a raised limit or a new share may change who runs next
        return user

    def _check_queued(self, owner: str, adding: int) -> None:
        """Refuse a submission that would take `owner` past its max_queued."""
        user = self.tx.get_user(owner)
        if user is None or user.max_queued is None:
            return
        queued = self.tx.tally(owner).queued
        if queued + adding > user.max_queued:
            raise Conflict(
                f"max_queued: {owner} may have at most {user.max_queued} jobs waiting "
                f"({queued} now, and this submission adds {adding})"
            )

    def draining(self, name: str) -> Worker:
        """The worker drains itself (its first SIGTERM): its claim is withdrawn at once."""
        worker = self._worker(name)
        if worker.state == WorkerState.ACTIVE.value:
            worker.state = WorkerState.DRAINING.value
        worker.wants = 0
        # It dropped what it held ahead before it said so, and reported what it had started.
        for job_id in list(worker.ahead):
            self._unclaim(worker, self._load(job_id), f"worker {name} drains")
        self._settle_drain(worker)
        self.tx.put_worker(worker)
        return worker

    def stopped(self, name: str) -> list[tuple[int, str]]:
        """The worker exits cleanly. It holds nothing by then; anything it still held goes
        back to the queue as from a lost worker. Returns those jobs and their new states."""
        return self._gone(
            self._worker(name), WorkerState.STOPPED, f"worker {name} stopped", self.now
        )

    def forget(self, actor: Actor, name: str) -> None:
        """Remove a lost or stopped worker from the list; a connected one is refused."""
        if actor.role != ADMIN:
            raise Forbidden("forgetting workers is for admins")
        worker = self._worker(name)
        if not worker.gone:
            raise Conflict(
                f"worker {name!r} is {worker.state}; only a lost or stopped worker can be "
                "forgotten (stop it first)"
            )
        self.tx.delete_worker(name)

    # ---- lost workers -----------------------------------------------------------------------

    def worker_lost(
        self, name: str, reason: str, heard: float | None = None
    ) -> list[tuple[int, str]]:
        """Silent past the liveness window: requeue its jobs without spending retries (SPEC §5).
        `heard` is when the broker last heard from it; None when this broker never did (it
        did not come back after a restart), which leaves the stored time. Returns its jobs and
        the state each went to."""
        worker = self.tx.get_worker(name)
        if worker is None or worker.gone:
            return []
        return self._gone(worker, WorkerState.LOST, reason, heard)

    def heard(self, seen: dict[str, float]) -> None:
        """Store when each connected worker was last heard from (the server does this now and
        then, and at its stop), so that after a restart the list still says when."""
        for name, when in seen.items():
            worker = self.tx.get_worker(name)
            if worker is not None and not worker.gone and when > worker.last_seen:
                worker.last_seen = when
                self.tx.put_worker(worker)

    def _gone(
        self, worker: Worker, state: WorkerState, reason: str, heard: float | None
    ) -> list[tuple[int, str]]:
        """The worker is no longer there (`state`): what it held goes back to the queue; what
        it held ahead, spending nothing (it is not known to have started any of it)."""
        moved = [self._lose_attempt(worker, j, t, reason) for j, t in list(worker.running.items())]
        for job_id in list(worker.ahead):
            job = self._load(job_id)
            self._unclaim(worker, job, reason)
            moved.append((job.id, job.state))
        worker.state = state.value
        worker.wants = 0
        if heard is not None:
            worker.last_seen = max(worker.last_seen, heard)
        self._recount(worker)
        self.tx.put_worker(worker)
        return [m for m in moved if m is not None]

    def _lose_attempt(
        self, worker: Worker, job_id: int, token: int, reason: str
    ) -> tuple[int, str] | None:
        job = self.tx.get_job(job_id)
        worker.running.pop(job_id, None)
        if job is None or job.token != token:
            return None
        attempt = self.tx.get_attempt(job_id, job.attempts)
        if attempt is not None:
            attempt.ended, attempt.outcome, attempt.reason = self.now, Outcome.LOST.value, reason
            self.tx.put_attempt(attempt)
            self._charge(job, attempt)
        job.token = None
        if job.st == S.PENDING_CANCELLATION:
            self._move(job, S.CANCELLED, job.cancel_reason)
            self._ended(job)
        elif job.st == S.RUNNING:
            self._requeue_or_lose(job, reason)
        return job.id, job.state

    def _requeue_or_lose(self, job: Job, reason: str) -> None:
        job.token = None
        if job.requeues < self.config.max_lost_requeues:
            job.requeues += 1
            job.unspent += 1
            job.worker = None
            self._move(
                job,
                S.AVAILABLE,
                f"{reason}; requeued ({job.requeues} of {self.config.max_lost_requeues})",
            )
            return
        job.outcome = Outcome.LOST.value
        self._move(job, S.TERMINATED, f"{reason}; requeued {job.requeues} times already")
        self._ended(job)


_AVAILABLE, _INACTIVE = S.AVAILABLE.value, S.INACTIVE.value
# No dependencies, no groups: one shared empty list, safe because a new row is packed at once.
_NONE: list[Any] = []
_CPUS, _MEMORY, _GPUS = float(defaults.CPUS), defaults.MEMORY_MIB, defaults.GPUS
_PRIORITY, _MAX_ATTEMPTS = defaults.PRIORITY, defaults.MAX_ATTEMPTS
_CANCEL_GRACE = float(defaults.CANCEL_GRACE)
# _new_row writes a Job row by hand (it is most of a big submission's work; a Job and its pack
# cost twice as much), so it must follow the field order.
_ROW_FIELDS = (
    *("id", "name", "command", "owner", "submitted", "state", "cwd", "env", "cpus", "memory"),
    *("gpus", "tags", "priority", "max_attempts", "time_limit", "cancel_grace", "output"),
    *("depends_on", "groups", "pending"),
)
assert NEW_JOB_FIELDS == _ROW_FIELDS, "_new_row no longer matches Job's fields"
_UMASK = Job.names().index("umask")


def _new_row(
    job_id: int,
    owner: str,
    now: float,
    spec: dict[str, Any],
    depends_on: list[list[Any]],
    groups: list[int],
    pending: int,
    tail: tuple[Any, ...] = NEW_JOB_TAIL,
) -> list[Any]:
    """`Job(...).pack()` for a new job from its JobSpec, defaults filled in, with `tail` for
    the fields after `pending` (owners.new_job_tail). The row is packed at once and never
    changed, so it may share the spec's env and tags."""
    get = spec.get
    row = [
        job_id,
        get("name") or "",
        spec["command"],
        owner,
        now,
        _INACTIVE if get("hold", False) else _AVAILABLE,
        get("cwd"),
        get("env") or {},
        float(get("cpus", _CPUS)),
        int(get("memory", _MEMORY)),
        int(get("gpus", _GPUS)),
        get("tags") or [],
        int(get("priority", _PRIORITY)),
        int(get("max_attempts", _MAX_ATTEMPTS)),
        get("time_limit"),
        float(get("cancel_grace", _CANCEL_GRACE)),
        get("output"),
        depends_on,
        groups,
        pending,
        *tail,
    ]
    umask = get("umask")
    if umask is not None:
        row[_UMASK] = umask
    return row


def _digest(jobs: list[dict[str, Any]], groups: list[dict[str, Any]]) -> str:
    """What a submission asks for, in a few bytes: equal for the same jobs and groups however
    their maps were ordered."""
    text = json.dumps([jobs, groups], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _span(ids: list[int]) -> str:
    return "none" if not ids else str(ids[0]) if len(ids) == 1 else f"{ids[0]}-{ids[-1]}"


def _outcome(reported: str, exit_code: int | None, signal: int | None) -> Outcome:
    if reported == "timeout":
        return Outcome.TIMEOUT
    if exit_code == 0 and signal is None:
        return Outcome.SUCCESS
    return Outcome.FAILED


def _failure_word(job: Job) -> str:
    if job.st == S.CANCELLED:
        return "was cancelled"
    return {"failed": "failed", "timeout": "timed out", "lost": "was lost"}.get(
        job.outcome or "", "did not succeed"
    )


WAIT = "wait"
MET = "met"


def _ended_verdict(kind: str, succeeded: bool, what: str) -> str:
    """A dependency on something that has ended: met, or the reason the dependent is cancelled."""
    if kind == DepKind.AFTER_ANY.value:
        return MET
    if kind == DepKind.AFTER.value:
        return MET if succeeded else f"{what} did not succeed"
    return f"{what} succeeded, so after_fail will never run" if succeeded else MET


def in_request(jobs: list[dict[str, Any]], index: int) -> str | None:
    """Job `index` of a request as its sender knows it: `jobs[1]`, with its name if it has one."""
    if not 0 <= index < len(jobs):
        return None
    name = jobs[index].get("name")
    return f"jobs[{index}]" + (f" ({name})" if name else "")
