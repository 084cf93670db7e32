"""Big submissions, made a slice at a time: a long operation, run by longops.py like bulk.py's.

Made in one turn, a 200,000-job array held the broker's loop for 2 to 8 s on two cores and its
memory peaked near 600 MB. A submission of more than `defaults.BIG_SUBMISSION` jobs is
admitted instead as a `Submission`:

- `admit` makes every check that may refuse it, as Core.submit does (its submit key,
  max_queued, its groups, its dependencies and their cycles). Then it reserves the job ids,
  makes the new groups with their final member counts (so none looks finished before its
  members exist), records the submit key with the reply to come, and keeps the request in the
  store. From there the submission is carried to its end, even across a kill -9.
- `step` makes the next jobs in id order, each with its edges and `submitted` event, as
  Core.submit does; an array's or each lines' jobs come from the template and a slice of its
  items, so no spec per job is ever held for the whole submission. A job born doomed (one of
  its dependencies can no longer be met) is noted, and once every job exists those are
  cancelled in id order, as a submission made at once cancels them after making its jobs: a
  submission ends the same made either way.

Until the last step commits, its jobs are passed over by claims (`holds`) and every request
that reads or changes jobs waits (longops.PARKED), so nobody sees a submission half made. All
its jobs are `submitted` at its admission. Pure, like state.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from banyan import arrays, defaults, protocol
from banyan.broker import bulk, owners, state
from banyan.broker.graph import DepGraph
from banyan.broker.records import Dep, Group, Job
from banyan.broker.state import Actor, Core, NewJobs, in_request, paused_gc

SUBMIT = "submit"
# Jobs made per step: about 4 ms, so a slice of longops.SLICE_SECONDS makes several, and the
# per-step costs (a put of each index, a run of events) are shared by many jobs.
STEP_JOBS = 512
MAKE, DOOM = 0, 1  # phases: make the jobs, then cancel those born doomed
# Where an item's changes go in a job's row.
_AT = {name: i for i, name in enumerate(Job.names())}
_ID = _AT["id"]


@dataclass(frozen=True)
class Source:
    """Where a submission's jobs come from: a spec each, or one template with its items
    (the indices of an `array` or the lines of `each`)."""

    jobs: list[dict[str, Any]]
    array: str | None = None
    each: list[str] | None = None

    @classmethod
    def of(cls, body: dict[str, Any]) -> Source:
        return cls(body["jobs"], body.get("array"), body.get("each"))

    @property
    def count(self) -> int:
        if self.array is not None:
            return arrays.count(self.array)
        return len(self.each if self.each is not None else self.jobs)

    @property
    def templated(self) -> bool:
        return self.array is not None or self.each is not None

    def specs(self, lo: int, hi: int) -> list[dict[str, Any]]:
        """The specs of jobs lo..hi-1, made now from the template if there is one."""
        if self.array is not None:
            return arrays.expand(self.jobs[0], arrays.window(self.array, lo, hi), index_env=True)
        if self.each is not None:
            return arrays.expand(self.jobs[0], self.each[lo:hi], index_env=False)
        return self.jobs[lo:hi]

    def digest(self, groups: list[dict[str, Any]]) -> str:
        """What the submission asks for, in a few bytes, for its submit key: a template and
        its items rather than every job they make."""
        if self.array is not None:
            return state._digest([*self.jobs, {"array": self.array}], groups)
        if self.each is not None:
            return state._digest([*self.jobs, {"each": self.each}], groups)
        return state._digest(self.jobs, groups)


def big(body: dict[str, Any]) -> bool:
    """Whether a decoded submit is made a slice at a time."""
    return Source.of(body).count > defaults.BIG_SUBMISSION


@dataclass
class Submission:
    """A big submission being made; stored (`pack`) after every slice, its request apart."""

    id: int
    actor: str
    role: str
    first: int  # its first job id; its jobs are first .. first + count - 1
    count: int
    submitted: float  # when it was admitted: every job's `submitted`
    groups: dict[str, int]  # the groups its jobs may name, and the reply's, by name
    mine: list[int]  # groups every job joins: an array's own
    tail: list[Any]  # every row's fields after `pending` (owners.new_job_tail)
    key: str | None  # its submit key
    phase: int = MAKE
    done: int = 0  # jobs made so far
    source: Source | None = field(default=None, repr=False, compare=False)
    _named: dict[str, Group] | None = field(default=None, repr=False, compare=False)

    kind = SUBMIT

    def pack(self) -> list[Any]:
        return [
            *(self.id, SUBMIT, self.actor, self.role, self.first, self.count, self.submitted),
            *(self.groups, self.mine, self.tail, self.key, self.phase, self.done),
        ]

    @classmethod
    def unpack(cls, row: list[Any], request: bytes) -> Submission:
        """A stored submission, with the request it was admitted for."""
        op_id, _, actor, role, first, count, submitted, groups, mine, tail, key, phase, done = row
        op = cls(op_id, actor, role, first, count, submitted, groups, mine, tail, key, phase, done)
        op.source = Source.of(protocol.decode(request, protocol.CLIENT_REQUESTS).body)
        return op

    def copy(self) -> Submission:
        return replace(self)

    def holds(self, core: Core, job_id: int) -> bool:
        """Its jobs are passed over by claims until it has ended."""
        return self.first <= job_id < self.first + self.count

    def reply(self, lists: dict[str, list[Any]]) -> dict[str, Any]:
        return {"jobs": list(self.ids), "groups": self.groups}

    @property
    def ids(self) -> range:
        return range(self.first, self.first + self.count)

    def step(self, core: Core, budget: int) -> bulk.Done:
        """Make the next STEP_JOBS jobs, or cancel up to `budget` of those born doomed."""
        if self.phase == MAKE:
            self._make(core)
            if self.done == self.count:
                self.phase = DOOM
            return bulk.Done({})
        for job_id, reason in core.tx.take_doomed(self.id, budget):
            core._cancel(core._load(job_id), reason)
            budget -= 1
        if budget <= 0:
            return bulk.Done({})
        core.wake = True  # its jobs may be claimed now
        return bulk.Done({}, finished=True)

    def _make(self, core: Core) -> None:
        source = self.source
        assert source is not None  # set at admission and by unpack
        lo = self.done
        n = min(STEP_JOBS, self.count - lo)
        first = self.first + lo
        ids = range(first, first + n)
        with paused_gc(n):
            if source.templated:
                doomed = self._from_template(core, source, lo, ids)
            else:
                specs = source.jobs[lo : lo + n]
                deps = {
                    first + i: self._deps(core, lo + i, spec)
                    for i, spec in enumerate(specs)
                    if spec.get("depends_on")
                }
                made = NewJobs(self.actor, self.submitted, self.groups, self.mine, (*self.tail,))
                fresh = range(first, self.first + self.count)  # not made before this step
                doomed = core.new_jobs(made, ids, specs, deps, fresh)
        for job_id, reason in doomed:
            core.tx.note_doomed(self.id, job_id, reason)
        self.done += n

    def _from_template(
        self, core: Core, source: Source, lo: int, ids: range
    ) -> list[tuple[int, str]]:
        """Core.new_jobs for jobs that differ from their template only where an item goes:
        the template's row is made once, each job's is a copy with the item's changes. A
        template's dependencies are never on its own jobs, and nothing changes them during
        a step, so one verdict each holds for every job of the step."""
        template = source.jobs[0]
        if source.array is not None:
            items = arrays.window(source.array, lo, lo + len(ids))
        else:
            items = (source.each or [])[lo : lo + len(ids)]
        needs = self._deps(core, lo, template)
        pending, doom = 0, None
        for dep in needs:
            verdict = core._verdict(dep, ())
            if verdict == state.WAIT:
                pending += 1
                for job_id in ids:
                    core.tx.add_dependent(dep.target, dep.id, job_id, dep.kind)
            elif verdict != state.MET and doom is None:
                doom = verdict
        groups_of = [self.groups[name] for name in template.get("groups", ())] + self.mine
        packed = [d.pack() for d in needs] if needs else state._NONE
        row = state._new_row(
            0, self.actor, self.submitted, template, packed, groups_of, pending, (*self.tail,)
        )
        change = arrays.changes(template, index_env=source.array is not None)
        rows = []
        for job_id, item in zip(ids, items, strict=True):
            mine = row.copy()  # sharing the template's lists: a new row is packed at once
            mine[_ID] = job_id
            for key, value in change(item):
                mine[_AT[key]] = value
            rows.append(mine)
        core.tx.put_new_jobs(rows)
        core._log_submitted(rows)
        return [] if doom is None else [(job_id, doom) for job_id in ids]

    def _deps(self, core: Core, index: int, spec: dict[str, Any]) -> list[Dep]:
        if not spec.get("depends_on"):
            return []
        if self._named is None:  # only ids are read from these
            self._named = {name: Group(gid, name, "", 0.0) for name, gid in self.groups.items()}
        return core._resolve_deps(index, spec, self._named, self.ids)


def admit(
    core: Core, actor: Actor, body: dict[str, Any], request: bytes
) -> Submission | dict[str, Any]:
    """Admit a big submission: checked whole, its ids, groups and submit key taken, its
    `request` kept. Returns the Submission to carry out, or the reply to a submit key already
    used for the same submission; raises the BanyanError that refuses it."""
    tx = core.tx
    source = Source.of(body)
    groups = body["groups"]
    key = body.get("submit_key")
    digest = source.digest(groups) if key else ""
    if key:
        prior = core.prior_submission(actor, key, digest)
        if prior is not None:
            return prior
    count = source.count
    core._check_queued(actor.name, count)
    by_name, joined = core._open_groups(actor, source.jobs, groups)
    first = tx.next_job_id()
    everyone = range(first, first + count)
    new, members, totals = _edges(core, source, by_name, everyone)
    own = core._array_group(actor, first) if source.array is not None else None
    if own is not None:
        by_name[own.name] = own
        totals[own.id] = count
    if any(new.values()):  # with no new edge no cycle can close
        label = None if source.array is not None or source.each else source.jobs
        DepGraph(tx, None if label is None else lambda j: in_request(label, j - first)).check(
            new, members, joined
        )
    for gid, n in totals.items():
        core._group_of(by_name, gid).total += n
    for group in by_name.values():
        tx.put_group(group)
    tail = owners.new_job_tail(tx, actor.runs_as, body.get("environment"), count)
    named = {name: g.id for name, g in by_name.items()}
    mine = [] if own is None else [own.id]
    op_id = tx.next_id("op")
    op = Submission(
        op_id, actor.name, actor.role, first, count, core.now, named, mine, list(tail), key
    )
    op.source = source
    tx.reserve_jobs(first + count - 1)
    tx.put_op_request(op_id, request)
    if key:
        result = {"jobs": list(everyone), "groups": named, "digest": digest}
        tx.put_submit_key(actor.name, key, result, core.now)
    return op


def _edges(
    core: Core, source: Source, by_name: dict[str, Group], everyone: range
) -> tuple[dict[int, list[Dep]], dict[int, list[int]], dict[int, int]]:
    """The dependencies and group memberships to check for cycles, and each group's new
    members. A template's jobs all have the same, so its first job stands for them all."""
    new: dict[int, list[Dep]] = {}
    members: dict[int, list[int]] = {}
    specs = source.jobs[:1] if source.templated else source.jobs
    for i, spec in enumerate(specs):
        job_id = everyone[i]
        if spec.get("depends_on"):
            new[job_id] = core._resolve_deps(i, spec, by_name, everyone)
        for name in spec.get("groups", ()):
            members.setdefault(by_name[name].id, []).append(job_id)
    scale = len(everyone) if source.templated else 1
    return new, members, {gid: scale * len(ids) for gid, ids in members.items()}
