"""The command-line tools, run in-process against a real broker and a real worker (SPEC §8).

Most tests share one module-wide cluster (each looks only at the jobs it made); the few that
need a cluster of their own use the `cluster` fixture.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import re
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq.auth
from docopt import parse_options

from banyan import keys, protocol
from banyan.broker.submission import Source
from banyan.cli import broker as broker_cli
from banyan.cli import (
    cancel,
    keygen,
    logs,
    main,
    modify,
    stats,
    status,
    submit,
    users,
    worker,
    workers,
)
from banyan.cli.usage import flag_words, parse
from banyan.client import Client
from tests.cluster import Cluster, cannot_run, free_port, scaled, wait_for

TOOLS: dict[str, Callable[[list[str] | None], int]] = {
    "submit": submit.main,
    "cancel": cancel.main,
    "modify": modify.main,
    "status": status.main,
    "workers": workers.main,
    "users": users.main,
    "stats": stats.main,
    "logs": logs.main,
    "keygen": keygen.main,
    "banyan": main.main,
}


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def ids(self) -> list[int]:
        return [int(line) for line in self.out.split()]

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cli"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BANYAN_HOME", str(c.home))
        mp.delenv("BANYAN_BROKER", raising=False)
        mp.delenv("NO_COLOR", raising=False)
        try:
            c.start_broker()
            c.start_worker("w1", cpus=2, memory=1000)
            yield c
        finally:
            c.stop()


Runner = Callable[..., Ran]


def runner(c: Cluster, capsys: pytest.CaptureFixture[str]) -> Runner:
    def run(tool: str, *args: str, broker: bool = True) -> Ran:
        argv = list(args)
        if broker:
            argv = ["--broker", f"127.0.0.1:{c.client_port}", "--timeout", "5", *argv]
        capsys.readouterr()
        code = TOOLS[tool](argv)
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


@pytest.fixture
def cli(live: Cluster, capsys: pytest.CaptureFixture[str]) -> Runner:
    return runner(live, capsys)


def finish(c: Cluster, ids: list[int]) -> dict[int, str]:
    w = c.client().wait(ids, timeout=scaled(20))
    assert not w.timed_out
    return {j.id: f"{j.state}/{j.outcome}" for j in w.jobs}


def row(table: str, job: int) -> str:
    (line,) = [line for line in table.splitlines() if line.split()[:1] == [str(job)]]
    return line


# ---- submit ---------------------------------------------------------------------------------


def test_submit_prints_the_id_and_the_job_runs(cli: Runner, live: Cluster) -> None:
    r = cli("submit", "--", "echo", "hello", "world")
    assert r.code == 0 and r.err == ""
    (job,) = r.ids()
    assert finish(live, [job]) == {job: "terminated/success"}
    info = live.client().job(job)
    assert info.raw["command"] == "echo hello world"
    assert info.raw["output_tail"]["stdout"] == "hello world\n"


def test_submit_options_reach_the_job(cli: Runner, live: Cluster, tmp_path: Path) -> None:
    os.environ["BANYAN_TEST_PASSED"] = "from-here"
    try:
        r = cli(
            "submit",
            *("--name", "fit", "--cpus", "0.5", "--memory", "1G", "--tag", "a", "--tag", "b"),
            *("--priority", "-3", "--attempts", "3", "--time-limit", "1h30m"),
            *("--cancel-grace", "00:01:30", "--env", "A=1", "--env", "BANYAN_TEST_PASSED"),
            *("--output", "out-{job}.txt", "--cwd", str(tmp_path), "--hold", "true"),
        )
    finally:
        del os.environ["BANYAN_TEST_PASSED"]
    assert r.code == 0, r.err
    raw = live.client().job(r.ids()[0]).raw
    assert raw["name"] == "fit" and raw["state"] == "inactive"
    assert (raw["cpus"], raw["memory"], raw["tags"], raw["priority"]) == (0.5, 1024, ["a", "b"], -3)
    assert (raw["max_attempts"], raw["time_limit"], raw["cancel_grace"]) == (3, 5400, 90)
    assert raw["env"] == {"A": "1", "BANYAN_TEST_PASSED": "from-here"}
    assert (raw["output"], raw["cwd"]) == ("out-{job}.txt", str(tmp_path))


def test_submit_cwd_defaults_to_here(cli: Runner, live: Cluster) -> None:
    job = cli("submit", "--hold", "true").ids()[0]
    assert live.client().job(job).raw["cwd"] == os.getcwd()


def test_submit_json_and_groups(cli: Runner, live: Cluster) -> None:
    first = cli("submit", "--json", "--group", "cli-open", "--open", "--hold", "true")
    assert first.code == 0, first.err
    doc = first.json()
    assert set(doc) == {"jobs", "groups"}
    gid = doc["groups"]["cli-open"]
    joined = cli("submit", "--json", "--group", "cli-open", "--hold", "true").json()
    assert joined["groups"] == {"cli-open": gid}
    live.client().close_group("cli-open")
    sealed = cli("submit", "--group", "cli-open", "true")
    assert sealed.code == 1 and sealed.out == ""
    assert sealed.err.startswith("banyan-submit: ") and "sealed" in sealed.err
    members = live.client().status(group="cli-open").jobs
    assert len(members) == 2


def test_after_ids_and_group(cli: Runner, live: Cluster) -> None:
    a, c = cli("submit", "--hold", "--array", "1-2", "true").ids()
    gid = cli("submit", "--json", "--group", "cli-deps", "--hold", "true").json()["groups"]
    b = cli("submit", "--after", f"{a}", "--after-any", "cli-deps", "--after-fail", f"{c}", "true")
    deps = live.client().job(b.ids()[0]).raw["depends_on"]
    assert deps == [
        {"kind": "after", "job": a},
        {"kind": "after_any", "group": gid["cli-deps"]},
        {"kind": "after_fail", "job": c},
    ]
    assert cli("submit", "--after", "999999", "true").code == 1


def test_each_line_becomes_a_job(cli: Runner, live: Cluster, tmp_path: Path) -> None:
    items = tmp_path / "items"
    items.write_text("alpha\n\n  beta  \ngamma delta\n")
    r = cli("submit", "--each", str(items), "--name", "e-{}", "echo item={}")
    ids = r.ids()
    assert len(ids) == 3
    assert set(finish(live, ids).values()) == {"terminated/success"}
    infos = live.client().status(ids, detail=True).jobs
    assert [j.raw["output_tail"]["stdout"] for j in infos] == [
        "item=alpha\n",
        "item=beta\n",
        "item=gamma delta\n",
    ]
    assert [j.name for j in infos] == ["e-alpha", "e-beta", "e-gamma delta"]


def test_each_from_stdin_appends_the_line(
    cli: Runner, live: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("it's one\ntwo\n"))
    ids = cli("submit", "--each", "-", "--hold", "echo").ids()
    commands = [j.raw["command"] for j in live.client().status(ids).jobs]
    assert commands == ["echo 'it'\"'\"'s one'", "echo two"]


def test_array_with_step(cli: Runner, live: Cluster) -> None:
    ids = cli("submit", "--array", "0-6:3,10", "echo {} $BANYAN_ARRAY_INDEX").ids()
    assert len(ids) == 4
    finish(live, ids)
    tails = [j.raw["output_tail"]["stdout"] for j in live.client().status(ids, detail=True).jobs]
    assert tails == ["0 0\n", "3 3\n", "6 6\n", "10 10\n"]


def test_large_array_is_one_request(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds: list[str] = []
    real = Client.request

    def counting(self: Client, kind: str, body: dict[str, Any], **kw: Any) -> Any:
        kinds.append(kind)
        return real(self, kind, body, **kw)

    monkeypatch.setattr(Client, "request", counting)
    r = runner(cluster, capsys)("submit", "--hold", "--array", "1-10000", "echo {}")
    assert r.code == 0, r.err
    assert kinds == ["submit"] and len(r.ids()) == 10_000


def test_an_array_travels_as_its_template_and_range() -> None:
    from docopt import docopt

    args = dict(docopt(submit.USAGE, ["--array", "0-99999", "run {}"], options_first=True))
    jobs, groups, array, each = submit.build(args)
    assert array == "0-99999" and [j["command"] for j in jobs] == ["run {}"] and each is None
    frame = protocol.encode("submit", {"jobs": jobs, "groups": groups, "array": array})
    assert len(frame) < 1000
    source = Source.of(protocol.decode(frame, protocol.CLIENT_REQUESTS).body)
    assert len(source.jobs) == 1 and source.count == 100_000  # made by the broker, in slices
    (last,) = source.specs(99_999, 100_000)
    assert last["command"] == "run 99999" and last["env"]["BANYAN_ARRAY_INDEX"] == "99999"


def test_file_workflow_with_keys_and_groups(cli: Runner, live: Cluster, tmp_path: Path) -> None:
    flow = {
        "defaults": {"time_limit": "10m", "env": {"STAGE": "x"}},
        "groups": [{"name": "cli-sweep"}],
        "jobs": [
            {"key": "prep", "command": "echo prep"},
            {
                "key": "a",
                "command": ["echo", "fit a"],
                "groups": ["cli-sweep"],
                "depends_on": ["prep"],
            },
            {"command": "echo fit b", "groups": "cli-sweep", "depends_on": [{"key": "prep"}]},
            {"command": "echo report $STAGE", "depends_on": ["cli-sweep"], "env": {"STAGE": "y"}},
        ],
    }
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(flow))
    r = cli("submit", "--json", "--wait", "--priority", "2", "--file", str(path))
    assert r.code == 0, r.err
    doc, ended = (json.loads(line) for line in r.out.splitlines())
    assert ended["succeeded"] and len(ended["ended"]) == 4
    prep, a, b, report = doc["jobs"]
    assert set(doc["groups"]) == {"cli-sweep"}
    info = {j.id: j.raw for j in live.client().status([prep, a, b, report], detail=True).jobs}
    assert info[a]["depends_on"] == [{"kind": "after", "job": prep}]
    assert info[a]["groups"] == ["cli-sweep"] and info[a]["command"] == "echo 'fit a'"
    sweep = doc["groups"]["cli-sweep"]
    assert info[report]["depends_on"] == [{"kind": "after", "group": sweep}]
    assert info[report]["output_tail"]["stdout"] == "report y\n"
    assert {i["priority"] for i in info.values()} == {2}
    assert {i["time_limit"] for i in info.values()} == {600}


@pytest.mark.parametrize(
    ("flow", "message"),
    [
        ('[{"command": "x", "colour": 1}]', "unknown field 'colour'"),
        ('[{"command": "x", "depends_on": [{"key": "nope"}]}]', "no job in this file"),
        ('[{"key": "a", "command": "x"}, {"key": "a", "command": "y"}]', "also jobs[0]'s key"),
        ('[{"command": "x", "cpus": "many"}]', "jobs[0].cpus"),
        ("{not json", "not valid JSON"),
        ('[{"name": "no command"}]', 'no "command"'),
    ],
)
def test_bad_workflow_files_are_usage_errors(
    cli: Runner, tmp_path: Path, flow: str, message: str
) -> None:
    path = tmp_path / "flow.json"
    path.write_text(flow)
    r = cli("submit", "--file", str(path))
    assert r.code == 2 and message in r.err and "Traceback" not in r.err


def test_wait_exit_codes(cli: Runner) -> None:
    good = cli("submit", "--wait", "--array", "1-3", "true")
    assert good.code == 0 and len(good.ids()) == 3
    assert "3 jobs ended, all succeeded" in good.err
    bad = cli("submit", "--wait", "--array", "1-3", "[ {} != 2 ] || exit 7")
    assert bad.code == 1
    assert "1 did not succeed" in bad.err and "exit 7" in bad.err
    assert "done" in bad.err.splitlines()[0]  # a plain progress line, not a \r display
    assert "\r" not in bad.err


def test_wait_with_json_prints_only_the_json(cli: Runner) -> None:
    """The submission at once, then how each job ended: one document per line in a pipe."""
    r = cli("submit", "--json", "--wait", "--name", "doomed", "exit 1")
    assert r.code == 1 and r.err == ""
    submitted, ended = (json.loads(line) for line in r.out.splitlines())
    assert list(submitted) == ["jobs", "groups"]
    (job,) = submitted["jobs"]
    me = cli("status", "--json", str(job)).json()["jobs"][0]["owner"]
    assert ended == {
        "ended": [
            {
                "id": job,
                "name": "doomed",
                "owner": me,
                "state": "terminated",
                "outcome": "failed",
                "exit_code": 1,
                "attempts": 1,
                "worker": "w1",
            }
        ],
        "succeeded": False,
    }


def test_a_wait_says_who_ran_each_job(live: Cluster) -> None:
    c = live.client()
    (job,) = c.submit("true", name="named").jobs
    (unnamed,) = c.submit("echo unnamed").jobs
    waited = c.wait([job, unnamed], timeout=scaled(20)).jobs
    full = [c.job(job), c.job(unnamed)]
    assert [(j.name, j.owner, j.worker) for j in waited] == [
        (j.name, j.owner, j.worker) for j in full
    ]
    assert [(j.name, j.worker) for j in waited] == [("named", "w1"), ("echo unnamed", "w1")]


def test_submit_key_makes_a_submission_idempotent(cli: Runner, live: Cluster) -> None:
    first = cli("submit", "--submit-key", "cli-key-1", "--hold", "--array", "1-3", "true")
    again = cli("submit", "--submit-key", "cli-key-1", "--hold", "--array", "1-3", "true")
    assert first.code == again.code == 0
    assert first.ids() == again.ids()
    waited = cli("submit", "--submit-key", "cli-key-2", "--wait", "true")
    repeat = cli("submit", "--submit-key", "cli-key-2", "--wait", "true")
    assert waited.ids() == repeat.ids() and repeat.code == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "--cpus", "abc", "true"],
        ["submit", "--cpus", "0", "true"],
        ["submit", "--array", "5-2", "true"],
        ["submit", "--array", "x", "true"],
        ["submit", "--time-limit", "soon", "true"],
        ["submit", "--memory", "lots", "true"],
        ["submit", "--attempts", "0", "true"],
        ["submit", "--open", "true"],
        ["submit", "--each", "/nonexistent/items", "true"],
        ["submit", "--array", "1-2", "--file", "x.json"],
        ["submit", "--file", "x.json", "true"],
        ["submit", "--bogus", "true"],
        ["submit"],
        ["cancel"],
        ["modify", "12"],
        ["modify", "12", "--hold", "--release"],
        ["modify", "abc", "--priority", "1"],
        ["status", "--interval", "0"],
        ["status", "--limit", "none"],
        ["status", "abc"],
        ["workers", "--drain", "a", "--resume", "b"],
        ["logs"],
        ["keygen", "boss", "x"],
        ["banyan", "frobnicate"],
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    monkeypatch.setenv("BANYAN_BROKER", f"127.0.0.1:{free_port()}")
    code = TOOLS[argv[0]](argv[1:])
    _, err = capsys.readouterr()
    assert code == 2 and err.strip() and "Traceback" not in err
    # A sentence for a person, naming the tool: never docopt's own terms.
    tool = "banyan" if argv[0] == "banyan" else f"banyan-{argv[0]}"
    assert err.startswith(f"{tool}: ") and "Option(" not in err and "Warning" not in err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["submit", "--bogus", "true"], "unknown option --bogus"),
        (["status", "--limit"], "--limit needs a value"),
        (["workers", "--drain", "a", "--resume", "b"], "--drain and --resume cannot be used"),
        (["workers", "--forget", "a", "--drain", "b"], "--forget and --drain cannot be used"),
        (["modify", "12", "--hold", "--hold"], "--hold given twice"),
        (["stats", "--json=1"], "--json takes no value"),
        (["submit", "--cpus", "2000000", "true"], "--cpus: at most 1000000 (got 2000000)"),
        (["submit", "--gpus", "5000", "true"], "--gpus: at most 1024 (got 5000)"),
        (["submit", "--priority", "9999999999", "true"], "--priority: at most 2147483647"),
        (["submit", "--attempts", "5000", "true"], "--attempts: at most 1000 (got 5000)"),
        (["submit", "--cancel-grace", "1000d", "true"], "--cancel-grace: at most 86400"),
        (["workers", "--drain", "x" * 300], "the worker's name: "),
        (["workers", "--drain", ""], "--drain: give a worker's name; it may not be empty"),
        (["keygen", "user"], "give the user key's NAME: banyan-keygen user NAME"),
        (["keygen", "root", "alice"], "the role is user, admin or worker, not 'root'"),
        (["keygen"], "give a role (user, admin or worker) and a NAME"),
        (["logs"], "give the job's ID: banyan-logs ID"),
        (["status", "--broker", "127.0.0.1:17411:3"], "--broker: '127.0.0.1:17411:3' is not"),
        (
            ["submit", "--array", "0-200000", "true"],
            "--array: 200001 jobs, over the 200000 one submission may hold (MAX_JOBS_PER_SUBMIT)",
        ),
        (
            ["cancel", *[f"{10 * i + 1}-{10 * i + 3}" for i in range(1001)]],
            "1001 id ranges, over the 1000 one request may carry (MAX_SELECT_RANGES)",
        ),
    ],
)
def test_usage_errors_say_what_was_wrong_before_anything_is_sent(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    said: str,
) -> None:
    """Found before connecting: a broker nobody listens for would be exit 3."""
    monkeypatch.setenv("BANYAN_BROKER", f"127.0.0.1:{free_port()}")
    code = TOOLS[argv[0]](argv[1:])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.split("\n")[0].startswith(f"banyan-{argv[0]}: {said}"), err
    assert "jobs[" not in err and "(as client request)" not in err
    as_json = TOOLS[argv[0]](["--json", *argv[1:]])
    doc = json.loads(capsys.readouterr().err)
    assert as_json == 2 and doc["error"] == "usage" and doc["message"].startswith(said)


def test_too_many_lines_name_the_limit(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BANYAN_BROKER", f"127.0.0.1:{free_port()}")
    lines = tmp_path / "lines"
    lines.write_text("".join(f"{i}\n" for i in range(200_001)))
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps([{"command": "true"}] * 200_001))
    for argv, said in (
        (["--each", str(lines), "echo {}"], "--each: "),
        (["--file", str(flow)], f"--file: {flow}: "),
    ):
        assert submit.main(argv) == 2
        err = capsys.readouterr().err
        limit = "200001 jobs, over the 200000 one submission may hold (MAX_JOBS_PER_SUBMIT)"
        assert err == f"banyan-submit: {said}{limit}\n"


def test_the_daemons_read_their_options_like_the_tools(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(worker.__doc__ or "", ["--memory", "4G", "--cpus", "1.5", "--gpus", "0"])
    config = worker.worker_config(args)
    assert (config.memory, config.cpus, config.gpus) == (4096, 1.5, [])
    for argv, said in (
        (["--memory", "lots"], "--memory: expected MiB or a size"),
        (["--bogus"], "unknown option --bogus"),
        (["--cpus", "0"], "--cpus: must be more than 0"),
    ):
        assert worker.main(argv) == 2
        assert capsys.readouterr().err.startswith(f"banyan-worker: {said}")
    assert broker_cli.main(["--client-port", "x"]) == 2
    assert capsys.readouterr().err.startswith("banyan-broker: --client-port: expected")
    assert broker_cli.main(["--retention", "forever"]) == 2
    said = "banyan-broker: --retention: expected how long to keep ended jobs, such as 30d, "
    assert capsys.readouterr().err.startswith(said + "12h or 90m, or none to keep them forever")
    for name in ("", "a b", "../x"):
        assert worker.main(["--name", name]) == 2
        said = f"banyan-worker: --name: {name!r} is not usable as a worker name: one word of "
        assert capsys.readouterr().err.startswith(said)


def test_banyan_alone_says_to_give_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("banyan: give a command: banyan COMMAND [ARGS...], COMMAND one of ")


def test_refusals_name_the_options_and_come_as_json(cli: Runner) -> None:
    after = cli("submit", "--after", "999999", "true")
    assert after.code == 1 and after.err == "banyan-submit: --after: no job 999999\n"
    missing = cli("status", "--json", "999999")
    assert missing.code == 1 and missing.json()["jobs"] == []
    assert json.loads(missing.err) == {"error": "not_found", "message": "no job 999999"}


def test_a_submit_key_names_one_submission(cli: Runner) -> None:
    first = cli("submit", "--submit-key", "one-thing", "--hold", "true")
    assert cli("submit", "--submit-key", "one-thing", "--hold", "true").ids() == first.ids()
    other = cli("submit", "--submit-key", "one-thing", "--hold", "false")
    assert other.code == 1 and other.out == ""
    assert "submit key 'one-thing' was first used for a different submission" in other.err


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "true"],
        ["submit", "--wait", "true"],
        ["status"],
        ["status", "1"],
        ["cancel", "1"],
        ["modify", "1", "--priority", "2"],
        ["workers"],
        ["stats"],
        ["logs", "1"],
    ],
)
def test_unreachable_broker_is_one_clear_line(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    broker = ["--broker", f"127.0.0.1:{free_port()}", "--timeout", "0.3"]
    t0 = time.monotonic()
    code = TOOLS[argv[0]]([*broker, *argv[1:]])
    elapsed = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert code == 3 and out == ""
    assert err.startswith(f"banyan-{argv[0]}: nothing is listening at tcp://127.0.0.1:")
    assert err.count("\n") == 1
    assert elapsed < scaled(1)


def test_every_option_of_every_tool_is_in_cli_md() -> None:
    """docs/cli.md describes each tool's options in its section (the shared ones once)."""
    doc = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()

    def section(title: str) -> str:
        start = doc.index(f"\n## {title}\n")
        end = doc.find("\n## ", start + 1)
        return doc[start : end if end > 0 else None]

    shared = section("What every tool shares")
    for tool, run_tool in TOOLS.items():
        if tool == "banyan":
            continue
        text = getattr(run_tool, "__module__", "")
        usage = sys.modules[text].USAGE
        options = parse_options(usage[usage.index("Options:") :])
        said = section(f"banyan-{tool}") + shared
        names = [o.longer for o in options if o.longer not in (None, "--help")]
        missing = [n for n in names if not re.search(rf"(?<![\w-]){n}(?![\w-])", said)]
        assert not missing, f"banyan-{tool}: {missing} not in docs/cli.md"


def test_status_watch_until_done_stops_when_the_jobs_have_ended(cli: Runner) -> None:
    (job,) = cli("submit", "sleep 0.5").ids()
    r = cli("status", "--watch", "--until-done", "--interval", "0.2", str(job))
    assert r.code == 0 and "state       terminated" in r.out.rsplit("Ctrl-C to stop", 1)[-1]


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    for tool in TOOLS:
        if tool == "banyan":
            continue
        assert TOOLS[tool](["--help"]) == 0
        assert "Usage:" in capsys.readouterr().out


# ---- the umbrella ---------------------------------------------------------------------------


def test_banyan_dispatches_to_each_tool(cli: Runner, live: Cluster) -> None:
    broker = ["--broker", f"127.0.0.1:{live.client_port}"]
    r = cli("banyan", "submit", *broker, "--hold", "true", broker=False)
    assert r.code == 0 and len(r.ids()) == 1
    r2 = cli("banyan", "status", *broker, "--json", str(r.ids()[0]), broker=False)
    assert r2.json()["jobs"][0]["state"] == "inactive"
    helped = cli("banyan", "help", "cancel", broker=False)
    assert helped.code == 0 and "banyan-cancel" in helped.out
    listing = cli("banyan", "--help", broker=False)
    assert listing.code == 0 and "submit" in listing.out


# ---- cancel and modify ----------------------------------------------------------------------


def test_cancel(cli: Runner, live: Cluster) -> None:
    held = cli("submit", "--hold", "true").ids()[0]
    r = cli("cancel", "--reason", "not needed", str(held))
    assert r.code == 0 and r.out == f"cancelled: {held}\n"
    again = cli("cancel", "--json", str(held))
    assert again.code == 0
    assert again.json() == {"cancelled": [], "pending": [], "already": [held], "errors": []}
    assert live.client().job(held).raw["cancel_reason"].endswith("not needed")
    unknown = cli("cancel", "999999")
    assert unknown.code == 1 and unknown.err == "banyan-cancel: no job 999999\n"


def test_cancel_group_and_running_job(cli: Runner, live: Cluster, tmp_path: Path) -> None:
    flag = tmp_path / "started"
    ids = cli("submit", "--group", "cli-doomed", f"touch {flag}; sleep 60").ids()
    wait_for(flag.exists, 10, what="the job to start")
    r = cli("cancel", "--json", "cli-doomed")
    assert r.code == 0 and r.json()["pending"] == ids
    assert finish(live, ids) == {ids[0]: "cancelled/None"}
    assert cli("cancel", "no-such-group").code == 1


def test_modify(cli: Runner, live: Cluster, tmp_path: Path) -> None:
    job = cli("submit", "--hold", "true").ids()[0]
    r = cli("modify", str(job), "--priority", "7", "--name", "renamed", "--cpus", "2")
    assert r.code == 0 and r.out.startswith(f"job {job} (inactive): ")
    j = cli("modify", "--json", str(job), "--release").json()["job"]
    assert isinstance(j, dict)
    assert (j["state"], j["priority"], j["name"], j["cpus"]) == ("available", 7, "renamed", 2)
    assert finish(live, [job]) == {job: "terminated/success"}
    flag = tmp_path / "started"
    running = cli("submit", f"touch {flag}; sleep 60").ids()[0]
    wait_for(flag.exists, 10, what="the job to start")
    refused = cli("modify", str(running), "--cpus", "2")
    assert refused.code == 1 and refused.out == ""
    assert refused.err.startswith("banyan-modify: cpus: may only be changed while")
    cli("cancel", str(running))
    # A change the broker checks as a submission's job is said in the options' words.
    parked = cli("submit", "--hold", "true").ids()[0]
    missing = cli("modify", str(parked), "--after", "999999")
    assert (missing.code, missing.err) == (1, "banyan-modify: --after: no job 999999\n")
    cli("cancel", str(parked))


def test_status_count_needs_watch(cli: Runner) -> None:
    r = cli("status", "--count", "2")
    assert r.code == 2 and "--count counts the redraws of --watch: give --watch too" in r.err


# ---- status ---------------------------------------------------------------------------------


def test_status_table_shows_why_jobs_wait(cli: Runner, live: Cluster) -> None:
    held = cli("submit", "--hold", "--name", "parked", "true").ids()[0]
    huge = cli("submit", "--cpus", "64", "true").ids()[0]
    blocked = cli("submit", "--after", str(held), "true").ids()[0]
    r = cli("status")
    assert r.code == 0
    header = r.out.splitlines()[0].split()
    assert header == [
        "ID", "NAME", "USER", "STATE", "ATTEMPT", "WORKER", "PROGRESS", "TIME", "REASON",
    ]  # fmt: skip
    assert row(r.out, held).split()[1] == "parked" and row(r.out, held).split()[3] == "inactive"
    assert row(r.out, held).endswith("held")
    assert "no worker can ever run this: needs 64 cpus, largest worker has 2" in row(r.out, huge)
    assert row(r.out, blocked).endswith("waiting for 1 dependency")
    only_held = cli("status", "--state", "inactive", "--json").json()["jobs"]
    assert isinstance(only_held, list) and held in [j["id"] for j in only_held]
    assert {j["state"] for j in only_held} == {"inactive"}
    cli("cancel", str(held), str(huge))


def test_status_json_shape(cli: Runner, live: Cluster) -> None:
    job = cli("submit", "--group", "cli-shape", "echo shaped").ids()[0]
    finish(live, [job])
    doc = cli("status", "--json", "--all", "--group", "cli-shape").json()
    (j,) = doc["jobs"]
    for key in ("id", "name", "state", "outcome", "exit_code", "attempts", "worker", "progress"):
        assert key in j
    for key in ("owner", "depends_on", "groups"):
        assert key in j
    assert (j["id"], j["state"], j["outcome"], j["exit_code"]) == (job, "terminated", "success", 0)
    assert j["groups"] == ["cli-shape"] and j["worker"] == "w1"
    assert doc["groups"][0]["name"] == "cli-shape"
    owner = j["owner"]
    mine = cli("status", "--json", "--all", "--user", owner, str(job)).json()["jobs"]
    nobody = cli("status", "--json", "--all", "--user", "nobody-else", str(job)).json()["jobs"]
    assert len(mine) == 1 and nobody == []


def test_status_detail(cli: Runner, live: Cluster) -> None:
    job = cli("submit", "--attempts", "2", "echo to-out; echo to-err >&2; exit 4").ids()[0]
    finish(live, [job])
    r = cli("status", str(job))
    assert r.code == 0
    text = r.out
    assert text.startswith(f"job {job}  ")
    assert "failed: exit 4" in text and "attempt 2 of 2" in text
    assert "ATTEMPT" in text and "to-out" in text and "to-err" in text
    assert "\x1b[" not in text  # no colour into a pipe
    assert cli("status", "999999").code == 1


def test_status_watch_stops_after_count(cli: Runner) -> None:
    r = cli("status", "--watch", "--count", "2", "--interval", "0.2", "--all", "--limit", "3")
    assert r.code == 0
    assert r.out.count("ID  NAME") == 2
    js = cli("status", "--json", "--watch", "--count", "2", "--interval", "0.2", "--limit", "1")
    paged = {"next", "counts", "matched", "exact"}  # a listing's page and its counts
    assert [set(json.loads(line)) for line in js.out.splitlines()] == [
        {"jobs", "groups", "truncated"} | paged
    ] * 2


# ---- workers, stats, logs -------------------------------------------------------------------


def test_workers_table_json_and_drain(cli: Runner, live: Cluster) -> None:
    r = cli("workers")
    assert r.code == 0
    assert r.out.splitlines()[0].split()[:4] == ["NAME", "HOST", "STATE", "CPUS"]
    (line,) = [line for line in r.out.splitlines() if line.startswith("w1 ")]
    assert "/2" in line and "ago" in line
    (w,) = cli("workers", "--json").json()["workers"]
    assert w["name"] == "w1" and w["cpus"] == 2
    # Every field docs/cli.md lists, and no other.
    documented = "name, host, state, cpus, memory, gpus, used_cpus, used_memory, used_gpus, "
    documented += "tags, running, completed, last_seen, only_account, refused_accounts, address, "
    documented += "key, held, ahead, prefetch"
    assert list(w) == documented.split(", ")
    assert w["only_account"] is None and w["refused_accounts"] == {}
    try:
        drained = cli("workers", "--drain", "w1")
        assert drained.code == 0 and drained.out.startswith("w1: drain")
    finally:
        resumed = cli("workers", "--resume", "w1")
    assert resumed.code == 0 and resumed.out in ("w1: idle\n", "w1: busy\n")
    assert cli("workers", "--drain", "nope").code == 1


def test_workers_json_says_whose_jobs_a_worker_will_not_run(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker left to its defaults: as root it refuses root's jobs, as another account it
    runs only that account's."""
    cluster.start_worker("plain", extra=())
    (w,) = runner(cluster, capsys)("workers", "--json").json()["workers"]
    if os.geteuid() == 0:
        assert w["only_account"] is None and list(w["refused_accounts"]) == ["root"]
        assert "--allow-root-jobs" in w["refused_accounts"]["root"]
    else:
        assert w["only_account"] == pwd.getpwuid(os.geteuid()).pw_name
        assert w["refused_accounts"] == {}


def test_users_shows_and_sets_shares_and_limits(cli: Runner, live: Cluster) -> None:
    (job,) = cli("submit", "--json", "--hold", "true").json()["jobs"]
    me = cli("status", "--json", str(job)).json()["jobs"][0]["owner"]
    r = cli("users")
    assert r.code == 0 and r.out.splitlines()[0].split()[:3] == ["USER", "SHARES", "RUNNING"]
    (mine,) = [u for u in cli("users", "--json").json()["users"] if u["name"] == me]
    assert mine["queued"] >= 1 and mine["shares"] == 1 and mine["max_running"] is None
    set_ = cli("users", "carol", "--shares", "2.5", "--max-queued", "40", "--json")
    assert set_.code == 0
    (carol,) = set_.json()["users"]
    assert (carol["shares"], carol["max_queued"], carol["max_running"]) == (2.5, 40, None)
    assert cli("users", "carol").out.splitlines()[1].split()[:2] == ["carol", "2.5"]
    try:
        assert cli("users", me, "--max-running", "0").code == 0
        cli("modify", "--release", str(job))
        reason = cli("status", "--json", str(job)).json()["jobs"][0]["reason"]
        assert reason == f"{me} is at max_running (0 of 0 running)"
    finally:
        lifted = cli("users", me, "--max-running", "none", "--json")
    assert lifted.json()["users"][0]["max_running"] is None
    assert finish(live, [job]) == {job: "terminated/success"}
    assert cli("users", "--shares", "2").code == 2  # a setting needs a NAME
    assert cli("users", "carol", "--max-running", "many").code == 2


def test_stats(cli: Runner, live: Cluster) -> None:
    finish(live, cli("submit", "true").ids())
    r = cli("stats")
    assert r.code == 0
    for words in ("jobs", "PER MINUTE", "queue wait", "run time", "success", "workers"):
        assert words in r.out
    assert "on disk" in r.out and "ended jobs kept 30d" in r.out
    doc = cli("stats", "--json").json()
    for key in ("counts", "per_minute", "queue_wait", "run_time", "success_rate", "workers"):
        assert key in doc
    store = doc["store"]
    assert 0 < store["used"] <= store["file"] and store["retention"] == 30 * 86400
    assert store["oldest_job"]["id"] == 1 and store["jobs"] == sum(doc["counts"].values())
    assert doc["window_since"] is None  # a window that is not full reaches back all the way


def test_stats_say_how_far_back_a_full_window_reaches() -> None:
    """After a burst (a big cancel) the last 20,000 changes may cover two minutes: the
    minutes before are shown unknown, not as zeros, and a line says how far back it reaches."""
    per = {"submitted": [5, 3, 9, 0, 0], "started": [5, 0, 0, 0, 0], "finished": [0] * 5}
    summary = {
        "per_minute": per,
        "time": 1000.0,
        "window_since": 1000.0 - 130,
        "window_events": 20000,
    }
    text = stats.render(summary)
    (row,) = [line for line in text.splitlines() if line.startswith("submitted")]
    assert row.split() == ["submitted", "5", "3", "9", "-", "-", "17"]
    assert "(the last 20,000 changes reach back 2m10s: rates, times and success cover only" in text
    whole = stats.render({**summary, "window_since": None})
    (row,) = [line for line in whole.splitlines() if line.startswith("submitted")]
    assert row.split() == ["submitted", "5", "3", "9", "0", "0", "17"]


def test_logs_whole_output_from_the_worker(cli: Runner, live: Cluster) -> None:
    job = cli("submit", "seq 1 3000; echo oops >&2").ids()[0]
    finish(live, [job])
    r = cli("logs", str(job))
    assert r.code == 0
    assert r.out == "".join(f"{i}\n" for i in range(1, 3001))  # more than the 4 KiB tail
    assert cli("logs", "--stderr", str(job)).out == "oops\n"
    assert cli("logs", "999999").code == 1


def test_logs_follow_until_the_job_ends(cli: Runner) -> None:
    job = cli("submit", "echo one; sleep 0.6; echo two; sleep 0.3; echo three").ids()[0]
    t0 = time.monotonic()
    r = cli("logs", "-f", str(job))
    assert r.code == 0 and r.out == "one\ntwo\nthree\n"
    assert time.monotonic() - t0 < scaled(10)


# ---- keygen ---------------------------------------------------------------------------------


def test_keygen(cli: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    keys.ensure_local(home)  # the broker's home, as its first start leaves it
    monkeypatch.setenv("BANYAN_HOME", str(home))
    r = cli("keygen", "user", "alice", broker=False)
    assert r.code == 0, r.err
    public = home / "keys" / "issued" / "alice.key"
    secret = home / "keys" / "issued" / "alice.key_secret"
    authorized = home / "keys" / "authorized" / "user" / "alice.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub, none = zmq.auth.load_certificate(public)
    pub2, sec = zmq.auth.load_certificate(secret)
    assert pub == pub2 and none is None and sec
    assert zmq.auth.load_certificate(authorized)[0] == pub
    assert "keys/client.key_secret" in r.out and str(secret) in r.out
    assert r.out.startswith("made a user key for alice")
    assert cli("keygen", "admin", "root-2", "--unix-user", "root", broker=False).out.startswith(
        "made an admin key for root-2"
    )
    assert cli("keygen", "user", "a b", "--unix-user", "root", broker=False).code == 2
    again = cli("keygen", "admin", "alice", broker=False)
    assert again.code == 1 and "already exists" in again.err
    as_json = cli("keygen", "--json", "admin", "alice", broker=False)
    assert as_json.code == 1 and json.loads(as_json.err)["error"] == "conflict"
    doc = cli("keygen", "--json", "worker", "node7", broker=False).json()
    assert doc["role"] == "worker" and "keys/worker.key_secret" in doc["install"]
    assert cli("keygen", "user", "../x", broker=False).code == 2


def test_keygen_binds_a_unix_account(
    cli: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys.ensure_local(tmp_path / "home")
    monkeypatch.setenv("BANYAN_HOME", str(tmp_path / "home"))
    r = cli("keygen", "user", "alice", broker=False)
    assert "its jobs run as the Unix account alice" in r.out
    doc = cli("keygen", "--json", "--unix-user", "asmith", "admin", "alice-2", broker=False).json()
    assert doc["unix_user"] == "asmith"
    assert cli("keygen", "--json", "worker", "node7", broker=False).json()["unix_user"] is None
    bad = cli("keygen", "user", "Alice Smith", broker=False)
    assert bad.code == 2 and "--unix-user" in bad.err


def test_keygen_refuses_where_no_broker_keeps_its_keys(
    cli: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Such as the broker account's default home, when the broker runs with another
    BANYAN_HOME (the shipped systemd unit): a key authorized there would admit nobody."""
    home = tmp_path / "home"
    monkeypatch.setenv("BANYAN_HOME", str(home))
    r = cli("keygen", "user", "alice", broker=False)
    assert r.code == 1 and r.out == ""
    assert r.err.startswith(f"banyan-keygen: {home} is not a broker's home: it has no broker ")
    assert "sudo -u banyan BANYAN_HOME=/var/lib/banyan banyan-keygen user alice" in r.err
    assert not home.exists()  # nothing made
    doc = json.loads(cli("keygen", "--json", "worker", "n1", broker=False).err)
    assert doc["error"] == "not_found" and "is not a broker's home" in doc["message"]


def test_keygen_refuses_to_write_keys_the_broker_could_not_read(
    cli: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run as root on the home of a broker that runs as its own account (forgetting sudo -u):
    refused, saying as whom to run it, and nothing made (the files would be root's, and the
    broker could read none of its users' keys)."""
    if os.geteuid() != 0:
        cannot_run("making another account's broker home needs root")
    home = tmp_path / "brokers"
    keys.ensure_local(home)
    nobody = pwd.getpwnam("nobody")
    for path in [home, *home.rglob("*")]:
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    before = sorted(p.name for p in home.rglob("*"))
    monkeypatch.setenv("BANYAN_HOME", str(home))
    r = cli("keygen", "user", "t2bob", broker=False)
    assert r.code == 1 and r.out == ""
    assert r.err == (
        f"banyan-keygen: {home}/keys belongs to the account nobody, which runs the broker: run "
        f"banyan-keygen as it (sudo -u nobody BANYAN_HOME={home} banyan-keygen user t2bob), so "
        "that the broker can read the key\n"
    )
    assert sorted(p.name for p in home.rglob("*")) == before


def test_a_users_limit_is_named_as_set_not_as_an_option() -> None:
    said = "max_queued: alice may have at most 5 jobs waiting (3 now, and this submission adds 3)"
    assert flag_words(said) == said
    assert flag_words("max_running: at most 3").startswith("max_running: ")
    assert (
        flag_words("jobs[0].max_attempts: must be >= 1, got 0") == "--attempts: at least 1 (got 0)"
    )


def test_a_worker_with_a_spool_it_cannot_make_says_so_as_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 and a sentence, not a traceback and exit 1 (a unit restarts on 1)."""
    monkeypatch.setenv("BANYAN_HOME", str(tmp_path / "home"))
    blocker = tmp_path / "afile"
    blocker.write_text("")
    code = worker.main(["--name", "m7", "--broker", "127.0.0.1:1", "--spool", f"{blocker}/sub"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"banyan-worker: --spool {blocker}/sub: cannot make or use it: Not a directory" in err
    code = worker.main(["--name", "m7", "--broker", "127.0.0.1:1", "--spool", str(blocker)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"banyan-worker: --spool {blocker}: cannot make or use it: it is no directory" in err


def test_an_attempt_given_back_unstarted_shows_no_start_and_no_run() -> None:
    given_back = {"attempt": 1, "worker": "w1", "claimed": 100.0, "ended": 109.0}
    row = status.attempt_row({**given_back, "outcome": "returned"}, now=110.0)
    assert (row[2], row[3]) == ("-", "-")
    ran = status.attempt_row({**given_back, "started": 100.0, "outcome": "success"}, now=110.0)
    assert (ran[2], ran[3]) == ("10s ago", "9s")
