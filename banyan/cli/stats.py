"""banyan-stats: how the cluster is doing: counts, throughput, waits, run times, success."""

from __future__ import annotations

import sys
from typing import Any

from banyan.cli import EXIT_OK
from banyan.cli.output import (
    CONNECT_OPTIONS,
    Args,
    ago,
    connect,
    duration,
    percent,
    print_json,
    run,
    size,
    table,
)

TOOL = "banyan-stats"
USAGE = (
    """banyan-stats: job counts, throughput, queue waits, run times, success and utilisation.

Usage:
  banyan-stats [options]

Rates, percentiles and the success rate cover the recent event history (the last
20,000 state changes); counts by state cover every job the broker keeps (ended jobs are
purged after its --retention). A queue wait is a job's time to its first start; a run time is
one attempt's, a requeued or retried attempt counted on its own. The store line shows the size
of the broker's store.

Options:
"""
    + CONNECT_OPTIONS
)

STATES = ("inactive", "available", "running", "pending_cancellation", "terminated", "cancelled")
SERIES = ("submitted", "started", "finished")
QUANTILES = ("p50", "p90", "p99", "max")


def main(argv: list[str] | None = None) -> int:
    return run(TOOL, USAGE, argv, stats)


def stats(args: Args) -> int:
    with connect(args) as client:
        s = client.stats()
    if args["--json"]:
        print_json(s)
    else:
        print(render(s))
    return EXIT_OK


def render(s: dict[str, Any]) -> str:
    counts: dict[str, int] = s.get("counts", {})
    order = [st for st in STATES if st in counts] + sorted(set(counts) - set(STATES))
    total = sum(counts.values())
    jobs = ", ".join(f"{counts[st]} {st}" for st in order if counts[st]) or "none"
    out = [f"jobs          {total} in all: {jobs}", ""]
    per_minute: dict[str, list[int]] = s.get("per_minute", {})
    minutes = max((len(v) for v in per_minute.values()), default=0)
    if minutes:
        # Minutes the window of recent changes does not reach are not known to be zero.
        since, now = s.get("window_since"), s.get("time")
        known = minutes
        if since is not None and now is not None:
            known = min(minutes, max(1, int((now - since) // 60) + 1))
        head = ["PER MINUTE", "now", *(f"-{m}m" for m in range(1, minutes)), "TOTAL"]
        rows = [
            [
                k,
                *(str(n) if m < known else "-" for m, n in enumerate(per_minute.get(k, []))),
                str(sum(per_minute.get(k, []))),
            ]
            for k in SERIES
        ]
        out += [table(head, rows)]
        if known < minutes and since is not None and now is not None:
            reach = duration(now - since)
            out.append(
                f"(the last {s.get('window_events', 0):,} changes reach back {reach}: rates, "
                "times and success cover only those)"
            )
        out.append("")
    rows = [
        [name, *_quantiles(s.get(key) or {})]
        for name, key in (("queue wait", "queue_wait"), ("run time", "run_time"))
    ]
    # A queue wait is a job's (to its first start), a run time an attempt's.
    out += [table(["TIMES", *QUANTILES, "COUNT"], rows), ""]
    out.append(f"success       {_success(s)}")
    if s.get("attempts"):
        out.append(f"attempts      {_attempts(s['attempts'])}")
    out.append(f"workers       {_workers(s.get('workers') or {})}")
    if s.get("store"):
        out.append(f"store         {_store(s['store'])}")
        out.append(f"history       {_history(s['store'])}")
    return "\n".join(out)


def _quantiles(p: dict[str, Any]) -> list[str]:
    return [duration(p.get(q)) for q in QUANTILES] + [str(p.get("n", 0))]


def _success(s: dict[str, Any]) -> str:
    outcomes: dict[str, int] = s.get("outcomes") or {}
    ended = sum(outcomes.values())
    if not ended:
        return "no job has ended recently"
    detail = ", ".join(f"{n} {k}" for k, n in outcomes.items())
    return f"{percent(s.get('success_rate'))} of {ended} ended jobs ({detail})"


def _attempts(a: dict[str, Any]) -> str:
    """Attempts that ended recently, by outcome, and those requeued without spending one."""
    if not a.get("ended"):
        return "none ended recently"
    outcomes = ", ".join(f"{n} {k}" for k, n in (a.get("outcomes") or {}).items())
    return (
        f"{a['ended']} ended ({outcomes}); "
        f"{a.get('requeued', 0)} requeued without spending an attempt"
    )


def _store(st: dict[str, Any]) -> str:
    return (
        f"{size(st.get('file'))} on disk: {size(st.get('used'))} in use, "
        f"{size(st.get('free'))} freed for reuse; {st.get('jobs', 0)} jobs"
    )


def _span(seconds: float) -> str:
    """A retention as it was likely given: `30d`, `12h`, else `1h30m`-like."""
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length and seconds % length == 0:
            return f"{seconds / length:g}{unit}"
    return duration(seconds)


def _history(st: dict[str, Any]) -> str:
    keep = st.get("retention")
    kept = f"ended jobs kept {_span(keep)}" if keep else "ended jobs kept forever"
    oldest = st.get("oldest_job")
    if not oldest:
        return f"no jobs; {kept}"
    return f"oldest job {oldest['id']}, submitted {ago(oldest.get('submitted'))}; {kept}"


def _workers(w: dict[str, Any]) -> str:
    live = w.get("live", 0)
    gone = "".join(f", {w[k]} {k}" for k in ("lost", "stopped") if w.get(k))
    if not live:
        return f"none live{gone}"
    return (
        f"{live} live{gone}; {w.get('used_cpus', 0):g}/{w.get('cpus', 0):g} cpus in use "
        f"({percent(w.get('utilisation'))} utilisation)"
    )


if __name__ == "__main__":
    sys.exit(main())
