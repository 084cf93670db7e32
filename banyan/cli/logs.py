"""banyan-logs: a job's output, from its worker while it has the file, else the stored tail."""

from __future__ import annotations

import sys
import time

from banyan import defaults
from banyan.cli import EXIT_OK
from banyan.cli.output import CONNECT_OPTIONS, Args, UsageError, connect, run
from banyan.client import Client, LogChunk

TOOL = "banyan-logs"
USAGE = (
    """banyan-logs: print a job's output.

Usage:
  banyan-logs [options] ID

While the job runs, and for a while after, its output comes whole from the worker that ran
it. Otherwise only the last 4 KiB, kept with the result, is left. With --follow the output
is printed as it is written until the job has ended; a retry starts over with its own output.

Options:
  --stderr              The job's standard error instead of its standard output.
  -f --follow           Keep printing new output until the job ends.
"""
    + CONNECT_OPTIONS
)

# A stored tail this long is most likely cut (a tail cut at a character boundary may be up to
# three bytes short); a shorter one is the whole output.
CUT = defaults.OUTPUT_TAIL_BYTES - 3
PACE = 0.25  # seconds between fetches when following: live enough, cheap for the worker
CHUNKS_PER_FETCH = 256  # a bound on one catch-up (256 MiB at the 1 MiB chunk size)


def main(argv: list[str] | None = None) -> int:
    return run(TOOL, USAGE, argv, logs, explain=explain)


def explain(words: list[str]) -> str | None:
    if not words:
        return "give the job's ID: banyan-logs ID"
    if len(words) > 1:
        return f"one job ID at a time, got {len(words)}: {' '.join(words)}"
    return None


def logs(args: Args) -> int:
    if not args["ID"].isdigit():
        raise UsageError(f"expected a job id, got {args['ID']!r}")
    with connect(args) as client:
        reader = Reader(client, int(args["ID"]), "stderr" if args["--stderr"] else "stdout")
        ended = reader.poll()
        chunk = reader.catch_up()
        if not args["--follow"]:
            return EXIT_OK
        try:
            while not (chunk.eof and not chunk.live and ended):
                time.sleep(PACE)  # the follow pace; the end is read from the job, not assumed
                ended = reader.poll()
                chunk = reader.catch_up()
        except KeyboardInterrupt:
            pass
    return EXIT_OK


class Reader:
    """Fetches from the last offset and writes the bytes as they are; a new attempt starts
    its own output, so the offset goes back to 0 when the attempt count moves."""

    def __init__(self, client: Client, job: int, stream: str) -> None:
        self.client = client
        self.job = job
        self.stream = stream
        self.offset = 0
        self.attempts: int | None = None
        self.told_tail = False

    def poll(self) -> bool:
        """Note the job's attempt; True once it has ended."""
        info = self.client.status([self.job]).jobs[0]
        if self.attempts is not None and info.attempts != self.attempts and self.offset:
            print(f"{TOOL}: job {self.job}, attempt {info.attempts}:", file=sys.stderr, flush=True)
            self.offset = 0
        self.attempts = info.attempts
        return info.terminal

    def catch_up(self) -> LogChunk:
        chunk = self.client.logs(self.job, self.stream, self.offset)
        for _ in range(CHUNKS_PER_FETCH):
            if chunk.size < self.offset:
                # Only the stored tail is left, and more than it has been shown already.
                return LogChunk(b"", self.offset, self.offset, False, True)
            if chunk.tail and chunk.size >= CUT and not self.told_tail:
                self.told_tail = True
                print(
                    f"{TOOL}: job {self.job}: only the last {defaults.OUTPUT_TAIL_BYTES} bytes of "
                    f"its {self.stream}, which the broker keeps, are left: its worker no longer "
                    "has the file, or is not connected",
                    file=sys.stderr,
                    flush=True,
                )
            _write(chunk.data)
            self.offset = chunk.offset + len(chunk.data)
            if not chunk.data or self.offset >= chunk.size:
                break
            chunk = self.client.logs(self.job, self.stream, self.offset)
        return chunk


def _write(data: bytes) -> None:
    if not data:
        return
    sys.stdout.flush()
    raw = getattr(sys.stdout, "buffer", None)
    if raw is None:
        sys.stdout.write(data.decode("utf-8", errors="replace"))
    else:
        raw.write(data)
        raw.flush()


if __name__ == "__main__":
    sys.exit(main())
