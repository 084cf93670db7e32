"""Which eligible job a claiming worker gets next: pure, over the heads of the queues.

The eligible index is split into queues, one per owner and shape (records.Head). A job fits a
worker exactly when its queue's head does, so a claim looks at one entry per queue, never at
the jobs behind a head that does not fit.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from banyan.broker.records import Head, Request

Room = tuple[float, int, int]  # free cpus, memory MiB, gpus
# Whose jobs a worker may take (an owner filter); None takes everyone's.
Accepts = Callable[[str], bool] | None


def fits(request: Request, room: Room, tags: Collection[str]) -> bool:
    cpus, memory, gpus, wanted = request
    return (
        cpus <= room[0] + 1e-9
        and memory <= room[1]
        and gpus <= room[2]
        and all(t in tags for t in wanted)
    )


class Board:
    """The queue heads during one `match`, kept up to date as it assigns."""

    def __init__(self, heads: list[Head]) -> None:
        self._heads = {h.queue: h for h in heads}

    def __bool__(self) -> bool:
        return bool(self._heads)

    def pick(self, room: Room, tags: Collection[str], accepts: Accepts = None) -> Head | None:
        """The best head that fits `room` and `tags`: highest priority, then oldest."""
        best: Head | None = None
        for head in self._heads.values():
            if not fits(head.request, room, tags):
                continue
            if accepts is not None and not accepts(head.owner):
                continue
            if best is None or (head.priority, -head.job) > (best.priority, -best.job):
                best = head
        return best

    def took(self, head: Head, after: Head | None) -> None:
        """`head` was assigned; `after` is its queue's new head, if any."""
        if after is None:
            del self._heads[head.queue]
        else:
            self._heads[head.queue] = after
