"""The Celery application the peer benchmark's worker runs (`celery -A bench.peers.celery_app`).

One task: run a shell command as `/bin/sh -c COMMAND`, as Banyan and `xargs` do, and return its
exit status. Its output goes to the worker's log, not to a file per job. Broker and result
backend are the bench's own Redis on loopback, named by BANYAN_BENCH_REDIS.
"""

from __future__ import annotations

import os
import subprocess

from celery import Celery

REDIS = os.environ.get("BANYAN_BENCH_REDIS", "redis://127.0.0.1:6379")

app = Celery("banyan_bench", broker=f"{REDIS}/0", backend=f"{REDIS}/1")
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # Everything else is Celery's default: prefetch multiplier 4, early acknowledgement,
    # results kept in Redis for a day.
)


@app.task(name="run")  # type: ignore[untyped-decorator]
def run(command: str) -> int:
    return subprocess.run(command, shell=True, check=False).returncode
