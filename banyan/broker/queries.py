"""Client requests: which state-machine call or read each wire request becomes.

`handle` returns the reply body (the server encodes it after the commit) or raises a
`BanyanError`, which becomes an `error` reply.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from banyan import defaults
from banyan.broker import stats, views
from banyan.broker.records import JobState, Tx
from banyan.broker.state import Actor, Core
from banyan.errors import BadRequest, NotFound

ACTIVE = (
    JobState.INACTIVE.value,
    JobState.AVAILABLE.value,
    JobState.RUNNING.value,
    JobState.PENDING_CANCELLATION.value,
)
TERMINAL = (JobState.TERMINATED.value, JobState.CANCELLED.value)
ALL = (*ACTIVE, *TERMINAL)

REPLY = {
    "ping": "pong",
    "submit": "submitted",
    "cancel": "cancelled",
    "modify": "job",
    "close_group": "group",
    "status": "status",
    "wait": "waited",
    "workers": "workers",
    "drain": "workers",
    "forget": "workers",
    "stats": "stats",
    "events": "events",
}


def handle(
    core: Core, actor: Actor, kind: str, body: dict[str, Any], last_seen: dict[str, float]
) -> dict[str, Any]:
    tx = core.tx
    if kind == "ping":
        return {"version": defaults.PROTOCOL_VERSION, "time": time.time()}
    if kind == "submit":
        return core.submit(actor, body["jobs"], body["groups"], body.get("submit_key"))
    if kind == "cancel":
        return core.cancel(actor, body["jobs"], body["groups"], body.get("reason"))
    if kind == "modify":
        job = core.modify(actor, body["job"], body["set"], body["hold"], body["release"])
        return {"job": views.job_info(tx, job, list(tx.workers()))}
    if kind == "close_group":
        return {"group": views.group_info(tx, core.close_group(actor, body["group"]))}
    if kind == "status":
        return status(tx, body)
    if kind == "wait":
        return wait(tx, body)
    if kind == "workers":
        return {"workers": workers(tx, last_seen)}
    if kind == "drain":
        core.drain(actor, body["worker"], body["resume"])
        return {"workers": workers(tx, last_seen)}
    if kind == "forget":
        core.forget(actor, body["worker"])
        return {"workers": workers(tx, last_seen)}
    if kind == "stats":
        return stats.summary(tx, core.now)
    if kind == "events":
        events = tx.events_from(body["since"], body["limit"])
        rows = [[e.seq, e.time, e.job, e.frm, e.to, e.reason] for e in events]
        return {"events": rows, "next": events[-1].seq + 1 if events else body["since"]}
    raise BadRequest(f"{kind}: not a client request")


def workers(tx: Tx, last_seen: dict[str, float]) -> list[dict[str, Any]]:
    return [views.worker_info(w, last_seen.get(w.name)) for w in tx.workers()]


def status(tx: Tx, body: dict[str, Any]) -> dict[str, Any]:
    limit = body.get("limit") or defaults.STATUS_LIMIT
    ids: Iterable[int]
    groups = []
    if body.get("jobs"):
        ids = body["jobs"]
        for job_id in ids:
            if tx.get_job(job_id) is None:
                raise NotFound(f"no job {job_id}")
    elif body.get("group") is not None:
        ref = body["group"]
        group = tx.get_group(ref) if isinstance(ref, int) else tx.group_by_name(ref)
        if group is None:
            raise NotFound(f"no group {ref!r}")
        groups.append(views.group_info(tx, group))
        ids = tx.group_members(group.id)
    else:
        state = body.get("state")
        if state is not None and state not in ALL:
            raise BadRequest(f"state: must be one of {', '.join(ALL)}, got {state!r}")
        states = (state,) if state else ALL if body.get("all") else ACTIVE
        ids = _merged(tx, states)
    live = list(tx.workers())
    owner = body.get("owner")
    state_filter = body.get("state")
    out: list[dict[str, Any]] = []
    truncated = False
    for job_id in ids:
        job = tx.get_job(job_id)
        if job is None or (owner and job.owner != owner):
            continue
        if state_filter and job.state != state_filter:
            continue
        if len(out) >= limit:
            truncated = True
            break
        out.append(views.job_info(tx, job, live, detail=bool(body.get("detail"))))
    return {"jobs": out, "groups": groups, "truncated": truncated}


def _merged(tx: Tx, states: Iterable[str]) -> list[int]:
    ids: list[int] = []
    for state in states:
        ids += tx.jobs_in_state(state)
    return sorted(ids)


def wait(tx: Tx, body: dict[str, Any]) -> dict[str, Any]:
    """The jobs still running keep the request open; the server answers when they end."""
    ids = list(body["jobs"])
    for ref in body.get("groups", ()):
        group = tx.get_group(ref) if isinstance(ref, int) else tx.group_by_name(ref)
        if group is None:
            raise NotFound(f"no group {ref!r}")
        ids += tx.group_members(group.id)
    seen: dict[int, dict[str, Any] | None] = {}
    rows = brief(tx, ids, seen)  # one load per job: a wait may name 100k of them
    for job_id in ids:
        if seen[job_id] is None:
            raise NotFound(f"no job {job_id}")
    pending = [r["id"] for r in rows if r["state"] not in TERMINAL]
    return {"pending": pending, "all": ids, "jobs": rows}


def brief(
    tx: Tx, ids: list[int], seen: dict[int, dict[str, Any] | None] | None = None
) -> list[dict[str, Any]]:
    """Short rows for a `waited` reply; `seen` shares them between the replies of one read
    (a thousand clients waiting for the same jobs cost one load per job, not a thousand)."""
    seen = {} if seen is None else seen
    out: list[dict[str, Any]] = []
    for job_id in ids:
        if job_id not in seen:
            job = tx.get_job(job_id)
            seen[job_id] = (
                None
                if job is None
                else {
                    "id": job.id,
                    "state": job.state,
                    "outcome": job.outcome,
                    "exit_code": job.exit_code,
                    "attempts": job.attempts,
                }
            )
        row = seen[job_id]
        if row is not None:
            out.append(row)
    return out
