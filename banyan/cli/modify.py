"""banyan-modify: change jobs that have not started, hold them or release them (SPEC §2, §3).

One job id gets the broker's strict answer (the job in full, or why it may not change); ranges,
several ids and filters become one `modify_many`, which changes every job it may and says
which it skipped and why."""

from __future__ import annotations

import sys

from banyan.cli import EXIT_OK
from banyan.cli.output import (
    CONNECT_OPTIONS,
    Args,
    UsageError,
    connect,
    dependencies,
    plural,
    print_json,
    run,
    visible,
)
from banyan.cli.status import group_line
from banyan.cli.submit import job_fields
from banyan.cli.targets import Targets, ids_text
from banyan.cli.usage import flag_words
from banyan.errors import BanyanError

TOOL = "banyan-modify"
USAGE = (
    """banyan-modify: change, hold or release a job.

Usage:
  banyan-modify [options] [--tag T]... [--env K=V]... [--after IDS]... [--after-any IDS]...
                [--after-fail IDS]... [TARGET...]

A TARGET is a job id (12) or a range of ids (100-2000). Most fields can change only while a
job is held (inactive); the priority also while it is queued (available). Tags, env and
dependencies replace the job's whole list. Values take the forms banyan-submit takes.

One ID is changed or refused as a whole. With several, a range or a filter, every job it may
change is changed in one step and the others are listed as skipped, with the reason. A range
or a filter means your own held and queued jobs (an admin's pick of anyone's), unless a state
is given.

Options:
  --hold                Hold a queued job: it will not start until released.
  --release             Queue a held job again.
  --priority P          Higher runs first.
  --name NAME           A new label.
  --command CMD         A new shell command.
  --attempts N          Runs allowed in total.
  -c --cpus N           CPUs to reserve.
  --memory SIZE         Memory to reserve: MiB, or a size such as 512M or 4G.
  --gpus N              GPUs to reserve.
  --tag T               Labels the worker must carry (replaces them all); repeat for more.
  -t --time-limit T     Wall-clock limit per attempt: seconds, 90s, 1h30m or HH:MM:SS.
  --cancel-grace T      Time from SIGTERM to SIGKILL when cancelled.
  --cwd DIR             Working directory on the worker.
  --env K=V             Environment variables (replaces them all); repeat for more.
  -o --output TEMPLATE  Where output goes on the worker.
  --after IDS           Dependencies (replace them all): run after these succeed.
  --after-any IDS       Run after these end, whatever the outcome.
  --after-fail IDS      Run only if these end without success.
  --user U              Only U's jobs.
  --state S             Only jobs in state S (default: inactive and available).
  --named GLOB          Only jobs whose name (the command, if unnamed) matches GLOB.
  --group G             Only the members of group G (an array's is array-ID).
  --close-group G       Close the open group G (made with submit --group G --open): no job
                        may join it any more, and jobs that depend on it can then go.
"""
    + CONNECT_OPTIONS
)


def main(argv: list[str] | None = None) -> int:
    return run(TOOL, USAGE, argv, modify, many="TARGET")


def modify(args: Args) -> int:
    if args["--close-group"] is not None:
        return close_group(args)
    targets = Targets.parse(args["TARGET"], args, name_option="--named", whole_groups=False)
    if targets.empty:
        raise UsageError("nothing to modify: give job ids, ranges or a filter")
    if args["--hold"] and args["--release"]:
        raise UsageError("--hold and --release exclude each other")
    changes = job_fields(args)
    if not changes and not args["--hold"] and not args["--release"]:
        raise UsageError("nothing to change: give --priority, --hold, --release, ...")
    hold, release = args["--hold"], args["--release"]
    if len(targets.ids) != 1 or targets.select is not None:
        with connect(args) as client:
            done = client.modify_many(targets.ids, targets.select, hold, release, **changes)
        return _many(done.modified, done.skipped, args["--json"])
    with connect(args) as client:
        try:
            job = client.modify(targets.ids[0], hold=hold, release=release, **changes)
        except BanyanError as e:
            if not e.message.startswith("jobs["):
                raise
            # The broker checks a change as a submission's job: say it as the options.
            raise type(e)(flag_words(e.message), e.code) from None
    if args["--json"]:
        print_json({"job": job.raw})
        return EXIT_OK
    what = [f"{k}={_show(v)}" for k, v in changes.items()]
    what += ["held"] * args["--hold"] + ["released"] * args["--release"]
    print(visible(f"job {job.id} ({job.state}): {', '.join(what)}"))
    return EXIT_OK


def close_group(args: Args) -> int:
    if args["TARGET"] or job_fields(args) or args["--hold"] or args["--release"]:
        raise UsageError("--close-group takes no job ids and no other change")
    with connect(args) as client:
        group = client.close_group(args["--close-group"])
    if args["--json"]:
        print_json({"group": group})
    else:
        print(visible(group_line(group)))
    return EXIT_OK


def _many(modified: list[int], skipped: list[tuple[int, str]], as_json: bool) -> int:
    if as_json:
        print_json({"modified": modified, "skipped": [list(s) for s in skipped]})
        return EXIT_OK
    print(
        f"modified {plural(len(modified), 'job')}" + (f": {ids_text(modified)}" if modified else "")
    )
    for job_id, why in skipped[:SKIPS_SHOWN]:
        print(f"skipped {job_id}: {visible(why)}")
    if len(skipped) > SKIPS_SHOWN:
        print(f"skipped {len(skipped) - SKIPS_SHOWN} more (--json lists them all)")
    return EXIT_OK


SKIPS_SHOWN = 10


def _show(value: object) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return dependencies(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(_show(v) for v in value) or "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
