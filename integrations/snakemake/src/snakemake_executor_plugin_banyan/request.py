"""What a Snakemake job asks of Banyan, and what Banyan says back about it, in words.

Pure: no Snakemake objects and no sockets, so every mapping is tested on its own.

    threads               -> cpus
    mem_mib, mem_mb       -> memory (MiB); Snakemake derives mem_mb from `mem` ("4G")
    runtime (minutes)     -> time_limit (seconds)
    gpu, nvidia_gpu       -> gpus
    banyan_tags           -> tags ("a,b" or "a b")
    the rule's priority   -> priority
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

# Banyan's priority is an int32; Snakemake gives its target jobs sys.maxsize.
PRIORITY_RANGE = (-(2**31), 2**31 - 1)
# What a job needs for ever if no worker fits it (banyan/broker/views.py `unrunnable`).
UNRUNNABLE = "no worker can ever run this"
STDERR_LINES = 20


class BadResource(ValueError):
    """A resource value Banyan cannot take; the message names it."""


def resources(threads: int, res: Mapping[str, Any], priority: int = 0) -> dict[str, Any]:
    """JobSpec fields for a job with `threads` and resources `res`."""
    spec: dict[str, Any] = {"cpus": max(1, int(threads))}
    memory = _first(res, "mem_mib", "mem_mb")
    if memory is not None:
        spec["memory"] = _whole(memory, "mem_mb")
    runtime = res.get("runtime")
    if runtime is not None:
        minutes = _number(runtime, "runtime")
        if minutes > 0:
            spec["time_limit"] = minutes * 60.0
    gpus = _first(res, "gpu", "nvidia_gpu")
    if gpus is not None:
        spec["gpus"] = _whole(gpus, "gpu")
    tags = res.get("banyan_tags")
    if tags:
        spec["tags"] = [t for t in str(tags).replace(",", " ").split() if t]
    spec["priority"] = max(PRIORITY_RANGE[0], min(PRIORITY_RANGE[1], int(priority)))
    return spec


def _first(res: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if res.get(name) is not None:
            return res[name]
    return None


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadResource(f"resource {name}: expected a number, got {value!r}") from None
    if number < 0:
        raise BadResource(f"resource {name}: must not be negative, got {value!r}")
    return number


def _whole(value: Any, name: str) -> int:
    number = _number(value, name)
    if number != int(number):
        raise BadResource(f"resource {name}: expected a whole number, got {value!r}")
    return int(number)


def submit_key(run: str, jobs: Iterable[tuple[int, int]]) -> str:
    """One submission's key: its run and its jobs' (jobid, attempt). Asking again with it
    (the broker did not answer) returns the ids it gave, never a second set of jobs; a later
    attempt of a job (--retries) is a new submission."""
    digest = hashlib.sha256(",".join(f"{j}.{a}" for j, a in jobs).encode()).hexdigest()
    return f"snakemake-{run}-{digest[:24]}"


def failure(info: Mapping[str, Any]) -> str:
    """Why a Banyan job did not succeed, for Snakemake's log: how it ended, where, and the
    end of its stderr."""
    job, attempt = info["id"], info.get("attempts") or 1
    worker = info.get("worker")
    where = f" on worker {worker}" if worker else ""
    if info["state"] == "cancelled":
        how = f"was cancelled ({info.get('cancel_reason') or 'cancelled'})"
    elif info.get("signal"):
        how = f"was killed by signal {info['signal']}{where}"
    elif info.get("outcome") == "timeout":
        how = f"reached its time limit (the runtime resource){where}"
    elif info.get("outcome") == "lost":
        how = f"was lost with its worker{where}"
    else:
        how = f"failed with exit code {info.get('exit_code')}{where}"
    text = f"Banyan job {job} (attempt {attempt}) {how}."
    stderr = ((info.get("output_tail") or {}).get("stderr") or "").rstrip()
    if stderr:
        lines = stderr.splitlines()[-STDERR_LINES:]
        text += "\nThe end of its stderr:\n" + "\n".join(f"    {line}" for line in lines)
    return text + "\n"
