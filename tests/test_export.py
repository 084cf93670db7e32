"""`--export` (banyan/export.py): what of the submitter's environment a job gets, and the
Python progress helper a job calls (SPEC §5)."""

from __future__ import annotations

from pathlib import Path

import pytest

import banyan
from banyan import defaults, export, protocol
from banyan.worker.progress import parse_progress

SHELL = {
    "PATH": "/usr/bin",
    "LANG": "C",
    "BANYAN_HOME": "/home/a/.banyan",
    "BANYAN_BROKER": "b:7411",
    "BANYAN_JOB_ID": "4",
}


def test_all_is_the_default_less_the_daemons_variables() -> None:
    assert export.capture(environ=SHELL) == {
        "PATH": "/usr/bin",
        "LANG": "C",
        "BANYAN_BROKER": "b:7411",
    }


def test_none_exports_nothing() -> None:
    assert export.capture("NONE", SHELL) is None
    assert export.capture(None, SHELL) is None


def test_a_list_exports_only_those() -> None:
    assert export.capture("LANG,FOO=bar", SHELL) == {"LANG": "C", "FOO": "bar"}
    assert export.capture(["LANG", "FOO=a=b"], SHELL) == {"LANG": "C", "FOO": "a=b"}
    assert export.capture("BANYAN_HOME,LANG", SHELL) == {"LANG": "C"}  # never travels


def test_all_with_overrides() -> None:
    got = export.capture("ALL,LANG=en_US.UTF-8,X=1", SHELL)
    assert got == {"PATH": "/usr/bin", "LANG": "en_US.UTF-8", "BANYAN_BROKER": "b:7411", "X": "1"}


@pytest.mark.parametrize("spec", ["", "LANG,,PATH", "NONE,LANG", "MISSING", "=x", "LANG,ALL"])
def test_bad_specs_say_what_is_wrong(spec: str) -> None:
    with pytest.raises(ValueError, match="--export"):
        export.capture(spec, SHELL)


def test_progress_helper_writes_what_the_worker_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "progress"
    monkeypatch.setenv("BANYAN_PROGRESS_FILE", str(path))
    banyan.progress(42.5, "epoch 3/10")
    assert parse_progress(path.read_bytes()) == (42.5, "epoch 3/10")
    banyan.progress(50, "multi\nline  message")
    assert path.read_text() == "50 multi line message\n"  # one line, rewritten each time


def test_progress_helper_is_a_no_op_outside_a_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BANYAN_PROGRESS_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    banyan.progress(10, "nothing happens")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("BANYAN_PROGRESS_FILE", str(tmp_path / "no" / "such" / "dir"))
    banyan.progress(10)  # a failed write never breaks the job


def submit_with(environment: object) -> protocol.Message:
    body = {"jobs": [{"command": "true"}], "environment": environment}
    return protocol.decode(protocol.pack("submit", body, 1), protocol.CLIENT_REQUESTS)


def test_an_exported_environment_is_checked_each_time_it_changes() -> None:
    good = {"PATH": "/usr/bin", "LANG": "C"}
    assert submit_with(good).body["environment"] == good
    assert submit_with(dict(good)).body["environment"] == good  # the same again: passes
    for bad, rule in (
        ({**good, "A=B": "x"}, "must not contain '='"),
        ({**good, "LANG": "C\0"}, "must not contain NUL"),
        ({**good, "LANG": 7}, "must be a str"),
    ):
        with pytest.raises(protocol.ProtocolError, match=rule):
            submit_with(bad)
    assert submit_with(None).body["environment"] is None


def test_an_exported_environment_is_bounded_as_a_whole() -> None:
    per = 60_000  # each variable within its own limit, together past the request's
    big = {f"V{i}": "x" * per for i in range(defaults.MAX_ENVIRONMENT_BYTES // per + 1)}
    with pytest.raises(protocol.ProtocolError, match="export fewer variables"):
        submit_with(big)
