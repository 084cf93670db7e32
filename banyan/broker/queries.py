"""Client requests: which state-machine call or read each wire request becomes.

`handle` returns the reply body (the server encodes it after the commit) or raises a
`BanyanError`, which becomes an `error` reply.
"""

from __future__ import annotations

import time
from typing import Any

from banyan import defaults
from banyan.broker import history, retention, stats, submission, views
from banyan.broker.records import Job, Tx
from banyan.broker.selectors import TERMINAL
from banyan.broker.state import Actor, Core
from banyan.errors import BadRequest, BanyanError, Forbidden, NotFound

REPLY = {
    "ping": "pong",
    "submit": "submitted",
    "modify": "job",
    "close_group": "group",
    "status": "status",
    "wait": "waited",
    "workers": "workers",
    "drain": "workers",
    "forget": "workers",
    "stats": "stats",
    "events": "events",
    "users": "users",
    "set_user": "users",
}


def handle(
    core: Core, actor: Actor, kind: str, body: dict[str, Any], last_seen: dict[str, float]
) -> dict[str, Any]:
    tx = core.tx
    if kind == "ping":
        return {"version": defaults.PROTOCOL_VERSION, "time": time.time()}
    if kind == "submit":  # a small one: big ones are made a slice at a time (submission.py)
        source = submission.Source.of(body)
        return core.submit(
            actor,
            source.specs(0, source.count),
            body["groups"],
            body.get("submit_key"),
            array=source.array is not None,
            environment=body.get("environment"),
            digest=source.digest(body["groups"]) if source.templated else None,
        )
    if kind == "modify":
        job = core.modify(actor, body["job"], body["set"], body["hold"], body["release"])
        return {"job": views.job_info(tx, job, list(tx.workers()))}
    if kind == "close_group":
        return {"group": views.group_info(tx, core.close_group(actor, body["group"]))}
    if kind == "status":
        return _hide_others_output(status(tx, body), actor)
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
        return stats.summary(tx, core.now, core.config.retention)
    if kind == "users":
        return {"users": views.users_info(tx, core.now, core.config.half_life)}
    if kind == "set_user":
        core.set_user(actor, body["name"], body["set"])
        listed = views.users_info(tx, core.now, core.config.half_life)
        return {"users": [u for u in listed if u["name"] == body["name"]]}
    if kind == "events":
        events = tx.events_from(body["since"], body["limit"])
        rows = [[e.seq, e.time, e.job, e.frm, e.to, e.reason] for e in events]
        return {"events": rows, "next": events[-1].seq + 1 if events else body["since"]}
    raise BadRequest(f"{kind}: not a client request")


def workers(tx: Tx, last_seen: dict[str, float]) -> list[dict[str, Any]]:
    """`last_seen` has the connected workers, with when each was last heard from."""
    return [views.worker_info(w, last_seen.get(w.name), w.name in last_seen) for w in tx.workers()]


def status(tx: Tx, body: dict[str, Any]) -> dict[str, Any]:
    """Named jobs in the order asked (at most a page of them), or a page of the queue or of
    history (history.page)."""
    live = list(tx.workers())
    if not body.get("jobs"):
        return history.page(tx, body, live)
    limit = min(body.get("limit") or defaults.STATUS_LIMIT, defaults.STATUS_PAGE)
    ids = body["jobs"][:limit]
    out: list[dict[str, Any]] = []
    errors: list[list[Any]] = []
    limits: dict[str, str | None] = {}
    for job_id in ids:
        job = tx.get_job(job_id)
        if job is None:
            if not body.get("each"):
                raise NotFound(retention.gone(tx, job_id))
            errors.append([job_id, NotFound.code, retention.gone(tx, job_id)])
            continue
        if body.get("owner") not in (None, job.owner) or body.get("state") not in (None, job.state):
            continue
        out.append(views.job_info(tx, job, live, bool(body.get("detail")), limits))
    reply = {"jobs": out, "groups": [], "truncated": len(body["jobs"]) > limit}
    return reply | {"errors": errors} if body.get("each") else reply


def may_read_output(actor: Actor, job: Job | None, job_id: int) -> BanyanError | None:
    """Why `actor` may not read job `job_id`'s output, or None: its owner and admins may."""
    if job is None:
        return NotFound(f"no job {job_id}")
    if not actor.may_touch(job.owner):
        return Forbidden(
            f"job {job.id} belongs to {job.owner}; only they or an admin may read its output"
        )
    return None


def _hide_others_output(reply: dict[str, Any], actor: Actor) -> dict[str, Any]:
    """Everyone sees every job, but a job's output and its `--env` values (where tokens go)
    only its owner and admins (SPEC §6)."""
    for info in reply["jobs"]:
        if "output_tail" in info and not actor.may_touch(info["owner"]):
            info["output_tail"] = {"stdout": "", "stderr": ""}
            info["output_hidden"] = True
            if info.get("env"):
                info["env"] = {}
                info["env_hidden"] = True
    return reply


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
    """Short rows for a `waited` reply (id, name, state, outcome, exit code, attempts, worker,
    owner); `seen` shares them between the replies of one read (a thousand clients waiting
    for the same jobs cost one load per job, not a thousand)."""
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
                    # A long command stands in for a missing name as status shows it, cut to
                    # a name's length: a wait on 100,000 jobs must stay a small reply.
                    "name": job.name or job.command[: defaults.MAX_NAME],
                    "state": job.state,
                    "outcome": job.outcome,
                    "exit_code": job.exit_code,
                    "attempts": job.attempts,
                    "worker": job.worker,
                    "owner": job.owner,
                }
            )
        row = seen[job_id]
        if row is not None:
            out.append(row)
    return out
