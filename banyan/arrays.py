"""One job per item: `--each` lines and `--array` indices, `{}` in the command replaced.

An `--each` submission is expanded by the client. An array travels as one job spec (the
template) and its range, and the broker expands it while decoding (protocol.py): a 100,000-job
array is then a request of a few hundred bytes rather than megabytes to encode, send, decode
and check job by job.

Both are sized before they are built: `array_bytes` and `each_bytes` say how many bytes of job
text (see `text_bytes`) the expansion would make, by arithmetic over the range or the lines, so
a submission over `MAX_SUBMIT_BYTES` is refused without allocating it.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from banyan import defaults

INDEX_VAR = "BANYAN_ARRAY_INDEX"
# The largest index: a signed 64-bit integer, which a job's shell can still count with.
MAX_INDEX = 2**63 - 1
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: int() would also take `٣` and `1_000`
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
        rng, colon, step_text = part.strip().partition(":")
        lo_text, dash, hi_text = rng.partition("-")
        texts = [lo_text] + [hi_text] * bool(dash) + [step_text] * bool(colon)
        if not all(_DIGITS.fullmatch(t.strip()) for t in texts):
            raise ValueError(f"expected N-M or N-M:STEP, got {part!r}")
        lo = int(lo_text)
        hi = int(hi_text) if dash else lo
        step = int(step_text) if colon else 1
        if max(hi, step) > MAX_INDEX:
            raise ValueError(f"{part!r}: an index or step is at most {MAX_INDEX} (2^63 - 1)")
        if lo < 0 or hi < lo or step < 1:
            raise ValueError(f"{part!r} is empty or backwards (need 0 <= N <= M)")
        out.append(range(lo, hi + 1, step))
        total += len(out[-1])
        if total > limit:
            raise ValueError(f"over {limit} jobs in one submission")
    return out


def text_bytes(spec: dict[str, Any]) -> int:
    """The bytes of text one job spec carries (UTF-8): command, name, cwd, output, env names
    and values, tags and groups. Every job stores its own copy, so this is what a submission
    costs per job beyond its fixed fields."""
    n = 0
    for key in ("command", "name", "cwd", "output"):
        value = spec.get(key)
        if value:
            n += _utf8_len(value)
    for k, v in (spec.get("env") or {}).items():
        n += _utf8_len(k) + _utf8_len(v)
    for key in ("tags", "groups"):
        for value in spec.get(key) or ():
            n += _utf8_len(value)
    return n


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _holes(base: dict[str, Any]) -> int:
    """How many `{}` an item replaces in one job: in the command and the templated fields."""
    return sum((base.get(k) or "").count("{}") for k in ("command", *TEMPLATED))


def array_bytes(template: dict[str, Any], spec: str) -> int:
    """`text_bytes` summed over the jobs of an array, without making them: each index replaces
    every `{}` and adds $BANYAN_ARRAY_INDEX to the env."""
    count = digits = 0
    for r in ranges(spec):
        count += len(r)
        digits += _digit_sum(r)
    holes = _holes(template)
    per_job = text_bytes(template) - 2 * holes + len(INDEX_VAR)
    return count * per_job + digits * (holes + 1)


def _digit_sum(r: range) -> int:
    """Σ len(str(i)) for i in r (r ascending, from 0 up), one band of equal length at a time."""
    total, low = 0, 0
    for width in range(1, 21):
        high = 10**width  # [low, high) are the numbers of `width` digits
        first = max(0, -(-(low - r.start) // r.step))  # index of the first element >= low
        stop = max(0, -(-(high - r.start) // r.step))  # index of the first element >= high
        total += width * max(0, min(stop, len(r)) - min(first, len(r)))
        low = high
    return total


def each_bytes(base: dict[str, Any], items: list[str]) -> int:
    """`text_bytes` summed over the jobs `expand(base, items, index_env=False)` would make."""
    holes = _holes(base)
    total = len(items) * (text_bytes(base) - 2 * holes) + holes * sum(map(_utf8_len, items))
    if "{}" not in base["command"]:  # the item is appended as one quoted argument
        total += sum(1 + _utf8_len(shlex.quote(item)) for item in items)
    return total


def check_size(total: int, what: str) -> None:
    """Raise ValueError naming the limit when `total` bytes of job text are too many."""
    if total > defaults.MAX_SUBMIT_BYTES:
        raise ValueError(
            f"{what} makes {total} bytes of job text (command, name, cwd, output, env, "
            f"tags, groups), over the {defaults.MAX_SUBMIT_BYTES} bytes a submission may "
            "carry (MAX_SUBMIT_BYTES)"
        )


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
