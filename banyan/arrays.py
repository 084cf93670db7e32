"""One job per item: `--each` lines and `--array` indices, `{}` in the command replaced.

An `--each` submission is expanded by the client. An array travels as one job spec (the
template) and its range, and the broker expands it while decoding (protocol.py): a 100,000-job
array is then a request of a few hundred bytes rather than megabytes to encode, send, decode
and check job by job.
"""

from __future__ import annotations

import shlex
from typing import Any

from banyan import defaults

INDEX_VAR = "BANYAN_ARRAY_INDEX"
# Fields whose `{}` is replaced too; the command always is.
TEMPLATED = ("name", "output")


def indices(spec: str) -> list[str]:
    """`0-9`, `1-99:2`, `3` or a comma list of those, as strings ready to substitute.

    Raises ValueError saying what is wrong."""
    return [str(i) for r in ranges(spec) for i in r]


def count(spec: str) -> int:
    """How many indices `spec` names (ValueError as for `indices`), without listing them."""
    return sum(len(r) for r in ranges(spec))


def ranges(spec: str, limit: int = defaults.MAX_JOBS_PER_SUBMIT) -> list[range]:
    out: list[range] = []
    total = 0
    for part in spec.split(","):
        rng, _, step_text = part.strip().partition(":")
        lo_text, dash, hi_text = rng.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if dash else lo
            step = int(step_text) if step_text else 1
        except ValueError:
            raise ValueError(f"expected N-M or N-M:STEP, got {part!r}") from None
        if lo < 0 or hi < lo or step < 1:
            raise ValueError(f"{part!r} is empty or backwards (need 0 <= N <= M)")
        out.append(range(lo, hi + 1, step))
        total += len(out[-1])
        if total > limit:
            raise ValueError(f"over {limit} jobs in one submission")
    return out


def expand(base: dict[str, Any], items: list[str], index_env: bool) -> list[dict[str, Any]]:
    """One job per item with `{}` replaced: plain string work, fast for 100,000 items.

    Without `{}` in the command, `--each` appends the item as a quoted argument and an array
    leaves the command alone (the index is in $BANYAN_ARRAY_INDEX either way for arrays)."""
    if len(items) > defaults.MAX_JOBS_PER_SUBMIT:
        raise ValueError(f"over {defaults.MAX_JOBS_PER_SUBMIT} jobs in one submission")
    command: str = base["command"]
    in_command = "{}" in command
    templated = [k for k in TEMPLATED if "{}" in (base.get(k) or "")]
    env: dict[str, str] = base.get("env") or {}
    jobs = []
    for item in items:
        job = dict(base)
        if in_command:
            job["command"] = command.replace("{}", item)
        elif not index_env:
            job["command"] = f"{command} {shlex.quote(item)}"
        for key in templated:
            job[key] = base[key].replace("{}", item)
        if index_env:
            job["env"] = {**env, INDEX_VAR: item}
        jobs.append(job)
    return jobs
