"""Human units, value parsing, tables and live displays of the command-line tools."""

from __future__ import annotations

import io

import pytest

from banyan import arrays
from banyan.cli import cancel, keygen, logs, modify, stats, status, submit, workers
from banyan.cli.output import (
    Cell,
    LiveLine,
    Screen,
    UsageError,
    ago,
    bar,
    clip,
    duration,
    paint,
    parse_duration,
    parse_memory,
    run,
    size,
    table,
    use_color,
)
from banyan.cli.submit import array_count


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0, "0s"),
        (0.45, "450ms"),
        (3.21, "3.2s"),
        (42, "42s"),
        (65, "1m05s"),
        (192, "3m12s"),
        (7380, "2h03m"),
        (3 * 86400 + 4 * 3600 + 59, "3d04h"),
    ],
)
def test_duration(seconds: float | None, text: str) -> None:
    assert duration(seconds) == text


def test_ago() -> None:
    assert ago(100.0, now=104.2) == "4s ago"
    assert ago(None) == "never"


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (None, "-"),
        (512, "512 B"),
        (1536, "1.5 KiB"),
        (12 * 2**20, "12 MiB"),
        (4 * 2**30, "4.0 GiB"),
    ],
)
def test_size(nbytes: int | None, text: str) -> None:
    assert size(nbytes) == text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("1.5", 1.5),
        ("90s", 90),
        ("1h30m", 5400),
        ("2d", 172800),
        ("01:30", 90),
        ("1:00:00", 3600),
        ("1-00:00:10", 86410),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text, "--time-limit") == seconds


@pytest.mark.parametrize("text", ["", "soon", "1x", "h", "1h30", "-5"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="--time-limit"):
        parse_duration(text, "--time-limit")


@pytest.mark.parametrize(
    ("text", "mib"),
    [("512", 512), ("512M", 512), ("4G", 4096), ("1.5GiB", 1536), ("1T", 1 << 20), ("100k", 1)],
)
def test_parse_memory(text: str, mib: int) -> None:
    assert parse_memory(text, "--memory") == mib


def test_array_indices() -> None:
    assert arrays.indices("0-4") == ["0", "1", "2", "3", "4"]
    assert arrays.indices("1-9:4,20") == ["1", "5", "9", "20"]
    assert array_count("1-9:4,20") == 4 and array_count("0-99999") == 100_000
    for bad in ("5-2", "a-b", "1-2:0", "-3", "0-1000000000", "0-199999,7"):
        with pytest.raises(UsageError, match="--array"):
            array_count(bad)


def test_table_aligns_columns_and_colours_only_when_asked() -> None:
    rows: list[list[Cell]] = [["1", ("running", "green"), "w1"], ["123", ("held", None), "-"]]
    plain = table(("ID", "STATE", "WORKER"), rows)
    assert plain.splitlines() == [
        "ID   STATE    WORKER",
        "1    running  w1",
        "123  held     -",
    ]
    coloured = table(("ID", "STATE", "WORKER"), rows, color=True)
    assert "\x1b[32mrunning\x1b[0m" in coloured
    assert paint("x", "red", on=False) == "x"


def test_colour_needs_a_terminal_and_no_NO_COLOR(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert use_color(FakeTTY()) and not use_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(FakeTTY())


def test_clip_and_bar() -> None:
    assert clip("a\nb   c", 10) == "a\\nb c"  # one line: the newline shows as \n
    assert clip("abcdefghij", 5) == "abcd…"
    assert bar(0.5, 10) == "[#####-----]"
    assert bar(2, 4) == "[####]"


def test_live_line_rewrites_in_place_on_a_terminal() -> None:
    tty = FakeTTY()
    line = LiveLine(tty)
    line.show("one", major="a")
    line.show("two", major="a")
    line.close()
    assert tty.getvalue() == "\rone\x1b[K\rtwo\x1b[K\n"


def test_live_line_prints_changes_only_into_a_pipe() -> None:
    pipe = io.StringIO()
    line = LiveLine(pipe, gap=3600)
    line.show("1/3 done", major="1/3")
    line.show("1/3 done | 50%", major="1/3")  # only the minor part moved: held back
    line.show("2/3 done", major="2/3")
    line.show("2/3 done", major="2/3")
    line.close()
    assert pipe.getvalue() == "1/3 done\n2/3 done\n"


def test_screen_redraws_in_place_on_a_terminal_and_appends_in_a_pipe() -> None:
    tty = FakeTTY()
    screen = Screen(tty)
    screen.show("a\nb")
    screen.show("c")
    assert tty.getvalue() == "\x1b[2J\x1b[Ha\x1b[K\nb\x1b[K\n\x1b[J\x1b[Hc\x1b[K\n\x1b[J"
    pipe = io.StringIO()
    screen = Screen(pipe)
    screen.show("a")
    screen.show("b")
    assert pipe.getvalue() == "a\n\nb\n"


@pytest.mark.parametrize(
    ("argv", "targets", "reason"),
    [
        (["5", "--reason", "7", "8"], ["5", "8"], "7"),
        (["--rea", "x", "5"], ["5"], "x"),  # abbreviated, as docopt allows
        (["--reason=--json", "--json", "g"], ["g"], "--json"),
        (["--json", "--", "-g", "--reason"], ["-g", "--reason"], None),
    ],
)
def test_many_words_are_set_aside_as_docopt_would_read_them(
    argv: list[str], targets: list[str], reason: str | None
) -> None:
    seen: dict[str, object] = {}

    def body(args: dict[str, object]) -> int:
        seen.update(args)
        return 0

    assert run(cancel.TOOL, cancel.USAGE, argv, body, many="TARGET") == 0
    assert seen["TARGET"] == targets and seen["--reason"] == reason
    assert cancel.main(["--json"]) == 2  # nothing named, no filter


def test_no_line_of_prose_in_a_usage_reads_as_an_option() -> None:
    """docopt takes any line that starts with a dash for an option's description, so a
    sentence wrapped to begin with `--state` made --state a list."""
    for tool in (cancel, keygen, logs, modify, stats, status, submit, workers):
        prose = tool.USAGE.split("Options:")[0].split("\n\n", 2)[-1]
        assert not [line for line in prose.splitlines() if line.lstrip().startswith("-")], tool
