"""Read-only views of stored records, as the wire's JobInfo, GroupInfo and WorkerInfo maps.

Pure functions over records; the server feeds them from a read transaction.
"""

from __future__ import annotations

import os
from typing import Any

from banyan.broker import owners
from banyan.broker.matching import decayed, factors
from banyan.broker.records import (
    QUEUED,
    Attempt,
    Group,
    Job,
    JobState,
    Tx,
    User,
    Worker,
    WorkerState,
)
from banyan.outputs import account_spool, job_dir, output_paths

S = JobState


def waiting_reason(job: Job, workers: list[Worker], limit: str | None = None) -> str | None:
    """Why a job is not running, in words (SPEC §3, §5); None when it is past waiting.

    `limit` is its owner's `held_back`. "queued" only while a worker that takes jobs has room
    for it now: it goes at the next claim. A job no such worker can fit says what it waits for
    instead.
    """
    st = job.st
    if st == S.INACTIVE:
        return "held"
    if st == S.PENDING_CANCELLATION:
        return f"cancel sent to {job.worker}"
    if st == S.RUNNING and held_ahead(job, workers):
        return f"assigned to {job.worker}, waiting for a slot"
    if st != S.AVAILABLE:
        return None
    if job.pending:
        return f"waiting for {job.pending} dependenc{'y' if job.pending == 1 else 'ies'}"
    live = [w for w in workers if not w.gone]
    if not live:
        return "no workers connected"
    refused = owners.nobody_runs(job, live)
    if refused:
        return refused
    running = [w for w in live if owners.runs(w, job.runs_as)]
    never = unrunnable(job, running)
    if never:
        return away(job, workers) or not_for_account(job, live) or never
    live = running
    if limit:
        return limit
    request = (job.cpus, job.memory, job.gpus, job.tags)
    takers = [w for w in live if w.state == WorkerState.ACTIVE.value and w.could_ever_fit(*request)]
    if not takers:
        fit = [w for w in live if w.could_ever_fit(*request)]
        if fit and all(w.state == WorkerState.DRAINED.value for w in fit):
            names = ", ".join(sorted(w.name for w in fit)[:3]) + (", ..." if len(fit) > 3 else "")
            return f"every worker that could run it is drained: {names} (banyan-workers --resume)"
        return "every worker that could run it is draining or drained"
    if any(w.fits(*request) for w in takers):
        return "queued"
    return "waiting for free resources"


def held_ahead(job: Job, workers: list[Worker]) -> bool:
    """Whether the running job is one its worker holds ahead: assigned, waiting for a slot
    there (SPEC §5, claim-ahead)."""
    return any(w.name == job.worker and job.id in w.ahead for w in workers)


def held_back(tx: Tx, owner: str) -> str | None:
    """Why every eligible job of `owner` waits, whatever the workers: a per-user limit."""
    user = tx.get_user(owner)
    if user is None or user.max_running is None:
        return None
    running = tx.tally(owner).running
    if running < user.max_running:
        return None
    return f"{owner} is at max_running ({running} of {user.max_running} running)"


def unrunnable(job: Job, live: list[Worker]) -> str | None:
    """Say so when no connected worker could ever fit the job, naming what is missing."""
    if any(w.could_ever_fit(job.cpus, job.memory, job.gpus, job.tags) for w in live):
        return None
    lead = "no worker can ever run this: needs"
    most_cpus = max(w.cpus for w in live)
    if job.cpus > most_cpus:
        return f"{lead} {_cpus(job.cpus)}, largest worker has {most_cpus:g}"
    most_mem = max(w.memory for w in live)
    if job.memory > most_mem:
        return f"{lead} {job.memory} MiB of memory, largest worker has {most_mem} MiB"
    most_gpus = max(w.gpus for w in live)
    if job.gpus > most_gpus:
        return f"{lead} {_gpus(job.gpus)}, largest worker has {most_gpus}"
    if not any(all(t in w.tags for t in job.tags) for w in live):
        if len(job.tags) == 1:
            return f"{lead} tag {job.tags[0]}; no worker carries it"
        return f"{lead} tags {', '.join(job.tags)}; no worker carries them all"
    parts = [_cpus(job.cpus)]
    parts += [f"{job.memory} MiB"] if job.memory else []
    parts += [_gpus(job.gpus)] if job.gpus else []
    parts += [_tags(job.tags)] if job.tags else []
    both = f"{', '.join(parts[:-1])} and {parts[-1]}"
    return f"{lead} {both} together; no worker has all of them"


# Workers named in a reason, at most: the rest are counted.
NAMED = 3


def not_for_account(job: Job, live: list[Worker]) -> str | None:
    """The job fits no worker that runs its account's jobs, but fits one that does not: say
    that one's rule, not that nothing could ever fit it."""
    request = (job.cpus, job.memory, job.gpus, job.tags)
    able = [w for w in live if w.could_ever_fit(*request)]
    if not able:
        return None
    why = "; ".join(sorted({owners.why_not(w, job.runs_as) for w in able[:NAMED]}))
    return f"only workers that do not run jobs of account {job.runs_as} could run it: {why}"


def away(job: Job, workers: list[Worker]) -> str | None:
    """The job fits no connected worker, but would fit one that is lost or stopped: it runs
    when that one comes back, so say which rather than "never" (an unreachable or restarting
    machine is not a job too big for the cluster)."""
    request = (job.cpus, job.memory, job.gpus, job.tags)
    able = [
        w for w in workers if w.gone and w.could_ever_fit(*request) and owners.runs(w, job.runs_as)
    ]
    if not able:
        return None
    names = ", ".join(w.name for w in able[:NAMED])
    if len(able) > NAMED:
        names += f" and {len(able) - NAMED} more"
    states = sorted({w.state for w in able}, key=["stopped", "lost"].index)
    if len(able) == 1:
        return f"the only worker that could run it ({names}) is {states[0]}"
    return f"the only workers that could run it ({names}) are {' or '.join(states)}"


def _cpus(n: float) -> str:
    return f"{n:g} cpu{'' if n == 1 else 's'}"


def _gpus(n: int) -> str:
    return f"{n} gpu{'' if n == 1 else 's'}"


def _tags(tags: list[str]) -> str:
    return f"tag{'' if len(tags) == 1 else 's'} {', '.join(tags)}"


def job_info(
    tx: Tx,
    job: Job,
    workers: list[Worker],
    detail: bool = False,
    limits: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """`limits` caches `held_back` by owner across the rows of one reply."""
    limits = {} if limits is None else limits
    if job.eligible and job.owner not in limits:
        limits[job.owner] = held_back(tx, job.owner)
    info: dict[str, Any] = {
        "id": job.id,
        "name": job.name or job.command,
        "command": job.command,
        "state": job.state,
        "outcome": job.outcome,
        "exit_code": job.exit_code,
        "signal": job.signal,
        "attempts": job.attempts,
        "counted": job.attempts - job.unspent,
        "max_attempts": job.max_attempts,
        "worker": job.worker,
        "progress": job.progress,
        "progress_message": job.progress_message,
        "owner": job.owner,
        "account": job.runs_as,
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
        "reason": open_groups(tx, job, waiting_reason(job, workers, limits.get(job.owner))),
        "ahead": job.worker is not None and held_ahead(job, workers),
        "pending_dependencies": job.pending,
    }
    history = tx.attempts_of(job.id) if detail else []
    run = _run(tx, job, history)
    # Held ahead: assigned, not started (its claim is no start).
    held = info["ahead"]
    info["attempt_started"] = None if run is None or held else run.started or run.claimed
    info["attempt_ended"] = None if run is None else run.ended
    if detail:
        spools = {w.name: w.spool for w in workers}
        info["history"] = [
            attempt_info(a) | attempt_outputs(job, a, spools.get(a.worker, "")) for a in history
        ]
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
            umask=job.umask,
            exported_environment=job.environ is not None,
        )
    return info


def _run(tx: Tx, job: Job, history: list[Attempt]) -> Attempt | None:
    """The attempt a running job runs, or the one that ended an ended job; None while it waits.
    (`started` dates the first attempt only. A record past `attempts` was handed back
    unstarted; the next claim reuses its number.)"""
    if not job.attempts or job.st in QUEUED:
        return None
    if history:
        return history[job.attempts - 1]
    return tx.get_attempt(job.id, job.attempts)


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


def open_groups(tx: Tx, job: Job, reason: str | None) -> str | None:
    """A reason that says which open groups a waiting job depends on: such a dependency is met
    only once its group is closed, however its members ended."""
    if reason is None or not job.pending or job.st != S.AVAILABLE:  # held: it says so
        return reason
    names = []
    for _kind, target, gid in job.depends_on:
        group = tx.get_group(gid) if target == "group" else None
        if group is not None and group.open and group.name not in names:
            names.append(group.name)
    if not names:
        return reason
    which = ", ".join(names)
    first = names[0]
    return (
        f"{reason}; group{'s' if len(names) > 1 else ''} {which} still open: a dependency on "
        f"a group is met once it is closed (banyan-modify --close-group {first})"
    )


def attempt_outputs(job: Job, attempt: Attempt, spool: str) -> dict[str, str | None]:
    """The attempt's output files, as its worker named them: the `--output` template expanded
    for this attempt, or the worker's spool. None where that depends on a spool the worker has
    not said (it registered before workers told their spool, or was forgotten)."""
    spool = account_spool(spool, job.runs_as) if spool else ""
    cwd = job.cwd or (job_dir(spool, job.id, attempt.number) if spool else "")
    template = job.output
    known = bool(spool) if template is None else bool(cwd) or os.path.isabs(template)
    if not known:
        return {"stdout": None, "stderr": None}
    out, err = output_paths(template, spool, cwd, job.id, attempt.number)
    return {"stdout": out, "stderr": err}


def _group_name(tx: Tx, gid: int) -> str:
    group = tx.get_group(gid)
    return group.name if group else str(gid)


def group_info(tx: Tx, group: Group) -> dict[str, Any]:
    counts = {state: n for state, n in tx.group_counts(group.id).items() if n}
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


# The state shown for a worker that a restarted broker waits for: it has not heard from it yet.
EXPECTED = "expected"


def worker_info(
    worker: Worker, last_seen: float | None = None, connected: bool = True
) -> dict[str, Any]:
    """`state` is idle or busy for an active worker, else draining, drained, stopped or lost;
    `expected` for one not `connected` that is not gone either: the broker restarted and waits
    for it to register again (for a liveness window, before it is lost). `last_seen` is when
    the broker last heard from a connected one; else the stored time."""
    state = worker.state
    if not connected and not worker.gone:
        state = EXPECTED
    elif state == WorkerState.ACTIVE.value:
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
        "only_account": worker.only_account,
        "refused_accounts": dict(worker.refused),
        "last_seen": last_seen if last_seen is not None else worker.last_seen,
        "address": worker.address,
        "key": worker.key,
        "held": worker.held,
        "ahead": sorted(worker.ahead),
        "prefetch": worker.prefetch,
    }


def users_info(tx: Tx, now: float, half_life: float) -> list[dict[str, Any]]:
    """Every user with settings or jobs: shares, limits, what it holds and waits for, its
    decayed usage and its fair-share factor among all of them."""
    users = {u.name: u for u in tx.users()}
    names = sorted(set(users) | {t.owner for t in tx.tallies()})
    factor = factors({name: users.get(name) for name in names}, now, half_life)
    rows = []
    for name in names:
        user = users.get(name) or User(name)
        tally = tx.tally(name)
        rows.append(
            {
                "name": name,
                "shares": user.shares,
                "max_running": user.max_running,
                "max_queued": user.max_queued,
                "running": tally.running,
                "cpus": tally.cpus,
                "queued": tally.queued,
                "jobs": tally.counts,
                "usage": decayed(user, now, half_life),
                "fair_share": factor[name],
            }
        )
    return rows
