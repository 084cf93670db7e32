"""Reading a command line with docopt, and saying in a sentence what was wrong with it.

docopt reports a mistake in its own terms (`found unmatched (duplicate?) arguments
[Option(None, '--bogus', 0, True)]`); a person should read `unknown option --bogus`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from docopt import DocoptExit, docopt
from docopt import parse_options as docopt_options

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


Explain = Callable[[list[str]], "str | None"]


def parse(
    usage: str,
    argv: list[str] | None,
    options_first: bool = False,
    many: str | None = None,
    explain: Explain | None = None,
) -> dict[str, Any]:
    """docopt's reading of `argv`; a mistake raises UsageError. `--help` prints the usage and
    raises SystemExit, as docopt does.

    `many` names a repeated positional argument (`TARGET...`) that may be given thousands of
    times: its words are set aside before docopt, whose matching is quadratic in the number of
    words (`banyan-cancel $(seq 80 100080)` spent 45 s in it), and docopt sees only the first.
    `explain`, given a command line docopt refused, says what is wrong with its positional
    words (a missing ID, a wrong role) in the tool's own terms, or None.
    """
    try:
        if many is None:
            return dict(docopt(usage, argv=argv, options_first=options_first))
        argv, words = split_words(usage, argv or [])
        args = dict(docopt(usage, argv=argv, options_first=options_first))
        args[many] = words
        return args
    except DocoptExit as e:
        text = str(e)
        hint = text[text.index("Usage:") :].rstrip() if "Usage:" in text else ""
        said = explain(split_words(usage, argv or [])[1]) if explain else None
        raise UsageError(
            said or sentence(text.split("\n", 1)[0], usage, argv or []), hint
        ) from None


def split_words(usage: str, argv: list[str]) -> tuple[list[str], list[str]]:
    """`argv` as docopt would read it with the positional words set aside: the options (with
    their values) plus `--` and the first word, and every positional word. An option that
    takes a value takes the next word, as in docopt, also when abbreviated."""
    options = docopt_options(usage[usage.find("Options:") :])
    takes = {o.longer: o.argcount for o in options if o.longer}
    takes |= {o.short: o.argcount for o in options if o.short}
    flags: list[str] = []
    words: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            words += argv[i:]
            break
        if not word.startswith("-") or word == "-":
            words.append(word)
            continue
        flags.append(word)
        if word.startswith("--"):
            name = word if word in takes else _abbreviated(word, takes)
            wants = "=" not in word and takes.get(name, 0) > 0
        else:  # -x VALUE, or -xVALUE with the value attached
            wants = len(word) == 2 and takes.get(word, 0) > 0
        if wants and i < len(argv):
            flags.append(argv[i])
            i += 1
    return ([*flags, "--", words[0]] if words else flags), words


def _abbreviated(word: str, takes: dict[str, int]) -> str:
    """The one long option `word` abbreviates, else `word` itself (docopt then complains)."""
    matches = [name for name in takes if name.startswith(word)]
    return matches[0] if len(matches) == 1 else word


def sentence(problem: str, usage: str, argv: list[str] | None = None) -> str:
    """docopt's first line of complaint, `problem`, about `argv`, as a person would say it."""
    known = set(_NAMED.findall(usage))
    if problem.startswith("Warning: found unmatched"):
        said = []
        for short, long in _OPTION.findall(problem):
            name = long or short
            if name in known:
                said.append(
                    _clash(name, usage, argv or [])
                    or f"{name} given twice, or with an option it cannot be used with"
                )
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


_ALTERNATIVES = re.compile(r"[\[(]([^\[\]()]*\|[^\[\]()]*)[\])]")


def _clash(name: str, usage: str, argv: list[str]) -> str | None:
    """Why option `name` does not fit: given twice, or with one the usage sets against it
    (`[--drain NAME | --resume NAME]`)."""
    words = argv[: argv.index("--")] if "--" in argv else argv
    given = [w.split("=", 1)[0] for w in words if w.startswith("-")]
    if given.count(name) > 1:
        return f"{name} given twice"
    pattern = usage[usage.find("Usage:") :].split("\n\n", 1)[0]
    for group in _ALTERNATIVES.findall(pattern):
        choices = [set(_NAMED.findall(choice)) for choice in group.split("|")]
        if not any(name in c for c in choices):
            continue
        others = [g for g in given if g != name and any(g in c for c in choices)]
        if others:
            first, second = sorted({name, others[0]}, key=given.index)
            return f"{first} and {second} cannot be used together"
    return None


# The options that set each request field, for messages about values the command line gave.
FLAGS = {
    "max_attempts": "--attempts",
    "tags": "--tag",
    "groups": "--group",
    "depends_on": "--after",
    "command": "the command",
    "worker": "the worker's name",
    "jobs": "the job ids",
    "environment": "--export",
    "body": "the request",
    "frame": "the request",
    # Limits set with banyan-users, named as the refusal names them, not as an option here.
    "max_queued": "max_queued",
    "max_running": "max_running",
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

    return _BOUND.sub(_bound, _PATH.sub(one, text))


# The wire's range refusals (`must be <= 1e+06, got 2e+06`), in words and plain numbers.
_BOUND = re.compile(r"must be (<=|>=|<|>) ([-+.\deE]+)(?:, got ([-+.\deE]+))?")
_RELATION = {"<=": "at most", ">=": "at least", "<": "less than", ">": "more than"}


def _bound(m: re.Match[str]) -> str:
    got = f" (got {_plain(m.group(3))})" if m.group(3) else ""
    return f"{_RELATION[m.group(1)]} {_plain(m.group(2))}{got}"


def _plain(number: str) -> str:
    if re.fullmatch(r"[-+]?\d+", number):
        return str(int(number))
    try:
        value = float(number)
    except ValueError:
        return number
    return str(int(value)) if value.is_integer() and abs(value) < 1e18 else f"{value:g}"
