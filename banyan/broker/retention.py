"""Retention: forget what ended long ago, oldest first, a slice at a time. Pure, over a Tx.

The event log is in time order and every job's last event is the one that ended it, so one walk
from the log's start finds, in the order they ended, every job that ended before the cutoff:
each is deleted as its ending event goes by (`Tx.delete_job` takes its attempts, index entries
and dependency edges with it), and every event before the cutoff goes too, whichever job it is
about. What stays consistent, and how:

- Dependencies: a job is deleted only once it has ended, and its dependents were settled when
  it ended, so no live job waits for a deleted one. A new dependency on a deleted job is refused
  like one on a job that never existed, with a message that says it was purged.
- Groups: a member's entry goes with it; the group's counts (total, done, succeeded) stay as
  they were. A sealed group whose members have all ended and been deleted is deleted too, and
  its name is free again. An open group stays until it is closed. A group that never had a
  member and that no job depends on goes once it was made before the cutoff, open or not (a
  submission of groups alone would otherwise keep them, and their names, for ever).
- Submit keys: forgotten once older than the cutoff; a submission that repeats one after that
  makes new jobs. A key is never older than its jobs' endings, so no key outlives its jobs.
- Numbers: job ids and event seqs are never reused (the store keeps the last one issued).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from banyan.broker.records import TERMINAL, Tx

_ENDED = frozenset(s.value for s in TERMINAL)
# Events read per look at the log; `more` is asked before each one.
_BATCH = 64
# The meta key of the first group id the next look for memberless groups starts from.
_GROUPS_AT = "retention_groups_at"


@dataclass
class Purged:
    jobs: int = 0
    events: int = 0
    groups: int = 0
    submit_keys: int = 0
    done: bool = False  # nothing from before the cutoff is left
    oldest: float | None = None  # with `done`: the time of the oldest event kept, if any

    def add(self, other: Purged) -> None:
        """Count `other`'s deletions in with these."""
        self.jobs += other.jobs
        self.events += other.events
        self.groups += other.groups
        self.submit_keys += other.submit_keys


def purge(tx: Tx, cutoff: float, more: Callable[[], bool]) -> Purged:
    """Delete what ended before `cutoff`, oldest first, while `more()` says to go on."""
    out = Purged()
    while True:
        events = tx.events_from(0, _BATCH)
        last = None
        for event in events:
            if event.time >= cutoff:
                out.oldest = event.time
                break
            if not more():
                break
            if event.to in _ENDED:
                _forget_job(tx, event.job, out)
            last = event.seq
        if last is not None:
            out.events += tx.delete_events_through(last)
        if out.oldest is not None or not events:
            break  # caught up with the cutoff
        if last is None or last != events[-1].seq:
            return out  # out of time
    while more():
        expired = tx.expire_submit_keys(cutoff, _BATCH)
        out.submit_keys += expired
        if expired < _BATCH:
            break
    else:
        return out
    out.done = _memberless(tx, cutoff, more, out)
    return out


def _memberless(tx: Tx, cutoff: float, more: Callable[[], bool], out: Purged) -> bool:
    """Delete the groups made before `cutoff` that never had a member and that no job depends
    on (a submission of groups alone makes them; nothing else would ever take them away).
    Groups are walked once, in id order, from where the last pass stopped."""
    at = int(tx.get_meta(_GROUPS_AT) or 1)
    try:
        while more():
            groups = tx.groups_from(at, _BATCH)
            for group in groups:
                if group.created >= cutoff:
                    return True
                if group.total == 0 and not tx.dependents("group", group.id):
                    tx.delete_group(group.id)
                    out.groups += 1
                at = group.id + 1
            if len(groups) < _BATCH:
                return True
        return False
    finally:
        tx.put_meta(_GROUPS_AT, at)


def _forget_job(tx: Tx, job_id: int, out: Purged) -> None:
    job = tx.get_job(job_id)
    if job is None or job.state not in _ENDED:
        return
    tx.delete_job(job_id)
    out.jobs += 1
    for group_id in set(job.groups):
        group = tx.get_group(group_id)
        if group is None or not group.complete:
            continue
        if next(tx.group_members(group_id), None) is None:  # that was its last member
            tx.delete_group(group_id)
            out.groups += 1


def purged(tx: Tx, job_id: int) -> bool:
    """Was there a job `job_id`, deleted since? (Ids are never reused.)"""
    return 0 < job_id < tx.next_job_id() and tx.get_job(job_id) is None


def gone(tx: Tx, job_id: int) -> str:
    """What to say about a job id that has no record."""
    if purged(tx, job_id):
        return f"job {job_id} ended long ago and was purged"
    return f"no job {job_id}"
