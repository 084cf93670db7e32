"""Whose jobs a worker runs (SPEC §6), and the environments jobs carry, for the state machine.

Every job runs as its owner's Unix account (`Job.runs_as`). A worker says at registration whose
jobs it runs: a worker not started as root only its own account's (`only_account`), and none
of the accounts it cannot run (`refused`: a missing account, or root without
`--allow-root-jobs`). It also hands back a job whose account it finds it cannot run, and the
account joins `refused` until the worker registers again. Matching skips those jobs there
(`filter_for`), and status says why when no worker can run them (`nobody_runs`).

The submitter's exported environment is stored once per distinct content (`environments` in
the store) and named by each job; an assignment carries each environment it needs once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from banyan import defaults
from banyan.broker.records import NEW_JOB_TAIL, Job, Tx, Worker

_TAIL_START = len(Job.names()) - len(NEW_JOB_TAIL)
_ACCOUNT = Job.names().index("account") - _TAIL_START
_ENVIRON = Job.names().index("environ") - _TAIL_START
# Environments one `assign` message carries at most, in bytes (the frame limit is 64 MiB).
ASSIGN_ENVIRONMENT_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Runs:
    """Whose jobs a worker runs, as it registered."""

    only_account: str | None = None
    refused: dict[str, str] = field(default_factory=dict)


ANY_OWNER = Runs()


def runs(worker: Worker, account: str) -> bool:
    return (
        worker.only_account is None or worker.only_account == account
    ) and account not in worker.refused


def why_not(worker: Worker, account: str) -> str:
    """Why `worker` does not run `account`'s jobs, in the worker's own words if it said."""
    if account in worker.refused:
        return worker.refused[account]
    return (
        f"worker {worker.name} runs only {worker.only_account}'s jobs "
        f"(it is not root, and was not started with --run-any-owner)"
    )


def refuse(worker: Worker, account: str, reason: str) -> None:
    """Remember that `worker` cannot run `account`'s jobs; bounded like its registration."""
    if account in worker.refused or len(worker.refused) < defaults.MAX_REFUSED_ACCOUNTS:
        worker.refused[account] = reason


def filter_for(worker: Worker, tx: Tx) -> Callable[[int], bool] | None:
    """A test of eligible job ids for a claim by `worker`; None when it runs anyone's jobs, so
    matching reads nothing more than the eligible index."""
    if worker.only_account is None and not worker.refused:
        return None

    def allowed(job_id: int) -> bool:
        account = tx.job_account(job_id)
        return account is not None and runs(worker, account)

    return allowed


def nobody_runs(job: Job, live: list[Worker]) -> str | None:
    """Why no connected worker will ever run `job` for its account, or None if one may."""
    account = job.runs_as
    if any(runs(w, account) for w in live):
        return None
    if len(live) == 1:
        return why_not(live[0], account)
    reasons = sorted({why_not(w, account) for w in live})
    shown = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
    return f"no worker can run jobs of account {account}: {shown}"


def environment_key(env: dict[str, str]) -> str:
    """The content key of an environment: equal maps (in equal order) share one record."""
    global _last_key
    if env == _last_key[0]:  # a client repeats its environment with every submission
        return _last_key[1]
    packed = msgpack.packb(env, use_bin_type=True)
    key = hashlib.blake2b(packed, digest_size=16).hexdigest()
    _last_key = (dict(env), key)  # a copy: a caller may change its map afterwards
    return key


_last_key: tuple[dict[str, str] | None, str] = (None, "")

# Environments by content key, as assignments last read them, with their sizes: a stream of
# jobs from one submitter names one environment in every `assign`. A key names its content,
# so an entry never goes stale.
_KEPT_ENVIRONMENTS = 64
_environments: dict[str, dict[str, str]] = {}
_sizes: dict[str, int] = {}


def _environment(tx: Tx, key: str) -> dict[str, str] | None:
    env = _environments.get(key)
    if env is None:
        env = tx.get_environment(key)
        if env is None:
            return None
        if len(_environments) >= _KEPT_ENVIRONMENTS:
            _environments.clear()
            _sizes.clear()
        _environments[key] = env
        _sizes[key] = sum(len(k) + len(v) + 2 for k, v in env.items())
    return env


def new_job_tail(
    tx: Tx, account: str, environment: dict[str, str] | None, jobs: int
) -> tuple[Any, ...]:
    """The fields after `pending` of a submission's `jobs` new job rows: its account and
    environment, the environment stored on the way."""
    tail = list(NEW_JOB_TAIL)
    tail[_ACCOUNT] = account
    if environment:
        key = environment_key(environment)
        tx.put_environment(key, environment, jobs)
        tail[_ENVIRON] = key
    return tuple(tail)


def assignments(tx: Tx, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`assign` bodies for `batch`, each carrying the environments its jobs name, once. A batch
    whose environments together pass ASSIGN_ENVIRONMENT_BYTES is split, so no message nears
    the frame limit however many distinct environments a claim's jobs have."""
    keys = {a["environ"] for a in batch if a["environ"]}
    if not keys:
        return [{"jobs": batch}]
    found = {key: _environment(tx, key) for key in keys}
    bodies: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    envs: dict[str, dict[str, str]] = {}
    size = 0
    for a in batch:
        key = a["environ"]
        env = found.get(key) if key else None
        if env is not None and key not in envs:
            need = _sizes[key]
            if jobs and size + need > ASSIGN_ENVIRONMENT_BYTES:
                bodies.append({"jobs": jobs, "environments": envs})
                jobs, envs, size = [], {}, 0
            envs[key] = env
            size += need
        jobs.append(a)
    bodies.append({"jobs": jobs, "environments": envs})
    return bodies
