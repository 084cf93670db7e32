"""What this machine offers to jobs: cpus, memory and GPUs, detected and then overridable.

Detection runs once, before the worker's loop starts, so the nvidia-smi probe may take a moment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass

import psutil

from banyan import defaults

# CUDA's own spellings for "no device".
_NO_GPUS = {"", "-1", "NoDevFiles"}


@dataclass(frozen=True)
class Capacity:
    cpus: float
    memory_mib: int
    gpus: list[str]  # device names, as CUDA_VISIBLE_DEVICES for jobs will spell them


def detect(gpu_probe_timeout: float = defaults.GPU_PROBE_TIMEOUT) -> Capacity:
    logical = psutil.cpu_count(logical=True) or 1
    try:
        # A worker pinned with taskset or a cpuset can use only its own cpus.
        usable = len(psutil.Process().cpu_affinity()) or logical
    except (AttributeError, psutil.Error, OSError):
        usable = logical
    memory = psutil.virtual_memory().total // (1024 * 1024)
    return Capacity(float(min(logical, usable)), int(memory), detect_gpus(gpu_probe_timeout))


def detect_gpus(timeout: float = defaults.GPU_PROBE_TIMEOUT) -> list[str]:
    """The worker's own CUDA_VISIBLE_DEVICES when set (an operator's choice), else nvidia-smi."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        if visible.strip() in _NO_GPUS:
            return []
        devices = []
        for entry in visible.split(","):
            if entry.strip() in _NO_GPUS:
                break  # CUDA ignores everything from the first invalid entry on
            devices.append(entry.strip())
        return devices
    return _nvidia_smi(timeout)


def _nvidia_smi(timeout: float) -> list[str]:
    program = shutil.which("nvidia-smi")
    if program is None:
        return []
    command = [program, "--query-gpu=index", "--format=csv,noheader"]
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        return []
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Kill its whole group: a wrapper's child would otherwise hold the pipe open.
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=1.0)  # a process stuck in the driver may never die
        return []
    if proc.returncode != 0:
        return []
    lines = out.decode("ascii", "replace").split()
    return [line for line in lines if line.isdigit()]


def override(
    capacity: Capacity,
    cpus: float | None = None,
    memory: int | None = None,
    gpus: int | None = None,
) -> Capacity:
    """Apply `--cpus`, `--memory` (MiB) and `--gpus N`.

    `--gpus N` keeps the first N detected devices; with none detected it declares devices
    "0".."N-1". Asking for more than were detected is an error, not a guess.
    """
    if cpus is not None and not cpus > 0:
        raise ValueError(f"--cpus must be > 0, not {cpus}")
    if memory is not None and memory < 0:
        raise ValueError(f"--memory must be >= 0 MiB, not {memory}")
    devices = capacity.gpus
    if gpus is not None:
        if gpus < 0:
            raise ValueError(f"--gpus must be >= 0, not {gpus}")
        if not devices:
            devices = [str(i) for i in range(gpus)]
        elif gpus > len(devices):
            found = ", ".join(devices)
            raise ValueError(f"--gpus {gpus}, but only {len(devices)} detected: {found}")
        else:
            devices = devices[:gpus]
    return Capacity(
        cpus=capacity.cpus if cpus is None else float(cpus),
        memory_mib=capacity.memory_mib if memory is None else int(memory),
        gpus=list(devices),
    )
