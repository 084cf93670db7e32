"""Command-line front ends. Each `main(argv=None) -> int` returns the exit code (SPEC §8)."""

import logging
import sys

from banyan.cli.visible import visible

# Exit codes (SPEC §8).
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3  # the broker cannot be reached, or refuses this machine's key


class _Visible(logging.Formatter):
    """A log line shows control characters as escapes: its messages quote worker names,
    hosts and reasons others chose, and one line stays one line (no forged entries)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return visible(super().formatMessage(record))


def daemon_logging(level: str) -> None:
    """Daemons log to stderr with levels (`--log-level`), timestamped for journald and files."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Visible("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
