"""Command-line front ends. Each `main(argv=None) -> int` returns the exit code (SPEC §8)."""

# Exit codes (SPEC §8).
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
