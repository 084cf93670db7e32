"""Reading a command line with docopt, and saying in a sentence what was wrong with it.

docopt reports a mistake in its own terms (`found unmatched (duplicate?) arguments
[Option(None, '--bogus', 0, True)]`); a person should read `unknown option --bogus`.
"""

from __future__ import annotations

import re
from typing import Any

from docopt import DocoptExit, docopt

# docopt's words for what it could not place: Option(short, long, argcount, value) and
# Argument(name, value).
_OPTION = re.compile(r"Option\((?:'(-[^']*)'|None), (?:'(--[^']*)'|None), \d+, ")
_ARGUMENT = re.compile(r"Argument\((?:'[^']*'|None), '([^']*)'\)")
_NAMED = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


class UsageError(ValueError):
    """A bad command line or argument value: exit 2. `hint` is the tool's short usage."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def parse(usage: str, argv: list[str] | None, options_first: bool = False) -> dict[str, Any]:
    """docopt's reading of `argv`; a mistake raises UsageError. `--help` prints the usage and
    raises SystemExit, as docopt does."""
    try:
        return dict(docopt(usage, argv=argv, options_first=options_first))
    except DocoptExit as e:
        text = str(e)
        hint = text[text.index("Usage:") :].rstrip() if "Usage:" in text else ""
        raise UsageError(sentence(text.split("\n", 1)[0], usage), hint) from None


def sentence(problem: str, usage: str) -> str:
    """docopt's first line of complaint, `problem`, as a person would say it."""
    known = set(_NAMED.findall(usage))
    if problem.startswith("Warning: found unmatched"):
        said = []
        for short, long in _OPTION.findall(problem):
            name = long or short
            if name in known:
                said.append(f"{name} given twice, or with an option it cannot be used with")
            else:
                said.append(f"unknown option {name}")
        said += [f"unexpected argument {value!r}" for value in _ARGUMENT.findall(problem)]
        return "; ".join(dict.fromkeys(said)) or "arguments that do not fit the usage"
    if problem.endswith(" requires argument"):
        return f"{problem.removesuffix(' requires argument')} needs a value"
    if problem.endswith(" must not have an argument"):
        return f"{problem.removesuffix(' must not have an argument')} takes no value"
    if not problem or problem == "Usage:":
        return "missing or unexpected arguments"
    return problem


# The options that set each request field, for messages about values the command line gave.
FLAGS = {
    "max_attempts": "--attempts",
    "tags": "--tag",
    "groups": "--group",
    "depends_on": "--after",
    "command": "the command",
    "worker": "the worker's name",
    "jobs": "the job ids",
}
_PATH = re.compile(r"(?:^|(?<=; ))([A-Za-z_][\w.\[\]]*)(?=: )")


def flag_words(text: str) -> str:
    """A message about request fields (`jobs[0].cpus: must be ≤ 1000000`) in the words of the
    command line that set them (`--cpus: must be ≤ 1000000`)."""

    def one(m: re.Match[str]) -> str:
        parts = [p for p in re.split(r"[.\[\]]+", m.group(1)) if p and not p.isdigit()]
        while len(parts) > 1 and parts[0] in ("jobs", "set", "body"):
            parts.pop(0)
        field = parts[0] if parts else m.group(1)
        return FLAGS.get(field, "--" + field.replace("_", "-"))

    return _PATH.sub(one, text)
