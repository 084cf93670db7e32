"""Where a job attempt's stdout and stderr go: shared by the worker, which opens them, and the
broker, which shows them per attempt."""

from __future__ import annotations

import os
import re

_OUTPUT_FIELD = re.compile(r"%%|%j|\{job\}|\{attempt\}|\{stream\}")


def account_spool(spool: str, account: str) -> str:
    """An account's own directory in a worker's spool: its jobs' directories and output."""
    return f"{spool}/{account}"


def job_dir(spool: str, job: int, attempt: int) -> str:
    """The directory a job without a `cwd` runs in, in its worker's spool."""
    return f"{spool}/{job}.{attempt}"


def output_paths(
    template: str | None, spool: str, cwd: str, job: int, attempt: int
) -> tuple[str, str]:
    """Where stdout and stderr go: the spool by default, else the `--output` template.

    `{job}`/`%j`, `{attempt}` and `{stream}` (out/err) expand; `%%` is a literal `%`. Without
    `{stream}`, stderr goes next to stdout with `.err` appended. Relative paths are relative to
    the job's working directory, as in Slurm.
    """
    if template is None:
        return f"{spool}/{job}.{attempt}.out", f"{spool}/{job}.{attempt}.err"
    if template == os.devnull:
        return os.devnull, os.devnull

    def expand(stream: str) -> str:
        values = {"%%": "%", "%j": str(job), "{job}": str(job), "{attempt}": str(attempt)}
        values["{stream}"] = stream
        return os.path.join(cwd, _OUTPUT_FIELD.sub(lambda m: values[m.group()], template))

    if "{stream}" in template:
        return expand("out"), expand("err")
    out = expand("out")
    return out, out + ".err"
