"""A shell rule's command, run by the Banyan job itself instead of through a second Snakemake.

Every other cluster plugin runs each job as `python -m snakemake --target-jobs ...`, which
parses the Snakefile and builds a DAG again: about a second of CPU per job, more than many
jobs' own work. For a plain `shell:` rule the job needs only its command, formatted as
Snakemake's `shell()` formats it (the job's input, output, params, wildcards, threads,
resources, log and the Snakefile's globals), run by Snakemake's shell (bash with `set -euo
pipefail;`, or what `shell.executable` / `shell.prefix` / `shell.suffix` set), with the
thread variables `shell()` sets. The main Snakemake process prepares the job first, as its
local executor does (removes stale output, makes the output and log directories).

Anything else (`run:`, `script:`, `wrapper:`, notebooks, group jobs, shadow rules,
benchmarks, conda, containers, environment modules) returns None: the job runs a spawned
Snakemake as usual.
"""

from __future__ import annotations

import shlex
from typing import Any

from snakemake_interface_executor_plugins.settings import DeploymentMethod

# The thread variables Snakemake's shell() sets for linear algebra libraries.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
TMPDIR_VARIABLES = ("TMPDIR", "TMP", "TEMPDIR", "TEMP")
# What Snakemake's resources say when the machine running the job is to decide.
TBD = "<TBD>"
# A job's command is at most 64 KiB; leave room for the wrapper.
MAX_COMMAND = 60_000


def command(job: Any, deployment: set[Any]) -> tuple[str, dict[str, str]] | None:
    """The command and environment that run `job` directly, or None when it needs Snakemake."""
    if job.is_group() or not getattr(job, "is_shell", False) or job.is_norun:
        return None
    if job.is_shadow or job.benchmark is not None or job.is_pipe or job.is_service:
        return None
    if _deployed(job, deployment):
        return None
    try:
        from snakemake.shell import shell

        text = job.shellcmd
        executable = job.resources.get("shell_exec") or shell.get_executable() or "/bin/sh"
        prefix = shell._get_process_prefix(executable)
        suffix = shell._process_suffix
    except Exception:  # anything unusual: let Snakemake itself run it
        return None
    if not text:
        return None
    script = " ".join((prefix, text, suffix)).strip()
    line = f"exec {shlex.quote(executable)} -c {shlex.quote(script)}"
    if len(line.encode()) > MAX_COMMAND:
        return None
    env = {name: str(job.threads) for name in THREAD_VARIABLES}
    tmpdir = job.resources.get("tmpdir")
    if tmpdir and str(tmpdir) != TBD:  # TBD: the machine that runs it decides, as here
        env.update({name: str(tmpdir) for name in TMPDIR_VARIABLES})
    return line, env


def _deployed(job: Any, deployment: set[Any]) -> bool:
    """Whether the job runs in a conda env, a container or environment modules."""
    if DeploymentMethod.CONDA in deployment and job.conda_env_spec:
        return True
    if DeploymentMethod.APPTAINER in deployment and job.container_img_url:
        return True
    return DeploymentMethod.ENV_MODULES in deployment and bool(job.env_modules)
