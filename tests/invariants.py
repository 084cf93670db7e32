"""What must hold of the broker's stored state after every message (SPEC §3-§5, §7).

Each rule is restated here from the SPEC and checked from the records alone, apart from
banyan.broker.state, so that a bug in the state machine's own bookkeeping (its counters, its
doom flags, its transition table) cannot vouch for itself. `check_store` looks at one snapshot;
`History` also follows the event log and what workers reported from one step to the next.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from banyan.broker.records import Attempt, Group, Job, JobState, Worker
from banyan.broker.store import ReadTx

S = JobState
EPS = 1e-6
LIVE = (S.RUNNING, S.PENDING_CANCELLATION)
# SPEC §3's moves, restated rather than imported: the table in state.py is under test too.
MOVES = {
    S.INACTIVE: {S.AVAILABLE, S.CANCELLED},
    S.AVAILABLE: {S.INACTIVE, S.RUNNING, S.CANCELLED},
    S.RUNNING: {S.AVAILABLE, S.TERMINATED, S.PENDING_CANCELLATION},
    S.PENDING_CANCELLATION: {S.CANCELLED, S.TERMINATED},
    S.TERMINATED: set(),
    S.CANCELLED: set(),
}
# What a worker's report of an attempt's end is recorded as (SPEC §3).
REPORTED = {"timeout": "timeout", "cancelled": "cancelled"}

Node = tuple[str, int]  # ("job", id) or ("group", id)


def jobs_of(tx: ReadTx) -> dict[int, Job]:
    """Every job: ids are handed out in order and never removed, so 1..last are all there."""
    out = {}
    for job_id in range(1, tx.next_job_id()):
        job = tx.get_job(job_id)
        assert job is not None, f"job {job_id} is missing"
        out[job_id] = job
    return out


def members_of(tx: ReadTx, group: Group, jobs: dict[int, Job]) -> list[Job]:
    return [jobs[m] for m in tx.group_members(group.id)]


def will_not_succeed(job: Job) -> bool:
    """Cancel requested while it ran, or over without success (SPEC §4, §5)."""
    return job.st == S.PENDING_CANCELLATION or (job.st.terminal and job.outcome != "success")


def never_met(tx: ReadTx, jobs: dict[int, Job], kind: str, target: str, tid: int) -> bool:
    """Whether a dependency can never be met any more (SPEC §4): its dependent must be
    cancelled. An `after` edge on a job being cancelled counts at once (cancelled at request
    time); `after_fail` waits to see how it ends."""
    if target == "job":
        dep = jobs[tid]
        if kind == "after" and dep.st == S.PENDING_CANCELLATION:
            return True
        if not dep.st.terminal:
            return False
        succeeded = dep.outcome == "success"
    else:
        group = tx.get_group(tid)
        assert group is not None
        members = members_of(tx, group, jobs)
        if kind == "after" and any(will_not_succeed(m) for m in members):
            return True
        if group.open or not all(m.st.terminal for m in members):
            return False
        succeeded = all(m.outcome == "success" for m in members)
    return (kind == "after" and not succeeded) or (kind == "after_fail" and succeeded)


def finished(tx: ReadTx, jobs: dict[int, Job], target: str, tid: int) -> bool:
    """The dependency has ended: a job in a terminal state, a closed group of ended jobs."""
    if target == "job":
        return jobs[tid].st.terminal
    group = tx.get_group(tid)
    assert group is not None
    return not group.open and all(m.st.terminal for m in members_of(tx, group, jobs))


def graph(tx: ReadTx, jobs: dict[int, Job]) -> dict[Node, set[Node]]:
    """What each job and group waits for: a job its dependencies, a group its members. A job
    that has ended waits for nothing, so no cycle can run through it."""
    out: dict[Node, set[Node]] = {}
    for job in jobs.values():
        deps = [] if job.st.terminal else job.depends_on
        out[("job", job.id)] = {(t, tid) for _, t, tid in deps}
    for group in tx.groups():
        out[("group", group.id)] = {("job", m) for m in tx.group_members(group.id)}
    return out


def has_cycle(edges: dict[Any, set[Any]]) -> bool:
    """Iterative three-colour depth-first search over every node."""
    colour: dict[Any, int] = {}
    done = object()
    for root in edges:
        if root in colour:
            continue
        stack = [(root, iter(edges.get(root, ())))]
        colour[root] = 1
        while stack:
            node, it = stack[-1]
            nxt: Any = next(it, done)
            if nxt is done:
                colour[node] = 2
                stack.pop()
            elif colour.get(nxt) == 1:
                return True
            elif nxt not in colour:
                colour[nxt] = 1
                stack.append((nxt, iter(edges.get(nxt, ()))))
    return False


def check_store(tx: ReadTx, max_lost_requeues: int) -> dict[int, Job]:
    """Every invariant of one snapshot; returns the jobs it read."""
    jobs = jobs_of(tx)
    workers = list(tx.workers())
    holders = _check_workers(tx, workers, jobs)
    eligible = dict(tx.eligible())
    for job in jobs.values():
        _check_job(tx, job, jobs, holders, eligible, max_lost_requeues)
    assert len(eligible) == sum(
        1 for j in jobs.values() if j.st == S.AVAILABLE and j.pending == 0
    ), "the eligible index holds a job that is not eligible"
    for group in tx.groups():
        _check_group(tx, group, jobs)
    counts = tx.state_counts()
    for state in S:
        ids = [j.id for j in jobs.values() if j.state == state.value]
        assert list(tx.jobs_in_state(state.value)) == ids, f"state index of {state.value}"
        assert counts[state.value] == len(ids), f"count of {state.value}"
    for owner in {j.owner for j in jobs.values()}:
        owned = [j for j in jobs.values() if j.owner == owner]
        tally = tx.tally(owner)
        assert tally.counts == dict(Counter(j.state for j in owned)), f"{owner}'s counts"
        holding = sum(j.cpus for j in owned if j.st in (S.RUNNING, S.PENDING_CANCELLATION))
        assert abs(tally.cpus - holding) < 1e-6, f"{owner}'s running cpus"
        assert list(tx.owner_ids(owner, "available")) == [
            j.id for j in owned if j.state == "available"
        ], f"{owner}'s index"
    assert not has_cycle(graph(tx, jobs)), "the dependency graph has a cycle"
    _check_matching(workers, jobs, eligible)
    return jobs


def _check_workers(tx: ReadTx, workers: list[Worker], jobs: dict[int, Job]) -> dict[int, str]:
    """The resources each worker has in use are exactly those of the attempts it holds; the
    jobs it holds ahead (claim-ahead, SPEC §5) are claimed under their tokens and hold none."""
    holders: dict[int, str] = {}
    claimers = set(tx.claimers())
    for w in workers:
        for job_id, token in w.ahead.items():
            assert job_id not in holders, f"job {job_id} held by {holders[job_id]} and {w.name}"
            assert job_id not in w.running, (w.name, job_id)
            holders[job_id] = w.name
            job = jobs[job_id]
            assert (job.worker, job.token) == (w.name, token), (w.name, job_id, token, job)
            assert job.gpus == 0, f"job {job_id} asks for a gpu, yet it is held ahead"
        assert set(w.revoking) <= set(w.ahead) and len(set(w.revoking)) == len(w.revoking), w
        gpu_ids: list[int] = []
        for job_id, token in w.running.items():
            assert job_id not in holders, f"job {job_id} held by {holders[job_id]} and {w.name}"
            holders[job_id] = w.name
            job = jobs[job_id]
            assert (job.worker, job.token) == (w.name, token), (w.name, job_id, token, job)
            attempt = tx.get_attempt(job_id, job.attempts)
            assert attempt is not None and len(attempt.gpu_ids) == job.gpus
            gpu_ids += attempt.gpu_ids
        held = [jobs[j] for j in w.running]
        assert abs(w.used_cpus - sum(j.cpus for j in held)) < EPS, (w.name, w.used_cpus, held)
        assert w.used_memory == sum(j.memory for j in held), (w.name, w.used_memory)
        assert sorted(w.used_gpus) == sorted(gpu_ids), (w.name, w.used_gpus, gpu_ids)
        assert len(set(gpu_ids)) == len(gpu_ids) and all(0 <= g < w.gpus for g in gpu_ids)
        assert w.used_cpus <= w.cpus + EPS and w.used_memory <= w.memory, w
        if w.gone:  # what it held ahead went back to the queue with it
            assert not w.running and not w.ahead and w.wants == 0, w
        if w.state == "drained":
            assert not w.ahead, w
        listed = w.wants > 0 or bool(w.ahead)
        assert (w.name in claimers) == listed, f"claimers index of {w.name}"
    return holders


def _check_job(
    tx: ReadTx,
    job: Job,
    jobs: dict[int, Job],
    holders: dict[int, str],
    eligible: dict[int, Any],
    max_lost_requeues: int,
) -> None:
    attempts = tx.attempts_of(job.id)
    # A claim given back unstarted (hand_back, or a job held ahead returned) spends nothing:
    # its record waits past `attempts` for the next claim to reuse.
    unspent = attempts[job.attempts :]
    attempts = attempts[: job.attempts]
    assert [a.number for a in attempts] == list(range(1, job.attempts + 1)), job.id
    assert all(a.outcome != "returned" for a in attempts), f"job {job.id} spent a returned claim"
    assert len(unspent) <= 1 and all(
        a.outcome == "returned" and a.started is None and a.reason for a in unspent
    ), (job.id, unspent)
    live = [a for a in attempts if a.ended is None]
    if job.st in LIVE:
        assert holders.get(job.id) == job.worker, (job.id, holders.get(job.id), job.worker)
        assert live == attempts[-1:] and (live[0].token, live[0].worker) == (job.token, job.worker)
    else:
        assert job.id not in holders and not live and job.token is None, (job, live)
    successes = [a for a in attempts if a.outcome == "success"]
    assert len(successes) <= 1, f"job {job.id} recorded as succeeded twice"
    assert bool(successes) == (job.outcome == "success"), job
    if job.st == S.TERMINATED:
        assert job.outcome in ("success", "failed", "timeout", "lost"), job
    else:
        assert job.outcome is None, job
    _check_retries(job, attempts, max_lost_requeues)
    assert job.doomed == will_not_succeed(job), f"job {job.id} doomed={job.doomed}: {job.state}"
    if job.st.terminal:
        return
    for kind, target, tid in job.depends_on:
        assert not never_met(tx, jobs, kind, target, tid), (
            f"job {job.id} is {job.state} though its dependency {kind} {target} {tid} "
            "can never be met"
        )
    unfinished = sum(not finished(tx, jobs, t, tid) for _, t, tid in job.depends_on)
    assert job.pending == unfinished, (job.id, job.pending, unfinished)
    is_eligible = job.st == S.AVAILABLE and unfinished == 0
    assert (job.id in eligible) == is_eligible, (job.id, job.state, unfinished)
    if is_eligible:
        assert list(eligible[job.id]) == [job.cpus, job.memory, job.gpus, job.tags]


def _check_retries(job: Job, attempts: list[Attempt], max_lost_requeues: int) -> None:
    """Failures spend `max_attempts`; a lost worker spends a requeue instead (SPEC §5). An
    attempt that ends while a cancel is pending spends neither, nor one that its worker's
    cold stop (a second SIGTERM) cancelled: it runs again elsewhere."""
    failed = sum(a.outcome in ("failed", "timeout") for a in attempts)
    lost = sum(a.outcome == "lost" for a in attempts)
    assert job.failures <= job.max_attempts and job.requeues <= max_lost_requeues, job
    # What banyan-status counts against max_attempts leaves out exactly the runs put back for
    # nothing: the lost ones requeued, and those its worker's cold stop cancelled (only a cold
    # stop gives a cancelled attempt a reason).
    stopped = sum(a.outcome == "cancelled" and a.reason is not None for a in attempts)
    assert job.unspent == job.requeues + stopped, (job, attempts)
    if not job.st.terminal:
        assert (job.failures, job.requeues) == (failed, lost), (job, attempts)
    elif job.st == S.TERMINATED and not job.cancel_requested:
        assert job.failures == failed and job.requeues == lost - (job.outcome == "lost"), job
        if job.outcome in ("failed", "timeout"):
            assert job.failures == job.max_attempts, f"job {job.id} failed with tries left"
        if job.outcome == "lost":
            assert job.requeues == max_lost_requeues, f"job {job.id} lost with requeues left"


def _check_group(tx: ReadTx, group: Group, jobs: dict[int, Job]) -> None:
    members = members_of(tx, group, jobs)
    assert sorted(m.id for m in members) == [j.id for j in jobs.values() if group.id in j.groups]
    counts = (
        len(members),
        sum(m.st.terminal for m in members),
        sum(m.outcome == "success" for m in members),
        sum(will_not_succeed(m) for m in members),
    )
    assert (group.total, group.ended, group.succeeded, group.doomed) == counts, (group, counts)


def _fits_now(w: Worker, j: Job, jobs: dict[int, Job]) -> bool:
    """`j` fits the room of `w` that its own jobs held ahead would not take."""
    own = [jobs[job_id] for job_id in w.ahead]
    return (
        w.cpus - w.used_cpus - sum(o.cpus for o in own) >= j.cpus - 1e-9
        and w.memory - w.used_memory - sum(o.memory for o in own) >= j.memory
        and w.gpus - len(w.used_gpus) >= j.gpus
        and all(t in w.tags for t in j.tags)
    )


def _check_matching(workers: list[Worker], jobs: dict[int, Job], eligible: dict[int, Any]) -> None:
    """A claim is answered as soon as a fitting eligible job exists (SPEC §5); and no job
    is held ahead on one worker that fits another's claim now, unless it is being asked back
    (claim-ahead never holds back a job that an idle worker could run). A claimer's room is
    what its own jobs held ahead would not take: it starts those in any room it has."""
    for w in workers:
        if w.wants <= 0 or w.state != "active":
            continue
        for job_id in eligible:
            assert not _fits_now(w, jobs[job_id], jobs), (
                f"{w.name} claims and job {job_id} fits it, yet it was not assigned"
            )
        # A job held ahead elsewhere that fits its room now is being asked back, or the room
        # is spoken for by one that is (a claimer's room is filled one asked-back job at once).
        fitting = [
            (holder.name, job_id, job_id in holder.revoking)
            for holder in workers
            if holder is not w
            for job_id in holder.ahead
            if _fits_now(w, jobs[job_id], jobs)
        ]
        held = [(name, job_id) for name, job_id, asked in fitting if not asked]
        assert not held or any(asked for _, _, asked in fitting), (
            f"{w.name} claims and {held} fit it, yet they are held ahead and none is asked back"
        )


@dataclass
class History:
    """What a run has seen so far, for the rules that span steps (SPEC §3, §5, §7)."""

    max_lost_requeues: int
    seq: int = 0  # last event checked
    states: dict[int, str] = field(default_factory=dict)  # each job's state, from its events
    terminal: dict[int, Any] = field(default_factory=dict)  # records of ended jobs, as first seen
    asked: set[int] = field(default_factory=set)  # jobs a user asked to cancel
    sent: dict[int, tuple[str, int | None]] = field(default_factory=dict)  # token -> report
    acked: set[int] = field(default_factory=set)  # job ids the submitter was given

    def report(self, token: int, outcome: str, exit_code: int | None) -> tuple[str, int | None]:
        """A worker reports an attempt's end; the same attempt always ends the same way."""
        return self.sent.setdefault(token, (outcome, exit_code))

    def check(self, tx: ReadTx, settled: bool = True) -> None:
        """Everything, or (`settled` false: the cascade has dependents still to settle, see
        cascade.py) all but what holds of a job's dependencies only once they are settled."""
        jobs = check_store(tx, self.max_lost_requeues) if settled else jobs_of(tx)
        assert self.acked <= set(jobs), f"acknowledged jobs lost: {self.acked - set(jobs)}"
        self._check_events(tx, jobs)
        for job in jobs.values():
            attempts = tx.attempts_of(job.id)
            self._check_reports(attempts)
            if job.st.terminal:
                record = (job.pack(), [a.pack() for a in attempts])
                assert self.terminal.setdefault(job.id, record) == record, (
                    f"job {job.id} changed after it ended"
                )

    def _check_events(self, tx: ReadTx, jobs: dict[int, Job]) -> None:
        """Every state change is in the event log, in order, each a legal move (SPEC §3, §7),
        and every cancel has its cause: a user asked, or a dependency can never be met."""
        cancelled: list[Job] = []
        for event in tx.events_from(self.seq + 1, 1_000_000):
            assert event.seq == self.seq + 1, f"event {self.seq + 1} missing"
            self.seq = event.seq
            before = self.states.get(event.job)
            assert event.frm == before, (event, before)
            to = S(event.to)
            if before is None:
                assert to in (S.AVAILABLE, S.INACTIVE), event
            else:
                assert to in MOVES[S(before)], f"illegal move {before} -> {to.value}: {event}"
            if to == S.PENDING_CANCELLATION:
                assert event.job in self.asked, f"job {event.job} cancelled but nobody asked"
            if to == S.CANCELLED:
                cancelled.append(jobs[event.job])
            self.states[event.job] = to.value
        for job in jobs.values():
            assert self.states.get(job.id) == job.state, (job.id, self.states.get(job.id))
        for job in cancelled:
            assert job.id in self.asked or any(
                never_met(tx, jobs, *dep) for dep in job.depends_on
            ), f"job {job.id} cancelled ({job.cancel_reason}) though every dependency may be met"

    def _check_reports(self, attempts: Iterable[Attempt]) -> None:
        """An attempt ends as its worker reported it, with that attempt's token (SPEC §5);
        only the broker's loss of the worker ends one without a report."""
        for a in attempts:
            if a.ended is None:
                continue
            if a.outcome == "returned":  # given back unstarted: no report ends it
                assert a.reason and a.started is None, a
                continue
            if a.outcome == "lost":
                assert a.reason, a
                continue
            sent = self.sent.get(a.token)
            assert sent is not None, f"attempt {a.job}/{a.number} ended by a report never sent"
            outcome, code = sent
            expected = REPORTED.get(outcome) or ("success" if code == 0 else "failed")
            assert (a.outcome, a.exit_code) == (expected, code), (a, sent)
