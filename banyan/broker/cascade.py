"""The cascade: what a job's end does to its dependents, when there are many, a slice at a time.

When a job or a group ends, or is known never to succeed, its dependents are settled: each is
released (one dependency fewer to wait for) or cancelled, and each that ends so settles its own
(SPEC §4). A message settles up to `Config.cascade_jobs` dependents itself (state.py,
`Core._walk`); what lies past them is left to the cascade as "walks" (a job or group, what
happened to it, and how far its dependents are settled), each a record of its own under the
cascade's row of the store's long operations, written in the transaction of the message that
left them. The cascade is a long
operation like a big cancel (longops.py): each turn carries it on by a slice and stores how far
it got with that slice's changes, so a broker killed in the middle finishes it after a restart.

Walks are carried out in the order that settling everything at once would take (depth first;
see `Core._walk`), and while the cascade has work, every message leaves its walks to it too, so
the end state is the one settling each end at once gives. Clients never see it half done: it
holds back the requests that read or change jobs as every long operation does. A dependent it
has not reached is still waiting for the dependency that caused it (its `pending` counts it),
so none can start before the cascade reaches it.

Pure, like state.py: no sockets, no LMDB, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from banyan.broker import bulk
from banyan.broker.state import CASCADE, CASCADE_KIND, Core


@dataclass
class Cascade:
    """The running cascade; its walks live in the store (`Core.tx`), where messages add to
    them, and `row` is its stored row as the last step left it (see Core._defer)."""

    row: list[Any] = field(default_factory=lambda: [CASCADE, CASCADE_KIND, 0, 0])

    id = CASCADE
    kind = CASCADE_KIND
    actor = ""  # nobody's: it takes no user's turn

    def pack(self) -> list[Any]:
        return self.row

    @classmethod
    def unpack(cls, row: list[Any]) -> Cascade:
        return cls(row)

    def copy(self) -> Cascade:
        return Cascade(list(self.row))

    def step(self, core: Core, budget: int) -> bulk.Done:
        return bulk.Done({}, step(core, budget, self))

    def holds(self, core: Core, job_id: int) -> bool:
        return False  # what it has not reached waits for it (see the module's docstring)

    def reply(self, lists: dict[str, list[Any]]) -> dict[str, Any]:
        return {}  # nobody asked for it


def step(core: Core, budget: int, cascade: Cascade | None = None) -> bool:
    """Carry the cascade on by about `budget` dependents; returns whether it has ended (its
    row is then gone from the store)."""
    core.limit = core.spent + budget
    core.inline = True
    for _ in range(budget + 1):  # each walk taken settles one dependent at least, or ends
        if core.spent >= core.limit or not core.inline:
            break
        walk = core.tx.take_walk(CASCADE)
        if walk is None:
            core.tx.delete_op(CASCADE)
            return True
        core._band = None
        core._walk(walk)
    if cascade is not None:
        cascade.row = core.tx.get_op(CASCADE) or cascade.row
    return False


def waiting(tx: Any) -> bool:
    """Whether the cascade has work left in this store."""
    return tx.get_op(CASCADE) is not None
