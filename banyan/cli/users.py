"""banyan-users: fair-share settings, limits and usage per user; admins change them."""

from __future__ import annotations

import sys
from typing import Any

from banyan.cli import EXIT_OK
from banyan.cli.output import (
    CONNECT_OPTIONS,
    Args,
    Cell,
    UsageError,
    connect,
    number,
    print_json,
    run,
    table,
)

TOOL = "banyan-users"
USAGE = (
    """banyan-users: each user's shares, limits, jobs and recent usage; set them (admins).

Usage:
  banyan-users [options] [NAME]

Free cpus go to the users with waiting jobs in proportion to their shares, less for a user
who used more than their share lately (usage halves every week). With NAME, shows that user;
with a setting too, sets it for NAME, who need not have submitted anything yet (admin key
needed). `none` lifts a limit.

Options:
  --shares N            NAME's shares: 2 get twice what 1 gets when both want more.
  --max-running N       At most N of NAME's jobs run at once; the others wait, and
                        banyan-status says why.
  --max-queued N        At most N of NAME's jobs wait at once; a submission that would go
                        past it is refused.
"""
    + CONNECT_OPTIONS
)

HEADERS = (
    *("USER", "SHARES", "RUNNING", "CPUS", "QUEUED"),
    *("MAX RUN", "MAX QUEUED", "USAGE", "FAIRSHARE"),
)


def main(argv: list[str] | None = None) -> int:
    return run(TOOL, USAGE, argv, users)


def users(args: Args) -> int:
    name = args["NAME"]
    settings = _settings(args)
    if settings and not name:
        raise UsageError("--shares, --max-running and --max-queued need a NAME")
    with connect(args) as client:
        rows = [client.set_user(name, **settings)] if settings else client.users()
    if name and not settings:
        rows = [r for r in rows if r["name"] == name] or [_nobody(name)]
    if args["--json"]:
        print_json({"users": rows})
    else:
        print(render(rows))
    return EXIT_OK


def _settings(args: Args) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args["--shares"] is not None:
        out["shares"] = number(args["--shares"], "--shares", positive=True)
    for option, key in (("--max-running", "max_running"), ("--max-queued", "max_queued")):
        text = args[option]
        if text is not None:
            out[key] = None if text.lower() == "none" else number(text, option, integer=True)
    return out


def _nobody(name: str) -> dict[str, Any]:
    """The row of a user the broker has never heard of: the defaults."""
    return {
        "name": name,
        "shares": 1.0,
        "max_running": None,
        "max_queued": None,
        "running": 0,
        "cpus": 0.0,
        "queued": 0,
        "jobs": {},
        "usage": 0.0,
        "fair_share": 1.0,
    }


def _cpu_hours(seconds: float) -> str:
    hours = seconds / 3600
    if not seconds:
        return "-"
    return f"{hours:.2f} cpu-h" if hours < 10 else f"{hours:,.0f} cpu-h"


def render(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no users yet: nobody has submitted a job or been given settings"
    return table(HEADERS, [row(r) for r in rows])


def row(r: dict[str, Any]) -> list[Cell]:
    def limit(value: int | None) -> str:
        return "-" if value is None else str(value)

    return [
        r["name"],
        f"{r['shares']:g}",
        str(r["running"]),
        f"{r['cpus']:g}",
        str(r["queued"]),
        limit(r["max_running"]),
        limit(r["max_queued"]),
        _cpu_hours(r["usage"]),
        f"{r['fair_share']:.2f}",
    ]


if __name__ == "__main__":
    sys.exit(main())
