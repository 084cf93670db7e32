"""Selectors: which jobs a bulk request or a history query means, found by index (SPEC §8).

A `Selector` is the intersection of its criteria: id ranges, an owner, a set of states, a name
glob and a group. `ids` walks the jobs it may match, in id order or its reverse, through the
narrowest index it has (a group's members, an owner's jobs by state, the jobs in a state, or
the job table within the id ranges); `matches` then tests every criterion on the job itself.
Pure: reads go through a `records.Tx`.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from banyan.broker.glob import matcher
from banyan.broker.records import Job, JobState, Tx

MAX_ID = 2**64 - 1
ACTIVE = (
    JobState.INACTIVE.value,
    JobState.AVAILABLE.value,
    JobState.RUNNING.value,
    JobState.PENDING_CANCELLATION.value,
)
TERMINAL = (JobState.TERMINATED.value, JobState.CANCELLED.value)
ALL = (*ACTIVE, *TERMINAL)


@dataclass(frozen=True)
class Selector:
    ranges: tuple[tuple[int, int], ...] = ()  # inclusive id ranges; () is every id
    owner: str | None = None
    states: tuple[str, ...] = ALL
    name: str | None = None  # a glob over the name shown (the command when there is none)
    group: int | None = None  # a group id

    def matches(self, job: Job) -> bool:
        return (
            job.state in self.states
            and (self.owner is None or job.owner == self.owner)
            and (self.group is None or self.group in job.groups)
            and (not self.ranges or any(lo <= job.id <= hi for lo, hi in self.ranges))
            and (self.name is None or matcher(self.name)(job.name or job.command))
        )

    def ids(self, tx: Tx, lo: int = 1, hi: int = MAX_ID, descending: bool = False) -> Iterator[int]:
        """Ids in [lo, hi] that may match, each once, in order: a superset of the matches,
        which only `matches` tells apart (the index used may not cover every criterion)."""
        spans = sorted(self.ranges) if self.ranges else [(lo, hi)]
        for first, last in reversed(spans) if descending else spans:
            a, b = max(first, lo), min(last, hi)
            if a <= b:
                yield from self._walk(tx, a, b, descending)

    def _walk(self, tx: Tx, lo: int, hi: int, descending: bool) -> Iterator[int]:
        if self.group is not None:
            return tx.member_ids(self.group, lo, hi, descending)
        if self.owner is not None:
            walks = [tx.owner_ids(self.owner, s, lo, hi, descending) for s in self.states]
        elif len(self.states) < len(ALL):
            walks = [tx.state_ids(s, lo, hi, descending) for s in self.states]
        else:
            return tx.job_ids(lo, hi, descending)
        return walks[0] if len(walks) == 1 else heapq.merge(*walks, reverse=descending)

    @property
    def indexed(self) -> bool:
        """Whether the index walked covers every criterion, so each id walked matches."""
        if self.name is not None:
            return False
        if self.group is not None:
            return self.owner is None and len(self.states) == len(ALL)
        return True

    def pack(self) -> list[Any]:
        return [
            [list(r) for r in self.ranges],
            self.owner,
            list(self.states),
            self.name,
            self.group,
        ]

    @classmethod
    def unpack(cls, row: list[Any]) -> Selector:
        ranges, owner, states, name, group = row
        return cls(tuple((a, b) for a, b in ranges), owner, tuple(states), name, group)
