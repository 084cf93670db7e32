"""Python calls run as Banyan jobs (banyan.futures): what travels, and the job's side.

A job runs `python -m banyan.remote`. Its calls come in its environment, as base64 in
`BANYAN_CALL_0`, `BANYAN_CALL_1`, ... (at most CHUNK characters each): a pickle of
`(function, [(args, kwargs), ...], sys.path)`. What they return or raise goes to the job's
stdout as one frame, written last: base64 of a pickle of `[(ok, value), ...]` (value: the
result, or `(exception, traceback text)`), then the line `#banyan-result N` (N: the base64's
length). The caller reads the frame from the output tail the broker keeps, or from the
worker's file when it is longer. The functions' own prints go to the job's stderr. The job
exits 1 if a call raised, so Banyan's retries apply to it.

This module is what each such job imports first: it stays light (no zmq, no client).
"""

from __future__ import annotations

import base64
import io
import os
import pickle
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any

PREFIX = "BANYAN_CALL_"
# Characters of base64 per variable: under the broker's 65,536 per value.
CHUNK = 60_000
# A call's function and arguments, pickled: they ride in the job's environment, which the
# broker stores with the job and execve must accept beside the exported environment (2 MiB
# for everything on Linux).
MAX_CALL_BYTES = 768 * 1024
# What a job's calls return, pickled: it is read back through the broker in 1 MiB pieces.
MAX_RESULT_BYTES = 16 * 1024 * 1024
TRAILER = "#banyan-result"

Outcome = tuple[bool, Any]  # (True, value) or (False, (exception, traceback text))


class RemoteError(Exception):
    """An exception raised in a job that could not be sent back as itself (it does not
    pickle); its type and message, as text."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a job, as text: set as the `__cause__` of the
    exception a future raises, so that printing it shows where it happened remotely."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class PayloadTooLarge(ValueError):
    """A call's pickled function and arguments, or its result, is over its limit."""


class NotImportable(pickle.PicklingError):
    """A function or class the worker could not import (defined in `__main__`), and no
    cloudpickle to send it by value."""


class _ByReference(pickle.Pickler):
    """pickle, refusing what it would send by a reference the worker cannot follow: on the
    worker `__main__` is Banyan's own runner, not the caller's script."""

    def reducer_override(self, obj: Any) -> Any:
        named = isinstance(obj, type) or (callable(obj) and hasattr(obj, "__qualname__"))
        if named and getattr(obj, "__module__", None) == "__main__":
            raise NotImportable(
                f"{obj.__qualname__} is defined in __main__, which a worker cannot import: "
                "install cloudpickle (pip install cloudpickle) to send it by value, or move "
                "it into a module the worker can import"
            )
        return NotImplemented


def dumps(obj: Any) -> bytes:
    """cloudpickle when installed (lambdas, closures, functions of `__main__`), else pickle,
    which refuses what is defined in `__main__` (NotImportable)."""
    try:
        import cloudpickle  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        out = io.BytesIO()
        _ByReference(out, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        return out.getvalue()
    return bytes(cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def call_env(payload: bytes) -> dict[str, str]:
    """A pickled call as environment variables."""
    if len(payload) > MAX_CALL_BYTES:
        raise PayloadTooLarge(
            f"the function and its arguments pickle to {len(payload):,} bytes; a call may "
            f"carry at most {MAX_CALL_BYTES:,} (banyan.remote.MAX_CALL_BYTES): pass large "
            "data as a path on a shared filesystem instead"
        )
    text = base64.b64encode(payload).decode("ascii")
    return {f"{PREFIX}{i // CHUNK}": text[i : i + CHUNK] for i in range(0, len(text), CHUNK)}


def read_call(env: Mapping[str, str]) -> bytes:
    parts = []
    for i in range(len(env)):
        part = env.get(f"{PREFIX}{i}")
        if part is None:
            break
        parts.append(part)
    return base64.b64decode("".join(parts))


def frame(outcomes: list[Outcome]) -> bytes:
    """The job's last output: its calls' outcomes."""
    payload = _pickled(outcomes)
    text = base64.b64encode(payload)
    return text + f"\n{TRAILER} {len(text)}\n".encode()


def _pickled(outcomes: list[Outcome]) -> bytes:
    try:
        payload = dumps(outcomes)
    except Exception:
        # One of them does not pickle: send each that does, and say which did not.
        outcomes = [_sendable(o) for o in outcomes]
        payload = dumps(outcomes)
    if len(payload) > MAX_RESULT_BYTES:
        error = PayloadTooLarge(
            f"the result pickles to {len(payload):,} bytes; a job's results may be at most "
            f"{MAX_RESULT_BYTES:,} (banyan.remote.MAX_RESULT_BYTES): write large results to "
            "a shared filesystem and return the path"
        )
        payload = dumps([(False, (error, ""))] * len(outcomes))
    return payload


def _sendable(outcome: Outcome) -> Outcome:
    try:
        dumps(outcome)
        return outcome
    except Exception as e:
        ok, value = outcome
        if ok:
            return False, (RemoteError(f"the result does not pickle: {e}"), "")
        exc, tb = value
        return False, (RemoteError(f"{type(exc).__qualname__}: {exc}"), tb)


def trailer_length(text: str) -> int | None:
    """The base64 length a frame's trailer line at the end of `text` gives, or None."""
    body = text.rstrip("\n")
    last = body.rsplit("\n", 1)[-1]
    word, _, n = last.partition(" ")
    if word != TRAILER or not n.isdigit():
        return None
    return int(n)


def unframe(text: str) -> bytes | None:
    """The pickled outcomes from output ending in a whole frame, or None if it is not all
    there."""
    n = trailer_length(text)
    if n is None:
        return None
    body = text.rstrip("\n").rsplit("\n", 1)[0]
    if len(body) < n:
        return None
    return base64.b64decode(body[-n:])


def _outcome(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
    try:
        return True, fn(*args, **kwargs)
    except BaseException as e:  # the caller gets whatever it raised, SystemExit included
        return False, (e, traceback.format_exc())


def run(env: Mapping[str, str]) -> int:
    """Run the calls in `env`, write their frame to stdout, and return the exit status."""
    out = os.dup(1)
    os.dup2(2, 1)  # the functions' prints, even a C library's, go to stderr
    try:
        fn, calls, path = pickle.loads(read_call(env))
        sys.path.extend(p for p in path if p not in sys.path)
    except BaseException as e:
        # The function or its arguments cannot be loaded here (a module the worker's Python
        # does not have): every call of the job fails with that.
        outcomes: list[Outcome] = [(False, (e, traceback.format_exc()))]
    else:
        outcomes = [_outcome(fn, args, kwargs) for args, kwargs in calls]
    sys.stdout.flush()
    data = frame(outcomes)
    view = memoryview(data)
    while view:
        view = view[os.write(out, view) :]
    return 0 if all(ok for ok, _ in outcomes) else 1


if __name__ == "__main__":
    # Run as banyan.remote, not __main__: the exceptions it sends back must unpickle by that
    # name in the caller.
    from banyan import remote

    sys.exit(remote.run(os.environ))
