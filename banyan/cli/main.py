"""banyan: one entry point for every tool; `banyan submit ...` is `banyan-submit ...`."""

from __future__ import annotations

import importlib
import sys

from banyan.cli import EXIT_OK, EXIT_USAGE
from banyan.cli.usage import UsageError, parse

USAGE = """banyan: run shell commands on a cluster of machines.

Usage:
  banyan COMMAND [ARGS...]
  banyan -h | --help

Commands:
  submit     queue commands, arrays of them or a whole workflow
  status     what is queued, running and done; one job in detail
  logs       a job's output, live while it runs
  cancel     cancel jobs or groups
  modify     change, hold or release a job
  workers    the worker machines; drain and resume them
  users      users' shares, limits and usage; set them (admins)
  stats      counts, throughput, waits, run times, success
  keygen     make and authorize keys for users and machines
  broker     run the broker
  worker     run a worker daemon on this machine

`banyan COMMAND --help` (or `banyan help COMMAND`) shows a command's options.
"""

COMMANDS: tuple[str, ...] = ("submit", "status", "logs", "cancel", "modify", "workers")
COMMANDS += ("users", "stats", "keygen", "broker", "worker")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(
            f"banyan: give a command: banyan COMMAND [ARGS...], COMMAND one of "
            f"{', '.join(COMMANDS)} (banyan --help says what each does)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if argv and argv[0] in COMMANDS:
        # Straight to the tool: docopt's matching is quadratic in the number of words, and
        # `banyan cancel $(seq 80 100080)` is 100,000 of them.
        return dispatch(argv[0], argv[1:])
    try:
        args = parse(USAGE, argv, options_first=True)
    except UsageError as e:
        print(f"banyan: {e}" + (f"\n{e.hint}" if e.hint else ""), file=sys.stderr)
        return EXIT_USAGE
    except SystemExit:  # --help was printed
        return EXIT_OK
    command, rest = args["COMMAND"], args["ARGS"]
    if command == "help":
        if not rest:
            print(USAGE.strip())
            return EXIT_OK
        return dispatch(rest[0], ["--help"])
    return dispatch(command, rest)


def dispatch(command: str, rest: list[str]) -> int:
    if command not in COMMANDS:
        print(f"banyan: no command {command!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    # Imported on demand, so `banyan status` never loads the broker's storage code.
    tool = importlib.import_module(f"banyan.cli.{command}")
    code: int = tool.main(rest)
    return code


if __name__ == "__main__":
    sys.exit(main())
