"""Functions the banyan.futures tests run as jobs: importable by module on the workers, and
light to import (each job imports this module)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


class Odd(ValueError):
    pass


def boom(x: int) -> int:
    if x % 2:
        raise Odd(f"{x} is odd")
    return x


def wait_for_file(started: str, release: str, value: int) -> int:
    """Say it started (with its pid), then wait up to 60 s for `release` to exist."""
    Path(started).write_text(str(os.getpid()))
    for _ in range(6000):
        if os.path.exists(release):
            return value
        time.sleep(0.01)
    raise TimeoutError(release)


def chatty(n: int) -> int:
    from banyan import progress

    print(f"working on {n}", flush=True)
    progress(50, f"half of {n}")
    time.sleep(0.6)  # the worker forwards progress every quarter of a second
    return n + 1


def nbytes(n: int) -> bytes:
    return b"x" * n


def job_id() -> str:
    return os.environ["BANYAN_JOB_ID"]
