"""What banyan-submit cannot send is a usage error in a sentence that names the culprit and the
way out (exit 2, before anything is sent): hostile workflow files, variables the environment
cannot carry, text that is not UTF-8. A variable `--export ALL` cannot carry is left out with
a warning instead."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from banyan import arrays, protocol
from banyan.cli import submit
from banyan.client import Client
from banyan.errors import BadRequest, Invalid
from tests.cluster import Cluster, free_port, scaled


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one line banyan-submit says for `argv`; nothing listens at its broker, so an
    attempt to send would be exit 3, not 2."""
    code = submit.main(["--broker", f"127.0.0.1:{free_port()}", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("banyan-submit: ") and "Traceback" not in err
    for internal in ("--body", "--environment", "--frame", "body:"):
        assert internal not in err, err
    as_json = submit.main(["--broker", f"127.0.0.1:{free_port()}", "--json", *argv])
    doc = json.loads(capsys.readouterr().err)
    assert as_json == 2 and doc["error"] == "usage"
    return err.split("\n")[0]


def test_hostile_workflow_files_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    assert "nests arrays or objects too deeply" in refused(capsys, "--file", str(nested))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'[{"command": "true"},\n {"command": "echo \xff"}]')
    said = refused(capsys, "--file", str(binary))
    assert "is not UTF-8 text: byte 0xff on line 2" in said
    digits = tmp_path / "digits.json"
    digits.write_text('[{"command": "true", "priority": ' + "9" * 5000 + "}]")
    assert "cannot be read as JSON" in refused(capsys, "--file", str(digits))


def test_each_lines_that_are_not_utf8_are_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(2):  # the plain line, then --json
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"ok\n\xff\xfe\n")))
        code = submit.main(["--broker", f"127.0.0.1:{free_port()}", "--each", "-", "echo {}"])
        err = capsys.readouterr().err
        assert code == 2 and "--each: - is not UTF-8 text: byte 0xff on line 2" in err, err


def test_what_the_environment_cannot_carry_is_named_with_the_way_out(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BADV", "\udcff")  # the byte 0xff, as os.environ holds it
    said = refused(capsys, "--export", "BADV", "true")
    assert said.startswith("banyan-submit: --export: BADV is not UTF-8 text")
    assert "--env: BADV is not UTF-8 text" in refused(capsys, "--env", "BADV", "true")
    monkeypatch.delenv("BADV")

    monkeypatch.setenv("A1", "a" * 120_000)
    said = refused(capsys, "true")
    assert "--export: A1 is 120000 characters long, over the 65536" in said
    assert "--export NONE" in said and "env -u" in said
    monkeypatch.delenv("A1")

    for i in range(10):  # 600 KB in all
        monkeypatch.setenv(f"BIG{i}", "b" * 60_000)
    said = refused(capsys, "true")
    assert "over the 524288 a submission may carry (the biggest: BIG" in said
    assert "--export NONE" in said
    for i in range(10):
        monkeypatch.delenv(f"BIG{i}")

    for i in range(1001):
        monkeypatch.setenv(f"MANY{i}", "x")
    said = refused(capsys, "true")
    assert "variables, over the 1000 a job's environment may carry" in said


def test_command_line_text_that_is_not_utf8_names_its_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    said = refused(capsys, "--export", "NONE", "--", "echo \udcff")
    assert said == "banyan-submit: the command: not UTF-8 text (byte 0xff at character 5)"
    said = refused(capsys, "--export", "NONE", "--cwd", "/tmp/\udcfe", "true")
    assert said.startswith("banyan-submit: --cwd: not UTF-8 text (byte 0xfe")
    said = refused(capsys, "--export", "NONE", "--env", "K=\udcfe", "true")
    assert said.startswith("banyan-submit: --env: K is not UTF-8 text")


def test_a_variable_all_cannot_carry_is_left_out_with_a_warning(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.start_worker("w1")
    monkeypatch.setenv("BADV", "\udcff")
    monkeypatch.setenv("GOODV", "fine")
    argv = ["--broker", f"127.0.0.1:{cluster.client_port}", "--wait", "--", "env"]
    assert submit.main(argv) == 0
    out, err = capsys.readouterr()
    assert "banyan-submit: warning: BADV is not UTF-8 text" in err
    assert "the jobs get no such variable" in err
    (job,) = [int(w) for w in out.split()]
    env = cluster.client().job(job).raw["output_tail"]["stdout"]
    assert "GOODV=fine" in env and "BADV" not in env
    assert cluster.client().wait([job], timeout=scaled(5)).all_succeeded


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ("0-99999999999999999999:99999999999999999999", "an index or step is at most"),
        ("٠-٩", "expected N-M or N-M:STEP"),  # Arabic-Indic digits
        ("1_000", "expected N-M or N-M:STEP"),
        ("0-9223372036854775807", "9223372036854775808 jobs, over the 200000"),
    ],
)
def test_array_indices_are_ascii_and_fit_64_bits(
    capsys: pytest.CaptureFixture[str], spec: str, said: str
) -> None:
    assert said in refused(capsys, "--export", "NONE", "--array", spec, "echo {}")
    body = {"jobs": [{"command": "echo {}"}], "groups": [], "submit_key": None, "array": spec}
    with pytest.raises(protocol.ProtocolError, match=said):  # and the broker's check
        protocol.encode("submit", body, 1)
    assert arrays.count("9223372036854775806-9223372036854775807") == 2  # the top still fits


def test_the_api_refuses_a_bad_request_with_a_typed_error(tmp_path: Path) -> None:
    """What the client's own checks refuse is `banyan.errors.Invalid` (a BadRequest), as the
    README promises typed errors, and nothing is sent."""
    with Client(f"127.0.0.1:{free_port()}", tmp_path, timeout=1) as c:
        with pytest.raises(Invalid, match="9223372036854775808 jobs, over the 200000") as e:
            c.submit("true", array="0-9223372036854775807", export="NONE")
        assert isinstance(e.value, BadRequest) and e.value.code == "bad_request"
        with pytest.raises(Invalid, match="name"):
            c.submit("true", name="n" * 100_000, export="NONE")
