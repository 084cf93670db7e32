"""Why a job waits, in words (SPEC §5; docs/cli.md, REASON): what is permanent says so, and
what ends when a worker comes back says which worker. Pure: no sockets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from banyan.broker.owners import Runs
from banyan.broker.state import Actor
from banyan.broker.views import waiting_reason
from tests.statekit import ROOT, Harness, spec


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "store")
    yield harness
    harness.store.close()


def reason(h: Harness, job_id: int) -> str | None:
    with h.store.read() as tx:
        return waiting_reason(h.job(job_id), list(tx.workers()))


def test_a_job_only_a_lost_worker_can_run_waits_for_that_worker(h: Harness) -> None:
    h.add_worker("plain")
    h.add_worker("nsnode", tags=["netns"])
    (job,) = h.submit(spec(tags=["netns"], hold=True))
    h.do(lambda c: c.worker_lost("nsnode", "silent"))
    h.do(lambda c: c.modify(ROOT, job, {}, release=True))
    assert reason(h, job) == "the only worker that could run it (nsnode) is lost"
    h.add_worker("nsnode", tags=["netns"])  # back: it takes the job at its next claim
    assert reason(h, job) == "queued"


def test_stopped_and_lost_workers_are_named_as_such(h: Harness) -> None:
    h.add_worker("small", cpus=1)
    for name in ("big1", "big2", "big3"):
        h.add_worker(name, cpus=8)
    (job,) = h.submit(spec(cpus=4))
    h.do(lambda c: c.draining("big1"))
    h.do(lambda c: c.stopped("big1"))
    h.do(lambda c: c.draining("big2"))
    h.do(lambda c: c.stopped("big2"))
    h.do(lambda c: c.worker_lost("big3", "silent"))
    assert reason(h, job) == (
        "the only workers that could run it (big1, big2, big3) are stopped or lost"
    )
    h.do(lambda c: c.forget(ROOT, "big3"))
    assert reason(h, job) == "the only workers that could run it (big1, big2) are stopped"


def test_too_big_for_every_known_worker_is_never(h: Harness) -> None:
    h.add_worker("small", cpus=1)
    h.add_worker("gone", cpus=2)
    h.do(lambda c: c.worker_lost("gone", "silent"))
    (job,) = h.submit(spec(cpus=4))
    assert reason(h, job) == "no worker can ever run this: needs 4 cpus, largest worker has 1"


def test_what_a_job_needs_is_said_in_words(h: Harness) -> None:
    h.add_worker("w", cpus=1, gpus=0, tags=["a"])
    one_gpu, one_tag, two_tags, one_cpu, together = h.submit(
        spec(gpus=1, cpus=0.5),
        spec(tags=["netns"], cpus=0.5),
        spec(tags=["a", "b"], cpus=0.5),
        spec(cpus=1),
        spec(cpus=1, tags=["a"]),
    )
    lead = "no worker can ever run this: needs"
    assert reason(h, one_gpu) == f"{lead} 1 gpu, largest worker has 0"
    assert reason(h, one_tag) == f"{lead} tag netns; no worker carries it"
    assert reason(h, two_tags) == f"{lead} tags a, b; no worker carries them all"
    h.do(lambda c: c.worker_lost("w", "silent"))
    h.do(lambda c: c.forget(ROOT, "w"))
    h.add_worker("tagged", cpus=0.5, tags=["a"])
    assert reason(h, one_cpu) == f"{lead} 1 cpu, largest worker has 0.5"
    h.add_worker("wide", cpus=2)
    # Each part fits some worker, but no worker has them all.
    assert reason(h, together) == f"{lead} 1 cpu and tag a together; no worker has all of them"


def test_a_job_only_another_accounts_worker_could_run_says_so(h: Harness) -> None:
    """eve's job needs a tag only bob's own worker (not root: it runs bob's jobs alone)
    carries: the worker is there, and it is its rule, not the tag, that keeps the job."""
    h.add_worker("shared")
    h.do(lambda c: c.register("bobs", "h", (2, 1024, 0), ["bobw"], [], Runs(only_account="bob")))
    (job,) = h.submit(spec(tags=["bobw"]), actor=Actor("eve", "user"))
    said = reason(h, job)
    assert said is not None and said.startswith(
        "only workers that do not run jobs of account eve could run it: worker bobs runs only"
    ), said
