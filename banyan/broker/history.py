"""`status` without job ids: a page of the queue or of history, newest first (like sacct).

Filters (owner, states, a name glob, a group, a submission time window) become a `Selector`
and an id window, walked by index from the newest job down, so a page costs what it shows
plus what the filter passes over, never a scan of every job: after `STATUS_SCAN` jobs read,
the page ends early and its cursor says where to go on. The reply counts every job the
filter matches, by state: from the kept counters, or in a time window from the index keys;
a filter no index answers (a name glob; a group with other filters) is counted by the first
page as it walks, up to the same bound. Past a bound the counts are a floor (`exact` false),
and never below what the page itself shows, state by state.
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
    first = body.get("cursor") is None
    top = hi if first else min(hi, body["cursor"] - 1)
    # With a filter no index or counter answers, the first page counts as it walks.
    tally: dict[str, int] | None = None if _counted(selector, lo, hi) else {}
    rows: list[dict[str, Any]] = []
    limits: dict[str, str | None] = {}  # what holds each owner's jobs back, once per reply
    shown = seen = None  # the last id shown, and the last looked at
    more = cut = False
    read = 0
    for job_id in selector.ids(tx, lo, top, descending=True):
        if read >= defaults.STATUS_SCAN:
            cut = True
            break
        read += 1
        seen = job_id
        job = tx.get_job(job_id)
        if job is None or not selector.matches(job):
            continue
        if len(rows) < limit:
            rows.append(views.job_info(tx, job, workers, bool(body.get("detail")), limits))
            shown = job_id
        else:
            more = True  # a match past the page
            if tally is None or not first:
                break
        if tally is not None:
            tally[job.state] = tally.get(job.state, 0) + 1
    if tally is None:
        counts, exact = _counts(tx, selector, lo, hi)
    elif first:
        counts, exact = tally, not cut
    else:
        counts, exact = {}, False  # counted on the first page only
    if not exact:
        _at_least(counts, rows)
    resume = shown if more or len(rows) == limit else seen
    return {
        "jobs": rows,
        "groups": groups,
        "truncated": more or cut,
        "next": resume if more or cut else None,
        "counts": counts,
        "matched": sum(counts.values()) if first or tally is None else None,
        "exact": exact,
    }


def _at_least(counts: dict[str, int], rows: list[dict[str, Any]]) -> None:
    """A bounded count is a floor: raise it, state by state, to the rows the page shows (a
    window counted a state at a time could run out before the states of the newest rows)."""
    shown: dict[str, int] = {}
    for row in rows:
        shown[row["state"]] = shown.get(row["state"], 0) + 1
    for state, n in shown.items():
        counts[state] = max(counts.get(state, 0), n)


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


def _counted(selector: Selector, lo: int, hi: int) -> bool:
    """Whether `_counts` can count the matches from counters or index keys alone: no name
    glob, and no group but on its own over all time."""
    if selector.name is not None:
        return False
    return selector.group is None or (selector.owner is None and lo <= 1 and hi >= MAX_ID)


def _counts(tx: Tx, selector: Selector, lo: int, hi: int) -> tuple[dict[str, int], bool]:
    """The matches by state, for a filter `_counted` allows: from the kept counters, or in
    a time window key by key, a state at a time; False when the keys ran past their bound."""
    if lo <= 1 and hi >= MAX_ID:
        if selector.group is not None:
            kept = tx.group_counts(selector.group)
        elif selector.owner is not None:
            kept = tx.owner_counts(selector.owner)
        else:
            kept = tx.state_counts()
        return {s: kept[s] for s in selector.states if kept[s]}, True
    counts: dict[str, int] = {}
    budget = defaults.STATUS_COUNT_KEYS
    for state in selector.states:
        for _ in Selector(owner=selector.owner, states=(state,)).ids(tx, lo, hi):
            budget -= 1
            if budget < 0:
                return counts, False
            counts[state] = counts.get(state, 0) + 1
    return counts, True
