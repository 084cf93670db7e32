"""`status` without job ids: a page of the queue or of history, newest first (like sacct).

Filters (owner, states, a name glob, a group, a submission time window) become a `Selector`
and an id window, walked by index from the newest job down, so a page costs what it shows
plus what the filter passes over, never a scan of every job; past `STATUS_SCAN` jobs passed
over, the page ends early and its cursor says where to go on. The reply counts every job the
filter matches, by state: from the kept counts when the filter allows it, else by walking the
indexes (key by key, or job by job for a name glob), up to a bound past which the counts are
a floor and `exact` is false.
"""

from __future__ import annotations

from typing import Any

from banyan import defaults
from banyan.broker import views
from banyan.broker.records import Tx, Worker
from banyan.broker.selectors import ACTIVE, ALL, MAX_ID, Selector
from banyan.errors import NotFound


def page(tx: Tx, body: dict[str, Any], workers: list[Worker]) -> dict[str, Any]:
    """One page of jobs (at most `limit`, at most STATUS_PAGE) for a status request without
    ids, newest first, with `next` (pass it back as `cursor`), the group's summary if one was
    asked for, and the counts of everything that matches."""
    selector, groups = _selector(tx, body)
    lo, hi = _window(tx, body)
    limit = min(body.get("limit") or defaults.STATUS_LIMIT, defaults.STATUS_PAGE)
    top = hi if body.get("cursor") is None else min(hi, body["cursor"] - 1)
    rows: list[dict[str, Any]] = []
    last = None  # the last id looked at
    passed = 0
    more = False
    for job_id in selector.ids(tx, lo, top, descending=True):
        job = tx.get_job(job_id)
        if job is None or not selector.matches(job):
            passed += 1
            if passed >= defaults.STATUS_SCAN:
                last, more = job_id, True
                break
            continue
        if len(rows) >= limit:  # one more match exists: there is a next page
            more = True
            break
        rows.append(views.job_info(tx, job, workers, detail=bool(body.get("detail"))))
        last = job_id
    counts, exact = _counts(tx, selector, lo, hi)
    return {
        "jobs": rows,
        "groups": groups,
        "truncated": more,
        "next": last if more else None,
        "counts": counts,
        "matched": sum(counts.values()),
        "exact": exact,
    }


def _selector(tx: Tx, body: dict[str, Any]) -> tuple[Selector, list[dict[str, Any]]]:
    state = body.get("state")
    states = (state,) if state else ALL if body.get("all") else ACTIVE
    group_id = None
    groups = []
    if body.get("group") is not None:
        ref = body["group"]
        group = tx.get_group(ref) if isinstance(ref, int) else tx.group_by_name(ref)
        if group is None:
            raise NotFound(f"no group {ref!r}")
        group_id = group.id
        groups.append(views.group_info(tx, group))
        if not state:
            states = ALL  # a group is shown whole
    selector = Selector(
        owner=body.get("owner"), states=states, name=body.get("name"), group=group_id
    )
    return selector, groups


def _window(tx: Tx, body: dict[str, Any]) -> tuple[int, int]:
    """The ids of the jobs submitted in [since, until): ids are issued in time order."""
    lo = 1 if body.get("since") is None else tx.first_submitted_since(body["since"])
    hi = MAX_ID if body.get("until") is None else tx.first_submitted_since(body["until"]) - 1
    return lo, hi


def _counts(tx: Tx, selector: Selector, lo: int, hi: int) -> tuple[dict[str, int], bool]:
    """How many jobs match, by state; False when the walk stopped at its bound."""
    whole = lo <= 1 and hi >= MAX_ID
    if whole and selector.name is None and (selector.group is None or selector.owner is None):
        if selector.group is not None:
            kept = tx.group_counts(selector.group)
        elif selector.owner is not None:
            kept = tx.owner_counts(selector.owner)
        else:
            kept = tx.state_counts()
        return {s: kept[s] for s in selector.states if kept[s]}, True
    counts: dict[str, int] = {}
    if selector.name is None and selector.group is None:  # key by key, a state at a time
        budget = defaults.STATUS_COUNT_KEYS
        for state in selector.states:
            one = Selector(owner=selector.owner, states=(state,))
            for _ in one.ids(tx, lo, hi):
                budget -= 1
                if budget < 0:
                    return counts, False
                counts[state] = counts.get(state, 0) + 1
        return counts, True
    budget = defaults.STATUS_SCAN
    for job_id in selector.ids(tx, lo, hi):
        budget -= 1
        if budget < 0:
            return counts, False
        job = tx.get_job(job_id)
        if job is not None and selector.matches(job):
            counts[job.state] = counts.get(job.state, 0) + 1
    return counts, True
