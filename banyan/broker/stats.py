"""`banyan-stats`: counts, rates and percentiles, read from the records and the event log."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from banyan.broker.records import HOLDING, Attempt, Job, Outcome, Tx

WINDOW_EVENTS = 20_000  # the recent history the rates and percentiles are drawn from
MINUTES = 10
_HOLDING = frozenset(s.value for s in HOLDING)


def summary(tx: Tx, now: float, retention: float | None = None) -> dict[str, Any]:
    last = tx.last_id("event")
    events = tx.events_from(max(1, last - WINDOW_EVENTS + 1), WINDOW_EVENTS)
    per_minute: dict[str, list[int]] = {
        k: [0] * MINUTES for k in ("submitted", "started", "finished")
    }
    finished: dict[int, str] = {}
    ran: set[int] = set()  # jobs an attempt of which ended in the window
    for e in events:
        age = int((now - e.time) // 60)
        kind = (
            "submitted"
            if e.frm is None
            else "started"
            if e.to == "running"
            else "finished"
            if e.to in ("terminated", "cancelled")
            else None
        )
        if kind and 0 <= age < MINUTES:
            per_minute[kind][age] += 1
        if e.to in ("terminated", "cancelled"):
            finished[e.job] = e.to
        if e.frm in _HOLDING:
            ran.add(e.job)
    waits: list[float] = []
    outcomes = {"success": 0, "failed": 0, "timeout": 0, "lost": 0}
    for job_id in finished:
        job = tx.get_job(job_id)
        if job is None:
            continue
        if job.outcome in outcomes:
            outcomes[job.outcome] += 1
        if job.started is not None:
            waits.append(job.started - job.submitted)
    since = events[0].time if events else now
    runs: list[float] = []
    by_outcome = {"success": 0, "failed": 0, "timeout": 0, "lost": 0, "cancelled": 0}
    requeued = 0
    for job, a, end in _attempts(tx, ran, since):
        runs.append(end - (a.started if a.started is not None else a.claimed))
        by_outcome[a.outcome or "-"] = by_outcome.get(a.outcome or "-", 0) + 1
        requeued += _requeued(job, a)
    ended = sum(outcomes.values())
    workers = list(tx.workers())
    live = [w for w in workers if not w.gone]
    total_cpus = sum(w.cpus for w in live)
    return {
        "counts": tx.state_counts(),
        "per_minute": per_minute,
        "queue_wait": percentiles(waits),
        "run_time": percentiles(runs),
        "outcomes": outcomes,
        "success_rate": outcomes["success"] / ended if ended else None,
        "attempts": {"ended": len(runs), "outcomes": by_outcome, "requeued": requeued},
        "workers": {
            "live": len(live),
            **{state: sum(w.state == state for w in workers) for state in ("lost", "stopped")},
            "cpus": total_cpus,
            "used_cpus": sum(w.used_cpus for w in live),
            "utilisation": sum(w.used_cpus for w in live) / total_cpus if total_cpus else None,
        },
        "time": now,
        "window_events": len(events),
        # A full window may reach back less far than the per-minute columns: when it starts.
        "window_since": since if len(events) >= WINDOW_EVENTS else None,
        "store": store(tx, retention),
    }


def _attempts(tx: Tx, jobs: set[int], since: float) -> Iterator[tuple[Job, Attempt, float]]:
    """The attempts of `jobs` that ran and ended at or after `since`, with their job and end:
    each run counts on its own, a requeued or retried one too (a job's first start to its end
    is not a run)."""
    for job_id in sorted(jobs):
        job = tx.get_job(job_id)
        if job is None:
            continue
        for a in tx.attempts_of(job_id):
            if a.ended is not None and a.ended >= since and a.outcome != Outcome.RETURNED.value:
                yield job, a, a.ended


def _requeued(job: Job, a: Attempt) -> bool:
    """The attempt was put back in the queue without spending one: its worker was lost or
    stopped (outcome lost), or its worker's cold stop cancelled it (the only cancel that gives
    an attempt a reason); unless it ended the job (the last requeue used up, or a pending
    cancel settled)."""
    if a.outcome != Outcome.LOST.value and not (
        a.outcome == Outcome.CANCELLED.value and a.reason is not None
    ):
        return False
    ended_job = job.st.terminal and a.number == job.attempts and job.ended == a.ended
    return not ended_job


def store(tx: Tx, retention: float | None) -> dict[str, Any]:
    """How big the store is, and how far back it goes."""
    oldest = tx.first_job()
    first_event = tx.events_from(0, 1)
    return {
        **tx.store_info(),
        "jobs": sum(tx.state_counts().values()),
        "retention": retention,
        "oldest_job": None
        if oldest is None
        else {"id": oldest.id, "submitted": oldest.submitted, "ended": oldest.ended},
        "oldest_event": first_event[0].time if first_event else None,
    }


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "n": 0}
    values = sorted(values)

    def at(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": values[-1], "n": len(values)}
