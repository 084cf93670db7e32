"""What a Snakemake job asks of Banyan, and how a failure reads in Snakemake's log."""

from __future__ import annotations

import pytest

from snakemake_executor_plugin_banyan import request


def test_resources_map_to_a_jobspec() -> None:
    res = {"mem_mb": 2048, "runtime": 90, "gpu": 1, "banyan_tags": "ssd, a100", "tmpdir": "x"}
    assert request.resources(4, res, priority=7) == {
        "cpus": 4,
        "memory": 2048,
        "time_limit": 5400.0,
        "gpus": 1,
        "tags": ["ssd", "a100"],
        "priority": 7,
    }


def test_mem_mib_wins_and_nvidia_gpu_counts() -> None:
    got = request.resources(1, {"mem_mib": 100, "mem_mb": 200, "nvidia_gpu": 2})
    assert (got["memory"], got["gpus"]) == (100, 2)


def test_nothing_asked_is_one_cpu_and_no_reservation() -> None:
    assert request.resources(0, {}) == {"cpus": 1, "priority": 0}


def test_snakemakes_target_priority_fits_banyans_range() -> None:
    assert request.resources(1, {}, priority=2**63 - 1)["priority"] == 2**31 - 1


@pytest.mark.parametrize(
    ("res", "message"),
    [
        ({"mem_mb": "lots"}, "resource mem_mb: expected a number, got 'lots'"),
        ({"gpu": 1.5}, "resource gpu: expected a whole number, got 1.5"),
        ({"runtime": -1}, "resource runtime: must not be negative, got -1"),
    ],
)
def test_a_bad_value_is_named(res: dict[str, object], message: str) -> None:
    with pytest.raises(request.BadResource, match=message):
        request.resources(1, res)


def test_a_submit_key_names_its_jobs_and_attempts() -> None:
    key = request.submit_key("run1", [(3, 1), (4, 1)])
    assert key == request.submit_key("run1", [(3, 1), (4, 1)])
    assert key != request.submit_key("run1", [(3, 2), (4, 1)])  # a retry is a new submission
    assert key != request.submit_key("run2", [(3, 1), (4, 1)])  # another run
    assert key.startswith("snakemake-run1-") and len(key) <= 256


def test_a_failure_says_exit_where_and_the_end_of_stderr() -> None:
    lines = "\n".join(f"line {i}" for i in range(30))
    info = {
        "id": 12,
        "state": "terminated",
        "outcome": "failed",
        "exit_code": 3,
        "attempts": 1,
        "worker": "w1",
        "output_tail": {"stderr": lines + "\n"},
    }
    text = request.failure(info)
    assert text.startswith("Banyan job 12 (attempt 1) failed with exit code 3 on worker w1.\n")
    assert "    line 29\n" in text and "line 9\n" not in text and "    line 10\n" in text


def test_a_cancel_says_why() -> None:
    info = {"id": 5, "state": "cancelled", "cancel_reason": "cancelled by alice"}
    assert request.failure(info) == "Banyan job 5 (attempt 1) was cancelled (cancelled by alice).\n"
