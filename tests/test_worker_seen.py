"""`LAST SEEN` and the state of workers the broker has stopped hearing from (docs/operations.md,
"What banyan-workers shows"): the broker in-process with clocks of the test's own, real ZeroMQ
sockets on loopback and a real LMDB store, restarted on the same state directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from banyan.broker.server import Broker
from tests.test_broker_clock import HEARTBEAT, STEPS, WINDOW, Clocks, Peer, Site


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)  # a failed test's open sockets must not hang its teardown


@pytest.fixture
def sites(tmp_path: Path, ctx: zmq.Context[Any]) -> Iterator[list[Site]]:
    made: list[Site] = []
    yield made
    for s in made:
        s.close()


def tick(clocks: Clocks, seconds: float) -> None:
    """Time passes for everyone: both clocks move together."""
    clocks.mono += seconds
    clocks.wall += seconds


def beat(site: Site, w: Peer, name: str, clocks: Clocks) -> None:
    """An idle worker's heartbeat, and the broker turns until it has heard it."""
    w.send("heartbeat", {"running": []})
    for _ in range(STEPS):
        site.broker.step(0.005)
        if site.broker.sessions[name].last_seen == clocks.mono:
            return
    raise AssertionError("the broker never heard the heartbeat")


def row(site: Site, name: str) -> dict[str, Any]:
    return dict(next(w for w in site.ask("workers", {})["workers"] if w["name"] == name))


def crash(broker: Broker) -> None:
    """What kill -9 leaves: the store as last committed, nothing written on the way out; the
    kernel closes the sockets and lets the state directory's lock go."""
    broker.client.close(linger=0)
    broker.worker.close(linger=0)
    for monitor in broker.refusing:
        monitor.close(linger=0)
    broker.store.close()
    os.close(broker.state_lock)


def test_a_lost_worker_was_last_seen_at_its_last_heartbeat(
    tmp_path: Path, ctx: zmq.Context[Any], sites: list[Site]
) -> None:
    clocks = Clocks()
    site = Site(tmp_path, ctx, clocks)
    sites.append(site)
    w = site.worker("w1")
    for _ in range(3):
        tick(clocks, HEARTBEAT)
        beat(site, w, "w1", clocks)
    heard = clocks.wall
    tick(clocks, WINDOW + HEARTBEAT)  # it dies: nothing more from it
    for _ in range(5):
        site.broker.step(0.005)
    lost = row(site, "w1")
    assert lost["state"] == "lost"
    assert lost["last_seen"] == pytest.approx(heard, abs=1e-3)
    tick(clocks, 30)  # LAST SEEN goes on counting from its last heartbeat
    assert row(site, "w1")["last_seen"] == pytest.approx(heard, abs=1e-3)


@pytest.mark.parametrize("stop", ["clean", "kill -9"])
def test_after_a_restart_a_worker_not_back_yet_is_expected_and_its_last_heartbeat_shown(
    tmp_path: Path, ctx: zmq.Context[Any], sites: list[Site], stop: str
) -> None:
    clocks = Clocks()
    first = Site(tmp_path, ctx, clocks)
    w = first.worker("w1")
    registered = clocks.wall
    for _ in range(int(WINDOW) + 2):  # past one liveness window: its time has been stored
        tick(clocks, HEARTBEAT)
        beat(first, w, "w1", clocks)
    heard = clocks.wall
    w.close()
    if stop == "clean":
        first.close()
    else:
        for p in first.peers:
            p.close()
        crash(first.broker)
    tick(clocks, 60)  # the broker is away for a minute; the worker died with it
    again = Site(tmp_path, ctx, clocks)
    sites.append(again)
    waited = row(again, "w1")
    assert waited["state"] == "expected"
    if stop == "clean":
        assert waited["last_seen"] == pytest.approx(heard, abs=1e-3)
    else:  # stored once a liveness window: at most that far behind
        assert heard - WINDOW <= waited["last_seen"] <= heard
        assert waited["last_seen"] > registered
    tick(clocks, WINDOW + HEARTBEAT)
    for _ in range(5):
        again.broker.step(0.005)
    lost = row(again, "w1")
    assert lost["state"] == "lost" and lost["last_seen"] == waited["last_seen"]


def test_a_worker_back_after_a_restart_is_connected_again(
    tmp_path: Path, ctx: zmq.Context[Any], sites: list[Site]
) -> None:
    clocks = Clocks()
    first = Site(tmp_path, ctx, clocks)
    first.worker("w1")
    first.close()
    tick(clocks, 2)
    again = Site(tmp_path, ctx, clocks)
    sites.append(again)
    assert row(again, "w1")["state"] == "expected"
    again.worker("w1")
    back = row(again, "w1")
    assert back["state"] == "idle" and back["last_seen"] == pytest.approx(clocks.wall, abs=1e-3)
