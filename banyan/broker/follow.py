"""Blocking reads of the event log (`events` with `wait`).

A read that finds no event at or after its `since` is kept here, and answered as soon as a
commit appends one, or with nothing once its wait is over. A program that follows jobs (a
workflow engine's executor, `banyan.futures`) then learns of a change one commit after it,
with one request outstanding and no polling.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from banyan import protocol
from banyan.broker.records import Event


@dataclass(eq=False)
class Follower:
    identity: bytes
    req: int
    since: int
    limit: int
    deadline: float  # on the broker's monotonic clock
    answered: bool = False


def reply(follower: Follower, events: list[Event]) -> bytes:
    rows = [[e.seq, e.time, e.job, e.frm, e.to, e.reason] for e in events]
    after = events[-1].seq + 1 if events else follower.since
    return protocol.encode("events", {"events": rows, "next": after}, follower.req)


class Followers:
    """The reads waiting for the log to grow, and their deadlines, soonest first."""

    def __init__(self) -> None:
        self.waiting: list[Follower] = []
        self._deadlines: list[tuple[float, int, Follower]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, follower: Follower) -> None:
        self.waiting.append(follower)
        heapq.heappush(self._deadlines, (follower.deadline, next(self._seq), follower))

    def next_deadline(self) -> float | None:
        while self._deadlines and self._deadlines[0][2].answered:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def due(self, now: float) -> list[tuple[bytes, bytes]]:
        """Replies (identity, frame) for the reads whose wait is over: nothing came."""
        out: list[tuple[bytes, bytes]] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            follower = heapq.heappop(self._deadlines)[2]
            if follower.answered:
                continue
            follower.answered = True
            out.append((follower.identity, reply(follower, [])))
        if out:
            self.waiting = [f for f in self.waiting if not f.answered]
        return out

    def wake(self, read: Callable[[int, int], list[Event]]) -> list[tuple[bytes, bytes]]:
        """Replies for the reads that the log now answers; `read(since, limit)` reads it. A
        read asking for events past the new ones waits on."""
        out: list[tuple[bytes, bytes]] = []
        keep: list[Follower] = []
        for follower in self.waiting:
            events = read(follower.since, follower.limit)
            if events:
                follower.answered = True
                out.append((follower.identity, reply(follower, events)))
            else:
                keep.append(follower)
        self.waiting = keep
        return out
