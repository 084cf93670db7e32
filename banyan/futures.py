"""Python functions as Banyan jobs: a `concurrent.futures.Executor` for a Banyan cluster.

    from banyan.futures import Executor
    with Executor(cpus=1, memory="2G") as ex:
        results = list(ex.map(simulate, params))
        fut = ex.submit(train, cfg, gpus=1)

Each call is an ordinary job (visible in banyan-status, with logs, progress, retries), run
by the same Python on a worker (`sys.executable`, in the caller's working directory, with
the caller's environment and `sys.path`): workers need that interpreter and the modules the
function uses. The function and its arguments are pickled (cloudpickle when installed, for
lambdas, closures and functions of `__main__`; plain pickle needs functions importable by
module), travel in the job through the broker (banyan.remote has the limits), and the result
or the exception comes back the same way, the exception with its remote traceback as text.

Completion is pushed: a thread follows the broker's event log with one read outstanding
(`events` with `wait`), and collects the results of the jobs that ended in one status request.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import pickle
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banyan import defaults, remote
from banyan.client import Client, JobInfo
from banyan.errors import BrokerUnavailable, KeyRefused
from banyan.remote import PayloadTooLarge, RemoteError, RemoteTraceback

__all__ = [
    "Executor",
    "Future",
    "JobCancelled",
    "JobFailed",
    "PayloadTooLarge",
    "RemoteError",
    "RemoteTraceback",
]

log = logging.getLogger("banyan.futures")

# Keyword arguments of `submit` that are the job's, not the function's.
OPTIONS = frozenset(
    {"cpus", "memory", "gpus", "tags", "priority", "time_limit", "attempts", "name", "after"}
)
# Jobs per submit request, and their environments' bytes: well inside the broker's limits.
BATCH_JOBS = 1000
BATCH_BYTES = 32 << 20
# A status reply is kept near this size: it carries each job's environment (its call).
STATUS_BYTES = 8 << 20
# The event log is read with this wait: how long an idle executor's thread sleeps in the
# broker between reads, and so how late it notices its executor shut down.
FOLLOW_WAIT = 2.0
RECONNECT_MAX = 5.0


class JobFailed(Exception):
    """The job ended without a result: killed by a signal, out of time, lost, or its Python
    never wrote one. The message has its exit and the end of its stderr."""


class JobCancelled(Exception):
    """The job was cancelled by someone else, or because a job it came after failed."""


class Future(concurrent.futures.Future[Any]):
    """A call's future; `job` is its Banyan job's id. `cancel()` cancels the job, also while
    it runs (its processes are killed): it is False only once the call has finished. A call
    of `map` with `chunksize` > 1 shares its job with the rest of its chunk."""

    def __init__(self, executor: Executor) -> None:
        super().__init__()
        self.job = 0
        self._executor = executor

    def cancel(self) -> bool:
        if self.done():
            return self.cancelled()
        self._executor._cancel([self])
        return self.cancelled()

    def _cancelled_now(self) -> bool:
        """Mark it cancelled whatever it was doing; False if it had finished."""
        with self._condition:
            if self._state == FINISHED:
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            self._state = CANCELLED
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        self.set_running_or_notify_cancel()  # tells wait() and as_completed()
        return True

    def _mark_running(self) -> None:
        with contextlib.suppress(RuntimeError):  # not pending: running already, or over
            if self._state == PENDING:
                self.set_running_or_notify_cancel()

    def _settle(self, ok: bool, value: Any) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
            if ok:
                self.set_result(value)
            else:
                self.set_exception(value)


@dataclass
class _Job:
    futures: list[Future]
    size: int  # bytes of its call in the environment, which status replies carry back


@dataclass
class _Request:
    """One call or one chunk of a map: a job to submit."""

    spec: dict[str, Any]
    futures: list[Future]
    size: int
    after: list[Future] = field(default_factory=list)


class Executor(concurrent.futures.Executor):
    """Runs calls as Banyan jobs. Defaults for every job: `cpus`, `memory` (MiB, or `"2G"`),
    `gpus`, `tags`, `priority`, `time_limit` (s), `attempts` (total runs on failure, as
    `banyan-submit --attempts`); `export` as `banyan-submit --export` ("ALL": the caller's
    environment); `cwd`, the jobs' directory (the caller's). `broker`, `home` and `timeout`
    are the Client's.

    `submit(fn, *args, **kwargs)` takes the job's own options among the keywords: `cpus`,
    `memory`, `gpus`, `tags`, `priority`, `time_limit`, `attempts`, `name`, and `after` (a
    list of futures this call runs after, once they succeeded). A function keyword with one of
    those names goes through `functools.partial`.

    Leaving a `with` block waits for every call; leaving it by an exception (Ctrl-C included)
    cancels what has not finished. `shutdown(cancel_futures=True)` cancels the calls not yet
    finished, running ones too (their processes are killed)."""

    def __init__(
        self,
        cpus: float = 1,
        memory: int | str = 0,
        gpus: int = 0,
        tags: Sequence[str] = (),
        priority: int = 0,
        time_limit: float | None = None,
        attempts: int = 1,
        export: str | None = "ALL",
        cwd: str | None = None,
        broker: str | None = None,
        home: str | Path | None = None,
        timeout: float = defaults.CLIENT_TIMEOUT,
    ) -> None:
        self.defaults = _job_options(
            cpus=cpus,
            memory=memory,
            gpus=gpus,
            tags=tags,
            priority=priority,
            time_limit=time_limit,
            attempts=attempts,
        )
        self.export = export
        self.cwd = cwd or os.getcwd()
        self.command = f"exec {shlex.quote(sys.executable)} -m banyan.remote"
        self._connect = (broker, home, timeout)
        self.client = Client(broker, home, timeout)
        self._lock = threading.RLock()  # the client, the registry
        self._jobs: dict[int, _Job] = {}
        self._futures: list[Future] = []
        self._shutdown = False
        self._stop = threading.Event()
        try:
            since = self.client.events_head()
        except BaseException:
            self.client.close()
            raise
        self._follower = threading.Thread(
            target=self._follow, args=(since,), name="banyan-futures", daemon=True
        )
        self._follower.start()

    # ---- submitting -------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTIONS}
        (future,) = self._submit([self._request(fn, [(args, kwargs)], options)])
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """As `concurrent.futures.Executor.map`: every call is submitted at once (in a few
        requests), results come in order. `chunksize` calls share a job (fewer, longer jobs
        for short calls). Leaving the iterator early cancels what is left."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        calls: list[tuple[Any, Any]] = [(args, {}) for args in zip(*iterables, strict=False)]
        requests = [
            self._request(fn, calls[i : i + chunksize], {}) for i in range(0, len(calls), chunksize)
        ]
        futures = self._submit(requests)
        return self._results(futures, None if timeout is None else time.monotonic() + timeout)

    def _results(self, futures: list[Future], end: float | None) -> Iterator[Any]:
        try:
            for future in futures:
                left = None if end is None else max(0.0, end - time.monotonic())
                yield future.result(left)
        finally:
            self._cancel([f for f in futures if not f.done()])

    def _request(
        self, fn: Callable[..., Any], calls: list[tuple[Any, Any]], options: dict[str, Any]
    ) -> _Request:
        after = list(options.pop("after", None) or [])
        if any(not isinstance(f, Future) or f._executor is not self for f in after):
            raise TypeError("after: futures of this executor only")
        payload = remote.dumps((fn, calls, list(sys.path)))
        env = remote.call_env(payload)
        name = options.pop("name", None) or getattr(fn, "__qualname__", None) or repr(fn)
        spec = {
            "command": self.command,
            "name": str(name)[: defaults.MAX_NAME],
            "cwd": self.cwd,
            "env": env,
            **self.defaults,
            **_job_options(**options),
        }
        futures = [Future(self) for _ in calls]
        return _Request(spec, futures, sum(len(v) for v in env.values()), after)

    def _submit(self, requests: list[_Request]) -> list[Future]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            for batch in _batches(requests):
                for r in batch:
                    deps = [{"kind": "after", "job": f.job} for f in r.after]
                    if deps:
                        r.spec["depends_on"] = deps
                # The event log is read under this lock: a job's events are handled only once
                # it is registered below, however soon they come.
                ids = self.client.submit(jobs=[r.spec for r in batch], export=self.export).jobs
                for r, job in zip(batch, ids, strict=True):
                    for f in r.futures:
                        f.job = job
                    self._jobs[job] = _Job(r.futures, r.size)
                    self._futures += r.futures
        return [f for r in requests for f in r.futures]

    # ---- cancelling and shutting down ------------------------------------------------------

    def _cancel(self, futures: list[Future]) -> list[int]:
        """Cancel the jobs of these futures in one request; each whose job was cancelled (or
        had not finished) is marked cancelled, with every future of its job. Returns the jobs
        that were running: they end once their worker has killed them."""
        # Newest first: a job named after one it depends on would be cancelled by that one's
        # cancel, and be reported as already over.
        ids = sorted({f.job for f in futures if f.job and not f.done()}, reverse=True)
        if not ids:
            return []
        with self._lock:
            done = self.client.cancel(ids, reason="cancelled by banyan.futures", each=True)
            stopped = [self._jobs[j] for j in (*done.cancelled, *done.pending) if j in self._jobs]
        for job in stopped:
            for f in job.futures:
                f._cancelled_now()
        return done.pending

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            futures = list(self._futures)
        stopping = self._cancel([f for f in futures if not f.done()]) if cancel_futures else []
        if wait:
            concurrent.futures.wait(futures)
            if stopping:  # until their processes are gone
                with self._lock:
                    self.client.wait(stopping)
        self._stop.set()
        with self._lock:
            self.client.close()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.shutdown(wait=True, cancel_futures=exc_type is not None)

    # ---- completion, pushed from the broker -------------------------------------------------

    def _follow(self, since: int) -> None:
        """Follow the event log from `since` until shut down, settling futures as their jobs
        run and end. A broker that goes away is waited for: the log is durable, so nothing is
        missed. Should this thread fail, every unfinished future gets its exception."""
        client: Client | None = None
        backoff = defaults.RECONNECT_MIN
        try:
            while not self._stop.is_set():
                try:
                    if client is None:
                        client = Client(*self._connect)
                    events, since = client.events(since, defaults.EVENTS_LIMIT, FOLLOW_WAIT)
                    self._handle(client, events)
                    backoff = defaults.RECONNECT_MIN
                except KeyRefused:
                    raise
                except BrokerUnavailable as e:
                    log.warning("following the broker's events: %s; trying again", e)
                    if client is not None:
                        client.close()
                        client = None
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, RECONNECT_MAX)
        except BaseException as e:
            failure = JobFailed(f"banyan.futures lost track of its jobs: {e}")
            with self._lock:
                futures = list(self._futures)
            for f in futures:
                f._settle(False, failure)
        finally:
            if client is not None:
                client.close()

    def _handle(self, client: Client, events: list[list[Any]]) -> None:
        running: list[Future] = []
        ended: dict[int, _Job] = {}
        with self._lock:
            for _seq, _time, job_id, _frm, to, _reason in events:
                job = self._jobs.get(job_id)
                if job is None:
                    continue
                if to == "running":
                    running += job.futures
                elif to in ("terminated", "cancelled"):
                    ended[job_id] = self._jobs.pop(job_id)
        for f in running:
            f._mark_running()
        if ended:
            self._finish(client, ended)

    def _finish(self, client: Client, ended: dict[int, _Job]) -> None:
        for page in _pages(ended):
            for info in client.status(page, detail=True, each=True).jobs:
                job = ended[info.id]
                for f, (ok, value) in zip(
                    job.futures, self._outcomes(client, info, job), strict=True
                ):
                    f._settle(ok, value)

    def _outcomes(self, client: Client, info: JobInfo, job: _Job) -> list[tuple[bool, Any]]:
        """What each call of an ended job gives: its result, or the exception to raise."""
        n = len(job.futures)
        if info.state == "cancelled":
            why = info.raw.get("cancel_reason") or "cancelled"
            return [(False, JobCancelled(f"job {info.id} was cancelled: {why}"))] * n
        try:
            payload = _result_payload(client, info)
            outcomes = None if payload is None else remote_loads(payload)
        except Exception as e:
            return [(False, JobFailed(f"job {info.id}: its result could not be read: {e}"))] * n
        if outcomes is None:
            return [(False, JobFailed(_failure(info)))] * n
        if len(outcomes) != n:  # the calls could not even be loaded: each fails with that
            outcomes = [outcomes[0]] * n
        return [_raised(ok, value) for ok, value in outcomes]


def remote_loads(payload: bytes) -> list[tuple[bool, Any]]:
    outcomes: list[tuple[bool, Any]] = pickle.loads(payload)
    return outcomes


def _raised(ok: bool, value: Any) -> tuple[bool, Any]:
    if ok:
        return True, value
    exc, tb = value
    if tb and isinstance(exc, BaseException):
        exc.__cause__ = RemoteTraceback(tb)
    return False, exc


def _result_payload(client: Client, info: JobInfo) -> bytes | None:
    """The pickled outcomes a job wrote: from its output tail, or when they are longer, from
    its worker's file through the broker. None if it wrote none."""
    tail = (info.raw.get("output_tail") or {}).get("stdout") or ""
    whole = remote.unframe(tail)
    if whole is not None:
        return whole
    n = remote.trailer_length(tail)
    if n is None:
        return None
    size = client.logs(info.id, "stdout", 0, 1).size
    trailer = len(f"\n{remote.TRAILER} {n}\n")
    start = size - trailer - n
    data = b""
    for _ in range(n // (1 << 20) + 2):
        if start + len(data) >= size:
            break
        chunk = client.logs(info.id, "stdout", start + len(data), 1 << 20)
        if not chunk.data:
            break
        data += chunk.data
    return remote.unframe(data.decode("ascii", "replace")) if data else None


def _failure(info: JobInfo) -> str:
    raw = info.raw
    if raw.get("signal"):
        how = f"killed by signal {raw['signal']}"
    elif info.outcome == "timeout":
        how = "stopped at its time limit"
    elif info.outcome == "lost":
        how = "lost with its worker"
    else:
        how = f"exit {info.exit_code}"
    text = f"job {info.id} ended without a result ({how})"
    stderr = ((raw.get("output_tail") or {}).get("stderr") or "").strip()
    if stderr:
        text += ":\n" + "\n".join(stderr.splitlines()[-20:])
    return text


def _pages(ended: dict[int, _Job]) -> Iterator[list[int]]:
    """Ids in status requests of about STATUS_BYTES each (a reply carries their calls)."""
    page: list[int] = []
    size = 0
    for job_id, job in ended.items():
        if page and (len(page) >= defaults.STATUS_PAGE or size + job.size > STATUS_BYTES):
            yield page
            page, size = [], 0
        page.append(job_id)
        size += job.size
    if page:
        yield page


def _batches(requests: list[_Request]) -> Iterator[list[_Request]]:
    batch: list[_Request] = []
    size = 0
    for r in requests:
        if batch and (len(batch) >= BATCH_JOBS or size + r.size > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(r)
        size += r.size
    if batch:
        yield batch


def _job_options(**options: Any) -> dict[str, Any]:
    """Executor and submit options as JobSpec fields."""
    spec: dict[str, Any] = {}
    for key, value in options.items():
        if key == "memory":
            spec["memory"] = _mib(value)
        elif key == "attempts":
            spec["max_attempts"] = int(value)
        elif key == "tags":
            spec["tags"] = [value] if isinstance(value, str) else list(value)
        elif key in ("cpus", "gpus", "priority", "time_limit", "name"):
            spec[key] = value
        else:
            raise TypeError(f"unknown job option {key!r}")
    return spec


def _mib(value: int | str) -> int:
    if isinstance(value, int):
        return value
    from banyan.cli.output import UsageError, parse_memory

    try:
        return parse_memory(value, "memory")
    except UsageError as e:
        raise ValueError(str(e)) from None
