"""Real Snakemake workflows through the Banyan executor plugin, on a real broker and worker.

Each test writes a Snakefile into its own directory and runs `python -m snakemake --executor
banyan` as a subprocess, stopped by its PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banyan.client import Client
from tests.cluster import Cluster, pids_with_marker, scaled, wait_for


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("snakemake"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BANYAN_HOME", str(c.home))
        try:
            c.start_broker()
            c.start_worker("w1", cpus=4, memory=4000)
            yield c
        finally:
            c.stop()


def snakefile(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Snakefile").write_text(textwrap.dedent(text))
    return root


def start(c: Cluster, wd: Path, *args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "snakemake", "--executor", "banyan", "--jobs", "8"]
    argv += ["--banyan-broker", f"127.0.0.1:{c.client_port}", "--nocolor", *args]
    env = {**os.environ, "BANYAN_HOME": str(c.home), "FROM_SNAKEMAKE": "yes"}
    return subprocess.Popen(
        argv, cwd=wd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def snakemake(c: Cluster, wd: Path, *args: str, timeout: float = 60) -> tuple[int, str]:
    proc = start(c, wd, *args)
    try:
        out, _ = proc.communicate(timeout=scaled(timeout))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out


def run_jobs(c: Cluster, out: str) -> list[dict[str, object]]:
    """The Banyan jobs of the run whose output is `out`, by its group."""
    (line,) = {w for w in out.split() if w.startswith("snakemake-") and len(w) == 22} or {""}
    group = line or _group_of(c)
    with Client(f"127.0.0.1:{c.client_port}", c.home) as client:
        return [j.raw for j in client.status(group=group, all=True).jobs]


def _group_of(c: Cluster) -> str:
    with Client(f"127.0.0.1:{c.client_port}", c.home) as client:
        newest = client.status(all=True, limit=1).jobs[0].raw
    return str(next(g for g in newest["groups"] if g.startswith("snakemake-")))


FAN = """
SAMPLES = [f"s{i}" for i in range(6)]

rule all:
    input: "summary.txt"

rule measure:
    output: "measured/{s}.txt"
    threads: 2
    resources: mem_mb=100, runtime=1
    shell:
        'echo "{wildcards.s} $BANYAN_CPUS $BANYAN_MEMORY_MB $OMP_NUM_THREADS '
        '$FROM_SNAKEMAKE $(pwd)" > {output}'

rule square:
    input: "measured/{s}.txt"
    output: "squared/{s}.txt"
    run:
        n = int(wildcards.s[1:])
        Path(output[0]).write_text(f"{n * n}\\n")

rule summary:
    input:
        m=expand("measured/{s}.txt", s=SAMPLES),
        q=expand("squared/{s}.txt", s=["s2", "s3"]),
    output: "summary.txt"
    shell: "cat {input.m} {input.q} > {output}"
"""


def test_a_fan_out_and_in_with_checked_outputs(live: Cluster, tmp_path: Path) -> None:
    wd = snakefile(tmp_path / "fan", "from pathlib import Path\n" + FAN)
    code, out = snakemake(live, wd)
    assert code == 0, out
    lines = (wd / "summary.txt").read_text().splitlines()
    # mem_mb=100 is 96 MiB, the unit Banyan reserves in (Snakemake gives both)
    assert lines == [f"s{i} 2 96 2 yes {wd}" for i in range(6)] + ["4", "9"]
    jobs = run_jobs(live, out)
    assert len(jobs) == 6 + 2 + 1 and {j["state"] for j in jobs} == {"terminated"}
    measure = [j for j in jobs if str(j["name"]).startswith("measure.")]
    assert {(j["cpus"], j["memory"]) for j in measure} == {(2, 96)}
    with Client(f"127.0.0.1:{live.client_port}", live.home) as client:
        detail = client.job(int(str(measure[0]["id"]))).raw
    assert detail["time_limit"] == 60 and detail["cwd"] == str(wd)
    assert detail["command"].startswith("exec ")  # the shell rule ran directly
    square = next(j for j in jobs if str(j["name"]).startswith("square."))
    assert "-m snakemake" in str(square["command"])  # a run: rule through a spawned Snakemake


FAILING = """
rule all:
    input: expand("out/{i}.txt", i=range(3))

rule work:
    output: "out/{i}.txt"
    shell:
        'if [ {wildcards.i} = 1 ]; then echo "oops from job {wildcards.i}" >&2; exit 3; fi; '
        "touch {output}"
"""


def test_a_failing_rule_says_its_exit_and_stderr_and_keep_going_goes_on(
    live: Cluster, tmp_path: Path
) -> None:
    wd = snakefile(tmp_path / "fail", FAILING)
    code, out = snakemake(live, wd, "--keep-going")
    assert code != 0
    assert "failed with exit code 3 on worker w1." in out
    assert "    oops from job 1" in out
    assert (wd / "out/0.txt").exists() and (wd / "out/2.txt").exists()
    assert not (wd / "out/1.txt").exists()


RETRIED = """
rule all:
    input: "done.txt"

rule flaky:
    output: "done.txt"
    shell: "if [ ! -e tried ]; then touch tried; exit 1; fi; touch {output}"
"""


def test_retries_submit_the_job_again(live: Cluster, tmp_path: Path) -> None:
    wd = snakefile(tmp_path / "retry", RETRIED)
    code, out = snakemake(live, wd, "--retries", "1")
    assert code == 0, out
    outcomes = sorted(str(j["outcome"]) for j in run_jobs(live, out))
    assert outcomes == ["failed", "success"]


UNRUNNABLE = """
rule all:
    input: "big.txt"

rule big:
    output: "big.txt"
    threads: 64
    shell: "touch {output}"
"""


def test_a_rule_no_worker_can_run_fails_at_once_with_the_reason(
    live: Cluster, tmp_path: Path
) -> None:
    wd = snakefile(tmp_path / "big", UNRUNNABLE)
    started = time.monotonic()
    code, out = snakemake(live, wd, "--cores", "64")
    assert code != 0
    assert "Banyan cannot run this job: no worker can ever run this: needs 64 cpus" in out
    assert time.monotonic() - started < scaled(30)
    assert {j["state"] for j in run_jobs(live, out)} == {"cancelled"}


SLEEPERS = """
rule all:
    input: expand("slept/{i}.txt", i=range(4))

rule sleep:
    output: "slept/{i}.txt"
    shell: "touch started.{wildcards.i}; sleep 60; echo MARKER > {output}"
"""


def test_ctrl_c_cancels_exactly_the_runs_jobs(live: Cluster, tmp_path: Path) -> None:
    marker = f"smk-{os.getpid()}-{tmp_path.name}"
    wd = snakefile(tmp_path / "int", SLEEPERS.replace("MARKER", marker))
    with Client(f"127.0.0.1:{live.client_port}", live.home) as client:
        (other,) = client.submit("sleep 60 # not the run's", export="NONE").jobs
    proc = start(live, wd)
    try:
        wait_for(lambda: len(list(wd.glob("started.*"))) >= 3, 30, what="the jobs to start")
        assert pids_with_marker(marker)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=scaled(40))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert not pids_with_marker(marker), "a job of the interrupted run still runs"
    jobs = run_jobs(live, out)
    assert len(jobs) == 4 and {j["state"] for j in jobs} == {"cancelled"}
    with Client(f"127.0.0.1:{live.client_port}", live.home) as client:
        assert client.job(other).state == "running"  # not the run's: left alone
        client.cancel([other])


CHAIN = """
rule all:
    input: "b.txt"

rule a:
    output: "a.txt"
    shell: "touch a.started; sleep 1.5; touch {output}"

rule b:
    input: "a.txt"
    output: "b.txt"
    shell: "touch {output}"
"""


def test_sigterm_finishes_what_runs_and_starts_nothing_new(live: Cluster, tmp_path: Path) -> None:
    wd = snakefile(tmp_path / "term", CHAIN)
    proc = start(live, wd)
    try:
        wait_for((wd / "a.started").exists, 30, what="rule a to start")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=scaled(40))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (wd / "a.txt").exists() and not (wd / "b.txt").exists(), out
    (job,) = run_jobs(live, out)
    assert (job["state"], job["outcome"]) == ("terminated", "success")


AWAY = """
localrules: pause

rule all:
    input: expand("slow/{i}.txt", i=range(2)), "late.txt"

rule slow:
    output: "slow/{i}.txt"
    shell: "touch started.{wildcards.i}; sleep 1; touch {output}"

rule pause:
    output: "paused.txt"
    shell: "while [ ! -e go ]; do sleep 0.05; done; touch {output}"

rule late:
    input: "paused.txt"
    output: "late.txt"
    shell: "touch {output}"
"""


def test_the_run_waits_for_a_broker_that_went_away(live: Cluster, tmp_path: Path) -> None:
    """Jobs end while the broker is away, and a job is submitted while it is: the run goes
    on once it is back, with nothing submitted twice."""
    wd = snakefile(tmp_path / "away", AWAY)
    proc = start(live, wd, "--banyan-timeout", "1")
    try:
        wait_for(lambda: len(list(wd.glob("started.*"))) == 2, 30, what="the jobs to start")
        live.kill("broker", signal.SIGKILL)
        wait_for(lambda: len(list(wd.glob("slow/*.txt"))) == 2, 30, what="the jobs to end")
        (wd / "go").touch()  # now rule late is submitted, to a broker that is not there

        def trying() -> bool:
            logs = list((wd / ".snakemake" / "log").glob("*.log"))
            return any("submitting jobs" in p.read_text() for p in logs)

        wait_for(trying, 30, what="the plugin to say it waits for the broker")
        live.start_broker()
        out, _ = proc.communicate(timeout=scaled(60))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert (wd / "late.txt").exists()
    assert sorted(str(j["name"]).split(".")[0] for j in run_jobs(live, out)) == [
        "late",
        "slow",
        "slow",
    ]


def test_a_missing_key_stops_the_run_at_once_saying_so(live: Cluster, tmp_path: Path) -> None:
    wd = snakefile(tmp_path / "nokey", RETRIED)
    (tmp_path / "empty-home").mkdir()
    code, out = snakemake(live, wd, "--banyan-home", str(tmp_path / "empty-home"), timeout=30)
    assert code != 0
    assert "Banyan refused this machine's key:" in out and "client.key_secret is missing" in out
    assert not (wd / "done.txt").exists()


def test_the_brokers_worker_port_stops_the_run_at_once_saying_so(
    live: Cluster, tmp_path: Path
) -> None:
    """Like a refused key, an address that is the broker's other port does not get better
    by waiting."""
    wd = snakefile(tmp_path / "wrongport", RETRIED)
    port = f"127.0.0.1:{live.worker_port}"
    code, out = snakemake(live, wd, "--banyan-broker", port, timeout=30)
    assert code != 0
    assert "Banyan's broker address is wrong:" in out and "not on this port" in out
    assert not (wd / "done.txt").exists()
