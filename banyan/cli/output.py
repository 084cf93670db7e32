"""What every Banyan tool shares: one way to run, to fail, and to show things to a person.

Errors: a refused request prints `tool: message` on stderr and exits 1; bad arguments exit 2;
a broker that cannot be reached, or refuses this machine's key, exits 3 (SPEC §8). With
`--json` the error is one JSON document on stderr instead, `{"error": CODE, "message": TEXT}`.
Units: durations as `3m12s`, ages as `4s ago`, sizes in KiB/MiB/GiB. Tables are aligned;
colour appears only on a terminal and never with NO_COLOR. A live display rewrites one line in
place on a terminal and prints plain lines into a pipe, only when something changed. Text that
others wrote (names, commands, reasons, progress, output) shows its control characters as
escapes (`visible`) in every table, detail view, live line and error.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from banyan import defaults
from banyan.cli import EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE
from banyan.cli.usage import Explain, UsageError, flag_words, parse
from banyan.cli.visible import visible
from banyan.client import Client, TargetError
from banyan.errors import BanyanError, BrokerUnavailable, Invalid
from banyan.protocol import ProtocolError

Args = dict[str, Any]

# The options every networked tool has; appended to each tool's own option list.
CONNECT_OPTIONS = f"""\
  --broker HOST[:PORT]  The broker (default: $BANYAN_BROKER, else {defaults.BROKER_HOST};
                        port {defaults.CLIENT_PORT}).
  --timeout SECONDS     Give up on a broker that does not answer within this many
                        seconds [default: {defaults.CLIENT_TIMEOUT:g}].
  --json                Print machine-readable JSON instead of tables.
  -h --help             Show this help.
"""

INTERRUPTED = 130  # the shell's code for "stopped by Ctrl-C"


# UsageError is raised by every tool for a bad value (defined with the parser); `visible` is
# what every tool shows others' text through (defined apart, for the daemons' logs too).
__all__ = ["UsageError", "visible"]


def run(
    tool: str,
    usage: str,
    argv: list[str] | None,
    body: Callable[[Args], int],
    options_first: bool = False,
    many: str | None = None,
    explain: Explain | None = None,
) -> int:
    """Parse `argv` with docopt and run `body`, mapping every failure to its exit code.
    `many` names a repeated positional argument that may be given thousands of times, and
    `explain` says what is wrong with the positional words of a refused command line
    (usage.parse)."""
    argv = sys.argv[1:] if argv is None else argv
    # Known before parsing, so that even a usage error comes as JSON when it was asked for.
    words = argv[: argv.index("--")] if "--" in argv else argv
    as_json = "--json" in words
    try:
        try:
            args = parse(usage, argv, options_first, many, explain)
        except SystemExit:  # --help was printed
            return EXIT_OK
        return body(args)
    except UsageError as e:
        return fail(tool, "usage", str(e), EXIT_USAGE, as_json, e.hint)
    except BrokerUnavailable as e:
        return fail(tool, e.code, e.message, EXIT_UNAVAILABLE, as_json)
    except Invalid as e:  # a value the broker's rules refuse, found before sending
        return fail(tool, "usage", flag_words(e.message), EXIT_USAGE, as_json)
    except BanyanError as e:
        return fail(tool, e.code, e.message, EXIT_REFUSED, as_json)
    except ProtocolError as e:  # likewise, found by the tool's own checks
        return fail(tool, "usage", flag_words(e.reason), EXIT_USAGE, as_json)
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        # The reader (`| head`) has gone: stop quietly, and keep Python's exit-time flush of
        # stdout from complaining about the same closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def fail(tool: str, code: str, message: str, status: int, as_json: bool, hint: str = "") -> int:
    """Report an error on stderr: `tool: message` (and the usage, for a usage error), or with
    `--json` one document `{"error": CODE, "message": TEXT}`. Returns the exit status."""
    if as_json:
        print(json.dumps({"error": code, "message": message}), file=sys.stderr)
    else:
        # The broker's messages quote names that others chose.
        print(f"{tool}: {visible(message)}" + (f"\n{hint}" if hint else ""), file=sys.stderr)
    return status


def target_errors(errors: Sequence[TargetError]) -> list[dict[str, Any]]:
    """Targets a request passed over, as `--json` prints them beside what it did."""
    return [{"target": e.target, "error": e.code, "message": e.message} for e in errors]


def report_errors(tool: str, errors: Sequence[TargetError], as_json: bool) -> int:
    """The targets a request passed over (the rest went ahead): each on its own line, or with
    `--json` one error document naming them all (the first one's code). Exit 1 if any."""
    if not errors:
        return EXIT_OK
    if as_json:
        message = "; ".join(e.message for e in errors)
        return fail(tool, errors[0].code, message, EXIT_REFUSED, as_json)
    for e in errors:
        print(f"{tool}: {e.message}", file=sys.stderr)
    return EXIT_REFUSED


def connect(args: Args) -> Client:
    """A client for `--broker` with `--timeout`; a malformed address is a usage error."""
    timeout = number(args["--timeout"], "--timeout", minimum=0.001)
    try:
        return Client(args["--broker"], timeout=timeout)
    except ValueError as e:  # the address, as --broker or $BANYAN_BROKER gave it
        raise UsageError(str(e)) from None


# ---- reading values ---------------------------------------------------------------------------


def prefetch(text: str) -> int:
    """`--prefetch` (of the broker and of a worker): a count of jobs, 0 to 1024."""
    count = number(text, "--prefetch", minimum=0, integer=True)
    if count > defaults.MAX_PREFETCH:
        raise UsageError(f"--prefetch: at most {defaults.MAX_PREFETCH}")
    return int(count)


def number(
    text: str, option: str, minimum: float = 0.0, integer: bool = False, positive: bool = False
) -> Any:
    """`text` as an int or float of at least `minimum` (above 0 if `positive`), else exit 2."""
    try:
        value: float = int(text) if integer else float(text)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise UsageError(f"{option}: expected {kind}, got {text!r}") from None
    if not math.isfinite(value) or value < minimum or (positive and value <= 0):
        bound = "more than 0" if positive else f"at least {minimum:g}"
        raise UsageError(f"{option}: must be {bound}, got {text!r}")
    return value


_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")


def parse_duration(text: str, option: str) -> float:
    """Seconds from `90`, `90s`, `1h30m`, `2d`, `MM:SS`, `HH:MM:SS` or `D-HH:MM:SS` (Slurm's)."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    if re.fullmatch(r"(\d+-)?\d+(:\d+){1,2}(\.\d+)?", t):
        days, _, clock = t.rpartition("-")
        parts = [float(p) for p in clock.split(":")]
        seconds = sum(p * 60.0**i for i, p in enumerate(reversed(parts)))
        return seconds + (int(days) * 86400 if days else 0)
    if t and _DURATION.sub("", t) == "":
        return sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(t))
    raise UsageError(f"{option}: expected seconds, 1h30m, 90s or HH:MM:SS, got {text!r}")


def positive_duration(text: str, option: str) -> float:
    """parse_duration, refusing 0."""
    seconds = parse_duration(text, option)
    if seconds <= 0:
        raise UsageError(f"{option}: must be more than 0, got {text!r}")
    return seconds


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?")
_MIB_PER = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024**2, "p": 1024**3}


def parse_memory(text: str, option: str) -> int:
    """MiB from `512` (MiB, as in Slurm), `512M`, `4G`, `1.5GiB`, `2T`; rounded up."""
    m = _SIZE.fullmatch(text.strip().lower())
    if not m:
        raise UsageError(f"{option}: expected MiB or a size like 512M, 4G; got {text!r}")
    return math.ceil(float(m.group(1)) * _MIB_PER[m.group(2)])


# ---- human units ------------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """`450ms`, `3.2s`, `42s`, `1m05s`, `2h03m`, `3d04h`; `-` for unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = max(0.0, seconds)
    if 0 < s < 1:
        return f"{s * 1000:.0f}ms"
    if s < 10 and s != int(s):
        return f"{s:.1f}s"
    whole = int(s)
    if whole < 60:
        return f"{whole}s"
    m, sec = divmod(whole, 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def ago(when: float | None, now: float | None = None) -> str:
    if when is None:
        return "never"
    return f"{duration(round((now or time.time()) - when))} ago"


def since(when: float | None, until: float | None = None) -> str:
    """How long from `when` to `until` (or now): `-` when it has not happened."""
    if when is None:
        return "-"
    return duration((until or time.time()) - when)


def size(nbytes: float | None) -> str:
    """`512 B`, `1.5 KiB`, `12 MiB`, `3.9 GiB`."""
    if nbytes is None:
        return "-"
    n = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.1f} {unit}" if abs(n) < 10 else f"{n:.0f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def mib(n: float | None) -> str:
    return "-" if n is None else size(n * 1024 * 1024)


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.0f}%"


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else many or word + 's'}"


def clip(text: str, width: int) -> str:
    text = " ".join(visible(text).split())  # one line, whatever the job's name held
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def bar(fraction: float, width: int = 20) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


# ---- colour and tables ------------------------------------------------------------------------

_CODES = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "magenta": "35"}
_CODES.update(cyan="36", dim="2", bold="1")


def is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def use_color(stream: TextIO) -> bool:
    return is_tty(stream) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def paint(text: str, color: str | None, on: bool) -> str:
    return f"\x1b[{_CODES[color]}m{text}\x1b[0m" if on and color else text


def job_color(state: str, outcome: str | None = None) -> str | None:
    if state == "terminated":
        return "green" if outcome == "success" else "red"
    return {
        "running": "green",
        "available": "cyan",
        "inactive": "magenta",
        "pending_cancellation": "yellow",
        "cancelled": "yellow",
    }.get(state)


Cell = str | tuple[str, str | None]  # text, or (text, colour)


def table(headers: Sequence[str], rows: Sequence[Sequence[Cell]], color: bool = False) -> str:
    """Columns padded to their widest cell; the last column is left ragged. Cells show their
    control characters as escapes, so each row stays one aligned line."""
    cells = [
        [(visible(c), None) if isinstance(c, str) else (visible(c[0]), c[1]) for c in row]
        for row in rows
    ]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, (text, _) in enumerate(row):
            widths[i] = max(widths[i], len(text))
    last = len(headers) - 1
    head = [h.ljust(widths[i]) if i < last else h for i, h in enumerate(headers)]
    lines = ["  ".join(head)]
    for row in cells:
        parts = [
            paint(text.ljust(widths[i]) if i < last else text, col, color)
            for i, (text, col) in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(line.rstrip() for line in lines)


def print_json(obj: Any, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    text = json.dumps(obj, indent=2 if is_tty(out) else None, default=_plain)
    out.write(text + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ---- live displays ----------------------------------------------------------------------------


def width(stream: TextIO) -> int:
    return shutil.get_terminal_size((100, 24)).columns if is_tty(stream) else 10_000


class LiveLine:
    """One status line: rewritten in place with `\\r` on a terminal; in a pipe, a new plain line
    when `major` changes, or when only the rest changed and `gap` seconds have passed."""

    def __init__(self, stream: TextIO, gap: float = 2.0) -> None:
        self.stream = stream
        self.tty = is_tty(stream)
        self.gap = gap
        self.text = ""
        self.major: str | None = None
        self.printed = 0.0

    def show(self, text: str, major: str | None = None) -> None:
        text = visible(text)  # it carries jobs' progress messages
        if self.tty:
            self.stream.write("\r" + clip(text, width(self.stream) - 1) + "\x1b[K")
            self.stream.flush()
            self.text = text
            return
        now = time.monotonic()
        changed = major is not None and major != self.major
        if changed or (text != self.text and now - self.printed >= self.gap):
            self.stream.write(text + "\n")
            self.stream.flush()
            self.text, self.major, self.printed = text, major, now

    def note(self, text: str) -> None:
        """A line of its own, above the status line on a terminal (redrawn at the next show)."""
        self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.stream.flush()
        self.text = "" if self.tty else self.text

    def close(self) -> None:
        if self.tty and self.text:
            self.stream.write("\n")
            self.stream.flush()


class Screen:
    """A whole screen redrawn in place on a terminal (`--watch`); blocks apart in a pipe."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = is_tty(stream)
        self.shown = 0

    def show(self, text: str) -> None:
        if self.tty:
            if not self.shown:
                self.stream.write("\x1b[2J")
            # Home, overwrite each line and clear what is left: no blank flash between frames.
            body = "\n".join(line + "\x1b[K" for line in text.splitlines())
            self.stream.write("\x1b[H" + body + "\n\x1b[J")
        else:
            self.stream.write(("\n" if self.shown else "") + text + "\n")
        self.stream.flush()
        self.shown += 1


def dependencies(deps: list[dict[str, Any]]) -> str:
    """`after 12, after_any group sweep`: a job's `depends_on` in words."""
    words = []
    for d in deps:
        target = f"group {d['group']}" if "group" in d else str(d.get("job", d.get("local")))
        words.append(f"{d.get('kind', 'after')} {target}")
    return ", ".join(words) or "none"
