"""Wire messages: one schema per message type, and `encode` / `decode` that enforce them.

This module is the executable form of docs/protocol.md; read that page for the meaning of each
message. Every frame is a msgpack array `[version, type, req, body]`. `decode` turns any bytes into
either a `Message` whose body is complete (defaults filled in, ints widened to floats where a
number is expected) or a `ProtocolError`, never anything else, so the broker can feed it whatever
arrives on a socket. `encode` checks a body against the same schema before packing, so a bug on
the sending side shows up where it happens rather than as a refusal on the far end.

Some type names travel in more than one direction with different bodies (`drain`, `cancel`,
`heartbeat`, `error`). Passing the socket's type set (`CLIENT_REQUESTS`, `CLIENT_REPLIES`,
`WORKER_TO_BROKER`, `BROKER_TO_WORKER`) as `allowed` selects that direction's schemas; without
it a body is accepted if it fits any of them.

Requests into the broker are checked strictly. Replies from the broker are checked loosely: the
listed top-level keys with their types, while JobInfo, GroupInfo, WorkerInfo and `stats` are
free-form maps of plain data (string keys, finite numbers, bounded nesting).
"""

from __future__ import annotations

import gc
import itertools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import msgpack

from banyan import arrays, defaults
from banyan.defaults import PROTOCOL_VERSION

__all__ = [
    "BAD_REQUEST",
    "BROKER_TO_WORKER",
    "CLIENT_REPLIES",
    "CLIENT_REQUESTS",
    "ERROR_CODES",
    "FREE_DEPTH",
    "MAX_ATTEMPTS_LIMIT",
    "MAX_CANCEL_GRACE",
    "MAX_CPUS",
    "MAX_GPUS",
    "MAX_HEARTBEAT",
    "MAX_INT",
    "MAX_LIVENESS",
    "MAX_LOG_CHUNK",
    "MAX_MEMORY",
    "MAX_REASON",
    "MAX_SHARES",
    "MAX_SIGNAL",
    "MAX_TAG",
    "MAX_TIME",
    "MAX_TIME_LIMIT",
    "PROTOCOL_VERSION",
    "UNSUPPORTED_VERSION",
    "WORKER_TO_BROKER",
    "Message",
    "ProtocolError",
    "decode",
    "encode",
    "pack",
]

BAD_REQUEST: Final = "bad_request"
UNSUPPORTED_VERSION: Final = "unsupported_version"
ERROR_CODES: Final = frozenset(
    {
        BAD_REQUEST,
        UNSUPPORTED_VERSION,
        "not_found",
        "conflict",
        "forbidden",
        "no_space",
        "busy",
        "unavailable",
        "wrong_port",
        "internal",
    }
)

# Limits that docs/protocol.md states but defaults.py does not name; only the wire cares.
MAX_INT: Final = (1 << 63) - 1  # ids, req, offsets: everything must fit an int64 downstream
MAX_CPUS: Final = 1_000_000.0
MAX_MEMORY: Final = 1 << 40  # MiB
MAX_GPUS: Final = 1024
MAX_ATTEMPTS_LIMIT: Final = 1000
MAX_TIME_LIMIT: Final = 1e9
MAX_TIME: Final = 1e11  # a Unix time: year 5138
MAX_CANCEL_GRACE: Final = 86_400.0
MAX_REASON: Final = 1024
MAX_TAG: Final = 64
MAX_LOG_CHUNK: Final = 1 << 20
MAX_SIGNAL: Final = 127  # WTERMSIG is 7 bits
MAX_SHARES: Final = 1_000_000.0
# Not in the doc: past these a broker's settings are a mistake, not a choice.
MAX_HEARTBEAT: Final = 3600.0
MAX_LIVENESS: Final = 1000
# Free-form reply maps are ours, so this only has to be deeper than anything views.py builds;
# it also keeps the checker's recursion far from Python's limit whatever arrives.
FREE_DEPTH: Final = 8

_INT32_MIN: Final = -(1 << 31)
_INT32_MAX: Final = (1 << 31) - 1
_WIRE_INT_MIN: Final = -(1 << 63)  # what msgpack can carry at all
_WIRE_INT_MAX: Final = (1 << 64) - 1
_BIG: Final = 1 << 62  # "no length limit but the frame's": lists and strings in replies


class ProtocolError(Exception):
    """A frame or body that breaks docs/protocol.md.

    `code` is `bad_request` or `unsupported_version`; `reason` names the field path and the rule
    (`jobs[3].cpus: must be > 0, got -1`). `type` and `req` are set when the envelope could be
    read that far, so the server can answer with an `error` that echoes `req`; when `req` is None
    there is nobody to answer and the frame should be counted and dropped.
    """

    def __init__(
        self, code: str, reason: str, *, type: str | None = None, req: int | None = None
    ) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.type = type
        self.req = req

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Message:
    type: str
    req: int
    body: dict[str, Any]


# A frozen dataclass's __init__ goes through object.__setattr__ per field, which is a third of
# a small decode; decode fills the slots directly instead.
_new_object = object.__new__
_set_type = Message.__dict__["type"].__set__
_set_req = Message.__dict__["req"].__set__
_set_body = Message.__dict__["body"].__set__


def _message(mtype: str, req: int, body: dict[str, Any]) -> Message:
    m: Message = _new_object(Message)
    _set_type(m, mtype)
    _set_req(m, req)
    _set_body(m, body)
    return m


# --- validators ------------------------------------------------------------------------------
#
# A validator takes a value and returns it normalised, or raises _Bad. _Bad collects the path on
# the way out (innermost segment first), so the happy path never builds a path string.

Check = Callable[[Any], Any]


class _Bad(Exception):
    def __init__(self, rule: str, *segs: str, what: str | None = None, got: str = "") -> None:
        super().__init__(rule)
        self.rule = rule
        self.path: list[str] = list(reversed(segs))
        # Set for type mismatches, so `_nullable` can say "an int or null".
        self.what = what
        self.got = got

    def where(self) -> str:
        return "".join(reversed(self.path)).lstrip(".")


_TYPE_NAMES: Final[dict[type, str]] = {
    type(None): "null",
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
    bytes: "bytes",
    list: "array",
    tuple: "array",
    dict: "map",
}


def _tname(v: Any) -> str:
    return _TYPE_NAMES.get(type(v)) or type(v).__name__


def _show(v: Any) -> str:
    """A short rendering for a refusal; never repr() a whole hostile value (size, nesting)."""
    if isinstance(v, (str, bytes)):
        return repr(v[:60]) + ("..." if len(v) > 60 else "")
    if isinstance(v, int) and v.bit_length() > 128:
        return f"an int of {v.bit_length()} bits"  # str() refuses ints past 4300 digits
    if isinstance(v, (int, float)) or v is None:
        return repr(v)
    return f"a {_tname(v)}"


def _seg(key: Any) -> str:
    if isinstance(key, str) and key.isidentifier() and len(key) <= 64:
        return "." + key
    return f"[{_show(key)}]"


def _type_error(what: str, v: Any) -> NoReturn:
    got = _tname(v)
    raise _Bad(f"must be {what}, got {got}", what=what, got=got)


def _is_int(v: Any) -> bool:
    return type(v) is int or (isinstance(v, int) and not isinstance(v, bool))


# Each validator tries one cheap test for the common, valid case and leaves conversion and the
# wording of refusals to a slower path: decode is on the broker's hot path.


def _int(lo: int, hi: int, *, null: bool = False) -> Check:
    what = "an int or null" if null else "an int"

    def check(v: Any) -> Any:
        if type(v) is int and lo <= v <= hi:
            return v
        if v is None and null:
            return None
        if not _is_int(v):
            _type_error(what, v)
        v = int(v)
        if v < lo:
            raise _Bad(f"must be >= {lo}, got {_show(v)}")
        if v > hi:
            raise _Bad(f"must be <= {hi}, got {_show(v)}")
        return v

    return check


def _num(lo: float, hi: float, *, above: bool = False, null: bool = False) -> Check:
    """A finite number in [lo, hi] (or (lo, hi] when `above`); ints become floats."""
    what = "a number or null" if null else "a number"
    # A finite `hi` makes the fast test refuse inf; NaN fails every comparison anyway.
    hi = min(hi, sys.float_info.max)
    lo = max(lo, -sys.float_info.max)

    def slow(v: Any) -> Any:
        if v is None and null:
            return None
        if isinstance(v, float):
            v = float(v)
        elif _is_int(v):
            try:
                v = float(v)
            except OverflowError:
                raise _Bad(f"must be <= {hi:g}, got {_show(v)}") from None
        else:
            _type_error(what, v)
        if not math.isfinite(v):
            raise _Bad(f"must be a finite number, got {v!r}")
        if above:
            if v <= lo:
                raise _Bad(f"must be > {lo:g}, got {v:g}")
        elif v < lo:
            raise _Bad(f"must be >= {lo:g}, got {v:g}")
        if v > hi:
            raise _Bad(f"must be <= {hi:g}, got {v:g}")
        return v

    if above:

        def check(v: Any) -> Any:
            if type(v) is float and lo < v <= hi:
                return v
            return slow(v)

    else:

        def check(v: Any) -> Any:
            if type(v) is float and lo <= v <= hi:
                return v
            return slow(v)

    return check


def _str(lo: int = 0, hi: int = defaults.MAX_NAME, *, nul: bool = True) -> Check:
    """A str of lo..hi characters; `nul=False` refuses NUL, which execve cannot pass on."""

    def check(v: Any) -> Any:
        if type(v) is str and lo <= len(v) <= hi and (nul or "\0" not in v):
            return v
        if not isinstance(v, str):
            _type_error("a str", v)
        n = len(v)
        if n < lo:
            raise _Bad("must not be empty" if lo == 1 else f"must be at least {lo} characters")
        if n > hi:
            raise _Bad(f"must be at most {hi} characters, got {n}")
        if not nul and "\0" in v:
            raise _Bad("must not contain NUL")
        return v

    return check


def _utf8(lo: int, hi: int) -> Check:
    """A str of lo..hi bytes once encoded as UTF-8, without NUL (it ends up in argv)."""

    def check(v: Any) -> Any:
        if not isinstance(v, str):
            _type_error("a str", v)
        n = len(v)
        # Every character is 1..4 bytes, so the encode is only needed near the limit.
        if n * 4 > hi:
            n = len(v.encode("utf-8", "surrogatepass"))
        if n < lo:
            raise _Bad("must not be empty" if lo == 1 else f"must be at least {lo} bytes")
        if n > hi:
            raise _Bad(f"must be at most {hi} bytes of UTF-8, got {n}")
        if "\0" in v:
            raise _Bad("must not contain NUL")
        return v

    return check


def _bytes(hi: int) -> Check:
    def check(v: Any) -> Any:
        if type(v) is bytes and len(v) <= hi:
            return v
        if not isinstance(v, bytes):
            _type_error("bytes", v)
        if len(v) > hi:
            raise _Bad(f"must be at most {hi} bytes, got {len(v)}")
        return v

    return check


def _bool(v: Any) -> Any:
    if v is True or v is False:
        return v
    _type_error("a bool", v)


def _enum(*values: str) -> Check:
    # Mapping each value to itself turns a str enum member into its plain value on the way.
    canonical = {x: x for x in values}
    listed = ", ".join(repr(x) for x in values)

    def check(v: Any) -> Any:
        if not isinstance(v, str):
            _type_error("a str", v)
        plain = canonical.get(v)
        if plain is None:
            raise _Bad(f"must be one of {listed}, got {_show(v)}")
        return plain

    return check


def _nullable(inner: Check) -> Check:
    def check(v: Any) -> Any:
        if v is None:
            return None
        try:
            return inner(v)
        except _Bad as e:
            if e.what is not None and not e.path:
                e.rule = f"must be {e.what} or null, got {e.got}"
            raise

    return check


def _either(what: str, on_str: Check, on_int: Check) -> Check:
    """A name or an id: groups are addressed by either."""

    def check(v: Any) -> Any:
        if isinstance(v, str):
            return on_str(v)
        if _is_int(v):
            return on_int(v)
        _type_error(what, v)

    return check


def _refuse(rule: str) -> Check:
    """A field that is known but not allowed here, refused with a better word than "unknown"."""

    def check(v: Any) -> Any:
        raise _Bad(rule)

    return check


def _locate(item: Check, v: list[Any] | tuple[Any, ...]) -> NoReturn:
    """Re-run a failed list check one item at a time to name the index; validators are pure."""
    _locate_each([item] * len(v), v)


def _locate_each(checks: Sequence[Check], v: Sequence[Any]) -> NoReturn:
    for i, (check, x) in enumerate(zip(checks, v, strict=True)):
        try:
            check(x)
        except _Bad as e:
            e.path.append(f"[{i}]")
            raise
    raise AssertionError("a check failed on the whole but on no item")  # pragma: no cover


def _list(item: Check, hi: int, lo: int = 0) -> Check:
    def check(v: Any) -> Any:
        if type(v) is not list and not isinstance(v, (list, tuple)):
            _type_error("an array", v)
        n = len(v)
        if n > hi:
            raise _Bad(f"must have at most {hi} items, got {n}")
        if n < lo:
            raise _Bad(f"must have at least {lo} item{'s' if lo > 1 else ''}")
        try:
            return list(map(item, v))
        except _Bad:
            _locate(item, v)

    return check


def _row(shape: str, *items: Check) -> Check:
    """A fixed-arity array such as `[job, token]`; `shape` names the positions for the reader.

    Generated like `_record`: heartbeats carry one row per running job.
    """
    arity = len(items)

    def as_list(v: Any) -> list[Any]:
        if not isinstance(v, (list, tuple)):
            _type_error(f"an array {shape}", v)
        if len(v) != arity:
            raise _Bad(f"must be an array of {arity} items {shape}, got {len(v)} items")
        return list(v)

    def locate(v: list[Any]) -> NoReturn:
        _locate_each(items, v)

    env: dict[str, Any] = {"Bad": _Bad, "list": list, "len": len, "as_list": as_list}
    env.update({f"c{i}": c for i, c in enumerate(items)})
    env["locate"] = locate
    cells = ", ".join(f"c{i}(v[{i}])" for i in range(arity))
    source = f"""\
def check(v):
    if type(v) is not list or len(v) != {arity}:
        v = as_list(v)
    try:
        return [{cells}]
    except Bad:
        locate(v)
"""
    return _compiled(source, env)


def _compiled(source: str, env: dict[str, Any]) -> Check:
    """The function `check` that `source` defines, with `env` as its globals."""
    exec(source, env)
    generated: Check = env["check"]
    return generated


def _map(key: Check, value: Check, hi: int) -> Check:
    """A map with caller-chosen keys (env, groups by name)."""

    def check(v: Any) -> Any:
        if not isinstance(v, dict):
            _type_error("a map", v)
        if len(v) > hi:
            raise _Bad(f"must have at most {hi} entries, got {len(v)}")
        out = {}
        for k, x in v.items():
            try:
                k = key(k)
            except _Bad as e:
                e.rule = "key " + e.rule
                e.path.append(f"[{_show(k)}]")
                raise
            try:
                out[k] = value(x)
            except _Bad as e:
                e.path.append(_seg(k))
                raise
        return out

    return check


# What a field does when absent. Any other default is used as is, except that a list or dict
# is copied so that no two bodies share one.
_REQUIRED: Final = object()
_OMIT: Final = object()  # optional and left out when absent (DepSpec targets, modify's `set`)
_MISSING: Final = object()

Fields = dict[str, tuple[Check, Any]]
Post = Callable[[dict[str, Any]], None]


def _record(fields: Fields, post: Post | None = None, *, sparse: bool = False) -> Check:
    """A map with a fixed set of string keys: unknown keys refused, defaults filled in.

    The checker is generated as straight-line code, one block per field, because this is the
    inner loop of every decode and a generic loop over the field table costs about twice as much.
    `sparse` suits a map that usually carries few of many fields (a JobSpec): see _sparse.
    """
    full = _straight(fields, post)
    return _sparse(fields, post, full) if sparse else full


def _sparse(fields: Fields, post: Post | None, full: Check) -> Check:
    """A checker that visits only the fields present, over a copy of the defaults.

    A 100,000-job submission is 100,000 JobSpecs of 16 fields, most of them absent; this does
    a third of the work of `full` there. Anything wrong (unknown, missing or refused) goes to
    `full`, which reports it exactly as it would have: the checks are pure, so running one
    twice is harmless.
    """
    assert post is None and all(d is not _OMIT for _, d in fields.values())
    env: dict[str, Any] = {
        "Bad": _Bad,
        "dict": dict,
        "full": full,
        "unknown": _unknown,
        "get": {name: check for name, (check, _) in fields.items()}.get,
        # Defaults in field order, so `out` keeps the order `full` gives it. Lists and dicts
        # are placeholders here, replaced by fresh ones when absent so no two bodies share one.
        "template": {name: None if d is _REQUIRED else d for name, (_, d) in fields.items()},
    }
    required = [name for name, (_, d) in fields.items() if d is _REQUIRED]
    fresh = [(name, type(d)) for name, (_, d) in fields.items() if type(d) in (list, dict)]
    lines = [
        "def check(v):",
        "    if type(v) is not dict" + "".join(f" or {n!r} not in v" for n in required) + ":",
        "        return full(v)",
        "    out = template.copy()",
        "    try:",
        "        for k, x in v.items():",
        "            out[k] = get(k, unknown)(x)",
        "    except Bad:",
        "        return full(v)",
        *(f"    if {n!r} not in v: out[{n!r}] = {'[]' if t is list else '{}'}" for n, t in fresh),
        "    return out",
    ]
    return _compiled("\n".join(lines), env)


def _unknown(v: Any) -> NoReturn:
    raise _Bad("unknown field")


def _straight(fields: Fields, post: Post | None) -> Check:
    names = frozenset(fields)

    def unknown(v: dict[Any, Any]) -> None:
        for k in v:
            if k not in names:
                raise _Bad("unknown field", _seg(k))

    def missing(v: dict[Any, Any], seg: str) -> NoReturn:
        unknown(v)  # a misspelt field explains a missing one better than "missing" does
        raise _Bad("required field missing", seg)

    def as_dict(v: Any) -> dict[Any, Any]:
        if not isinstance(v, dict):
            _type_error("a map", v)
        return dict(v)

    env: dict[str, Any] = {
        "M": _MISSING,
        "Bad": _Bad,
        "dict": dict,
        "len": len,
        "unknown": unknown,
        "missing": missing,
        "as_dict": as_dict,
        "post": post,
    }
    lines = [
        "def check(v):",
        "    if type(v) is not dict:",
        "        v = as_dict(v)",
        "    get = v.get",
        "    out = {}",
        "    filled = 0",
    ]
    for i, (name, (check, default)) in enumerate(fields.items()):
        env[f"c{i}"] = check
        env[f"d{i}"] = default
        if default is _REQUIRED:
            absent = [f"missing(v, {_seg(name)!r})"]
        elif default is _OMIT:
            absent = ["pass"]
        elif type(default) in (list, dict):
            absent = [f"out[{name!r}] = {'[]' if type(default) is list else '{}'}", "filled += 1"]
        else:
            absent = [f"out[{name!r}] = d{i}", "filled += 1"]
        lines += [
            f"    x = get({name!r}, M)",
            "    if x is not M:",
            "        try:",
            f"            out[{name!r}] = c{i}(x)",
            "        except Bad as e:",
            f"            e.path.append({_seg(name)!r})",
            "            raise",
            "    else:",
            *("        " + line for line in absent),
        ]
    lines += [
        "    if len(out) - filled != len(v):",
        "        unknown(v)",
        *(["    post(out)"] if post is not None else []),
        "    return out",
    ]
    return _compiled("\n".join(lines), env)


def _free_value(x: Any, depth: int) -> None:
    """Plain msgpack data: what a reply's free-form maps may hold."""
    t = type(x)
    if t is str or t is bool or x is None or t is bytes:
        return
    if t is int:
        if not _WIRE_INT_MIN <= x <= _WIRE_INT_MAX:
            raise _Bad(f"int out of the 64-bit range, got {_show(x)}")
        return
    if t is float:
        if not math.isfinite(x):
            raise _Bad(f"must be a finite number, got {x!r}")
        return
    if t is dict or t is list or t is tuple:
        if depth <= 0:
            raise _Bad(f"nested deeper than {FREE_DEPTH} levels")
        if t is dict:
            for k, y in x.items():
                if type(k) is not str and not isinstance(k, str):
                    raise _Bad(f"map keys must be str, got {_tname(k)}", f"[{_show(k)}]")
                try:
                    _free_value(y, depth - 1)
                except _Bad as e:
                    e.path.append(_seg(k))
                    raise
        else:
            for i, y in enumerate(x):
                try:
                    _free_value(y, depth - 1)
                except _Bad as e:
                    e.path.append(f"[{i}]")
                    raise
        return
    # Subclasses (a str enum in a view, say) pack as their base type.
    if isinstance(x, (str, bytes)):
        return
    if isinstance(x, float):
        _free_value(float(x), depth)
        return
    if isinstance(x, int):
        _free_value(int(x), depth)
        return
    if isinstance(x, dict):
        _free_value(dict(x), depth)
        return
    if isinstance(x, (list, tuple)):
        _free_value(list(x), depth)
        return
    raise _Bad(f"must be plain data, got {_tname(x)}")


def _free(v: Any) -> Any:
    """A free-form map (JobInfo, GroupInfo, WorkerInfo, stats): string keys, plain data."""
    if type(v) is not dict and not isinstance(v, dict):
        _type_error("a map", v)
    _free_value(v, FREE_DEPTH)
    return v


# --- shared pieces ---------------------------------------------------------------------------

_ID = _int(1, MAX_INT)  # job ids, group ids, tokens, attempts
_INDEX = _int(0, MAX_INT)
_ANY_INT = _int(_WIRE_INT_MIN, _WIRE_INT_MAX)
_ANY_NUM = _num(-math.inf, math.inf)  # still finite: _num clamps to the float range
_NAME = _str(1, defaults.MAX_NAME)
_GROUP_REF = _either("a group name (str) or id (int)", _NAME, _ID)
_REASON = _str(0, MAX_REASON)
_STREAM = _enum("stdout", "stderr")
_TAGS = _list(_str(1, MAX_TAG), defaults.MAX_TAGS)
_JOB_IDS = _list(_ID, defaults.MAX_JOBS_PER_SUBMIT)
_GROUP_REFS = _list(_GROUP_REF, defaults.MAX_GROUPS_PER_SUBMIT)
_STATES = ("inactive", "available", "running", "pending_cancellation", "terminated", "cancelled")

_COMMAND = _utf8(1, defaults.MAX_COMMAND_BYTES)
_CWD = _nullable(_str(0, defaults.MAX_PATH, nul=False))
_OUTPUT = _nullable(_str(0, defaults.MAX_PATH, nul=False))
_TIME_LIMIT = _num(0.0, MAX_TIME_LIMIT, above=True, null=True)
_CANCEL_GRACE = _num(0.0, MAX_CANCEL_GRACE)


_ENV_NAME = _str(1, defaults.MAX_NAME, nul=False)


def _env_key(v: Any) -> Any:
    # execve cannot pass a name with "=" in it: the job would fail on every worker.
    if "=" in _ENV_NAME(v):
        raise _Bad("must not contain '='")
    return v


_ENV_MAP = _map(_env_key, _str(0, defaults.MAX_COMMAND_BYTES, nul=False), defaults.MAX_ENV_ENTRIES)


def _env(v: Any) -> Any:
    """_ENV_MAP, with the common case inlined: every job of an --array carries an env."""
    if type(v) is dict and len(v) <= defaults.MAX_ENV_ENTRIES:
        for k, x in v.items():
            if not (
                type(k) is str
                and type(x) is str
                and 0 < len(k) <= defaults.MAX_NAME
                and len(x) <= defaults.MAX_COMMAND_BYTES
                and "=" not in k
                and "\0" not in k
                and "\0" not in x
            ):
                return _ENV_MAP(v)  # says what is wrong
        return dict(v)
    return _ENV_MAP(v)


_ENV = _env


# The last environment `_environment` passed. A client sends the same one with every submit,
# and checking it whole again cost more than the rest of a small submit's decode.
_passed: list[dict[str, str]] = [{}]


def _environment(v: Any) -> Any:
    """A submitter's exported environment: an env map, bounded in bytes as a whole too."""
    last = _passed[0]
    if type(v) is dict and v == last and last:  # equal str to str: the same, checked map
        return last
    env = _env(v)
    size = sum(len(k) + len(x) + 2 for k, x in env.items())  # NAME=VALUE and its NUL
    if size * 4 > defaults.MAX_ENVIRONMENT_BYTES:  # characters are 1-4 bytes: count exactly
        size = sum(len(f"{k}={x}".encode("utf-8", "surrogatepass")) + 1 for k, x in env.items())
    if size > defaults.MAX_ENVIRONMENT_BYTES:
        raise _Bad(
            f"is {size} bytes, over the {defaults.MAX_ENVIRONMENT_BYTES}-byte limit "
            "(export fewer variables)"
        )
    _passed[0] = env
    return env


_ENVIRONMENT = _nullable(_environment)
_UMASK = _nullable(_int(0, 0o777))


def _dep_spec(local: bool) -> Check:
    """DepSpec: exactly one of job, group, local. `local` exists only inside a submission."""
    fields: Fields = {
        "kind": (_enum("after", "after_any", "after_fail"), "after"),
        "job": (_ID, _OMIT),
        "group": (_GROUP_REF, _OMIT),
    }
    if local:
        fields["local"] = (_int(0, defaults.MAX_JOBS_PER_SUBMIT - 1), _OMIT)
    else:
        fields["local"] = (_refuse("only valid in submit, where it indexes the jobs sent"), _OMIT)

    def one_target(d: dict[str, Any]) -> None:
        n = len(d) - 1  # every key but `kind` is a target
        if n != 1:
            names = "job, group or local" if local else "job or group"
            got = "none" if n == 0 else " and ".join(k for k in d if k != "kind")
            raise _Bad(f"must name exactly one of {names}, got {got}")

    return _record(fields, one_target)


_JOB_FIELDS: Final[Fields] = {
    "command": (_COMMAND, _REQUIRED),
    "name": (_str(0, defaults.MAX_NAME), ""),
    "cwd": (_CWD, None),
    "env": (_ENV, {}),
    "cpus": (_num(0.0, MAX_CPUS, above=True), float(defaults.CPUS)),
    "memory": (_int(0, MAX_MEMORY), defaults.MEMORY_MIB),
    "gpus": (_int(0, MAX_GPUS), defaults.GPUS),
    "tags": (_TAGS, []),
    "priority": (_int(_INT32_MIN, _INT32_MAX), defaults.PRIORITY),
    "max_attempts": (_int(1, MAX_ATTEMPTS_LIMIT), defaults.MAX_ATTEMPTS),
    "time_limit": (_TIME_LIMIT, None),
    "cancel_grace": (_CANCEL_GRACE, float(defaults.CANCEL_GRACE)),
    "output": (_OUTPUT, None),
    "depends_on": (_list(_dep_spec(local=True), defaults.MAX_DEPS_PER_JOB), []),
    "groups": (_list(_NAME, defaults.MAX_TAGS), []),
    "hold": (_bool, False),
    "umask": (_UMASK, None),
}
_JOB_SPEC = _record(_JOB_FIELDS, sparse=True)
# An --each line: its job's command (or name, output) with `{}` replaced by it is checked whole.
_EACH_ITEM = _str(1, defaults.MAX_COMMAND_BYTES, nul=False)
_EACH_ITEMS = _list(_EACH_ITEM, defaults.MAX_JOBS_PER_SUBMIT)


def _each(v: Any) -> Any:
    """_EACH_ITEMS, with loops in C for the common case: 200,000 lines checked one call each
    took a broker 0.1 s. Anything wrong goes to _EACH_ITEMS, which says what."""
    if (
        type(v) is list
        and len(v) <= defaults.MAX_JOBS_PER_SUBMIT
        and all(map(str.__instancecheck__, v))
        and min(map(len, v), default=1) >= 1
        and max(map(len, v), default=0) <= defaults.MAX_COMMAND_BYTES
        and not any(map(str.__contains__, v, itertools.repeat("\0")))
    ):
        return v
    return _EACH_ITEMS(v)


_GROUP_SPEC = _record({"name": (_NAME, _REQUIRED), "open": (_bool, False)})

# The doc's list of fields `modify` may set is every JobSpec field but membership and holding,
# which have their own requests.
_MODIFIABLE = tuple(name for name in _JOB_FIELDS if name not in ("groups", "hold"))
_MODIFY_SET = _record(
    {
        name: (
            _list(_dep_spec(local=False), defaults.MAX_DEPS_PER_JOB)
            if name == "depends_on"
            else _JOB_FIELDS[name][0],
            _OMIT,
        )
        for name in _MODIFIABLE
    }
)


def _submit_post(body: dict[str, Any]) -> None:
    # Cross-item rules the per-item schemas cannot see.
    jobs = body["jobs"]
    njobs = len(jobs)
    for i, job in enumerate(jobs):
        for j, dep in enumerate(job["depends_on"]):
            local = dep.get("local")
            if local is None:
                continue
            where = (".jobs", f"[{i}]", ".depends_on", f"[{j}]", ".local")
            if local >= njobs:
                raise _Bad(f"must be < {njobs} (jobs in this submission), got {local}", *where)
            if local == i:
                raise _Bad("must not name the job itself", *where)
    seen: dict[str, int] = {}
    for i, group in enumerate(body["groups"]):
        first = seen.setdefault(group["name"], i)
        if first != i:
            raise _Bad(f"duplicate of groups[{first}].name", ".groups", f"[{i}]", ".name")
    if body["array"] is not None:
        _check_array(body["array"], jobs)
    if body["each"] is not None:
        _check_each(body["each"], jobs, body["array"])


def _template(jobs: list[dict[str, Any]], field: str) -> dict[str, Any]:
    if len(jobs) != 1:
        raise _Bad(f"needs exactly one job, the template, in jobs (got {len(jobs)})", field)
    return jobs[0]


def _check_array(spec: str, jobs: list[dict[str, Any]]) -> None:
    """An array's one template and its range. Its jobs are made by the broker, a slice at a
    time; what an index changes is checked here for the index that makes it longest."""
    template = _template(jobs, ".array")
    try:
        arrays.count(spec)
    except ValueError as e:
        raise _Bad(str(e), ".array") from None
    if len(template["env"]) >= defaults.MAX_ENV_ENTRIES:
        where = ".jobs[0].env"
        raise _Bad(f"over {defaults.MAX_ENV_ENTRIES} entries with {arrays.INDEX_VAR}", where)
    try:
        arrays.check_size(arrays.array_bytes(template, spec), "the array")
    except ValueError as e:
        raise _Bad(str(e), ".array") from None
    widest = arrays.widest(spec)
    found = None if widest is None else arrays.too_long(template, widest[1], index_env=True)
    if widest is not None and found is not None:
        _too_long(widest[0], *found)


def _check_each(items: list[str], jobs: list[dict[str, Any]], array: str | None) -> None:
    """`--each` lines with their one template: sized as the jobs they make, whose command,
    name and output must keep within their limits."""
    if array is not None:
        raise _Bad("an array and each lines cannot go together", ".each")
    template = _template(jobs, ".each")
    try:
        arrays.check_size(arrays.each_bytes(template, items), f"{len(items)} each lines")
    except ValueError as e:
        raise _Bad(str(e), ".each") from None
    found = arrays.first_too_long(template, items)
    if found is not None:
        _too_long(*found)


def _too_long(at: int, key: str, n: int) -> NoReturn:
    """The refusal of job `at` of an array or each lines, as its own JobSpec would get it."""
    unit = "bytes of UTF-8" if key == "command" else "characters"
    rule = f"must be at most {arrays.FIELD_LIMITS[key]} {unit}, got {n}"
    raise _Bad(rule, ".jobs", f"[{at}]", f".{key}")


def _modify_post(body: dict[str, Any]) -> None:
    if body["hold"] and body["release"]:
        raise _Bad("hold and release cannot both be true", ".release")


def _modify_many_post(body: dict[str, Any]) -> None:
    _modify_post(body)
    if not body["jobs"] and body["select"] is None:
        raise _Bad("name jobs, or a selector in select", ".jobs")
    if not body["set"] and not body["hold"] and not body["release"]:
        raise _Bad("nothing to change: give set, hold or release", ".set")


def _selector_post(body: dict[str, Any]) -> None:
    for i, (first, last) in enumerate(body["ids"]):
        if first > last:
            raise _Bad(f"{first}-{last} is backwards", ".ids", f"[{i}]")
    if not body["ids"] and all(body[k] is None for k in ("owner", "state", "name", "group")):
        raise _Bad("must name at least one of ids, owner, state, name or group")


# Which jobs a bulk request means: every criterion given must hold (banyan/broker/selectors.py).
_SELECTOR = _nullable(
    _record(
        {
            "ids": (_list(_row("[first, last]", _ID, _ID), defaults.MAX_SELECT_RANGES), []),
            "owner": (_nullable(_NAME), None),
            "state": (_nullable(_enum(*_STATES)), None),
            "name": (_nullable(_NAME), None),
            "group": (_nullable(_GROUP_REF), None),
        },
        _selector_post,
    )
)


def _result_post(body: dict[str, Any]) -> None:
    # The state machine tells success from failure by exit_code; an exit with neither is noise.
    if body["outcome"] == "exited" and body["exit_code"] is None and body["signal"] is None:
        raise _Bad("an 'exited' result needs exit_code or signal", ".exit_code")


_JOB_TOKEN: Final[Fields] = {"job": (_ID, _REQUIRED), "token": (_ID, _REQUIRED)}


# --- schemas, one per message type and direction ----------------------------------------------

_CLIENT_REQUEST_SCHEMAS: Final[dict[str, Check]] = {
    "ping": _record({}),
    "submit": _record(
        {
            "jobs": (_list(_JOB_SPEC, defaults.MAX_JOBS_PER_SUBMIT), []),
            "groups": (_list(_GROUP_SPEC, defaults.MAX_GROUPS_PER_SUBMIT), []),
            "submit_key": (_nullable(_NAME), None),
            "array": (_nullable(_str(1, defaults.MAX_NAME)), None),
            "each": (_nullable(_each), None),
            "environment": (_ENVIRONMENT, None),
        },
        _submit_post,
    ),
    "cancel": _record(
        {
            "jobs": (_JOB_IDS, []),
            "groups": (_GROUP_REFS, []),
            "reason": (_nullable(_REASON), None),
            "select": (_SELECTOR, None),
            # A named job or group that is missing or not the sender's is listed in the reply's
            # `errors` rather than refusing the whole request.
            "each": (_bool, False),
        }
    ),
    "modify_many": _record(
        {
            "jobs": (_JOB_IDS, []),
            "select": (_SELECTOR, None),
            "set": (_MODIFY_SET, {}),
            "hold": (_bool, False),
            "release": (_bool, False),
        },
        _modify_many_post,
    ),
    "modify": _record(
        {
            "job": (_ID, _REQUIRED),
            "set": (_MODIFY_SET, {}),
            "hold": (_bool, False),
            "release": (_bool, False),
        },
        _modify_post,
    ),
    "close_group": _record({"group": (_GROUP_REF, _REQUIRED)}),
    "status": _record(
        {
            "jobs": (_JOB_IDS, []),
            "group": (_nullable(_GROUP_REF), None),
            "state": (_nullable(_enum(*_STATES)), None),
            "owner": (_nullable(_str(1, defaults.MAX_NAME)), None),
            "all": (_bool, False),
            "limit": (_int(1, defaults.MAX_JOBS_PER_SUBMIT), defaults.STATUS_LIMIT),
            "detail": (_bool, False),
            "name": (_nullable(_NAME), None),
            "since": (_num(0.0, MAX_TIME, null=True), None),
            "until": (_num(0.0, MAX_TIME, null=True), None),
            "cursor": (_nullable(_ID), None),
            # A named job that is missing is listed in the reply's `errors`, not refused.
            "each": (_bool, False),
        }
    ),
    "wait": _record(
        {
            "jobs": (_JOB_IDS, []),
            "groups": (_GROUP_REFS, []),
            "timeout": (_num(0.0, MAX_TIME_LIMIT, null=True), None),
        }
    ),
    "workers": _record({}),
    "drain": _record({"worker": (_NAME, _REQUIRED), "resume": (_bool, False)}),
    "forget": _record({"worker": (_NAME, _REQUIRED)}),
    "stats": _record({}),
    "users": _record({}),
    "set_user": _record(
        {
            "name": (_NAME, _REQUIRED),
            "set": (
                _record(
                    {
                        "shares": (_num(0.0, MAX_SHARES, above=True), _OMIT),
                        "max_running": (_int(0, MAX_INT, null=True), _OMIT),
                        "max_queued": (_int(0, MAX_INT, null=True), _OMIT),
                    }
                ),
                {},
            ),
        }
    ),
    "events": _record(
        {
            "since": (_INDEX, 0),
            "limit": (_int(1, defaults.EVENTS_LIMIT), defaults.EVENTS_LIMIT),
            # Seconds to wait for an event at or after `since` when there is none yet.
            "wait": (_num(0.0, defaults.EVENTS_WAIT_MAX, null=True), None),
        }
    ),
    "logs": _record(
        {
            "job": (_ID, _REQUIRED),
            "stream": (_STREAM, "stdout"),
            "offset": (_INDEX, 0),
            "limit": (_int(1, MAX_LOG_CHUNK), MAX_LOG_CHUNK),
        }
    ),
}

_ERROR = _record(
    {
        "code": (_enum(*sorted(ERROR_CODES)), _REQUIRED),
        "message": (_str(0, _BIG), ""),
    }
)
_INT_LIST = _list(_ANY_INT, _BIG)
_FREE_LIST = _list(_free, _BIG)
# Per named target (a job id, or a group's name or id): why it was passed over.
_TARGET = _either("a job id (int) or a group's name (str) or id", _str(0, _BIG), _ANY_INT)
_TARGET_ERRORS = _list(_row("[target, code, message]", _TARGET, _str(0, _BIG), _str(0, _BIG)), _BIG)
_EVENT = _row(
    "[seq, time, job, from, to, reason]",
    _ANY_INT,
    _ANY_NUM,
    _ANY_INT,
    _nullable(_str(0, _BIG)),
    _str(0, _BIG),
    _nullable(_str(0, _BIG)),
)

_CLIENT_REPLY_SCHEMAS: Final[dict[str, Check]] = {
    "pong": _record({"version": (_ANY_INT, _REQUIRED), "time": (_ANY_NUM, _REQUIRED)}),
    "submitted": _record(
        {
            "jobs": (_INT_LIST, _REQUIRED),
            "groups": (_map(_str(0, _BIG), _ANY_INT, _BIG), _REQUIRED),
        }
    ),
    "cancelled": _record(
        {
            "cancelled": (_INT_LIST, _REQUIRED),
            "pending": (_INT_LIST, _REQUIRED),
            "already": (_INT_LIST, _REQUIRED),
            "errors": (_TARGET_ERRORS, _OMIT),
        }
    ),
    "modified": _record(
        {
            "modified": (_INT_LIST, _REQUIRED),
            "skipped": (_list(_row("[job, reason]", _ANY_INT, _str(0, _BIG)), _BIG), _REQUIRED),
        }
    ),
    "job": _record({"job": (_free, _REQUIRED)}),
    "group": _record({"group": (_free, _REQUIRED)}),
    "status": _record(
        {
            "jobs": (_FREE_LIST, _REQUIRED),
            "groups": (_FREE_LIST, _REQUIRED),
            "truncated": (_bool, _REQUIRED),
            "next": (_nullable(_ANY_INT), None),
            "counts": (_map(_str(0, _BIG), _ANY_INT, _BIG), {}),
            "matched": (_nullable(_ANY_INT), None),
            "exact": (_bool, True),
            "errors": (_TARGET_ERRORS, _OMIT),
        }
    ),
    "waited": _record({"jobs": (_FREE_LIST, _REQUIRED), "timed_out": (_bool, _REQUIRED)}),
    "workers": _record({"workers": (_FREE_LIST, _REQUIRED)}),
    "stats": _free,
    "users": _record({"users": (_FREE_LIST, _REQUIRED)}),
    "events": _record({"events": (_list(_EVENT, _BIG), _REQUIRED), "next": (_ANY_INT, _REQUIRED)}),
    "logs": _record(
        {
            "data": (_bytes(_BIG), _REQUIRED),
            "offset": (_ANY_INT, _REQUIRED),
            "size": (_ANY_INT, _REQUIRED),
            "live": (_bool, _REQUIRED),
            "eof": (_bool, _REQUIRED),
            "tail": (_bool, False),
        }
    ),
    "error": _ERROR,
}

_CPU_PERCENT = _num(0.0, math.inf, null=True)
_RSS = _int(0, MAX_INT, null=True)
_DURATION = _num(0.0, 1e9)  # seconds, measured by one clock

_WORKER_TO_BROKER_SCHEMAS: Final[dict[str, Check]] = {
    "register": _record(
        {
            "name": (_NAME, _REQUIRED),
            "host": (_str(0, defaults.MAX_NAME), ""),
            "cpus": (_num(0.0, MAX_CPUS, above=True), _REQUIRED),
            "memory": (_int(0, MAX_MEMORY), _REQUIRED),
            "gpus": (_int(0, MAX_GPUS), _REQUIRED),
            "tags": (_TAGS, []),
            "running": (_list(_row("[job, token]", _ID, _ID), _BIG), []),
            "pid": (_INDEX, _REQUIRED),
            "only_account": (_nullable(_NAME), None),
            "refused": (_map(_NAME, _REASON, defaults.MAX_REFUSED_ACCOUNTS), {}),
            # One per worker process: a new connection of the same process may take over its
            # name's session; another process may not while that session is alive.
            "instance": (_str(0, 64), ""),
            "draining": (_bool, False),  # it is stopping (its own SIGTERM): assign nothing
            # Its spool directory: where status says a job's output files are.
            "spool": (_str(0, defaults.MAX_PATH, nul=False), ""),
            # Jobs it may hold ahead, beyond its free room (SPEC §5); null: the broker's default.
            "prefetch": (_int(0, defaults.MAX_PREFETCH, null=True), None),
        }
    ),
    # The worker's first SIGTERM or SIGINT (named in `reason`): claim nothing more for it.
    "draining": _record({"reason": (_str(0, 64), "")}),
    # It has nothing left to run or report and exits: shown as `stopped`, not `lost`.
    "stopping": _record({}),
    # `running` is required: an empty heartbeat would claim the worker runs nothing.
    "heartbeat": _record(
        {
            "running": (
                _list(_row("[job, token, cpu_percent, rss]", _ID, _ID, _CPU_PERCENT, _RSS), _BIG),
                _REQUIRED,
            )
        }
    ),
    # `ahead`: how many jobs the worker asks to have held ahead now (SPEC §5); absent: as many
    # as its prefetch allows.
    "claim": _record(
        {
            "max": (_int(1, defaults.MAX_CLAIM), _REQUIRED),
            "ahead": (_int(0, defaults.MAX_PREFETCH, null=True), None),
        }
    ),
    # pid is only shown to people; 0 stands for "not known" (register's pid likewise). `age`:
    # seconds since the job started, as the worker reports it a little later (durations, not
    # times, so the two clocks need not agree).
    "started": _record({**_JOB_TOKEN, "pid": (_INDEX, _REQUIRED), "age": (_DURATION, 0.0)}),
    # An assigned job this worker cannot run as its account, and did not start.
    "hand_back": _record({**_JOB_TOKEN, "reason": (_REASON, _REQUIRED)}),
    # A job it held ahead and never started, nor will: asked back, cancelled, or it drains.
    "returned": _record({**_JOB_TOKEN, "reason": (_REASON, _REQUIRED)}),
    "progress": _record(
        {
            **_JOB_TOKEN,
            "percent": (_num(0.0, 100.0, null=True), None),
            "message": (_str(0, defaults.PROGRESS_MESSAGE_MAX), ""),
            "cpu_percent": (_CPU_PERCENT, None),
            "rss": (_RSS, None),
        }
    ),
    "result": _record(
        {
            **_JOB_TOKEN,
            "outcome": (_enum("exited", "cancelled", "timeout"), _REQUIRED),
            "exit_code": (_int(_INT32_MIN, _INT32_MAX, null=True), None),
            "signal": (_int(1, MAX_SIGNAL, null=True), None),
            "stdout_tail": (_bytes(defaults.OUTPUT_TAIL_BYTES), b""),
            "stderr_tail": (_bytes(defaults.OUTPUT_TAIL_BYTES), b""),
            "runtime": (_num(0.0, 1e9, null=True), None),
            # Jobs it held ahead and started in the room this one freed: [[job, token], ...].
            "then": (_list(_row("[job, token]", _ID, _ID), defaults.MAX_PREFETCH), []),
        },
        _result_post,
    ),
    "log_chunk": _record(
        {
            "request": (_INDEX, _REQUIRED),
            "data": (_bytes(MAX_LOG_CHUNK), b""),
            "offset": (_INDEX, 0),
            "size": (_INDEX, 0),
            "eof": (_bool, False),
            "error": (_nullable(_REASON), None),
        }
    ),
}

_ASSIGNMENT = _record(
    {
        **_JOB_TOKEN,
        "attempt": (_ID, _REQUIRED),
        "command": (_COMMAND, _REQUIRED),
        "cwd": (_CWD, None),
        "env": (_ENV, {}),
        "gpu_ids": (_list(_int(0, MAX_GPUS - 1), MAX_GPUS), []),
        "time_limit": (_TIME_LIMIT, None),
        "cancel_grace": (_CANCEL_GRACE, float(defaults.CANCEL_GRACE)),
        "output": (_OUTPUT, None),
        "account": (_NAME, _REQUIRED),
        "environ": (_nullable(_str(1, 64)), None),
        "umask": (_UMASK, None),
        # What the job reserved: for its environment (BANYAN_CPUS, BANYAN_MEMORY_MB) and, held
        # ahead (SPEC §5), to start it when a slot has room for `cpus` and `memory`.
        "ahead": (_bool, False),
        "cpus": (_num(0.0, MAX_CPUS), float(defaults.CPUS)),
        "memory": (_int(0, MAX_MEMORY), defaults.MEMORY_MIB),
    }
)

_BROKER_TO_WORKER_SCHEMAS: Final[dict[str, Check]] = {
    "registered": _record(
        {
            "heartbeat": (_num(0.0, MAX_HEARTBEAT, above=True), _REQUIRED),
            "liveness": (_int(1, MAX_LIVENESS), _REQUIRED),
            # The broker's Unix account: a root worker refuses its jobs as it refuses root's.
            "broker_account": (_nullable(_NAME), None),
        }
    ),
    "assign": _record(
        {
            "jobs": (_list(_ASSIGNMENT, defaults.MAX_CLAIM, lo=1), _REQUIRED),
            "environments": (_map(_str(1, 64), _environment, defaults.MAX_CLAIM), {}),
        }
    ),
    # The broker writes this reason, sometimes from a dependency's; only the frame bounds it.
    "cancel": _record({**_JOB_TOKEN, "reason": (_str(0, _BIG), "")}),
    "kill_stale": _record(_JOB_TOKEN),
    # Give back this job held ahead if it has not started (`returned`); if it has, say nothing
    # more: its `started` went first, and it stays where it runs.
    "revoke": _record(_JOB_TOKEN),
    "ack": _record(_JOB_TOKEN),
    "drain": _record({"resume": (_bool, False)}),
    "heartbeat": _record({}),
    "reregister": _record({}),
    "fetch_log": _record(
        {
            "request": (_INDEX, _REQUIRED),
            **_JOB_TOKEN,
            "stream": (_STREAM, "stdout"),
            "offset": (_INDEX, 0),
            "limit": (_int(1, MAX_LOG_CHUNK), MAX_LOG_CHUNK),
        }
    ),
    "error": _ERROR,
}

CLIENT_REQUESTS: Final = frozenset(_CLIENT_REQUEST_SCHEMAS)
CLIENT_REPLIES: Final = frozenset(_CLIENT_REPLY_SCHEMAS)
WORKER_TO_BROKER: Final = frozenset(_WORKER_TO_BROKER_SCHEMAS)
BROKER_TO_WORKER: Final = frozenset(_BROKER_TO_WORKER_SCHEMAS)

_DIRECTIONS: Final = (
    ("client request", _CLIENT_REQUEST_SCHEMAS),
    ("client reply", _CLIENT_REPLY_SCHEMAS),
    ("worker to broker", _WORKER_TO_BROKER_SCHEMAS),
    ("broker to worker", _BROKER_TO_WORKER_SCHEMAS),
)
_TABLES: Final[dict[frozenset[str], dict[str, Check]]] = {
    frozenset(table): table for _, table in _DIRECTIONS
}
# Every schema a type name may mean, labelled by direction, for callers that pass no `allowed`.
_ANY: Final[dict[str, tuple[tuple[str, Check], ...]]] = {}
for _direction, _table in _DIRECTIONS:
    for _name, _check in _table.items():
        if all(c is not _check for _, c in _ANY.get(_name, ())):
            _ANY[_name] = (*_ANY.get(_name, ()), (_direction, _check))
del _direction, _table, _name, _check


# --- envelope --------------------------------------------------------------------------------


def _no_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"ext type {code} is not allowed")


_unpackb = msgpack.unpackb
_packb = msgpack.packb


def _validate(
    mtype: str, body: Any, req: int | None, allowed: frozenset[str] | None
) -> dict[str, Any]:
    table = _TABLES.get(allowed) if allowed is not None else None
    if table is not None:
        check = table[mtype]
        try:
            out: dict[str, Any] = check(body)
            return out
        except _Bad as e:
            raise ProtocolError(BAD_REQUEST, _reason(e), type=mtype, req=req) from None
    candidates = _ANY[mtype]
    failures: list[str] = []
    for direction, check in candidates:
        try:
            out = check(body)
            return out
        except _Bad as e:
            failures.append(_reason(e) + (f" (as {direction})" if len(candidates) > 1 else ""))
    raise ProtocolError(BAD_REQUEST, "; ".join(failures), type=mtype, req=req)


def _reason(e: _Bad) -> str:
    return f"{e.where() or 'body'}: {e.rule}"


def _check_type(mtype: Any, req: int | None, allowed: frozenset[str] | None) -> str:
    if not isinstance(mtype, str):
        raise ProtocolError(BAD_REQUEST, f"type: must be a str, got {_tname(mtype)}", req=req)
    if mtype not in _ANY:
        raise ProtocolError(BAD_REQUEST, f"type: unknown message type {_show(mtype)}", req=req)
    if allowed is not None and mtype not in allowed:
        raise ProtocolError(
            BAD_REQUEST, f"type: {mtype!r} is not accepted on this socket", type=mtype, req=req
        )
    return str(mtype)


def _req_or_none(env: list[Any]) -> int | None:
    if len(env) < 3:
        return None
    req = env[2]
    return req if type(req) is int and 0 <= req <= MAX_INT else None


def _type_or_none(env: list[Any]) -> str | None:
    mtype = env[1] if len(env) >= 2 else None
    return mtype if type(mtype) is str and mtype in _ANY else None


def _check_frame(frame: object) -> None:
    if isinstance(frame, (bytes, bytearray)):
        size = len(frame)
    elif isinstance(frame, memoryview):
        size = frame.nbytes
    else:
        raise ProtocolError(BAD_REQUEST, f"frame: must be bytes, got {_tname(frame)}")
    if size > defaults.MAX_MESSAGE_BYTES:
        raise ProtocolError(
            BAD_REQUEST, f"frame: {size} bytes is over the {defaults.MAX_MESSAGE_BYTES} limit"
        )


# A frame this big unpacks into so many maps and lists that the cyclic GC runs over and over
# while it decodes, which doubled the cost of a 100,000-job submit. Decoded data holds no
# cycles, so those passes can only find garbage made elsewhere: they wait until the end.
_GC_PAUSE_BYTES: Final = 1 << 16
_GC_PAUSE_ITEMS: Final = 256


def decode(frame: bytes | bytearray | memoryview, allowed: frozenset[str] | None = None) -> Message:
    """Parse and check one frame; raise ProtocolError, and nothing else, if it breaks the spec.

    `allowed` is the set of types this socket accepts (one of the four direction constants, or
    any subset); the direction constants also pick the schema for names used both ways.
    """
    if type(frame) is not bytes or len(frame) > defaults.MAX_MESSAGE_BYTES:
        _check_frame(frame)
    if len(frame) <= _GC_PAUSE_BYTES or not gc.isenabled():
        return _decode(frame, allowed)
    gc.disable()
    try:
        return _decode(frame, allowed)
    finally:
        gc.enable()


class _TooMany(Exception):
    """Raised from the unpacking hooks: the frame holds more maps and lists than allowed."""


def _counted(limit: int) -> Callable[[Any], Any]:
    """An object_hook and list_hook that lets `limit` maps and lists through, then refuses."""
    left = limit

    def hook(x: Any) -> Any:
        nonlocal left
        left -= 1
        if left < 0:
            raise _TooMany
        return x

    return hook


def _unpack_request(frame: bytes | bytearray | memoryview) -> Any:
    """Unpack a frame sent to the broker under limits that keep its decoded size near its own
    size: no list longer than any request may hold, no map bigger than an env, and in a frame
    over a MiB no more maps and lists in all than MAX_REQUEST_CONTAINERS."""
    # No more items than bytes either (msgpack's own default), so a header that claims more
    # than the frame holds still reads as a broken frame, not as a limit.
    limits = {k: min(v, len(frame)) for k, v in _REQUEST_LIMITS.items()}
    if len(frame) <= _COUNTED_BYTES:
        return _unpackb(frame, raw=False, ext_hook=_no_ext, **limits)
    hook = _counted(defaults.MAX_REQUEST_CONTAINERS)
    return _unpackb(frame, raw=False, ext_hook=_no_ext, object_hook=hook, list_hook=hook, **limits)


# Twice the longest list and the biggest map a request may hold, so the schema, not msgpack,
# gives the refusal of one just over the limit.
_REQUEST_LIMITS: Final = {
    "max_array_len": 2 * defaults.MAX_JOBS_PER_SUBMIT,
    "max_map_len": 2 * defaults.MAX_ENV_ENTRIES,
}
_COUNTED_BYTES: Final = 1 << 20  # smaller frames cannot unpack into more than ~64 MiB


def _decode(frame: bytes | bytearray | memoryview, allowed: frozenset[str] | None) -> Message:
    try:
        if allowed is CLIENT_REQUESTS or allowed is WORKER_TO_BROKER:
            env = _unpack_request(frame)
        else:
            env = _unpackb(frame, raw=False, ext_hook=_no_ext)
    except _TooMany:
        raise ProtocolError(
            BAD_REQUEST,
            f"frame: over {defaults.MAX_REQUEST_CONTAINERS} maps and lists in one request "
            "(MAX_REQUEST_CONTAINERS)",
        ) from None
    except Exception as e:
        limits = _REQUEST_LIMITS
        if isinstance(e, ValueError) and any(f"{k}({v})" in str(e) for k, v in limits.items()):
            raise ProtocolError(
                BAD_REQUEST,
                f"frame: {e}: a request's lists hold at most {limits['max_array_len']} items "
                f"and its maps {limits['max_map_len']} entries",
            ) from None
        # msgpack raises many types (ExtraData, StackError, UnicodeDecodeError, ValueError for
        # non-str keys, ...); to the sender they all mean the same thing.
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if isinstance(e, msgpack.exceptions.StackError):
            detail += ": nested too deep"
        raise ProtocolError(
            BAD_REQUEST, f"frame: not a valid msgpack message ({detail[:200]})"
        ) from None
    # The common case in as few tests as possible; anything unusual takes the careful path.
    if type(env) is list and len(env) == 4 and allowed is not None:
        version, mtype, req, body = env
        table = _TABLES.get(allowed)
        if (
            table is not None
            and type(version) is int
            and version == PROTOCOL_VERSION
            and type(req) is int
            and 0 <= req <= MAX_INT
            and type(mtype) is str
        ):
            check = table.get(mtype)
            if check is not None:
                try:
                    return _message(mtype, req, check(body))
                except _Bad as e:
                    raise ProtocolError(BAD_REQUEST, _reason(e), type=mtype, req=req) from None
    return _decode_envelope(env, allowed)


def _decode_envelope(env: Any, allowed: frozenset[str] | None) -> Message:
    if type(env) is not list or not env:
        got = f"{_tname(env)}" if type(env) is not list else "an empty array"
        raise ProtocolError(
            BAD_REQUEST, f"envelope: must be an array [version, type, req, body], got {got}"
        )
    version = env[0]
    if type(version) is not int or version != PROTOCOL_VERSION:
        req = _req_or_none(env)
        mtype = _type_or_none(env)
        if type(version) is int:
            raise ProtocolError(
                UNSUPPORTED_VERSION,
                f"version: {version} is not supported, this end speaks {PROTOCOL_VERSION}",
                type=mtype,
                req=req,
            )
        raise ProtocolError(
            BAD_REQUEST, f"version: must be an int, got {_tname(version)}", type=mtype, req=req
        )
    if len(env) != 4:
        raise ProtocolError(
            BAD_REQUEST,
            f"envelope: must have 4 items [version, type, req, body], got {len(env)}",
            type=_type_or_none(env),
            req=_req_or_none(env),
        )
    _, mtype, req, body = env
    if type(req) is not int or not 0 <= req <= MAX_INT:
        rule = (
            f"must be an int, got {_tname(req)}"
            if not _is_int(req)
            else f"must be in 0..{MAX_INT}, got {req}"
        )
        raise ProtocolError(BAD_REQUEST, f"req: {rule}", type=_type_or_none(env))
    mtype = _check_type(mtype, req, allowed)
    return _message(mtype, req, _validate(mtype, body, req, allowed))


def pack(type: str, body: dict[str, Any], req: int) -> bytes:
    """Pack a frame its sender built from values it had already checked, without checking it
    again; the receiver's `decode` checks every frame. Only for replies on hot paths: the
    broker's answers to merged submits, whose bodies are lists of the ids it just issued."""
    frame: bytes = _packb([PROTOCOL_VERSION, type, req, body], use_bin_type=True)
    return frame


def _not_utf8(v: Any, path: str) -> str | None:
    """Where in a (validated, so bounded) body a string is not UTF-8, in a sentence:
    `jobs[2].command: not UTF-8 text (byte 0xff at character 5)`."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            code = ord(v[e.start])  # a byte os.fsdecode kept is U+DC80..U+DCFF
            what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else "a surrogate"
            return f"{path}: not UTF-8 text ({what} at character {e.start})"
        return None
    if isinstance(v, (list, tuple)):
        items = (_not_utf8(x, f"{path}[{i}]") for i, x in enumerate(v))
        return next((f for f in items if f is not None), None)
    if not isinstance(v, dict):
        return None
    for k, x in v.items():
        named = path.rpartition(".")[2] in _VARIABLES  # a map of variables, not of fields
        where = f"{path}: the variable {_show(k)}" if named else f"{path}.{k}" if path else k
        found = _not_utf8(k, where) or _not_utf8(x, where)
        if found is not None:
            return found
    return None


_VARIABLES = ("env", "environment")


def encode(
    type: str,
    body: dict[str, Any],
    req: int = 0,
    *,
    allowed: frozenset[str] | None = None,
    checked: bool = True,
) -> bytes:
    """Check `body` against the schema for `type` and pack the frame.

    The body goes out as given, without defaults filled in, to keep frames small. `allowed`
    works as in `decode`: pass the receiving socket's constant to pick the direction of a name
    used both ways (`drain`, `cancel`, `heartbeat`). `checked=False` skips the schema (the
    size limit still holds): for bodies built from records the broker checked on the way in,
    on the per-job path, where the receiver checks them anyway.
    """
    if not _is_int(req) or not 0 <= req <= MAX_INT:
        raise ProtocolError(BAD_REQUEST, f"req: must be an int in 0..{MAX_INT}, got {_show(req)}")
    mtype = _check_type(type, req, allowed)
    # Checking a big body makes a map per item, like decoding one (see _GC_PAUSE_BYTES); the
    # big lists of this protocol are all called `jobs`.
    jobs = body.get("jobs") if isinstance(body, dict) else None  # `type` is the message's here
    if checked and isinstance(jobs, list) and len(jobs) >= _GC_PAUSE_ITEMS and gc.isenabled():
        gc.disable()
        try:
            _validate(mtype, body, req, allowed)
        finally:
            gc.enable()
    elif checked:
        _validate(mtype, body, req, allowed)
    try:
        frame: bytes = _packb([PROTOCOL_VERSION, mtype, int(req), body], use_bin_type=True)
    except Exception as e:
        # Validation admits only packable values, bar strings Python holds but UTF-8 cannot
        # express (lone surrogates: bytes a file name, an argument or a variable held).
        raise ProtocolError(
            BAD_REQUEST,
            _not_utf8(body, "") or f"body: cannot be packed ({e.__class__.__name__}: {e})",
            type=mtype,
            req=req,
        ) from None
    if len(frame) > defaults.MAX_MESSAGE_BYTES:
        raise ProtocolError(
            BAD_REQUEST,
            f"frame: {len(frame)} bytes is over the {defaults.MAX_MESSAGE_BYTES} limit",
            type=mtype,
            req=req,
        )
    return frame
