"""When an attempt started, as the broker records it from the worker's delayed reports.

The worker sends `started` a little after the start, with its age, and not at all for a job
that ends sooner: then the result's runtime dates the start. Durations only, one clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from banyan.broker.records import Attempt
from tests.statekit import Harness, spec


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "store")
    harness.add_worker("w")
    yield harness
    harness.store.close()


def claimed(h: Harness) -> dict[str, Any]:
    h.submit(spec())
    (a,) = h.claim("w")
    return a


def attempt(h: Harness, job: int) -> Attempt:
    with h.store.read() as tx:
        return tx.attempts_of(job)[-1]


def test_started_is_dated_by_its_age(h: Harness) -> None:
    a = claimed(h)
    h.now += 0.5
    h.do(lambda c: c.started("w", a["job"], a["token"], 0.2))
    assert attempt(h, a["job"]).started == pytest.approx(1000.3)


def test_a_start_is_never_dated_before_the_claim(h: Harness) -> None:
    a = claimed(h)
    h.now += 0.5
    h.do(lambda c: c.started("w", a["job"], a["token"], 30.0))
    assert attempt(h, a["job"]).started == 1000.0


def test_a_result_without_started_dates_the_start_by_its_runtime(h: Harness) -> None:
    a = claimed(h)
    h.now += 0.01
    h.do(lambda c: c.result("w", a["job"], a["token"], "exited", 0, None, runtime=0.004))
    got = attempt(h, a["job"])
    assert got.started == pytest.approx(1000.006) and got.ended == pytest.approx(1000.01)
    assert h.job(a["job"]).outcome == "success"


def test_a_reported_start_is_kept_when_the_result_comes(h: Harness) -> None:
    a = claimed(h)
    h.now += 0.1
    h.do(lambda c: c.started("w", a["job"], a["token"], 0.05))
    h.now += 1.0
    h.do(lambda c: c.result("w", a["job"], a["token"], "exited", 0, None, runtime=0.9))
    assert attempt(h, a["job"]).started == pytest.approx(1000.05)


def test_a_job_starts_when_its_first_process_does_not_when_it_is_claimed(tmp_path: Path) -> None:
    h = Harness(tmp_path / "store")
    h.add_worker("w")
    h.submit(spec(max_attempts=2))
    (a,) = h.claim("w")
    assert h.job(a["job"]).started is None  # claimed, but nothing runs yet
    h.now += 2.0
    h.do(lambda c: c.started("w", a["job"], a["token"], 0.5))
    assert h.job(a["job"]).started == pytest.approx(1001.5)
    h.do(lambda c: c.result("w", a["job"], a["token"], "exited", 1, None))
    (b,) = h.claim("w")
    h.now += 1.0
    h.do(lambda c: c.started("w", b["job"], b["token"], 0.0))
    assert h.job(a["job"]).started == pytest.approx(1001.5)  # a retry keeps the first start
    h.store.close()


def test_a_short_job_starts_when_its_runtime_says(h: Harness) -> None:
    a = claimed(h)
    h.now += 3.0
    h.do(lambda c: c.result("w", a["job"], a["token"], "exited", 0, None, runtime=0.01))
    assert h.job(a["job"]).started == pytest.approx(1002.99)
