"""Which of the submitter's environment variables a job gets: `--export`, as in `sbatch`.

    ALL                 every variable of the submitting process (the default)
    NONE                none: the job starts from its account's clean login environment
    VAR,VAR=value,...   only these: VAR as the submitter has it, VAR=value as given
    ALL,VAR=value,...   every variable, with these set or overridden

Only what a job's environment can carry travels: UTF-8 text (the wire is msgpack strings),
values of at most MAX_COMMAND_BYTES characters, MAX_ENV_ENTRIES variables and
MAX_ENVIRONMENT_BYTES in all. Under ALL a variable that is not UTF-8 (a shell may hold any
bytes; `sbatch` would pass them, Banyan cannot) is left out, and `left_out` names it so the
tools can say so; one named in the spec, or one too big, is refused by name.

The worker starts every job from its owner's login environment (HOME, USER, LOGNAME, SHELL,
PATH), adds what was exported, sets HOME, USER, LOGNAME and SHELL from the account again, then
the job's own `--env`, then BANYAN_JOB_ID and the rest of its own. The daemons' variables never
travel: BANYAN_HOME (which leads to keys) and every other BANYAN_ name but BANYAN_BROKER are
left out when the environment is captured, and again on the worker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from banyan import defaults

ALL, NONE = "ALL", "NONE"
KEPT = frozenset({"BANYAN_BROKER"})  # where the broker is: harmless, and lets jobs submit jobs


def travels(name: str) -> bool:
    """Whether a variable may go from a submitter to a job: none of the daemons' own."""
    return not name.startswith("BANYAN_") or name in KEPT


def exported(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if travels(k)}


def capture(
    spec: str | Sequence[str] | None = ALL, environ: Mapping[str, str] | None = None
) -> dict[str, str] | None:
    """The environment to send with a submission for `spec` (a --export string, or a list of
    its items); None exports nothing. Raises ValueError for a name this process lacks."""
    environ = os.environ if environ is None else environ
    if spec is None:
        return None
    items = [i.strip() for i in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not items or any(not i for i in items):
        raise ValueError(f"--export: expected ALL, NONE or VAR[,VAR=value...], got {spec!r}")
    head = items[0].upper()
    if head == NONE:
        if len(items) > 1:
            raise ValueError("--export: NONE takes nothing after it")
        return None
    out: dict[str, str] = {}
    if head == ALL:
        out.update((k, v) for k, v in exported(environ).items() if utf8(k) and utf8(v))
        items = items[1:]
    for item in items:
        name, eq, value = item.partition("=")
        if not name or name.upper() in (ALL, NONE):
            raise ValueError(f"--export: {item!r} is not VAR or VAR=value")
        if not eq:
            if name not in environ:
                raise ValueError(f"--export: {name} is not set here; give {name}=VALUE")
            value = environ[name]
        if not (utf8(name) and utf8(value)):
            raise ValueError(
                f"--export: {shown(name)} is not UTF-8 text, which a job's environment cannot "
                f"carry; give {shown(name)}=VALUE, or leave it out"
            )
        if travels(name):
            out[name] = value
    check_size(out)
    return out


_FIX = (
    "choose what the jobs get with --export NONE or --export VAR,VAR,..., or unset it for "
    "this command (env -u NAME ...)"
)


def check_size(env: Mapping[str, str]) -> None:
    """Raise ValueError, naming the variable and the way out, for an environment the broker
    would refuse: a name or value too long, too many variables, too many bytes in all."""
    for k, v in env.items():
        if len(k) > defaults.MAX_NAME:
            raise ValueError(
                f"--export: the variable {shown(k)} has a name of {len(k)} characters, over the "
                f"{defaults.MAX_NAME} a job's environment may carry; {_FIX}"
            )
        if len(v) > defaults.MAX_COMMAND_BYTES:
            raise ValueError(
                f"--export: {shown(k)} is {len(v)} characters long, over the "
                f"{defaults.MAX_COMMAND_BYTES} a variable may carry; {_FIX}"
            )
    if len(env) > defaults.MAX_ENV_ENTRIES:
        raise ValueError(
            f"--export: this shell has {len(env)} variables, over the "
            f"{defaults.MAX_ENV_ENTRIES} a job's environment may carry; {_FIX}"
        )
    size = sum(len(f"{k}={v}".encode()) + 1 for k, v in env.items())
    if size > defaults.MAX_ENVIRONMENT_BYTES:
        biggest = sorted(env, key=lambda k: -len(env[k]))[:3]
        raise ValueError(
            f"--export: the environment is {size} bytes, over the "
            f"{defaults.MAX_ENVIRONMENT_BYTES} a submission may carry (the biggest: "
            f"{', '.join(shown(k) for k in biggest)}); {_FIX}"
        )


def left_out(
    spec: str | Sequence[str] | None,
    captured: Mapping[str, str] | None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """The variables `ALL` in `spec` left out of `captured` for not being UTF-8, by `shown`."""
    environ = os.environ if environ is None else environ
    items = spec.split(",") if isinstance(spec, str) else list(spec or ())
    if captured is None or not items or items[0].strip().upper() != ALL:
        return []
    return [
        shown(k)
        for k, v in environ.items()
        if travels(k) and not (utf8(k) and utf8(v)) and k not in captured
    ]


def utf8(text: str) -> bool:
    """Whether `text` is UTF-8 text: os.environ holds other bytes as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(name: str) -> str:
    """A variable's name for a message: its undecodable bytes as \\xNN, at most 64 chars."""
    text = name.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
    return text if len(text) <= 64 else text[:63] + "…"
