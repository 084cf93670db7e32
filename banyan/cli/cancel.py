"""banyan-cancel: cancel jobs, groups, or whatever a selector matches (SPEC §8).

What has already ended counts as done. Ranges and filters go to the broker as one selector, so
cancelling 100,000 jobs is one small request.
"""

from __future__ import annotations

import sys

from banyan.cli.output import (
    CONNECT_OPTIONS,
    Args,
    UsageError,
    connect,
    print_json,
    report_errors,
    run,
    target_errors,
)
from banyan.cli.targets import Targets, ids_text

TOOL = "banyan-cancel"
USAGE = (
    """banyan-cancel: cancel jobs, groups, or every unfinished job a filter matches.

Usage:
  banyan-cancel [options] [TARGET...]

A TARGET is a job id (12), a range of ids (100-2000) or a group name; the jobs of an
array are the group array-ID, ID being the array's first job. Named jobs and groups must
exist and be yours (an admin may cancel anyone's): each one that is not is reported, the
rest are cancelled, and the exit status is 1. A range, and the filters below, select
unfinished jobs: your own, or an admin's pick of anyone's. Filters narrow the ranges given,
or stand alone; --group G alone cancels group G. Queued and held jobs are cancelled at once;
running ones get SIGTERM, then SIGKILL after their grace period. Everything that depends on
a cancelled job is cancelled too.

Options:
  --reason TEXT         Why, recorded with the jobs and shown by banyan-status.
  --user U              Only U's jobs.
  --state S             Only jobs in state S (default: every unfinished one).
  --name GLOB           Only jobs whose name (the command, if unnamed) matches GLOB.
  --group G             Only the members of group G.
"""
    + CONNECT_OPTIONS
)


def main(argv: list[str] | None = None) -> int:
    return run(TOOL, USAGE, argv, cancel, many="TARGET")


def cancel(args: Args) -> int:
    targets = Targets.parse(args["TARGET"], args, name_option="--name")
    if targets.empty:
        raise UsageError("nothing to cancel: give job ids, ranges, groups or a filter")
    with connect(args) as client:
        done = client.cancel(
            targets.ids, targets.groups, reason=args["--reason"], select=targets.select, each=True
        )
    if args["--json"]:
        print_json(
            {
                "cancelled": done.cancelled,
                "pending": done.pending,
                "already": done.already,
                "errors": target_errors(done.errors),
            }
        )
        return report_errors(TOOL, done.errors, True)
    for ids, what in (
        (done.cancelled, "cancelled"),
        (done.pending, "stopping (cancel sent to the worker)"),
        (done.already, "already over"),
    ):
        if ids:
            print(f"{what}: {ids_text(ids)}")
    if not (done.cancelled or done.pending or done.already or done.errors):
        print("nothing to cancel: nothing matched")
    return report_errors(TOOL, done.errors, False)


if __name__ == "__main__":
    sys.exit(main())
