"""The whole job lifecycle with a real broker, real workers and real jobs (SPEC §5, §7)."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from banyan import protocol
from banyan.cli import logs as logs_cli
from banyan.client import Client, JobInfo, LogChunk
from tests.cluster import HEARTBEAT, LIVENESS, Cluster, pids_with_marker, scaled, wait_for

WINDOW = HEARTBEAT * LIVENESS


def stamp(path: Path, what: str) -> str:
    """A shell snippet that appends `what <epoch seconds>` to `path`."""
    return f'echo "{what} $(date +%s.%N)" >> {path}'


def stamps(path: Path) -> dict[str, float]:
    out = {}
    for line in path.read_text().splitlines():
        what, when = line.split()
        out[what] = float(when)
    return out


def ended(c: Client, ids: list[int], timeout: float = 30) -> dict[int, str]:
    w = c.wait(ids, timeout=scaled(timeout))
    assert not w.timed_out, f"jobs still running: {[j for j in w.jobs if not j.terminal]}"
    return {j.id: f"{j.state}/{j.outcome}" for j in w.jobs}


def test_success_and_failure(cluster: Cluster) -> None:
    cluster.start_worker("w1")
    c = cluster.client()
    ok = c.submit("echo hello; echo warn >&2").jobs[0]
    bad = c.submit("echo oops >&2; exit 3").jobs[0]
    assert ended(c, [ok, bad]) == {ok: "terminated/success", bad: "terminated/failed"}
    good, fail = c.job(ok), c.job(bad)
    assert good.exit_code == 0 and fail.exit_code == 3
    assert good.raw["output_tail"]["stdout"] == "hello\n"
    assert good.raw["output_tail"]["stderr"] == "warn\n"
    assert fail.raw["output_tail"]["stderr"] == "oops\n"
    assert good.worker == "w1" and good.raw["history"][0]["worker"] == "w1"


def test_retry_succeeds_on_third_attempt(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_worker("w1")
    c = cluster.client()
    count = tmp_path / "count"
    script = f"n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}; [ $n -ge 3 ]"
    (j,) = c.submit(script, max_attempts=3).jobs
    assert ended(c, [j]) == {j: "terminated/success"}
    info = c.job(j)
    assert info.attempts == 3
    assert [a["outcome"] for a in info.raw["history"]] == ["failed", "failed", "success"]


def test_diamond_and_group_order(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_worker("w1", cpus=4)
    c = cluster.client()
    log = tmp_path / "order"

    def step(name: str) -> str:
        return f"{stamp(log, name + '.start')}; sleep 0.1; {stamp(log, name + '.end')}"

    jobs: list[dict[str, Any]] = [
        {"command": step("A")},
        {"command": step("B"), "depends_on": [{"local": 0}]},
        {"command": step("C"), "depends_on": [{"local": 0}]},
        {"command": step("D"), "depends_on": [{"local": 1}, {"local": 2}]},
    ]
    jobs += [{"command": step(f"m{i}"), "groups": ["sweep"]} for i in range(10)]
    jobs.append({"command": step("R"), "depends_on": [{"group": "sweep"}]})
    ids = c.submit(jobs=jobs, groups=[{"name": "sweep"}]).jobs
    assert set(ended(c, ids).values()) == {"terminated/success"}
    t = stamps(log)
    assert t["B.start"] >= t["A.end"] and t["C.start"] >= t["A.end"]
    assert t["D.start"] >= max(t["B.end"], t["C.end"])
    assert t["R.start"] >= max(t[f"m{i}.end"] for i in range(10))


def test_final_failure_cancels_diamond(cluster: Cluster) -> None:
    cluster.start_worker("w1")
    c = cluster.client()
    a, b, cc, d = c.submit(
        jobs=[
            {"command": "exit 1", "max_attempts": 2},
            {"command": "true", "depends_on": [{"local": 0}]},
            {"command": "true", "depends_on": [{"local": 0}]},
            {"command": "true", "depends_on": [{"local": 1}, {"local": 2}]},
        ]
    ).jobs
    assert ended(c, [a, b, cc, d]) == {
        a: "terminated/failed",
        b: "cancelled/None",
        cc: "cancelled/None",
        d: "cancelled/None",
    }
    assert c.job(b).raw["cancel_reason"] == f"dependency {a} failed"
    assert f"dependency {b}" in c.job(d).raw["cancel_reason"]


def test_cpu_limit_and_unrunnable(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_worker("w1", cpus=2)
    c = cluster.client()
    ids = [
        c.submit(
            f"{stamp(tmp_path / f'j{i}', 's')}; sleep 0.5; {stamp(tmp_path / f'j{i}', 'e')}", cpus=1
        ).jobs[0]
        for i in range(3)
    ]
    (big,) = c.submit("true", cpus=4).jobs
    assert set(ended(c, ids).values()) == {"terminated/success"}
    spans = [stamps(tmp_path / f"j{i}") for i in range(3)]
    for t in (s["s"] + 0.01 for s in spans):
        assert sum(1 for s in spans if s["s"] <= t < s["e"]) <= 2
    assert any(s["s"] >= min(x["e"] for x in spans) - 0.05 for s in spans)  # one had to wait
    reason = c.job(big).reason or ""
    assert "no worker can ever run this: needs 4 cpus, largest worker has 2" in reason


def test_cancel_trapping_job(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_worker("w1")
    c = cluster.client()
    marker = tmp_path / "trapped"
    started = tmp_path / "started"
    (j,) = c.submit(
        f"trap 'echo bye > {marker}; exit 0' TERM; touch {started}; while true; do sleep 0.05; done"
    ).jobs
    wait_for(started.exists, 10, what="the job to start")
    c.cancel([j])
    assert ended(c, [j]) == {j: "cancelled/None"}
    assert marker.read_text() == "bye\n"


def test_cancel_ignoring_job_is_killed_after_grace(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_worker("w1")
    c = cluster.client()
    started = tmp_path / "started"
    grace = 1.0
    (j,) = c.submit(
        f"trap '' TERM; touch {started}; sleep 1000.7 & sleep 1000.7; wait", cancel_grace=grace
    ).jobs
    wait_for(started.exists, 10, what="the job to start")
    wait_for(lambda: len(pids_with_marker("1000.7")) >= 2, 5, what="the sleeps")
    t0 = time.monotonic()
    c.cancel([j])
    assert ended(c, [j]) == {j: "cancelled/None"}
    gap = time.monotonic() - t0
    assert grace <= gap < grace + scaled(3)
    assert pids_with_marker("1000.7") == []


def test_background_child_dies_with_cancel(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_worker("w1")
    c = cluster.client()
    (j,) = c.submit("sleep 1000.3 & echo started; wait", cancel_grace=1).jobs
    wait_for(lambda: pids_with_marker("1000.3"), 10, what="the background sleep")
    c.cancel([j])
    ended(c, [j])
    assert wait_for(lambda: not pids_with_marker("1000.3"), 5, what="no survivors") is True


def test_a_fork_loop_leaves_the_worker_no_zombies(cluster: Cluster, tmp_path: Path) -> None:
    """The worker is the subreaper of its jobs' orphans: it reaps them as they exit, while
    the job runs and after its cancel, not when some later job ends."""
    proc = cluster.start_worker("w1")
    loop = tmp_path / "loop.py"
    loop.write_text(
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "if os.fork(): time.sleep(600); sys.exit(0)\n"
        "os.setsid()\n"
        f"for i in range(100000):\n"
        "    if os.fork(): os._exit(0)\n"
        f"    if i == 200: open({str(tmp_path / 'gate')!r}, 'w').close()\n"
        "    time.sleep(0.002)\n"
    )
    c = cluster.client()
    (job,) = c.submit(f"exec {sys.executable} {loop}", cancel_grace=0.5).jobs
    wait_for(lambda: (tmp_path / "gate").exists(), 20, what="the fork loop")
    worker = psutil.Process(proc.pid)

    def zombies() -> int:
        count = 0
        for p in worker.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                count += p.status() == psutil.STATUS_ZOMBIE
        return count

    # 200 have exited so far, one more every 2 ms: a few wait to be reaped at any moment
    wait_for(lambda: zombies() < 20, 10, what="the worker to reap orphans as they exit")
    c.cancel([job])
    assert ended(c, [job]) == {job: "cancelled/None"}
    wait_for(lambda: zombies() == 0, 10, what="the worker to reap every orphan")


def test_time_limit_gives_timeout(cluster: Cluster) -> None:
    cluster.start_worker("w1")
    c = cluster.client()
    (j,) = c.submit("sleep 1000.5", time_limit=0.5, cancel_grace=0.5).jobs
    assert ended(c, [j]) == {j: "terminated/timeout"}
    assert not pids_with_marker("1000.5")


def test_progress_visible_while_running(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_worker("w1")
    c = cluster.client()
    go = tmp_path / "go"
    (j,) = c.submit(
        f'echo "10 warming up" > "$BANYAN_PROGRESS_FILE"; sleep 0.3; '
        f'echo "42.5 epoch 3/10" >> "$BANYAN_PROGRESS_FILE"; '
        f"while [ ! -e {go} ]; do sleep 0.05; done"
    ).jobs

    def at_42() -> JobInfo | None:
        info = c.job(j)
        return info if info.progress == 42.5 else None

    info = wait_for(at_42, 10, what="progress 42.5")
    assert info.progress_message == "epoch 3/10" and info.state == "running"
    go.touch()
    assert ended(c, [j]) == {j: "terminated/success"}


def test_worker_kill9_requeues_on_other_worker(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_worker("w1")
    c = cluster.client()
    started = tmp_path / "started"
    (j,) = c.submit(f"echo $BANYAN_ATTEMPT >> {started}; sleep 1.5", max_attempts=1).jobs
    wait_for(lambda: c.job(j).state == "running", 10, what="the job to run")
    wait_for(started.exists, 10, what="the job's process")
    cluster.start_worker("w2")
    t0 = time.monotonic()
    cluster.kill("w1")
    wait_for(
        lambda: c.job(j).worker == "w2" and c.job(j).state == "running",
        WINDOW + 5,
        what="the job to run on w2",
    )
    rerun = time.monotonic() - t0
    assert rerun < scaled(WINDOW + 5)
    assert ended(c, [j]) == {j: "terminated/success"}
    info = c.job(j)
    assert info.raw["history"][0]["outcome"] == "lost"
    assert info.attempts == 2  # the lost attempt did not spend the single allowed failure


def test_broker_kill9_while_jobs_run(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_worker("w1", cpus=4)
    c = cluster.client()
    ids = [c.submit(f"sleep 1; echo {i}", name=f"j{i}").jobs[0] for i in range(4)]
    wait_for(lambda: all(c.job(i).state == "running" for i in ids), 10, what="all running")
    cluster.kill("broker")
    cluster.start_broker()
    c2 = cluster.client()
    assert ended(c2, ids, timeout=30) == {i: "terminated/success" for i in ids}
    for i in ids:
        info = c2.job(i)
        assert info.attempts == 1, "the running attempt continued across the restart"
    events, _ = c2.events(1, 10000)
    terminated = [e[2] for e in events if e[4] == "terminated"]
    assert sorted(terminated) == sorted(ids)  # each recorded exactly once


def test_stopped_worker_is_fenced(cluster: Cluster, tmp_path: Path) -> None:
    w1 = cluster.start_worker("w1")
    c = cluster.client()
    # The first attempt never ends by itself: only the fence can stop it.
    script = 'if [ "$BANYAN_ATTEMPT" = 1 ]; then sleep 1000.9 & sleep 1000.9; fi; echo done-2'
    (j,) = c.submit(script, max_attempts=1).jobs
    wait_for(
        lambda: c.job(j).worker == "w1" and len(pids_with_marker("1000.9")) >= 2,
        10,
        what="the job on w1",
    )
    stale = pids_with_marker("1000.9")
    w1.send_signal(signal.SIGSTOP)
    cluster.start_worker("w2")
    wait_for(lambda: c.job(j).worker == "w2", WINDOW + 5, what="the job to move to w2")
    assert ended(c, [j]) == {j: "terminated/success"}
    assert all(psutil.pid_exists(p) for p in stale)  # still there while w1 sleeps
    w1.send_signal(signal.SIGCONT)
    # w1 wakes up believing it still holds the job: the broker fences it and it kills the group
    wait_for(lambda: not any(psutil.pid_exists(p) for p in stale), 10, what="stale group killed")
    assert w1.poll() is None, "w1 died instead of being fenced"
    info = c.job(j)
    assert [a["worker"] for a in info.raw["history"]] == ["w1", "w2"]
    assert info.raw["history"][0]["outcome"] == "lost"
    assert info.raw["output_tail"]["stdout"] == "done-2\n"
    wait_for(lambda: "not ours any more" in cluster.log("w1"), 10, what="w1 to log the fence")


@pytest.mark.parametrize("n", [200])
def test_many_small_jobs(cluster: Cluster, n: int) -> None:
    cluster.start_worker("w1")
    c = cluster.client()
    ids = c.submit(jobs=[{"command": "true"} for _ in range(n)]).jobs
    assert set(ended(c, ids, timeout=60).values()) == {"terminated/success"}


def test_logs_of_running_and_ended_job(
    cluster: Cluster,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster.start_worker("w1")
    c = cluster.client()
    go = tmp_path / "go"
    (j,) = c.submit(f"seq 1 3000; echo err >&2; while [ ! -e {go} ]; do sleep 0.05; done").jobs

    def grown() -> LogChunk | None:
        chunk = c.logs(j)
        return chunk if chunk.size > 10000 else None

    chunk = wait_for(grown, 10, what="output")
    assert chunk.live and not chunk.eof
    assert chunk.data.startswith(b"1\n2\n3\n") and len(chunk.data) == chunk.size
    part = c.logs(j, offset=chunk.size - 5)
    assert part.data == b"3000\n"
    go.touch()
    ended(c, [j])
    whole = c.logs(j)
    assert whole.eof and whole.data.endswith(b"2999\n3000\n") and whole.size == len(whole.data)
    assert c.logs(j, stream="stderr").data == b"err\n"
    cluster.kill("w1")
    stored = c.logs(j)  # its worker is gone: the stored 4 KiB tail
    assert not stored.live and stored.eof and stored.data.endswith(b"3000\n")
    assert len(stored.data) <= 4096
    assert stored.tail and not whole.tail
    # banyan-logs says that what it prints is only the kept tail; of a short output, nothing.
    monkeypatch.setenv("BANYAN_HOME", str(cluster.home))
    broker = ["--broker", f"127.0.0.1:{cluster.client_port}"]
    capsys.readouterr()
    assert logs_cli.main([*broker, str(j)]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("2999\n3000\n") and len(out) <= 4096
    assert err == (
        f"banyan-logs: job {j}: only the last 4096 bytes of its stdout, which the broker keeps, "
        "are left: its worker no longer has the file, or is not connected\n"
    )
    assert logs_cli.main([*broker, "--stderr", str(j)]) == 0
    assert capsys.readouterr() == ("err\n", "")


def test_idle_worker_stays_alive_and_gets_work(cluster: Cluster) -> None:
    """An idle worker's heartbeats skip the broker's transaction; they still keep it alive."""
    cluster.start_worker("w1")
    c = cluster.client()
    # Three liveness windows of nothing but idle heartbeats, looking all along: a worker
    # declared lost and registered again in between would show.
    until = time.monotonic() + 3 * WINDOW
    for _ in range(int(3 * WINDOW / 0.1) + 10):
        (w,) = c.workers()
        assert (w.name, w.state) == ("w1", "idle"), w
        if time.monotonic() > until:
            break
        time.sleep(0.1)
    job = c.submit("echo still here").jobs[0]
    assert ended(c, [job]) == {job: "terminated/success"}
    (w,) = c.workers()
    assert w.completed == 1, w
    attempt = c.job(job).raw["history"][0]
    # A job this short ends before its `started` report is due: the result dates the start.
    assert attempt["started"] is not None
    assert attempt["claimed"] <= attempt["started"] <= attempt["ended"]


def pipelined(c: Client, requests: list[dict[str, Any]]) -> dict[int, protocol.Message]:
    """Send every submit before reading any answer, as a pipelining client does; the replies
    by request, numbered from 1. Request ids come from the client's own counter, so a late
    reply to its earlier requests (a ping of a patient status) is told apart and passed over."""
    first = next(c._reqs)
    for req, body in enumerate(requests, first):
        c.sock.send(protocol.encode("submit", body, req))
        next(c._reqs)
    replies: dict[int, protocol.Message] = {}
    for _ in range(len(requests) + 10):
        if len(replies) == len(requests):
            break
        assert c.sock.poll(int(scaled(10) * 1000)), f"only {len(replies)} replies"
        msg = protocol.decode(c.sock.recv(), protocol.CLIENT_REPLIES)
        if first <= msg.req < first + len(requests):
            replies[msg.req - first + 1] = msg
    return replies


def held(*commands: str) -> dict[str, Any]:
    return {"jobs": [{"command": command, "hold": True} for command in commands]}


def test_pipelined_submits_each_get_their_own_answer(cluster: Cluster) -> None:
    """Small submits arriving together run as one submission in the broker; every request
    still gets its own ids, in order, and a refused one changes nothing for the others."""
    c = cluster.client()
    together = pipelined(c, [held("echo 1"), held("echo 2", "echo 3"), held("echo 4")])
    ids = [j for req in (1, 2, 3) for j in together[req].body["jobs"]]
    assert [len(together[req].body["jobs"]) for req in (1, 2, 3)] == [1, 2, 1]
    assert ids == list(range(ids[0], ids[0] + 4))  # in the order sent
    commands = {j.id: j.raw["command"] for j in c.status(ids, detail=True).jobs}
    assert [commands[j] for j in ids] == ["echo 1", "echo 2", "echo 3", "echo 4"]

    refused = {"jobs": [{"command": "echo x", "depends_on": [{"job": 999_999}]}]}
    grouped = {**held("echo e"), "groups": [{"name": "pipe"}]}
    grouped["jobs"][0]["groups"] = ["pipe"]
    mixed = pipelined(c, [held("echo a"), held("echo b", "echo c"), refused, grouped])
    assert mixed[3].type == "error" and mixed[3].body["code"] == "not_found", mixed[3]
    ids = [j for req in (1, 2, 4) for j in mixed[req].body["jobs"]]
    assert ids == sorted(ids) and len(set(ids)) == 4
    commands = {j.id: j.raw["command"] for j in c.status(ids, detail=True).jobs}
    assert [commands[j] for j in ids] == ["echo a", "echo b", "echo c", "echo e"]
    assert len(c.status(all=True, limit=100).jobs) == 8  # nothing of the refused one


def test_a_broker_out_of_descriptors_says_so_and_recovers(tmp_path: Path) -> None:
    """Idle connections (no key needed) can take every descriptor the broker may hold: it says
    at start that its limit is low, says when it cannot take connections, and takes them again
    once they are gone."""
    c = Cluster(tmp_path)
    # The broker's process starts with at most 96 descriptors, soft and hard (as `prlimit`).
    limit = "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96)); "
    limit += "os.execv(sys.argv[1], sys.argv[1:])"
    c.prefix["broker"] = [sys.executable, "-c", limit]
    crowd: list[socket.socket] = []
    try:
        c.start_broker()
        assert "it may hold only 96 open files" in c.log("broker")
        connected = c.client()
        connected.ping()
        for _ in range(150):
            crowd.append(socket.create_connection(("127.0.0.1", c.client_port)))
        said = "cannot take new connections on the client port (Too many open files)"
        wait_for(lambda: said in c.log("broker"), 10, what="the broker to say so")
        assert connected.ping()  # those it holds are served meanwhile
        for s in crowd:
            s.close()
        crowd.clear()
        assert c.client().ping()
        assert c.procs["broker"].poll() is None
    finally:
        for s in crowd:
            s.close()
        c.stop()
