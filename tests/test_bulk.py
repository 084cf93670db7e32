"""Big requests against a real broker: every request costs bounded work (SPEC §6).

A request's size is checked before anything is built, a long operation is done in slices while
the broker keeps answering, and it is all-or-nothing even across a kill -9.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from banyan import defaults, protocol
from banyan.cli import cancel, main, modify, status, submit
from banyan.client import Client
from tests.cluster import Cluster, pinging, scaled, wait_for

MIB = 1 << 20


def _raw(client: Client, mtype: str, body: dict[str, Any]) -> protocol.Message:
    """Send `body` unchecked, as a hostile client would, and read the reply."""
    client.sock.send(protocol.pack(mtype, body, 4242))
    assert client.sock.poll(int(scaled(10) * 1000), zmq.POLLIN), "no reply"
    return protocol.decode(client.sock.recv(), protocol.CLIENT_REPLIES)


def _peak_rss(pid: int) -> int:
    """The most memory the process has held at once (VmHWM): what it freed since counts too."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_an_array_memory_bomb_is_refused_at_once_and_the_broker_stays_small(
    cluster: Cluster,
) -> None:
    """A 64 KiB command with `{}` over 4,000 indices would be 256 MiB once expanded (12 GiB
    over the 200,000 indices allowed): the broker refuses it from its size, builds nothing."""
    pid = cluster.procs["broker"].pid
    client = cluster.client()
    client.ping()
    before = _peak_rss(pid)
    template = {"command": "x" * (defaults.MAX_COMMAND_BYTES - 2) + "{}"}
    bomb: dict[str, Any] = {"jobs": [template], "array": "0-3999"}
    started = time.monotonic()
    reply = _raw(client, "submit", bomb)
    took = time.monotonic() - started
    grown = _peak_rss(pid) - before
    said = f"refused in {took:.2f} s, the broker grew by {grown / MIB:.0f} MiB"
    assert took < scaled(0.5) and grown < 32 * MIB, said
    assert reply.type == "error" and reply.body["code"] == "bad_request"
    assert "MAX_SUBMIT_BYTES" in reply.body["message"]
    client.ping()
    assert client.status(all=True).jobs == []


def test_an_each_file_too_big_in_bytes_is_refused_before_it_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = tmp_path / "lines"
    lines.write_text("".join(f"{i}\n" for i in range(1100)))
    command = "x" * (defaults.MAX_COMMAND_BYTES - 2) + "{}"
    code = submit.main(["--broker", "127.0.0.1:9", "--each", str(lines), command])
    assert code == 2
    err = capsys.readouterr().err
    assert "--each: 1100 lines makes" in err and "MAX_SUBMIT_BYTES" in err, err


def test_an_array_too_big_in_bytes_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    command = "x" * 60_000 + " {}"
    code = submit.main(["--broker", "127.0.0.1:9", "--array", "0-99999", command])
    assert code == 2
    err = capsys.readouterr().err
    assert "--array makes" in err and "MAX_SUBMIT_BYTES" in err, err


@pytest.mark.parametrize(
    "tool",
    [cancel.main, lambda argv: main.main(["cancel", *argv])],
    ids=["banyan-cancel", "banyan cancel"],
)
def test_cancel_reads_100000_ids_in_a_moment(
    cluster: Cluster, tool: Callable[[list[str]], int], capsys: pytest.CaptureFixture[str]
) -> None:
    """`banyan-cancel $(seq 80 100080)` spent 45 s of CPU parsing its arguments."""
    ids = [str(i) for i in range(80, 100081)]
    started = time.process_time()
    code = tool(["--broker", f"127.0.0.1:{cluster.client_port}", "--reason", "x", *ids])
    took = time.process_time() - started
    assert code == 1 and "no job 80" in capsys.readouterr().err  # nothing to cancel here
    assert took < scaled(2), f"{took:.1f} s of CPU"


# ---- long operations: in slices, the broker answering meanwhile, all or nothing -------------


def _group_of(client: Client, n: int, name: str = "g") -> list[int]:
    """`n` queued jobs in a new group, made by one array request."""
    template = {"command": "true", "groups": [name]}
    client.timeout = scaled(60)
    return client.submit(jobs=[template], groups=[{"name": name}], array=f"1-{n}").jobs


def test_a_100000_job_cancel_keeps_the_broker_answering(cluster: Cluster) -> None:
    """The cancel is done a slice a turn: a client pinging every 50 ms meanwhile is answered
    within 200 ms each time (it blocked the broker for 40 s). A status asked meanwhile waits
    for the cancel to end (the client waits as long as pings are answered), and sees it whole."""
    ids = _group_of(cluster.client(), 100_000)
    head = cluster.client().events_head()
    with pinging(cluster) as latencies:
        started = time.monotonic()
        canceller = cluster.client(timeout=10)
        canceller.sock.send(protocol.encode("cancel", {"groups": ["g"]}, 7))
        watcher = cluster.client()
        assert 0 < len(wait_for(lambda: _cancelled_since(watcher, head))) < len(ids)
        # Waited for past the client's timeout, as long as the broker answers pings.
        seen = cluster.client(timeout=1).status(group="g", limit=1).groups[0]["counts"]
        assert canceller.sock.poll(int(scaled(60) * 1000)), "no reply to the cancel"
        done = protocol.decode(canceller.sock.recv(), protocol.CLIENT_REPLIES).body
        took = time.monotonic() - started
    assert seen == {"cancelled": len(ids)}
    assert sorted(done["cancelled"]) == ids
    assert len(latencies) >= took / 0.25, "the pinger stalled"
    assert max(latencies) < scaled(0.2), f"slowest ping {max(latencies):.3f} s in {took:.1f} s"


def test_a_group_cancel_killed_in_the_middle_is_finished_after_restart(cluster: Cluster) -> None:
    """kill -9 while the cancel is half done: the restarted broker finishes it, so every member
    is cancelled, once; nothing is left half done."""
    n = 30_000
    ids = _group_of(cluster.client(), n)
    watcher = cluster.client()
    head = watcher.events_head()
    canceller = cluster.client()
    canceller.sock.send(protocol.encode("cancel", {"groups": ["g"], "reason": "midway"}, 1))

    seen = wait_for(lambda: _cancelled_since(watcher, head), what="the cancel to begin")
    cluster.kill("broker")
    assert len(seen) < n, "the cancel ended before the kill; nothing was tested"
    cluster.start_broker()
    client = cluster.client(timeout=30)
    status = client.status(group="g", limit=1)  # it waits for the operation to end
    assert status.groups[0]["counts"] == {"cancelled": n}
    assert status.groups[0]["cancel_reason"].endswith(": midway")
    assert sorted(_cancelled_since(client, head)) == ids  # each once
    assert "resuming cancel operation" in cluster.log("broker")


def _cancelled_since(client: Client, since: int) -> list[int]:
    """The jobs of every `cancelled` event from `since` on, reading the whole log."""
    out = []
    for _ in range(1000):
        page, since = client.events(since, defaults.EVENTS_LIMIT)
        out += [e[2] for e in page if e[4] == "cancelled"]
        if len(page) < defaults.EVENTS_LIMIT:  # the end, as it was then
            return out
    raise AssertionError("the event log did not end")


# ---- selectors on the command line ----------------------------------------------------------


def _cli(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, Any]]:
    """Run a tool in-process against the cluster with --json; (exit code, parsed output)."""
    tools = {"cancel": cancel.main, "modify": modify.main, "status": status.main}

    def run(tool: str, *argv: str) -> tuple[int, Any]:
        capsys.readouterr()
        code = tools[tool](["--broker", f"127.0.0.1:{cluster.client_port}", "--json", *argv])
        out = capsys.readouterr().out
        return code, json.loads(out) if out.strip() else None

    return run


def test_cancel_and_modify_take_ranges_and_filters(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _cli(cluster, capsys)
    client = cluster.client()
    seeds = client.submit("true", array="0-9", name="seed-{}", hold=True).jobs
    others = client.submit("true", array="0-4", name="other-{}").jobs
    code, out = run("cancel", f"{seeds[2]}-{seeds[4]}", "--name", "seed-*")
    assert code == 0 and out["cancelled"] == seeds[2:5]
    code, out = run("cancel", "--state", "available", "--name", "other-*")
    assert code == 0 and out["cancelled"] == others
    code, out = run("modify", "--priority", "5", "--group", f"array-{seeds[0]}")
    assert code == 0 and out == {"modified": seeds[:2] + seeds[5:], "skipped": []}
    code, out = run("modify", "--release", f"{seeds[0]}-{seeds[-1]}", "--state", "cancelled")
    assert code == 0 and out["modified"] == []
    assert [s[0] for s in out["skipped"]] == seeds[2:5]
    assert "only an inactive job can be released" in out["skipped"][0][1]
    code, out = run("cancel", f"array-{seeds[0]}")  # the array's handle
    assert code == 0 and out["cancelled"] == seeds[:2] + seeds[5:]
    assert out["already"] == seeds[2:5]
    infos = client.status(seeds).jobs
    assert {j.state for j in infos} == {"cancelled"}
    assert [j.raw["priority"] for j in infos] == [5, 5, 0, 0, 0, 5, 5, 5, 5, 5]
    code, _ = run("cancel", "--state", "bogus")
    assert code == 2
    code, _ = run("cancel", "--user", "nobody", "some-group")
    assert code == 2


# ---- history, like sacct ----------------------------------------------------------------------


def test_status_after_5000_jobs_shows_the_newest_and_counts_them_all(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    client = cluster.client()
    ids = client.submit("true", array="1-4000", hold=True).jobs
    ids += client.submit("true", array="1-1000", name="late-{}").jobs
    capsys.readouterr()
    assert status.main(["--broker", f"127.0.0.1:{cluster.client_port}", "--limit", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [int(line.split()[0]) for line in lines[1:4]] == ids[:-4:-1]
    assert lines[-1] == (
        "5000 jobs: 4000 inactive, 1000 available; the newest 3 shown (--limit N for more)"
    )
    run = _cli(cluster, capsys)
    code, page = run("status", "--limit", "2", "--user", "root", "--state", "available")
    assert code == 0 and [j["id"] for j in page["jobs"]] == ids[:-3:-1]
    assert (page["counts"], page["matched"], page["exact"]) == ({"available": 1000}, 1000, True)
    code, more = run(
        "status", "--limit", "3", "--cursor", str(page["next"]), "--state", "available"
    )
    assert [j["id"] for j in more["jobs"]] == ids[-3:-6:-1] and more["next"] == ids[-5]
    code, named = run("status", "--all", "--name", "late-99*", "--limit", "1000")
    ks = [*range(999, 989, -1), 99]  # late-999 .. late-990 and late-99, newest first
    assert [j["id"] for j in named["jobs"]] == [ids[4000 + k - 1] for k in ks]
    assert named["matched"] == 11 and named["next"] is None


def test_status_since_and_until_cut_by_submission_time(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    client = cluster.client()
    early = client.submit("true", array="1-300", hold=True).jobs
    late = client.submit("true", array="1-200", hold=True).jobs
    edge = client.status([late[0]]).jobs[0].raw["submitted"]
    assert client.status([early[-1]]).jobs[0].raw["submitted"] < edge
    run = _cli(cluster, capsys)
    code, page = run("status", "--since", f"@{edge}", "--limit", "1000")
    assert code == 0 and [j["id"] for j in page["jobs"]] == late[::-1]
    assert page["counts"] == {"inactive": 200} and page["exact"]
    code, page = run("status", "--until", f"@{edge}", "--limit", "1000")
    assert [j["id"] for j in page["jobs"]] == early[::-1] and page["matched"] == 300
    code, page = run("status", "--since", "1h", "--until", f"@{edge}", "--limit", "5")
    assert page["matched"] == 300 and len(page["jobs"]) == 5
    code, _ = run("status", "--since", "yesterday-ish")
    assert code == 2
