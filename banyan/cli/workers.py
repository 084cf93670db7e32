"""banyan-workers: the machines, what they offer and use (like sinfo); drain and resume."""

from __future__ import annotations

import dataclasses
import sys
import time

from banyan.cli import EXIT_OK
from banyan.cli.output import (
    CONNECT_OPTIONS,
    Args,
    Cell,
    UsageError,
    ago,
    connect,
    mib,
    plural,
    print_json,
    run,
    table,
    use_color,
    visible,
)
from banyan.client import WorkerInfo

TOOL = "banyan-workers"
USAGE = (
    """banyan-workers: list the workers, or drain or resume one.

Usage:
  banyan-workers [options] [--drain NAME | --resume NAME | --forget NAME]

States: idle, busy (running jobs), draining (finishing its jobs, taking no new ones), drained
(idle and taking none), stopped (exited cleanly), lost (silent past the liveness window; its
jobs were requeued), expected (the broker restarted and waits for it to register again). A
draining worker finishes what it runs and claims nothing new; then it shows as drained, and
stays drained, across its restarts, until resumed. Forgetting removes a lost or stopped worker
from the list. All three need an admin key.

Options:
  -l, --long            Also show where each worker registered from (ADDRESS, which tells
                        cloned machines with one host name apart) and the worker key it used.
  --drain NAME          Drain worker NAME (one stopped or lost comes back drained).
  --resume NAME         Let worker NAME claim jobs again.
  --forget NAME         Remove lost or stopped worker NAME from the list.
"""
    + CONNECT_OPTIONS
)

HEADERS = (
    "NAME",
    "HOST",
    "STATE",
    "CPUS",
    "MEMORY",
    "GPUS",
    "RUNNING",
    "DONE",
    "LAST SEEN",
    "TAGS",
)
COLORS = {"idle": "green", "busy": "cyan", "draining": "yellow", "drained": "dim", "lost": "red"}
COLORS["stopped"] = "dim"
COLORS["expected"] = "yellow"


def main(argv: list[str] | None = None) -> int:
    return run(TOOL, USAGE, argv, workers)


def workers(args: Args) -> int:
    for option in ("--drain", "--resume", "--forget"):
        if args[option] is not None and not args[option].strip():
            raise UsageError(f"{option}: give a worker's name; it may not be empty")
    name = args["--drain"] or args["--resume"]
    with connect(args) as client:
        if args["--forget"]:
            found = client.forget(args["--forget"])
        elif name:
            found = client.drain(name, resume=bool(args["--resume"]))
        else:
            found = client.workers()
    if args["--json"]:
        print_json({"workers": [dataclasses.asdict(w) for w in found]})
        return EXIT_OK
    if args["--forget"]:
        print(f"{visible(args['--forget'])}: forgotten")
        return EXIT_OK
    if name:
        w = next((w for w in found if w.name == name), None)
        print(f"{visible(name)}: {w.state if w else 'unknown'}{_drain_note(w)}")
        return EXIT_OK
    print(render(found, use_color(sys.stdout), bool(args["--long"])))
    return EXIT_OK


def _drain_note(w: WorkerInfo | None) -> str:
    if w is not None and w.held and w.state in ("lost", "stopped", "expected"):
        return "; it comes back drained when it registers again"
    if w is None or w.state != "draining":
        return ""
    return f" (finishing {plural(len(w.running), 'running job')}, then drained)"


def render(found: list[WorkerInfo], color: bool, long: bool = False) -> str:
    if not found:
        return "no workers have registered (start one with banyan-worker)"
    now = time.time()
    headers: tuple[str, ...] = HEADERS
    rows = [row(w, now) for w in found]
    if long:  # after NAME and HOST
        headers = (*HEADERS[:2], "ADDRESS", "KEY", *HEADERS[2:])
        extra = [[w.address or "-", w.key or "-"] for w in found]
        rows = [[*r[:2], *x, *r[2:]] for r, x in zip(rows, extra, strict=True)]
    out = table(headers, rows, color)
    live = [w for w in found if w.state not in ("lost", "stopped")]
    states: dict[str, int] = {}
    for w in found:
        states[w.state] = states.get(w.state, 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    used, total = sum(w.used_cpus for w in live), sum(w.cpus for w in live)
    return f"{out}\n{plural(len(found), 'worker')}: {tally}; {used:g}/{total:g} cpus in use"


def row(w: WorkerInfo, now: float) -> list[Cell]:
    return [
        w.name,
        w.host or "-",
        (w.state, COLORS.get(w.state)),
        f"{w.used_cpus:g}/{w.cpus:g}",
        f"{mib(w.used_memory) if w.used_memory else '0'}/{mib(w.memory)}",
        f"{w.used_gpus}/{w.gpus}",
        str(len(w.running)),
        str(w.completed),
        ago(w.last_seen, now),
        ",".join(w.tags) or "-",
    ]


if __name__ == "__main__":
    sys.exit(main())
