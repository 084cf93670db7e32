"""Read-only views of stored records, as the wire's JobInfo, GroupInfo and WorkerInfo maps.

Pure functions over records; the server feeds them from a read transaction.
"""

from __future__ import annotations

from typing import Any

from banyan.broker.records import Attempt, Group, Job, JobState, Tx, Worker, WorkerState

S = JobState


def waiting_reason(job: Job, workers: list[Worker]) -> str | None:
    """Why a job is not running, in words (SPEC §3, §5); None when it is past waiting."""
    st = job.st
    if st == S.INACTIVE:
        return "held"
    if st == S.PENDING_CANCELLATION:
        return f"cancel sent to {job.worker}"
    if st != S.AVAILABLE:
        return None
    if job.pending:
        return f"waiting for {job.pending} dependenc{'y' if job.pending == 1 else 'ies'}"
    live = [w for w in workers if not w.gone]
    if not live:
        return "no workers connected"
    never = unrunnable(job, live)
    if never:
        return never
    if not any(w.state == WorkerState.ACTIVE.value for w in live):
        return "every worker is draining"
    if any(w.fits(job.cpus, job.memory, job.gpus, job.tags) for w in live):
        return "queued"
    return "waiting for free resources"


def unrunnable(job: Job, live: list[Worker]) -> str | None:
    """Say so when no connected worker could ever fit the job, naming what is missing."""
    if any(w.could_ever_fit(job.cpus, job.memory, job.gpus, job.tags) for w in live):
        return None
    lead = "no worker can ever run this: needs"
    most_cpus = max(w.cpus for w in live)
    if job.cpus > most_cpus:
        return f"{lead} {job.cpus:g} cpus, largest worker has {most_cpus:g}"
    most_mem = max(w.memory for w in live)
    if job.memory > most_mem:
        return f"{lead} {job.memory} MiB of memory, largest worker has {most_mem} MiB"
    most_gpus = max(w.gpus for w in live)
    if job.gpus > most_gpus:
        return f"{lead} {job.gpus} gpus, largest worker has {most_gpus}"
    if not any(all(t in w.tags for t in job.tags) for w in live):
        return f"{lead} tags {', '.join(job.tags)}; no worker carries them all"
    return f"{lead} {job.cpus:g} cpus, {job.memory} MiB, {job.gpus} gpus and tags together"


def job_info(tx: Tx, job: Job, workers: list[Worker], detail: bool = False) -> dict[str, Any]:
    info: dict[str, Any] = {
        "id": job.id,
        "name": job.name or job.command,
        "command": job.command,
        "state": job.state,
        "outcome": job.outcome,
        "exit_code": job.exit_code,
        "signal": job.signal,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "worker": job.worker,
        "progress": job.progress,
        "progress_message": job.progress_message,
        "owner": job.owner,
        "depends_on": [{"kind": k, target: tid} for k, target, tid in job.depends_on],
        "groups": [_group_name(tx, gid) for gid in job.groups],
        "priority": job.priority,
        "cpus": job.cpus,
        "memory": job.memory,
        "gpus": job.gpus,
        "tags": job.tags,
        "submitted": job.submitted,
        "started": job.started,
        "ended": job.ended,
        "cancel_reason": job.cancel_reason,
        "reason": waiting_reason(job, workers),
        "pending_dependencies": job.pending,
    }
    if detail:
        history = tx.attempts_of(job.id)
        info["history"] = [attempt_info(a) for a in history]
        last = history[-1] if history else None
        info["output_tail"] = {
            "stdout": last.stdout_tail if last else "",
            "stderr": last.stderr_tail if last else "",
        }
        info["usage"] = {"cpu_percent": last.cpu_percent, "rss": last.rss} if last else None
        info.update(
            cwd=job.cwd,
            env=job.env,
            time_limit=job.time_limit,
            cancel_grace=job.cancel_grace,
            output=job.output,
        )
    return info


def attempt_info(a: Attempt) -> dict[str, Any]:
    return {
        "attempt": a.number,
        "token": a.token,
        "worker": a.worker,
        "claimed": a.claimed,
        "started": a.started,
        "ended": a.ended,
        "outcome": a.outcome,
        "exit_code": a.exit_code,
        "signal": a.signal,
        "progress": a.progress,
        "progress_message": a.progress_message,
        "cpu_percent": a.cpu_percent,
        "rss": a.rss,
        "gpu_ids": a.gpu_ids,
        "reason": a.reason,
    }


def _group_name(tx: Tx, gid: int) -> str:
    group = tx.get_group(gid)
    return group.name if group else str(gid)


def group_info(tx: Tx, group: Group) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for job_id in tx.group_members(group.id):
        job = tx.get_job(job_id)
        if job is not None:
            counts[job.state] = counts.get(job.state, 0) + 1
    return {
        "id": group.id,
        "name": group.name,
        "owner": group.owner,
        "open": group.open,
        "total": group.total,
        "counts": counts,
        "done": group.ended,
        "succeeded": group.succeeded,
        "cancel_reason": group.cancel_reason,
    }


def worker_info(worker: Worker, last_seen: float | None = None) -> dict[str, Any]:
    """`state` is idle or busy for an active worker, else draining, drained, stopped or lost."""
    state = worker.state
    if state == WorkerState.ACTIVE.value:
        state = "busy" if worker.running else "idle"
    return {
        "name": worker.name,
        "host": worker.host,
        "state": state,
        "cpus": worker.cpus,
        "memory": worker.memory,
        "gpus": worker.gpus,
        "used_cpus": worker.used_cpus,
        "used_memory": worker.used_memory,
        "used_gpus": len(worker.used_gpus),
        "tags": worker.tags,
        "running": sorted(worker.running),
        "completed": worker.completed,
        "last_seen": last_seen if last_seen is not None else worker.last_seen,
    }
