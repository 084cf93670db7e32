"""Helpers for code running inside a Banyan job."""

from __future__ import annotations

import contextlib
import os


def progress(percent: float, message: str = "") -> None:
    """Report progress to the worker: `progress(42.5, "epoch 3/10")` (percent, then free
    text), as a job in any language does by writing that line to $BANYAN_PROGRESS_FILE.
    Outside a job it does nothing, and a failed write never breaks the job."""
    path = os.environ.get("BANYAN_PROGRESS_FILE")
    if not path:
        return
    line = f"{float(percent):g} {' '.join(message.split())}".rstrip() + "\n"
    # Rewritten whole, so the file stays one line however often a job reports; the worker
    # reads only complete lines, so it never sees half of one.
    with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as f:
        f.write(line)
