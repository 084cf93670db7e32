"""Capacity detection and overrides, with fake GPU environments."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from banyan.worker.resources import Capacity, detect, detect_gpus, override
from tests.cluster import wait_for


def fake_nvidia_smi(directory: Path, body: str) -> None:
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)


@pytest.fixture
def no_gpu_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No CUDA_VISIBLE_DEVICES, and a PATH holding only an empty directory plus /bin."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:/bin:/usr/bin")
    return bin_dir


def test_detect_reports_this_machine(no_gpu_env: Path) -> None:
    capacity = detect()
    assert 1 <= capacity.cpus <= (psutil.cpu_count() or 1)
    assert capacity.memory_mib == psutil.virtual_memory().total // (1024 * 1024)
    assert capacity.gpus == []


@pytest.mark.parametrize(
    ("value", "gpus"),
    [
        ("0,1", ["0", "1"]),
        (" 2 , 3 ", ["2", "3"]),
        ("GPU-8f2a,GPU-77c1", ["GPU-8f2a", "GPU-77c1"]),
        ("", []),
        ("-1", []),
        ("NoDevFiles", []),
        ("1,-1,2", ["1"]),
    ],
)
def test_gpus_from_cuda_visible_devices(
    no_gpu_env: Path, monkeypatch: pytest.MonkeyPatch, value: str, gpus: list[str]
) -> None:
    fake_nvidia_smi(no_gpu_env, "echo 0; echo 1; echo 2; echo 3")  # must not be asked
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert detect_gpus() == gpus


def test_gpus_from_nvidia_smi(no_gpu_env: Path) -> None:
    fake_nvidia_smi(
        no_gpu_env,
        'test "$*" = "--query-gpu=index --format=csv,noheader" || exit 9\necho 0; echo 1',
    )
    assert detect_gpus() == ["0", "1"]
    assert detect().gpus == ["0", "1"]


@pytest.mark.parametrize(
    "body",
    [
        "echo 'NVIDIA-SMI has failed' >&2; exit 9",
        "echo 'No devices were found'",
        "exit 0",
    ],
)
def test_failing_nvidia_smi_means_no_gpus(no_gpu_env: Path, body: str) -> None:
    fake_nvidia_smi(no_gpu_env, body)
    assert detect_gpus() == []


def test_hanging_nvidia_smi_is_given_up_on(no_gpu_env: Path) -> None:
    # The child sleep holds the pipe open too: the whole group must go.
    fake_nvidia_smi(no_gpu_env, "sleep 1000; echo 0")
    started = time.monotonic()
    assert detect_gpus(timeout=0.3) == []
    factor = float(os.environ.get("BANYAN_TIME_FACTOR", "1"))
    assert time.monotonic() - started < 0.3 + 2 * factor

    def alive(p: psutil.Process) -> bool:
        try:
            return bool(p.status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False

    def gone() -> bool:  # SIGKILLed; on a loaded machine the kernel may still be at it
        return not any(alive(p) for p in psutil.Process().children(recursive=True))

    wait_for(gone, timeout=5, what="the fake nvidia-smi's group to be gone")


def test_no_nvidia_smi_means_no_gpus(no_gpu_env: Path) -> None:
    assert detect_gpus() == []


def test_override() -> None:
    base = Capacity(cpus=8.0, memory_mib=16000, gpus=[])
    assert override(base) == base
    assert override(base, cpus=2.5, memory=1000) == Capacity(2.5, 1000, [])
    assert override(base, gpus=3).gpus == ["0", "1", "2"]
    assert override(base, gpus=0).gpus == []
    detected = Capacity(cpus=8.0, memory_mib=16000, gpus=["2", "3", "5"])
    assert override(detected, gpus=2).gpus == ["2", "3"]
    assert override(detected, gpus=0).gpus == []
    assert override(detected, memory=0).gpus == ["2", "3", "5"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cpus": 0}, "--cpus"),
        ({"cpus": -1.5}, "--cpus"),
        ({"memory": -1}, "--memory"),
        ({"gpus": -1}, "--gpus"),
        ({"gpus": 4}, "only 3 detected: 2, 3, 5"),
    ],
)
def test_override_refuses_nonsense(kwargs: dict[str, float], message: str) -> None:
    detected = Capacity(cpus=8.0, memory_mib=16000, gpus=["2", "3", "5"])
    with pytest.raises(ValueError, match=message):
        override(detected, **kwargs)  # type: ignore[arg-type]
