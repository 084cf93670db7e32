"""A workflow file for `banyan-submit --file` (docs/workflow.md): jobs with keys, groups and
dependencies by key, defaults, and the command line's options layered under each job's own."""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Any

from banyan import arrays, defaults
from banyan.cli.output import UsageError, number, parse_duration, parse_memory
from banyan.client import JOB_FIELDS

DEP_KINDS = ("after", "after_any", "after_fail")


def read_text(option: str, path: str) -> str:
    """The file at `path` (`-`: standard input), or a usage error naming `option`."""
    try:
        if path == "-":
            raw = getattr(sys.stdin, "buffer", None)  # None: a text stream put in its place
            data = raw.read() if raw else sys.stdin.read().encode("utf-8", "surrogateescape")
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise UsageError(f"{option}: cannot read {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UsageError(
            f"{option}: {path} is not UTF-8 text: byte 0x{data[e.start]:02x} on line {line} "
            "(a job's text must be UTF-8)"
        ) from None


SPEC_KEYS = frozenset(JOB_FIELDS) - {"depends_on"} | {"command"}


def load_workflow(
    path: str, cli: dict[str, Any], cwd: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Jobs and groups of a workflow file; a job's own fields beat the command line's, which
    beat the file's `defaults`. `env` maps merge; `groups` and `depends_on` add up."""
    data = _parse_json(read_text("--file", path), path)
    if isinstance(data, list):
        data = {"jobs": data}
    if not isinstance(data, dict):
        raise UsageError(f'--file: {path}: expected an object with "jobs", or a list of jobs')
    _only(data, {"jobs", "groups", "defaults"}, "the file")
    groups = [_group(g, f"groups[{i}]") for i, g in enumerate(_list(data, "groups", "the file"))]
    raw_jobs = _list(data, "jobs", "the file")
    if not raw_jobs and not groups:
        raise UsageError(f"--file: {path} has no jobs and no groups")
    if len(raw_jobs) > defaults.MAX_JOBS_PER_SUBMIT:
        raise UsageError(f"--file: {path}: {arrays.too_many(len(raw_jobs))}")
    names = {g["name"] for g in groups}
    keys = _keys(raw_jobs, names)
    book = Refs(keys, cwd)
    shared = data.get("defaults") or {}
    if isinstance(shared, dict) and {"key", "command"} & set(shared):
        raise UsageError("--file: defaults: a key or a command belongs to one job")
    base = book.fields(shared, "defaults")
    jobs = []
    text = 0  # job text so far: the defaults and options are copied into every job
    for i, raw in enumerate(raw_jobs):
        where = f"jobs[{i}]"
        spec = _merge(base, cli, book.fields(raw, where))
        if "command" not in spec:
            raise UsageError(f'--file: {where}: no "command"')
        spec.setdefault("cwd", cwd)
        text += arrays.text_bytes(spec)
        try:
            arrays.check_size(text, f"--file: {path} up to {where}")
        except ValueError as e:
            raise UsageError(str(e)) from None
        jobs.append(spec)
    return jobs, groups


def _parse_json(text: str, path: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--file: {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise UsageError(f"--file: {path} nests arrays or objects too deeply") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise UsageError(f"--file: {path} cannot be read as JSON: {e}") from None


def _only(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise UsageError(f"--file: {where}: unknown field {unknown[0]!r}")


def _list(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    value = obj.get(key) or []
    if not isinstance(value, list):
        raise UsageError(f"--file: {where}: {key!r} must be a list")
    return value


def _group(spec: Any, where: str) -> dict[str, Any]:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise UsageError(f'--file: {where}: expected a name or {{"name": ..., "open": ...}}')
    _only(spec, {"name", "open"}, where)
    return {"name": spec["name"], "open": bool(spec.get("open", False))}


def _keys(raw_jobs: list[Any], group_names: set[str]) -> dict[str, int]:
    keys: dict[str, int] = {}
    for i, raw in enumerate(raw_jobs):
        if not isinstance(raw, dict):
            raise UsageError(f"--file: jobs[{i}]: expected an object")
        key = raw.get("key")
        if key is None:
            continue
        if not isinstance(key, str) or not key:
            raise UsageError(f"--file: jobs[{i}].key: must be a non-empty string")
        if key in keys:
            raise UsageError(f"--file: jobs[{i}].key: {key!r} is also jobs[{keys[key]}]'s key")
        if key in group_names:
            raise UsageError(f"--file: jobs[{i}].key: {key!r} is also a group's name")
        keys[key] = i
    return keys


def _merge(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            if k == "env":
                out[k] = {**out.get(k, {}), **v}
            elif k == "groups":
                out[k] = list(dict.fromkeys([*out.get(k, []), *v]))
            elif k == "depends_on":
                out[k] = [*out.get(k, []), *v]
            else:
                out[k] = v
    return out


class Refs:
    """Turns one job object of the file into JobSpec fields, resolving `key` references."""

    def __init__(self, keys: dict[str, int], cwd: str) -> None:
        self.keys = keys
        self.cwd = cwd

    def fields(self, raw: Any, where: str) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise UsageError(f"--file: {where}: expected an object")
        _only(raw, set(SPEC_KEYS) | {"key", "depends_on"}, where)
        out: dict[str, Any] = {}
        for k, v in raw.items():
            if k != "key":
                out[k] = self.value(k, v, f"--file: {where}.{k}")
        return out

    def value(self, k: str, v: Any, at: str) -> Any:
        """One field, accepting the friendly forms the command line accepts."""
        if k == "command":
            if isinstance(v, list) and v and all(isinstance(w, str) for w in v):
                return shlex.join(v)
            return _text(v, at)
        if k in ("name", "output"):
            return _text(v, at)
        if k == "cwd":
            return os.path.join(self.cwd, _text(v, at))
        if k == "env":
            if not isinstance(v, dict) or not all(
                isinstance(x, (str, int, float)) for x in v.values()
            ):
                raise UsageError(f"{at}: expected an object of names to strings")
            return {str(name): str(x) for name, x in v.items()}
        if k in ("tags", "groups"):
            items = [v] if isinstance(v, str) else v
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise UsageError(f"{at}: expected a list of strings")
            return list(items)
        if k == "hold":
            if not isinstance(v, bool):
                raise UsageError(f"{at}: expected true or false")
            return v
        if k == "depends_on":
            items = v if isinstance(v, list) else [v]
            return [self.dependency(d, f"{at}[{i}]") for i, d in enumerate(items)]
        return _quantity(k, v, at)

    def dependency(self, ref: Any, at: str) -> dict[str, Any]:
        """`"key"` (a job of this file, else a group), `12` (a job id) or an object."""
        kind = "after"
        if isinstance(ref, dict):
            rest = dict(ref)
            kind = rest.pop("kind", "after")
            if (
                kind not in DEP_KINDS
                or len(rest) != 1
                or next(iter(rest))
                not in (
                    "key",
                    "job",
                    "group",
                )
            ):
                raise UsageError(
                    f"{at}: expected one of key, job or group, and a kind of {', '.join(DEP_KINDS)}"
                )
            ((target, ref),) = rest.items()
            if target == "key" and ref not in self.keys:
                raise UsageError(f"{at}: no job in this file has the key {ref!r}")
            if target == "group":
                return {"kind": kind, "group": _text(ref, at)}
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise UsageError(f"{at}: expected a key, a job id, a group name or an object")
        if isinstance(ref, int):
            return {"kind": kind, "job": ref}
        if ref in self.keys:
            return {"kind": kind, "local": self.keys[ref]}
        return {"kind": kind, "group": ref}


def _text(v: Any, at: str) -> str:
    if not isinstance(v, str) or not v:
        raise UsageError(f"{at}: expected a non-empty string")
    return v


def _quantity(k: str, v: Any, at: str) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise UsageError(f"{at}: expected a number")
    text = str(v)
    if k == "cpus":
        return number(text, at, positive=True)
    if k == "memory":
        return parse_memory(text, at)
    if k == "gpus":
        return number(text, at, integer=True)
    if k == "priority":
        return number(text, at, minimum=-(2**31), integer=True)
    if k == "max_attempts":
        return number(text, at, minimum=1, integer=True)
    seconds = parse_duration(text, at)  # time_limit, cancel_grace
    if k == "time_limit" and seconds <= 0:
        raise UsageError(f"{at}: must be more than 0")
    return seconds
