"""What the tools print for a person never carries others' control characters (terminal
escapes): job names, commands, directories, environments, reasons, group and worker names,
tags, output and progress come through `visible`, and tables stay aligned. A real broker and
worker; the tools run in-process."""

from __future__ import annotations

import io
import re

import pytest

from banyan.cli import output
from banyan.errors import Forbidden
from tests.cluster import Cluster, scaled
from tests.test_cli import runner

# What a hostile user puts in a job: clear the screen, set the title, write the clipboard
# (OSC 52, here `rm -rf ~`), move up and erase a line, a C1 CSI, a bidi override, a CR.
CLEAR, TITLE = "\x1b[2J", "\x1b]0;pwned\x07"
CLIPBOARD, HIDE = "\x1b]52;c;cm0gLXJmIH4K\x07", "\x1b[1A\x1b[2K"
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]")  # all but newline and tab


def clean(text: str) -> str:
    found = CONTROLS.findall(text)
    assert not found, f"control characters reached the terminal: {found!r} in {text!r}"
    return text


def test_others_text_is_shown_with_its_control_characters_escaped(cluster: Cluster, capsys) -> None:
    cluster.start_worker("w1", tags=(f"gpu{CLEAR}",))
    cli = runner(cluster, capsys)
    c = cluster.client()
    hostile = {
        "command": f"echo hi {CLIPBOARD} {HIDE}",
        "name": f"evil{CLEAR}{TITLE}name",
        "cwd": f"/tmp/{CLEAR}",
        "env": {"TOKEN": f"v{TITLE}"},
        "groups": [f"g{CLEAR}x"],
        "hold": True,
    }
    (named,) = c.submit(jobs=[hostile], groups=[{"name": f"g{CLEAR}x"}]).jobs
    (cancelled,) = c.submit("true", hold=True, name="\u202eplain").jobs
    c.cancel([cancelled], reason=f"r{CLEAR}x\rfake")
    (ran,) = c.submit(
        "printf 'out\\033]0;t\\007\\r\\tcol\\n'; echo '50 \\033[31mRED' > $BANYAN_PROGRESS_FILE",
        tags=[f"gpu{CLEAR}"],
    ).jobs
    assert c.wait([ran], timeout=scaled(20)).all_succeeded

    listing = clean(cli("status", "--all").out)
    header, *rows, _total = listing.splitlines()
    assert [int(line.split()[0]) for line in rows] == [ran, cancelled, named]
    for line in rows:  # every row's owner starts under USER: the row is aligned
        assert line[header.index("USER") :].split()[0] == c.job(named).owner, line
    assert "evil\\x1b[2J\\x1b]0;pwned\\x07name" in listing
    assert "r\\x1b[2Jx\\rfake" in listing and "\\u202eplain" in listing

    detail = clean(cli("status", str(named), str(cancelled), str(ran)).out)
    assert f"echo hi {CLIPBOARD} {HIDE}".encode("unicode_escape").decode() in detail
    assert "/tmp/\\x1b[2J" in detail and "g\\x1b[2Jx" in detail
    assert "out\\x1b]0;t\\x07\\r\tcol" in detail  # a job's output keeps its tabs
    clean(cli("status", "--group", f"g{CLEAR}x").out)
    workers = clean(cli("workers").out)
    assert "gpu\\x1b[2J" in workers
    clean(cli("users").out)


def test_live_lines_and_errors_escape_control_characters(capsys) -> None:
    stream = io.StringIO()
    live = output.LiveLine(stream)
    live.show(f"job 3: 50% {CLEAR}", major="a")
    assert clean(stream.getvalue()) == "job 3: 50% \\x1b[2J\n"

    def refused(_args: output.Args) -> int:
        raise Forbidden(f"group 'g{CLEAR}' belongs to {TITLE}")

    assert output.run("banyan-x", "Usage:\n  banyan-x\n", [], refused) == 1
    assert clean(capsys.readouterr().err).startswith("banyan-x: group 'g\\x1b[2J'")


def test_the_daemons_logs_escape_control_characters(capsys) -> None:
    import logging

    from banyan.cli import _Visible

    record = logging.LogRecord("banyan.broker", 20, "", 0, "worker %s registered", (CLEAR,), None)
    assert clean(_Visible("%(message)s").format(record)) == "worker \\x1b[2J registered"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain name", "plain name"),
        ("a\tb\nc\rd", "a\\tb\\nc\\rd"),
        ("\x9b31m\x7f", "\\x9b31m\\x7f"),
        ("\u202eevil\u2066", "\\u202eevil\\u2066"),
        ("naïve café ✓", "naïve café ✓"),
    ],
)
def test_visible(text: str, shown: str) -> None:
    assert output.visible(text) == shown
    assert output.visible(shown) == shown  # escaping twice changes nothing more
