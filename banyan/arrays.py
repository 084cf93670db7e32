"""One job per item: `--each` lines and `--array` indices, `{}` in the command replaced.

Both travel as one job spec (the template) with their items: an array as its range, `--each`
as its lines. The broker makes the jobs from them a slice at a time (broker/submission.py), so
a 100,000-job array is a request of a few hundred bytes rather than megabytes to encode, send,
decode and check job by job, and the broker never holds 100,000 job specs at once.

Both are sized before they are built: `array_bytes` and `each_bytes` say how many bytes of job
text (see `text_bytes`) the expansion would make, by arithmetic over the range or the lines, so
a submission over `MAX_SUBMIT_BYTES` is refused without allocating it; `longest` says which
item makes a field longest, so its limit is checked once rather than per job.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
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


def too_many(jobs: int) -> str:
    """The refusal of a submission of `jobs` jobs, naming its limit."""
    return (
        f"{jobs} jobs, over the {defaults.MAX_JOBS_PER_SUBMIT} one submission may hold "
        "(MAX_JOBS_PER_SUBMIT)"
    )


def window(spec: str, lo: int, hi: int) -> list[str]:
    """The indices at positions lo..hi-1 of the range `spec`, as strings, without listing the
    ones before them."""
    out: list[str] = []
    for r in ranges(spec):
        if hi <= 0:
            break
        if lo < len(r):
            out += map(str, r[max(lo, 0) : hi])
        lo, hi = lo - len(r), hi - len(r)
    return out


def ranges(spec: str) -> list[range]:
    """The ranges `spec` names, refused (ValueError) past MAX_JOBS_PER_SUBMIT indices in all.
    Counted as Python integers first: len() of a range past 2^63 - 1 items raises."""
    parts: list[tuple[int, int, int]] = []
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
        parts.append((lo, hi, step))
        total += (hi - lo) // step + 1
    if total > defaults.MAX_JOBS_PER_SUBMIT:
        raise ValueError(too_many(total))
    return [range(lo, hi + 1, step) for lo, hi, step in parts]


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
    """`text_bytes` summed over the jobs `expand(base, items, index_env=False)` would make.
    Counted with C loops over the lines (a broker checks 200,000 of them in a request)."""
    holes = _holes(base)
    ascii_only = all(map(str.isascii, items))
    size = sum(map(len, items)) if ascii_only else sum(map(_utf8_len, items))
    total = len(items) * (text_bytes(base) - 2 * holes) + holes * size
    if "{}" not in base["command"]:  # appended after a space, quoted as shlex.quote does
        quoted = list(filter(_UNSAFE, items))  # ' becomes '"'"', and two quotes around
        total += len(items) + size + 2 * len(quoted) + 4 * sum(x.count("'") for x in quoted)
    return total


# What shlex.quote leaves unquoted: a line with any other character is quoted.
_UNSAFE = re.compile(r"[^\w@%+=:,./-]", re.ASCII).search


def widest(spec: str) -> tuple[int, str] | None:
    """The position and text of the first index with the most digits: the one that makes each
    templated field longest (every `{}` becomes the index)."""
    best: tuple[int, str] | None = None
    at = 0
    for r in ranges(spec):
        if r and (best is None or len(str(r[-1])) > len(best[1])):
            width = len(str(r[-1]))
            first = max(0, -(-(10 ** (width - 1) - r.start) // r.step))  # first of that width
            best = (at + first, str(r[first]))
        at += len(r)
    return best


def expanded_lengths(base: dict[str, Any], item: str, index_env: bool) -> dict[str, int]:
    """The length each changing field of `expand(base, [item], index_env)` would have: the
    command in UTF-8 bytes, name and output in characters (as their limits count them)."""
    out: dict[str, int] = {}
    command: str = base["command"]
    holes = command.count("{}")
    if holes:
        out["command"] = _utf8_len(command) + holes * (_utf8_len(item) - 2)
    elif not index_env:
        out["command"] = _utf8_len(command) + 1 + _utf8_len(shlex.quote(item))
    for key in TEMPLATED:
        value = base.get(key) or ""
        holes = value.count("{}")
        if holes:
            out[key] = len(value) + holes * (len(item) - 2)
    return out


# The limit on each field an item changes, in the units expanded_lengths counts.
FIELD_LIMITS = {
    "command": defaults.MAX_COMMAND_BYTES,
    "name": defaults.MAX_NAME,
    "output": defaults.MAX_PATH,
}


def too_long(base: dict[str, Any], item: str, index_env: bool) -> tuple[str, int] | None:
    """The first field `item` makes longer than its limit, and its length."""
    for key, n in expanded_lengths(base, item, index_env).items():
        if n > FIELD_LIMITS[key]:
            return key, n
    return None


def first_too_long(base: dict[str, Any], items: list[str]) -> tuple[int, str, int] | None:
    """Of `--each` items, the position of the first that makes a field too long, the field
    and its length. Looks at every item only when the longest could: a bound from the
    longest item first (a quoted item is at most 5 times as long, plus its quotes)."""
    if not items:
        return None
    longest = max(items, key=len)
    if not all(map(str.isascii, items)):
        longest = max(items, key=_utf8_len)
    probe = expanded_lengths(base, longest, False)
    if "{}" not in base["command"]:  # appended quoted: ' becomes '"'"', and two quotes
        probe["command"] = _utf8_len(base["command"]) + 1 + 5 * _utf8_len(longest) + 2
    if all(probe[key] <= FIELD_LIMITS[key] for key in probe):
        return None
    for at, item in enumerate(items):
        found = too_long(base, item, False)
        if found is not None:
            return at, *found
    return None


def check_size(total: int, what: str) -> None:
    """Raise ValueError naming the limit when `total` bytes of job text are too many."""
    if total > defaults.MAX_SUBMIT_BYTES:
        raise ValueError(
            f"{what} makes {total} bytes of job text (command, name, cwd, output, env, "
            f"tags, groups), over the {defaults.MAX_SUBMIT_BYTES} bytes a submission may "
            "carry (MAX_SUBMIT_BYTES)"
        )


def expand(base: dict[str, Any], items: list[str], index_env: bool) -> list[dict[str, Any]]:
    """One job per item with `{}` replaced (see `changes`)."""
    if len(items) > defaults.MAX_JOBS_PER_SUBMIT:
        raise ValueError(too_many(len(items)))
    change = changes(base, index_env)
    return [{**base, **dict(change(item))} for item in items]


def changes(base: dict[str, Any], index_env: bool) -> Callable[[str], list[tuple[str, Any]]]:
    """What one item changes in `base`: its (field, value) pairs. Plain string work, so the
    broker can make a job's row from a template's row and these, with no spec in between.

    Without `{}` in the command, `--each` appends the item as a quoted argument and an array
    leaves the command alone (the index is in $BANYAN_ARRAY_INDEX either way for arrays)."""
    command: str = base["command"]
    in_command = "{}" in command
    templated = [(k, base[k]) for k in TEMPLATED if "{}" in (base.get(k) or "")]
    env: dict[str, str] = base.get("env") or {}

    def change(item: str) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        if in_command:
            out.append(("command", command.replace("{}", item)))
        elif not index_env:
            out.append(("command", f"{command} {shlex.quote(item)}"))
        out += [(key, value.replace("{}", item)) for key, value in templated]
        if index_env:
            out.append(("env", {**env, INDEX_VAR: item}))
        return out

    return change
