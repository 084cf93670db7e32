"""What counts against max_attempts, and how long an attempt has run, as banyan-status and
banyan-stats show them (docs/cli.md): a run put back without spending an attempt (its worker
was lost or stopped, or stopped it) is not counted, and the time shown for a running job is its
current attempt's. Pure: the state machine and the broker's views over a real LMDB store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from banyan.broker import stats, views
from banyan.cli.stats import render
from banyan.cli.status import elapsed, row, state_line
from tests.statekit import ROOT, Harness, spec


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "store")
    yield harness
    harness.store.close()


def info(h: Harness, job_id: int, detail: bool = False) -> dict[str, Any]:
    with h.store.read() as tx:
        return views.job_info(tx, h.job(job_id), list(tx.workers()), detail)


def test_a_requeue_after_a_lost_worker_or_a_cold_stop_counts_no_attempt(h: Harness) -> None:
    for name in ("a", "b", "c"):
        h.add_worker(name)
    (job,) = h.submit(spec(max_attempts=1))
    h.claim("a")
    h.do(lambda c: c.worker_lost("a", "silent"))
    waiting = info(h, job)
    assert (waiting["attempts"], waiting["counted"]) == (1, 0)
    assert row(waiting, h.now)[4] == "0/1"  # not "1/1": its one attempt is still to come
    (b,) = h.claim("b")
    h.do(lambda c: c.draining("b"))
    h.finish("b", b, exit_code=None, outcome="cancelled")  # b's cold stop
    (c,) = h.claim("c")
    running = info(h, job, detail=True)
    assert (running["attempts"], running["counted"]) == (3, 1)
    assert row(running, h.now)[4] == "1/1"  # not "3/1"
    line = state_line(running, h.now)
    assert line.startswith("running, attempt 1 of 1 (2 runs requeued without spending an attempt)")
    h.finish("c", c)
    assert info(h, job)["counted"] == 1 and h.job(job).outcome == "success"


def test_failures_count_and_the_job_that_ended_shows_what_it_spent(h: Harness) -> None:
    h.add_worker("w")
    (job,) = h.submit(spec(max_attempts=2))
    h.finish("w", h.claim("w")[0], exit_code=1)
    again = info(h, job)
    assert again["counted"] == 1 and row(again, h.now)[4] == "1/2"
    assert state_line(again, h.now) == "available, 1 of 2 attempts spent"
    h.finish("w", h.claim("w")[0], exit_code=1)
    ended = info(h, job)
    assert (ended["state"], ended["counted"]) == ("terminated", 2)


def test_a_running_jobs_time_is_its_current_attempts(h: Harness) -> None:
    h.add_worker("a")
    h.add_worker("b")
    (job,) = h.submit(spec())
    (a,) = h.claim("a")
    h.do(lambda c: c.started("a", job, a["token"]))
    h.now += 15
    h.do(lambda c: c.worker_lost("a", "silent"))  # 15 s into its first run
    h.now += 5
    h.claim("b")
    h.now += 9
    running = info(h, job)
    assert running["started"] == 1000.0  # the job's first start, as before
    assert running["attempt_started"] == h.now - 9
    assert elapsed(running, h.now) == "9s"  # not 29s
    assert state_line(running, h.now).endswith("on b for 9s")


def test_an_ended_jobs_time_is_its_last_attempts(h: Harness) -> None:
    h.add_worker("w")
    (job,) = h.submit(spec(max_attempts=2))
    h.finish("w", h.claim("w")[0], exit_code=1)
    h.now += 30
    (a,) = h.claim("w")
    h.now += 4
    h.finish("w", a)
    assert elapsed(info(h, job), h.now) == "4s"


def test_stats_run_times_are_per_attempt(h: Harness) -> None:
    h.add_worker("a")
    h.add_worker("b")
    (job,) = h.submit(spec())
    (a,) = h.claim("a")
    h.do(lambda c: c.started("a", job, a["token"]))
    h.now += 100
    h.do(lambda c: c.worker_lost("a", "silent"))
    h.now += 50
    (b,) = h.claim("b")
    h.do(lambda c: c.started("b", job, b["token"]))
    h.now += 10
    h.finish("b", b)
    with h.store.read() as tx:
        run_time = stats.summary(tx, h.now)["run_time"]
    # Two runs, of 100 s and 10 s; not one of 160 s from its first start to its end.
    assert (run_time["n"], run_time["max"]) == (2, 100.0)


def test_stats_show_requeued_attempts_and_lost_and_stopped_workers(h: Harness) -> None:
    for name in ("a", "b", "c", "d"):
        h.add_worker(name)
    lost_once, stopped_once, _failed = h.submit(spec(), spec(), spec(max_attempts=2))
    assert [x["job"] for x in h.claim("a", 1)] == [lost_once]
    h.do(lambda c: c.worker_lost("a", "silent"))  # requeued: lost_once
    (b,) = h.claim("b")
    assert b["job"] == lost_once
    h.finish("b", b)
    (c,) = h.claim("c")
    assert c["job"] == stopped_once
    h.do(lambda c_: c_.draining("c"))
    h.finish("c", c, exit_code=None, outcome="cancelled")  # c's cold stop: requeued
    h.do(lambda c_: c_.stopped("c"))
    for _ in range(3):  # stopped_once once, failed twice (retried, then it ends failed)
        (x,) = h.claim("d")
        h.finish("d", x, exit_code=0 if x["job"] == stopped_once else 1)
    with h.store.read() as tx:
        s = stats.summary(tx, h.now)
    assert s["attempts"] == {
        "ended": 6,
        "outcomes": {"success": 2, "failed": 2, "timeout": 0, "lost": 1, "cancelled": 1},
        "requeued": 2,
    }
    assert s["outcomes"] == {"success": 2, "failed": 1, "timeout": 0, "lost": 0}
    assert (s["workers"]["live"], s["workers"]["lost"], s["workers"]["stopped"]) == (2, 1, 1)
    text = render(s)
    assert (
        "attempts      6 ended (2 success, 2 failed, 0 timeout, 1 lost, 1 cancelled); "
        "2 requeued without spending an attempt"
    ) in text
    assert "workers       2 live, 1 lost, 1 stopped; 0/4 cpus in use (0% utilisation)" in text


def test_a_lost_attempt_that_ended_its_job_was_not_requeued(h: Harness) -> None:
    h.add_worker("w")
    (job,) = h.submit(spec())
    h.claim("w")
    h.do(lambda c: c.cancel(ROOT, [job], [], None))  # pending: its worker is told
    h.do(lambda c: c.worker_lost("w", "silent"))  # and lost before it answered
    assert h.state(job) == "cancelled"
    with h.store.read() as tx:
        attempts = stats.summary(tx, h.now)["attempts"]
    assert attempts["outcomes"]["lost"] == 1 and attempts["requeued"] == 0
