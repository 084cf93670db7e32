"""Which of the submitter's environment variables a job gets: `--export`, as in `sbatch`.

    ALL                 every variable of the submitting process (the default)
    NONE                none: the job starts from its account's clean login environment
    VAR,VAR=value,...   only these: VAR as the submitter has it, VAR=value as given
    ALL,VAR=value,...   every variable, with these set or overridden

The worker starts every job from its owner's login environment (HOME, USER, LOGNAME, SHELL,
PATH), adds what was exported, sets HOME, USER, LOGNAME and SHELL from the account again, then
the job's own `--env`, then BANYAN_JOB_ID and the rest of its own. The daemons' variables never
travel: BANYAN_HOME (which leads to keys) and every other BANYAN_ name but BANYAN_BROKER are
left out when the environment is captured, and again on the worker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

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
        out.update(exported(environ))
        items = items[1:]
    for item in items:
        name, eq, value = item.partition("=")
        if not name or name.upper() in (ALL, NONE):
            raise ValueError(f"--export: {item!r} is not VAR or VAR=value")
        if not eq:
            if name not in environ:
                raise ValueError(f"--export: {name} is not set here; give {name}=VALUE")
            value = environ[name]
        if travels(name):
            out[name] = value
    return out
