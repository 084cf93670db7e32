"""banyan-modify: change a job that has not started, hold it or release it (SPEC §2, §3)."""

from __future__ import annotations

import sys

from banyan.cli import EXIT_OK
from banyan.cli.output import (
    CONNECT_OPTIONS,
    Args,
    UsageError,
    connect,
    dependencies,
    print_json,
    run,
)
from banyan.cli.submit import job_fields

TOOL = "banyan-modify"
USAGE = (
    """banyan-modify: change, hold or release a job.

Usage:
  banyan-modify [options] [--tag T]... [--env K=V]... [--after IDS]... [--after-any IDS]...
                [--after-fail IDS]... ID

Most fields can change only while the job is held (inactive); the priority also while it is
queued (available). Tags, env and dependencies replace the job's whole list. Values take the
forms banyan-submit takes.

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
"""
    + CONNECT_OPTIONS
)


def main(argv: list[str] | None = None) -> int:
    return run(TOOL, USAGE, argv, modify)


def modify(args: Args) -> int:
    if not args["ID"].isdigit():
        raise UsageError(f"expected a job id, got {args['ID']!r}")
    if args["--hold"] and args["--release"]:
        raise UsageError("--hold and --release exclude each other")
    changes = job_fields(args)
    if not changes and not args["--hold"] and not args["--release"]:
        raise UsageError("nothing to change: give --priority, --hold, --release, ...")
    with connect(args) as client:
        job = client.modify(
            int(args["ID"]), hold=args["--hold"], release=args["--release"], **changes
        )
    if args["--json"]:
        print_json({"job": job.raw})
        return EXIT_OK
    what = [f"{k}={_show(v)}" for k, v in changes.items()]
    what += ["held"] * args["--hold"] + ["released"] * args["--release"]
    print(f"job {job.id} ({job.state}): {', '.join(what)}")
    return EXIT_OK


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
