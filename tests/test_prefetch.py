"""Claim-ahead with a real broker and real workers (SPEC §5): a job held ahead shows as assigned
and waiting for a slot, starts in the slot that frees, is asked back for a worker with room, and
comes back unstarted, spending nothing, when its worker drains, dies or the job is cancelled."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from banyan.client import Client
from tests.cluster import ALLOW_ROOT, HEARTBEAT, LIVENESS, Cluster, wait_for
from tests.test_cli import runner

WINDOW = HEARTBEAT * LIVENESS


class HoldingCluster(Cluster):
    """Its workers hold two jobs ahead whatever the length of their jobs (`--prefetch 2`)."""

    def start_worker(self, *args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("extra", (*ALLOW_ROOT, "--prefetch", "2"))
        return super().start_worker(*args, **kwargs)


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A broker that lets workers hold two jobs ahead (`--prefetch 2`), and workers that do."""
    c = HoldingCluster(tmp_path)
    c.broker_args = ["--prefetch", "2"]
    yield from serving(c, monkeypatch)


def serving(c: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """The cluster with its broker running, for the length of a test."""
    monkeypatch.setenv("BANYAN_HOME", str(c.home))
    c.start_broker()
    try:
        yield c
    finally:
        c.stop()


def blocker(gate: Path, mark: Path) -> str:
    """A job that says it runs, then waits (20 s at most) for `gate` to exist."""
    return f"touch {mark}; for i in $(seq 1000); do [ -e {gate} ] && exit 0; sleep 0.02; done"


def marker(mark: Path) -> str:
    return f"echo $BANYAN_ATTEMPT >> {mark}"


def held_ahead(c: Client, job: int, worker: str) -> bool:
    info = c.job(job)
    return (
        info.state == "running"
        and info.worker == worker
        and info.raw["ahead"] is True
        and info.reason == f"assigned to {worker}, waiting for a slot"
    )


def ended(c: Client, ids: list[int], timeout: float = 30) -> dict[int, str]:
    w = c.wait(ids, timeout=timeout)
    assert not w.timed_out, f"jobs still running: {[j for j in w.jobs if not j.terminal]}"
    return {j.id: f"{j.state}/{j.outcome}" for j in w.jobs}


def busy_worker(cluster: Cluster, tmp_path: Path, name: str = "w1") -> tuple[Client, int, Path]:
    """A 1-cpu worker running a job that waits for the returned gate."""
    cluster.start_worker(name, cpus=1)
    c = cluster.client()
    gate, mark = tmp_path / "gate", tmp_path / "first-ran"
    (first,) = c.submit(blocker(gate, mark)).jobs
    wait_for(mark.exists, 10, what="the first job to run")
    return c, first, gate


def test_a_job_held_ahead_waits_for_a_slot_then_runs_there(cluster: Cluster, tmp_path: Path):
    c, first, gate = busy_worker(cluster, tmp_path)
    marks = [tmp_path / f"m{i}" for i in range(3)]
    ids = [c.submit(marker(m)).jobs[0] for m in marks]
    wait_for(lambda: all(held_ahead(c, j, "w1") for j in ids[:2]), 10, what="two held ahead")
    assert c.job(ids[2]).state == "available"  # beyond the broker's prefetch, 2
    (w1,) = [w for w in c.workers() if w.name == "w1"]
    assert w1.ahead == ids[:2]
    assert not any(m.exists() for m in marks)  # none started while the slot was taken
    gate.touch()
    assert ended(c, [first, *ids]) == {j: "terminated/success" for j in [first, *ids]}
    for j, m in zip(ids, marks, strict=True):
        assert m.read_text() == "1\n" and c.job(j).attempts == 1 and c.job(j).worker == "w1"


def test_a_job_held_ahead_is_asked_back_for_a_worker_with_room(cluster: Cluster, tmp_path: Path):
    c, first, gate = busy_worker(cluster, tmp_path)
    mark = tmp_path / "second"
    (second,) = c.submit(marker(mark)).jobs
    wait_for(lambda: held_ahead(c, second, "w1"), 10, what="the job held ahead")
    cluster.start_worker("w2", cpus=1)
    # w2 is idle and the job fits it: w1 gives it back unstarted, and it runs on w2 while
    # the first job still holds w1's only slot.
    assert ended(c, [second]) == {second: "terminated/success"}
    info = c.job(second)
    assert info.worker == "w2" and info.attempts == 1 and mark.read_text() == "1\n"
    assert [a["outcome"] for a in info.raw["history"]] == ["success"]
    assert c.job(first).state == "running"
    gate.touch()
    assert ended(c, [first]) == {first: "terminated/success"}


def test_a_draining_worker_gives_back_what_it_held_ahead_at_once(cluster: Cluster, tmp_path: Path):
    c, first, gate = busy_worker(cluster, tmp_path)
    marks = [tmp_path / "a", tmp_path / "b"]
    ids = [c.submit(marker(m)).jobs[0] for m in marks]
    wait_for(lambda: all(held_ahead(c, j, "w1") for j in ids), 10, what="two held ahead")
    cluster.procs["w1"].send_signal(signal.SIGTERM)
    wait_for(lambda: all(c.job(j).state == "available" for j in ids), 5, what="the jobs given back")
    assert c.job(first).state == "running"  # the one it runs, it finishes
    cluster.start_worker("w2", cpus=1)
    gate.touch()
    states = ended(c, [first, *ids])
    assert states == {j: "terminated/success" for j in [first, *ids]}
    for j, m in zip(ids, marks, strict=True):
        assert c.job(j).worker == "w2" and c.job(j).attempts == 1
        assert m.read_text() == "1\n"  # run once, on w2 only


def test_an_admins_drain_has_the_worker_give_back_what_it_held_ahead(
    cluster: Cluster, tmp_path: Path
):
    c, _first, gate = busy_worker(cluster, tmp_path)
    (second,) = c.submit(marker(tmp_path / "second")).jobs
    wait_for(lambda: held_ahead(c, second, "w1"), 10, what="the job held ahead")
    c.drain("w1")
    wait_for(lambda: c.job(second).state == "available", 5, what="the job given back")
    assert c.job(second).attempts == 0
    gate.touch()
    wait_for(
        lambda: any(w.name == "w1" and w.state == "drained" for w in c.workers()),
        10,
        what="w1 drained",
    )
    assert not (tmp_path / "second").exists()


def spooled(cluster: Cluster, worker: str, job: int) -> list[str]:
    """What the worker's spool holds of the job's first attempt: its directory and files."""
    return sorted(p.name for p in (cluster.root / "spool" / worker).glob(f"*/{job}.1*"))


def test_cancel_of_a_job_held_ahead_never_starts_it(cluster: Cluster, tmp_path: Path):
    c, first, gate = busy_worker(cluster, tmp_path)
    mark = tmp_path / "never"
    (second,) = c.submit(marker(mark)).jobs
    wait_for(lambda: held_ahead(c, second, "w1"), 10, what="the job held ahead")
    # Made ready to start while the slot is busy: its directory and output files.
    wait_for(lambda: len(spooled(cluster, "w1", second)) == 3, 10, what="the job made ready")
    c.cancel([second])
    assert ended(c, [second], timeout=10) == {second: "cancelled/None"}
    wait_for(lambda: spooled(cluster, "w1", second) == [], 10, what="what was made undone")
    gate.touch()
    assert ended(c, [first]) == {first: "terminated/success"}
    assert not mark.exists()


def test_a_lost_worker_gives_back_what_it_held_ahead_spending_nothing(
    cluster: Cluster, tmp_path: Path
):
    c, first, gate = busy_worker(cluster, tmp_path)
    (second,) = c.submit(marker(tmp_path / "second"), max_attempts=1).jobs
    wait_for(lambda: held_ahead(c, second, "w1"), 10, what="the job held ahead")
    # Silent, not killed: a killed worker's helpers and jobs would become this process's
    # zombies where an earlier test made it a child subreaper (in-process runners do).
    cluster.procs["w1"].send_signal(signal.SIGSTOP)
    gate.touch()
    cluster.start_worker("w2", cpus=1)
    assert ended(c, [first, second], timeout=WINDOW + 30) == {
        first: "terminated/success",
        second: "terminated/success",
    }
    info = c.job(second)
    assert info.worker == "w2" and info.attempts == 1
    assert info.raw["history"][0]["outcome"] == "success"  # the claim given back left none
    # Woken, w1 registers again, its result for `first` is refused as stale, and it stops.
    cluster.procs["w1"].send_signal(signal.SIGCONT)
    cluster.kill("w1", signal.SIGTERM)
    assert cluster.procs["w1"].returncode == 0


def _most_at_once(stamps: Path) -> int:
    """The most jobs running together, from the `start`/`end` lines they wrote."""
    events = []
    for line in stamps.read_text().splitlines():
        _, kind, at = line.split()
        events.append((float(at), 0 if kind == "end" else 1))
    most = now = 0
    for _, starts in sorted(events):
        now += 1 if starts else -1
        most = max(most, now)
    return most


def test_jobs_that_end_together_never_crowd_their_worker(cluster: Cluster, tmp_path: Path):
    """A 3-cpu worker whose jobs end together starts the ones it held ahead in their room, and
    the broker, hearing of the ends one message at a time, must not give that same room to a
    new claim: never more than 3 one-cpu jobs at once."""
    cluster.start_worker("w1", cpus=3)
    c = cluster.client()
    stamps = tmp_path / "stamps"
    stamp = f'echo "$BANYAN_JOB_ID {{}} $(date +%s.%N)" >> {stamps}'
    ids = c.submit(
        f"{stamp.format('start')}; sleep 0.3; {stamp.format('end')}", array="1-45", export="NONE"
    ).jobs
    assert set(ended(c, ids, timeout=120).values()) == {"terminated/success"}
    assert _most_at_once(stamps) <= 3


@pytest.fixture
def plain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A broker and workers on their defaults: each worker asks for as many jobs held ahead
    as its jobs' length calls for, within the broker's prefetch."""
    (tmp_path / "plain").mkdir()
    yield from serving(Cluster(tmp_path / "plain"), monkeypatch)


def test_long_jobs_are_held_nowhere_so_priority_decides_at_every_slot(
    plain: Cluster, tmp_path: Path
):
    plain.start_worker("w1", cpus=1)
    plain.start_worker("w2", cpus=1)
    c = plain.client()
    warm = c.submit(jobs=[{"command": "sleep 0.3"}] * 2).jobs  # the workers learn the length
    ended(c, warm)
    starts = tmp_path / "starts"
    lows = c.submit(jobs=[{"command": f"echo low >> {starts}; sleep 0.5"}] * 6).jobs
    wait_for(lambda: starts.exists() and len(starts.read_text().split()) == 2, 10, what="2 runs")
    assert all(w.ahead == [] for w in c.workers())
    assert [c.job(j).state for j in lows[2:]] == ["available"] * 4  # held nowhere
    (high,) = c.submit(f"echo high >> {starts}", priority=100).jobs
    ended(c, [*lows, high])
    # One of the two slots that freed first took the later job of higher priority (the other
    # may write its line first).
    lines = starts.read_text().split()
    assert sorted(lines) == ["high", *["low"] * 6] and lines.index("high") in (2, 3), lines


def test_a_stream_of_short_jobs_is_held_ahead(plain: Cluster):
    plain.start_worker("w1", cpus=2)
    c = plain.client()
    since = c.events_head()
    ids = c.submit(jobs=[{"command": "true"}] * 400).jobs
    ended(c, ids, timeout=120)
    reasons: set[str] = set()
    for _ in range(100):  # the events of 400 jobs, a page at a time
        events, since = c.events(since=since)
        if not events:
            break
        reasons.update(str(e[5]) for e in events)
    assert "assigned to w1, waiting for a slot" in reasons
    assert all(c.job(j).attempts == 1 for j in ids[::40])


def test_a_job_held_ahead_touches_no_file_it_names_until_it_starts(
    cluster: Cluster, tmp_path: Path
):
    c, first, gate = busy_worker(cluster, tmp_path)
    named = tmp_path / "keep.out"
    named.write_text("the user's own\n")
    (second,) = c.submit("echo ran", output=str(named)).jobs
    wait_for(lambda: held_ahead(c, second, "w1"), 10, what="the job held ahead")
    (third,) = c.submit("true").jobs  # made ready in the meantime, after the second
    wait_for(lambda: len(spooled(cluster, "w1", third)) == 3, 10, what="the third made ready")
    c.cancel([second])
    assert ended(c, [second], timeout=10) == {second: "cancelled/None"}
    assert named.read_text() == "the user's own\n"
    gate.touch()
    ended(c, [first, third])


def test_jobs_held_ahead_start_once_a_silent_broker_is_heard_again(
    cluster: Cluster, tmp_path: Path
):
    """Held jobs wait while the broker may count the worker lost (half the window without word
    from it), and start once it is heard from again: a pause (of the broker here, of the worker
    in the field) must not leave them held for good."""
    c, first, gate = busy_worker(cluster, tmp_path)
    marks = [tmp_path / f"m{i}" for i in range(2)]
    ids = [c.submit(marker(m)).jobs[0] for m in marks]
    wait_for(lambda: all(held_ahead(c, j, "w1") for j in ids), 10, what="two held ahead")
    broker = cluster.procs["broker"]
    broker.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.6 * WINDOW)  # silent for more than half the window, less than all of it
        gate.touch()  # the slot frees while the worker may not start what it holds
        time.sleep(0.3 * WINDOW)
    finally:
        broker.send_signal(signal.SIGCONT)
    assert ended(c, [first, *ids]) == {j: "terminated/success" for j in [first, *ids]}
    assert all(m.read_text() == "1\n" for m in marks)


def test_long_jobs_after_short_ones_go_back_from_where_they_were_held(plain: Cluster):
    plain.start_worker("w1", cpus=1)
    c = plain.client()
    ended(c, c.submit(jobs=[{"command": "true"}] * 100).jobs)  # short: it asks for many
    longs = c.submit(jobs=[{"command": "sleep 30"}] * 4).jobs
    # Held behind the first while its length was not known; given back once it has run longer
    # than a slot runs in the horizon, spending no attempt.
    wait_for(lambda: c.job(longs[0]).state == "running", 10, what="the first long job")
    wait_for(lambda: [w.ahead for w in c.workers()] == [[]], 10, what="nothing held ahead")
    assert [(c.job(j).state, c.job(j).attempts) for j in longs[1:]] == [("available", 0)] * 3
    c.cancel(longs)
    ended(c, longs)


def test_a_stream_of_jobs_that_end_at_once_is_never_told_stale(plain: Cluster):
    """A job held ahead that starts and ends within one turn of the worker is told by its own
    result: the broker never answers it with a kill for an attempt it already ended."""
    plain.start_worker("w1", cpus=2)
    c = plain.client()
    ids = c.submit(jobs=[{"command": "true"}] * 1500).jobs
    assert set(ended(c, ids, timeout=120).values()) == {"terminated/success"}
    assert "is not ours any more" not in plain.log("w1")


def test_a_job_held_ahead_is_shown_held_not_started(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    c, first, gate = busy_worker(cluster, tmp_path)
    (second,) = c.submit("true").jobs
    wait_for(lambda: held_ahead(c, second, "w1"), 10, what="the job held ahead")
    assert c.job(second).raw["attempt_started"] is None
    status = runner(cluster, capsys)
    shown = status("status", str(second))
    assert shown.code == 0, shown.err
    assert "state       running, attempt 1 of 1, held ahead on w1\n" in shown.out
    (row,) = [line.split() for line in shown.out.splitlines() if line.strip().startswith("1 ")]
    assert row[:5] == ["1", "w1", "-", "-", "held"], shown.out
    gate.touch()
    ended(c, [first, second])
