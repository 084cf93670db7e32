"""Command-line front ends. Each `main(argv=None) -> int` returns the exit code (SPEC §8)."""

import logging
import sys

# Exit codes (SPEC §8).
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3  # the broker cannot be reached, or refuses this machine's key


def daemon_logging(level: str) -> None:
    """Daemons log to stderr with levels (`--log-level`), timestamped for journald and files."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
