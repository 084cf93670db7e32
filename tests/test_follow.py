"""What programs built on Banyan need from it: following the event log without polling, and
batched status and cancel that answer per id. A real broker and worker on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banyan.client import Client
from tests.cluster import Cluster, scaled, wait_for


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("follow"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BANYAN_HOME", str(c.home))
        try:
            c.start_broker()
            c.start_worker("w1", cpus=2, memory=1000)
            yield c
        finally:
            c.stop()


def head(c: Client) -> int:
    return c.events_head()


def test_a_waiting_read_is_answered_when_the_log_grows(live: Cluster, tmp_path: Path) -> None:
    c, other = live.client(), live.client()
    go = tmp_path / "go"
    (job,) = c.submit(f"while [ ! -e {go} ]; do sleep 0.01; done", export="NONE").jobs
    wait_for(lambda: c.job(job).state == "running", 10, what="the job to run")
    since = head(c)
    go.touch()
    start = time.monotonic()
    events, after = other.events(since, wait=scaled(20))
    took = time.monotonic() - start
    assert [e[2] for e in events] == [job] and events[0][4] == "terminated"
    assert after == events[-1][0] + 1
    assert took < scaled(2), f"the read came back {took:.2f} s after the job's end"


def test_a_waiting_read_with_nothing_new_comes_back_empty_after_its_wait(live: Cluster) -> None:
    c = live.client()
    since = head(c)
    start = time.monotonic()
    events, after = c.events(since, wait=0.3)
    took = time.monotonic() - start
    assert (events, after) == ([], since)
    assert 0.25 <= took < scaled(2)


def test_a_read_without_wait_still_answers_at_once(live: Cluster) -> None:
    c = live.client()
    since = head(c)
    start = time.monotonic()
    assert c.events(since) == ([], since)
    assert time.monotonic() - start < scaled(1)


def test_a_read_past_the_next_event_waits_for_that_one(live: Cluster) -> None:
    """`since` two ahead of the log: the first new event does not answer it, the second does."""
    c, follower = live.client(), live.client()
    since = head(c)
    # Sent, not yet answered: a held job makes one event (submitted), its cancel a second.
    req = follower._send("events", {"since": since + 1, "limit": 10, "wait": scaled(10)})
    (job,) = c.submit("true", hold=True, export="NONE").jobs
    assert follower._next(0.3) is None
    c.cancel([job])
    msg = follower._next(scaled(5))
    assert msg is not None and msg.req == req
    rows = msg.body["events"]
    assert [(r[0], r[2], r[4]) for r in rows] == [(since + 1, job, "cancelled")]
