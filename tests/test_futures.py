"""banyan.futures with a real broker and real workers: calls run as jobs, results and
exceptions come back, cancels kill, a killed worker's call completes through the rerun."""

from __future__ import annotations

import concurrent.futures
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from banyan import remote
from banyan.errors import KeyRefused
from banyan.futures import Executor, JobCancelled, PayloadTooLarge, RemoteTraceback
from banyan.remote import NotImportable
from tests import calls
from tests.cluster import Cluster, scaled, wait_for


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("futures"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BANYAN_HOME", str(c.home))
        try:
            c.start_broker()
            c.start_worker("w1", cpus=4, memory=1000)
            yield c
        finally:
            c.stop()


@pytest.fixture
def ex(live: Cluster) -> Iterator[Executor]:
    with Executor(broker=f"127.0.0.1:{live.client_port}", timeout=scaled(5)) as executor:
        yield executor


def test_map_over_a_thousand_items(ex: Executor) -> None:
    assert list(ex.map(calls.square, range(1000), chunksize=25)) == [i * i for i in range(1000)]
    assert list(ex.map(calls.add, range(20), range(20))) == [2 * i for i in range(20)]


def test_results_exceptions_and_remote_tracebacks(ex: Executor) -> None:
    ok, bad = ex.submit(calls.boom, 4), ex.submit(calls.boom, 3)
    assert ok.result(scaled(20)) == 4
    with pytest.raises(calls.Odd, match="3 is odd") as raised:
        bad.result(scaled(20))
    cause = raised.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert 'in boom\n    raise Odd(f"{x} is odd")' in cause.text
    assert "RemoteTraceback" in "".join(traceback.format_exception(raised.value))
    assert ok.job != bad.job and ex.client.job(bad.job).outcome == "failed"


def test_as_completed_and_wait(ex: Executor, tmp_path: Path) -> None:
    release = tmp_path / "release"
    slow = ex.submit(calls.wait_for_file, str(tmp_path / "s"), str(release), 1)
    fast = [ex.submit(calls.square, i) for i in range(3)]
    first = [f.result() for f in concurrent.futures.as_completed(fast, timeout=scaled(20))]
    assert sorted(first) == [0, 1, 4] and not slow.done()
    done, pending = concurrent.futures.wait([slow, *fast], timeout=0.2)
    assert pending == {slow} and done == set(fast)
    release.touch()
    done, pending = concurrent.futures.wait(
        [slow], timeout=scaled(20), return_when=concurrent.futures.FIRST_COMPLETED
    )
    assert done == {slow} and slow.result() == 1


def test_cancel_kills_a_running_call_and_drops_a_queued_one(ex: Executor, tmp_path: Path) -> None:
    started = tmp_path / "started"
    running = ex.submit(calls.wait_for_file, str(started), str(tmp_path / "never"), 0)
    queued = ex.submit(calls.square, 3, after=[running])
    wait_for(started.exists, 20, what="the call to start")
    pid = int(started.read_text())
    wait_for(running.running, 10, what="the future to say it runs")
    assert queued.cancel() and queued.cancelled()
    assert running.cancel() and running.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        running.result(0)
    wait_for(lambda: not psutil.pid_exists(pid), 20, what="the call's process to end")
    wait_for(lambda: ex.client.job(running.job).state == "cancelled", 10, what="its job's end")
    done = ex.submit(calls.square, 2)
    assert done.result(scaled(20)) == 4 and not done.cancel()


def test_shutdown_cancels_what_is_left(live: Cluster, tmp_path: Path) -> None:
    ex = Executor(broker=f"127.0.0.1:{live.client_port}")
    started = tmp_path / "started"
    running = ex.submit(calls.wait_for_file, str(started), str(tmp_path / "never"), 0)
    later = [ex.submit(calls.square, i, after=[running]) for i in range(3)]
    wait_for(started.exists, 20, what="the call to start")
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in [running, *later])
    states = {j.state for j in live.client().status([f.job for f in [running, *later]]).jobs}
    assert states == {"cancelled"}
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(calls.square, 1)


def test_leaving_with_by_an_exception_cancels(live: Cluster, tmp_path: Path) -> None:
    started = tmp_path / "started"
    with pytest.raises(KeyboardInterrupt), Executor(broker=f"127.0.0.1:{live.client_port}") as ex:
        fut = ex.submit(calls.wait_for_file, str(started), str(tmp_path / "never"), 0)
        wait_for(started.exists, 20, what="the call to start")
        raise KeyboardInterrupt
    assert fut.cancelled()
    assert live.client().job(fut.job).state == "cancelled"


def test_a_call_after_a_failed_one_is_cancelled_with_the_reason(ex: Executor) -> None:
    first = ex.submit(calls.boom, 1)
    second = ex.submit(calls.add, 1, 2, after=[first])
    third = ex.submit(calls.add, 1, 2, after=[ex.submit(calls.boom, 2)])
    with pytest.raises(JobCancelled, match=f"dependency {first.job} failed"):
        second.result(scaled(20))
    assert third.result(scaled(20)) == 3


def test_calls_are_ordinary_jobs(ex: Executor, live: Cluster) -> None:
    fut = ex.submit(calls.chatty, 41, name="chatty-41", cpus=2, attempts=2)
    assert fut.result(scaled(20)) == 42
    info = live.client().job(fut.job)
    assert (info.name, info.raw["cpus"], info.raw["max_attempts"]) == ("chatty-41", 2, 2)
    assert info.raw["output_tail"]["stderr"] == "working on 41\n"
    assert info.raw["history"][0]["progress_message"] == "half of 41"
    assert ex.submit(calls.job_id).result(scaled(20)) != str(fut.job)


def test_a_function_of_main_without_cloudpickle_is_refused_at_once(
    ex: Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script's own function would go by a reference the worker cannot follow (there,
    __main__ is Banyan's runner): refused before anything is submitted, saying what to do."""
    monkeypatch.setitem(sys.modules, "cloudpickle", None)  # as where it is not installed

    def simulate(seed: int) -> int:
        return seed * seed

    class Params:
        pass

    simulate.__qualname__, Params.__qualname__ = "simulate", "Params"  # as at a script's top
    simulate.__module__ = Params.__module__ = "__main__"
    before = ex.client.events_head()
    with pytest.raises(NotImportable, match=r"simulate is defined in __main__.*cloudpickle"):
        ex.submit(simulate, 3)
    with pytest.raises(NotImportable, match="Params is defined in __main__"):
        list(ex.map(calls.square, [Params()]))
    assert ex.client.events_head() == before  # nothing was submitted
    assert ex.submit(calls.square, 3).result(scaled(20)) == 9


def test_payload_limits_are_refused_clearly(ex: Executor) -> None:
    with pytest.raises(PayloadTooLarge, match="at most 786,432"):
        ex.submit(calls.nbytes, b"x" * remote.MAX_CALL_BYTES)
    fut = ex.submit(calls.nbytes, remote.MAX_RESULT_BYTES + 1)
    with pytest.raises(PayloadTooLarge, match="results may be at most 16,777,216"):
        fut.result(scaled(30))
    big = ex.submit(calls.nbytes, 3_000_000)  # past the output tail: read from the worker
    assert big.result(scaled(30)) == b"x" * 3_000_000


def test_a_worker_killed_mid_call_and_the_call_completes_through_the_rerun(
    live: Cluster, tmp_path: Path
) -> None:
    live.start_worker("w2", cpus=1, memory=1000)
    live.client().drain("w1")  # so the call starts on w2
    try:
        with Executor(broker=f"127.0.0.1:{live.client_port}") as ex:
            started = tmp_path / "started"
            fut = ex.submit(calls.wait_for_file, str(started), str(tmp_path / "release"), 7)
            wait_for(started.exists, 20, what="the call to start on w2")
            live.client().drain("w1", resume=True)
            started.unlink()
            live.kill("w2", signal.SIGKILL)
            wait_for(started.exists, 30, what="the call to run again on w1")
            (tmp_path / "release").touch()
            assert fut.result(scaled(30)) == 7
            history = live.client().job(fut.job).raw["history"]
            assert [(a["worker"], a["outcome"]) for a in history] == [
                ("w2", "lost"),
                ("w1", "success"),
            ]
    finally:
        live.client().drain("w1", resume=True)


def test_a_missing_key_is_said_at_once(live: Cluster, tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    with pytest.raises(KeyRefused):
        Executor(broker=f"127.0.0.1:{live.client_port}", home=tmp_path, timeout=scaled(5))
