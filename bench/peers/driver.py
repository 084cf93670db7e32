"""The peers' side of W1, W2 and W3: runs in bench/peers/.venv, which has Celery and HyperQueue.

    driver.py client celery              # answers requests on stdin, one JSON line each
    driver.py client hyperqueue DIR      # the same, for the HyperQueue server in DIR
    driver.py hq-cluster DIR CORES       # a HyperQueue server and one worker, until stdin ends
    driver.py selftest DIR               # hq-cluster and client in one: one job, then stop

A client reads one JSON request per line and writes one JSON answer per line:

    {"op": "batch", "n": 2000, "command": "true"}  ->  {"seconds": 2.31}
    {"op": "sequential", "n": 200, "command": "true"}  ->  {"seconds": [0.0031, ...]}

`batch` submits n jobs at once and times submit to the last result; `sequential` submits one
job, waits for its result, and then the next, timing each. A failure answers {"error": TEXT}.
Every wait is bounded: by the request's "deadline" (seconds, for each wait), or DEADLINE.

HyperQueue's own `wait_for_jobs` asks the server once a second, which would put up to a second
on every figure. The client asks instead through the same call with a progress callback that
stops the wait after its first answer: one JobInfo request per probe, every BATCH_PROBE seconds
for a batch and every SEQUENTIAL_PROBE seconds for a single job.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEADLINE = 600.0
BATCH_PROBE = 0.001
SEQUENTIAL_PROBE = 0.0002
READY = "ready"  # the file hq-cluster writes into DIR once its server and worker run


# ---- Celery ------------------------------------------------------------------------------------


class CeleryClient:
    def __init__(self) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from celery import group

        from bench.peers.celery_app import run

        self.group, self.task = group, run

    def batch(self, n: int, command: str, deadline: float) -> float:
        started = time.perf_counter()
        result = self.group(self.task.s(command) for _ in range(n)).apply_async()
        codes = result.get(timeout=deadline)
        elapsed = time.perf_counter() - started
        _check(codes)
        return elapsed

    def sequential(self, n: int, command: str, deadline: float) -> list[float]:
        out, codes = [], []
        for _ in range(n):
            started = time.perf_counter()
            codes.append(self.task.delay(command).get(timeout=deadline))
            out.append(time.perf_counter() - started)
        _check(codes)
        return out


# ---- HyperQueue --------------------------------------------------------------------------------


class _Pending(Exception):
    """Raised from the progress callback: the probe's answer said the job has not ended."""


class HyperQueueClient:
    def __init__(self, server_dir: str) -> None:
        from hyperqueue import Client, Job

        self.client, self.job = Client(server_dir), Job
        self.workdir = Path(server_dir).parent / "hq-jobs"  # each task's stdout and stderr
        self.workdir.mkdir(exist_ok=True)

    def _submit(self, n: int, command: str) -> Any:
        job = self.job(default_workdir=self.workdir)
        for _ in range(n):
            job.program(["/bin/sh", "-c", command])
        return self.client.submit(job)

    def _ended(self, submitted: Any) -> bool:
        """One JobInfo request: has every task of the job ended? Raises if any failed."""
        seen: dict[int, Any] = {}

        def probe(status: dict[int, Any]) -> None:
            seen.update(status)
            if not all(s["completed"] for s in status.values()):
                raise _Pending

        try:
            failed = self.client.connection.wait_for_jobs([submitted.id], probe)
        except _Pending:
            return False
        if failed:
            raise RuntimeError(f"HyperQueue job {submitted.id} had failed tasks: {seen}")
        return True

    def _wait(self, submitted: Any, step: float, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._ended(submitted):
            if time.monotonic() > deadline:
                raise TimeoutError(f"HyperQueue job {submitted.id} not done in {seconds:g} s")
            time.sleep(step)

    def batch(self, n: int, command: str, deadline: float) -> float:
        started = time.perf_counter()
        self._wait(self._submit(n, command), BATCH_PROBE, deadline)
        return time.perf_counter() - started

    def sequential(self, n: int, command: str, deadline: float) -> list[float]:
        out = []
        for _ in range(n):
            started = time.perf_counter()
            self._wait(self._submit(1, command), SEQUENTIAL_PROBE, deadline)
            out.append(time.perf_counter() - started)
        return out


def hq_cluster(server_dir: str, cores: int, until: Callable[[], None]) -> None:
    """A HyperQueue server and one worker with `cores` cpus, both threads of this process (the
    wheel carries them; there is no `hq` binary), until `until` returns."""
    from hyperqueue.cluster import LocalCluster, WorkerConfig

    cluster = LocalCluster(server_dir=server_dir, worker_config=WorkerConfig(cores=cores))
    try:
        (Path(server_dir) / READY).write_text(str(os.getpid()))
        until()
    finally:
        cluster.stop()


# ---- main --------------------------------------------------------------------------------------


def _check(codes: list[int]) -> None:
    bad = [c for c in codes if c != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(codes)} jobs failed, e.g. exit {bad[0]}")


def serve(client: CeleryClient | HyperQueueClient) -> None:
    for line in sys.stdin:
        request = json.loads(line)
        deadline = float(request.get("deadline", DEADLINE))
        try:
            if request["op"] == "batch":
                answer: dict[str, Any] = {
                    "seconds": client.batch(request["n"], request["command"], deadline)
                }
            elif request["op"] == "sequential":
                seconds = client.sequential(request["n"], request["command"], deadline)
                answer = {"seconds": seconds}
            else:
                answer = {"error": f"unknown op {request['op']!r}"}
        except Exception as e:
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)


def _stdin_closed() -> None:
    sys.stdin.read()


def main(argv: list[str]) -> int:
    # SIGTERM unwinds through `finally`, so a HyperQueue cluster stops its threads cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if argv[:2] == ["client", "celery"]:
        serve(CeleryClient())
    elif argv[:2] == ["client", "hyperqueue"] and len(argv) == 3:
        serve(HyperQueueClient(argv[2]))
    elif argv[:1] == ["hq-cluster"] and len(argv) == 3:
        hq_cluster(argv[1], int(argv[2]), _stdin_closed)
    elif argv[:1] == ["selftest"] and len(argv) == 2:

        def one_job() -> None:
            HyperQueueClient(argv[1]).sequential(1, "true", 60)

        hq_cluster(argv[1], 1, one_job)
        print("hyperqueue: ran one job")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
