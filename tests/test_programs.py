"""What programs built on Banyan need from it: following the event log without polling, and
batched status and cancel that answer per id. A real broker and worker on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banyan.client import Client
from banyan.errors import NotFound
from tests.cluster import Cluster, scaled, wait_for
from tests.test_cli import Runner, runner


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("follow"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BANYAN_HOME", str(c.home))
        try:
            c.start_broker()
            c.start_worker("w1", cpus=2, memory=1000, gpus=1)
            yield c
        finally:
            c.stop()


@pytest.fixture
def cli(live: Cluster, capsys: pytest.CaptureFixture[str]) -> Runner:
    return runner(live, capsys)


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


# ---- batched status and cancel answer per id ------------------------------------------------


def test_cancel_of_a_missing_id_still_cancels_the_others(
    cli: Runner, live: Cluster, tmp_path: Path
) -> None:
    flag = tmp_path / "started"
    (running,) = cli("submit", f"touch {flag}; exec sleep 60").ids()
    (queued,) = cli("submit", "--hold", "true").ids()
    wait_for(flag.exists, 10, what="the job to start")
    r = cli("cancel", str(running), "999999", str(queued), "no-such-group")
    assert r.code == 1, r
    assert r.out == f"cancelled: {queued}\nstopping (cancel sent to the worker): {running}\n"
    assert r.err == "banyan-cancel: no group 'no-such-group'\nbanyan-cancel: no job 999999\n"
    w = live.client().wait([running, queued], timeout=scaled(20))
    assert [j.state for j in w.jobs] == ["cancelled", "cancelled"]


def test_cancel_json_lists_each_refused_target(cli: Runner) -> None:
    (held,) = cli("submit", "--hold", "true").ids()
    r = cli("cancel", "--json", str(held), "999998")
    assert r.code == 1
    assert r.json() == {
        "cancelled": [held],
        "pending": [],
        "already": [],
        "errors": [{"target": 999998, "error": "not_found", "message": "no job 999998"}],
    }
    assert json.loads(r.err) == {"error": "not_found", "message": "no job 999998"}
    ok = cli("cancel", "--json", str(held))
    assert ok.code == 0 and ok.json()["errors"] == [] and ok.err == ""


def test_status_of_a_missing_id_shows_the_others(cli: Runner) -> None:
    (job,) = cli("submit", "--hold", "--name", "still-here", "true").ids()
    r = cli("status", "--json", str(job), "999999")
    assert r.code == 1
    doc = r.json()
    assert [j["id"] for j in doc["jobs"]] == [job]
    assert doc["errors"] == [{"target": 999999, "error": "not_found", "message": "no job 999999"}]
    assert json.loads(r.err) == {"error": "not_found", "message": "no job 999999"}
    text = cli("status", "999999", str(job))
    assert text.code == 1 and text.out.startswith(f"job {job}  still-here")
    assert text.err == "banyan-status: no job 999999\n"
    alone = cli("status", "999999")
    assert (alone.code, alone.out, alone.err) == (1, "", "banyan-status: no job 999999\n")
    fine = cli("status", "--json", str(job))
    assert fine.code == 0 and fine.json()["errors"] == []
    cli("cancel", str(job))


def test_the_python_client_answers_per_id_only_when_asked(live: Cluster) -> None:
    c = live.client()
    (job,) = c.submit("true", hold=True, export="NONE").jobs
    st = c.status([job, 999999], each=True)
    assert [j.id for j in st.jobs] == [job]
    assert [(e.target, e.code) for e in st.errors] == [(999999, "not_found")]
    with pytest.raises(NotFound):
        c.status([job, 999999])
    with pytest.raises(NotFound):
        c.cancel([job, 999999])
    assert c.job(job).state == "inactive"  # refused whole: nothing changed
    done = c.cancel([job, 999999], each=True)
    assert done.cancelled == [job] and [e.target for e in done.errors] == [999999]


# ---- what a job is told about itself ----------------------------------------------------------


def test_a_job_is_told_its_id_attempt_and_what_it_reserved(live: Cluster, tmp_path: Path) -> None:
    c = live.client()
    names = ("BANYAN_JOB_ID", "BANYAN_ATTEMPT", "BANYAN_CPUS", "BANYAN_MEMORY_MB", "BANYAN_GPUS")
    show = "; ".join(f'echo "{n}=${n}"' for n in names)
    flag = tmp_path / "failed-once"
    once = f"[ -e {flag} ] || {{ touch {flag}; exit 1; }}"
    (job,) = c.submit(
        f"{show}; {once}", cpus=1.5, memory=300, gpus=1, max_attempts=2, export="NONE"
    ).jobs
    (plain,) = c.submit(show, export="NONE").jobs
    assert c.wait([job, plain], timeout=scaled(20)).all_succeeded
    told = dict(line.split("=", 1) for line in c.job(job).raw["output_tail"]["stdout"].split())
    assert told == {
        "BANYAN_JOB_ID": str(job),
        "BANYAN_ATTEMPT": "2",
        "BANYAN_CPUS": "1.5",
        "BANYAN_MEMORY_MB": "300",
        "BANYAN_GPUS": "1",
    }
    told = dict(line.split("=", 1) for line in c.job(plain).raw["output_tail"]["stdout"].split())
    assert (told["BANYAN_CPUS"], told["BANYAN_MEMORY_MB"], told["BANYAN_GPUS"]) == ("1", "0", "0")


def test_status_names_each_attempts_output_files(
    cli: Runner, live: Cluster, tmp_path: Path
) -> None:
    c = live.client()
    flag = tmp_path / "failed-once"
    command = f"echo out-$BANYAN_ATTEMPT; [ -e {flag} ] || {{ touch {flag}; exit 1; }}"
    (templated,) = c.submit(
        command, cwd=str(tmp_path), output="logs-{job}-{attempt}.txt", max_attempts=2,
        export="NONE",
    ).jobs  # fmt: skip
    (spooled,) = c.submit("echo spooled", export="NONE").jobs
    assert c.wait([templated, spooled], timeout=scaled(20)).all_succeeded
    history = c.job(templated).raw["history"]
    stem = f"{tmp_path}/logs-{templated}"
    assert [(a["stdout"], a["stderr"]) for a in history] == [
        (f"{stem}-1.txt", f"{stem}-1.txt.err"),
        (f"{stem}-2.txt", f"{stem}-2.txt.err"),
    ]
    assert [Path(a["stdout"]).read_text() for a in history] == ["out-1\n", "out-2\n"]
    (attempt,) = c.job(spooled).raw["history"]
    spool = live.root / "spool" / "w1" / c.job(spooled).raw["account"]
    assert attempt["stdout"] == f"{spool}/{spooled}.1.out"
    assert Path(attempt["stdout"]).read_text() == "spooled\n"
    text = cli("status", str(templated)).out
    assert f"  output      attempt 1: {stem}-1.txt, {stem}-1.txt.err\n" in text
    assert f"              attempt 2: {stem}-2.txt, {stem}-2.txt.err\n" in text
    assert "{job}" not in text


def test_an_open_group_is_closed_from_the_command_line(cli: Runner, live: Cluster) -> None:
    """A job after an open group waits, and says it waits for the group to be closed, until
    banyan-modify --close-group closes it; then it runs."""
    group = f"opened-{time.monotonic_ns()}"
    member = int(cli("submit", "--group", group, "--open", "--", "true").out)
    after = int(cli("submit", "--after", group, "--", "true").out)
    c = live.client()
    assert c.wait([member], timeout=scaled(20)).all_succeeded
    said = f"waiting for 1 dependency; group {group} still open: a dependency on a group is "
    wait_for(lambda: (c.job(after).reason or "").startswith(said), 10, what="the reason")
    assert f"(banyan-modify --close-group {group})" in (c.job(after).reason or "")
    assert cli("modify", "--close-group", group, "1").code == 2  # no job ids with it
    closed = cli("modify", "--close-group", group)
    assert closed.code == 0 and closed.out.startswith(f"group {group} (id "), closed
    assert ", sealed, " in closed.out
    assert c.wait([after], timeout=scaled(20)).all_succeeded
    again = cli("modify", "--json", "--close-group", group)
    assert again.code == 0 and json.loads(again.out)["group"]["open"] is False
    assert cli("modify", "--close-group", "no-such-group").code == 1
