"""banyan-cancel: cancel jobs and groups; what has already ended counts as done (SPEC §8)."""

from __future__ import annotations

import sys

from banyan.cli import EXIT_OK
from banyan.cli.output import CONNECT_OPTIONS, Args, connect, print_json, run

TOOL = "banyan-cancel"
USAGE = (
    """banyan-cancel: cancel jobs, or every unfinished job of a group.

Usage:
  banyan-cancel [options] TARGET...

A TARGET that is a number is a job id; anything else is a group name. Queued and held jobs
are cancelled at once; running ones get SIGTERM, then SIGKILL after their grace period.
Everything that depends on a cancelled job is cancelled too.

Options:
  --reason TEXT         Why, recorded with the jobs and shown by banyan-status.
"""
    + CONNECT_OPTIONS
)


def main(argv: list[str] | None = None) -> int:
    return run(TOOL, USAGE, argv, cancel, many="TARGET")


def cancel(args: Args) -> int:
    targets: list[str] = args["TARGET"]
    jobs = [int(t) for t in targets if t.isdigit()]
    groups = [t for t in targets if not t.isdigit()]
    with connect(args) as client:
        done = client.cancel(jobs, groups, reason=args["--reason"])
    if args["--json"]:
        print_json({"cancelled": done.cancelled, "pending": done.pending, "already": done.already})
        return EXIT_OK
    for ids, what in (
        (done.cancelled, "cancelled"),
        (done.pending, "stopping (cancel sent to the worker)"),
        (done.already, "already over"),
    ):
        if ids:
            print(f"{what}: {_ids(ids)}")
    if not (done.cancelled or done.pending or done.already):
        print("nothing to cancel: the groups have no members")
    return EXIT_OK


def _ids(ids: list[int]) -> str:
    shown = " ".join(map(str, ids[:20]))
    return shown + (f" … ({len(ids)} in all)" if len(ids) > 20 else "")


if __name__ == "__main__":
    sys.exit(main())
