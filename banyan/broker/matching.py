"""Which eligible job a claiming worker gets next: pure, over the heads of the queues.

The eligible index is split into queues, one per owner and shape (records.Head). A job fits a
worker exactly when its queue's head does, so a claim looks at one entry per queue, never at
the jobs behind a head that does not fit.

Between owners, fair share decides. Each owner with eligible work gets a weight: its shares
times Slurm's fair-share factor 2^(-U/S), where S is its fraction of the shares and U its
fraction of the recent usage (cpu-seconds, halved every half-life) among the owners with
eligible work. The next job goes to the owner holding the fewest cpus per unit of weight (ties:
the higher weight, then the oldest job), so free capacity is shared in proportion to the
weights and an owner that ran more lately gets less until the others catch up. Within one
owner, priority decides, then age. An owner at its `max_running` gets nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from banyan.broker.records import Head, Request, Tally, User

Room = tuple[float, int, int]  # free cpus, memory MiB, gpus
# A test of job ids; None passes every job.
Skip = Callable[[int], bool] | None
# The entry behind a given one in its queue.
Behind = Callable[[Head], Head | None]
# A queue's head now (with None), or the entry behind the given one (Tx.queue_head).
Reload = Callable[[bytes, Head | None], Head | None]
# Entries looked at behind a held head, per queue and pick: past them the queue waits for its
# operation to end (a cancel of a whole queue would otherwise be walked at every claim).
HELD_WALK = 32
# Entries looked at behind heads of accounts the worker does not run, per pick, over all
# queues. One owner's jobs usually run as one account, so such a head mostly means its whole
# queue is refused; but a key rebound to another account leaves older jobs of the old one at
# the front, and the new ones behind them must not wait for those.
REFUSED_WALK = 64
# The least weight an owner can have: 2^(-U/S) underflows to 0 for tiny shares.
_MIN_WEIGHT = 1e-12


def fits(request: Request, room: Room, tags: Collection[str]) -> bool:
    cpus, memory, gpus, wanted = request
    return (
        cpus <= room[0] + 1e-9
        and memory <= room[1]
        and gpus <= room[2]
        and all(t in tags for t in wanted)
    )


def decayed(user: User | None, now: float, half_life: float) -> float:
    """The user's usage in cpu-seconds as of `now`."""
    if user is None or user.usage <= 0:
        return 0.0
    age = max(0.0, now - user.usage_at)
    return user.usage * math.pow(0.5, age / half_life) if half_life > 0 else 0.0


def factors(users: dict[str, User | None], now: float, half_life: float) -> dict[str, float]:
    """Slurm's fair-share factor of each user among these: 2^(-U/S), from 1 (used nothing)
    down; 0.5 for a user whose usage fraction equals its share fraction."""
    shares = {name: u.shares if u else 1.0 for name, u in users.items()}
    usage = {name: decayed(u, now, half_life) for name, u in users.items()}
    total_shares, total_usage = sum(shares.values()), sum(usage.values())
    out = {}
    for name in users:
        used = usage[name] / total_usage if total_usage > 0 else 0.0
        out[name] = math.pow(2.0, -used / (shares[name] / total_shares))
    return out


@dataclass
class Account:
    """One owner during a match: its queues' heads and what it holds."""

    owner: str
    weight: float  # shares times fair-share factor
    cpus: float  # held now, with what this match assigned
    running: int
    max_running: int | None
    heads: dict[bytes, Head] = field(default_factory=dict)

    def order(self) -> tuple[float, float, int]:
        oldest = min(h.job for h in self.heads.values())
        return (self.cpus / self.weight, -self.weight, oldest)

    def best(
        self,
        room: Room,
        tags: Collection[str],
        refused: Skip,
        held: Skip,
        behind: Behind,
        budget: list[int],
    ) -> Head | None:
        """Its best entry that fits: highest priority, then oldest. `held` entries are passed
        over, at most HELD_WALK of them per queue; `refused` ones too, while `budget[0]` (the
        pick's REFUSED_WALK) lasts."""
        best: Head | None = None
        for head in self.heads.values():
            if not fits(head.request, room, tags):
                continue
            candidate: Head | None = head
            held_left = HELD_WALK
            while candidate is not None:
                if held is not None and held(candidate.job):
                    if held_left == 0:
                        candidate = None
                        break
                    held_left -= 1
                elif refused is not None and refused(candidate.job):
                    if budget[0] == 0:
                        candidate = None
                        break
                    budget[0] -= 1
                else:
                    break
                candidate = behind(candidate)
            if candidate is not None and (
                best is None or (candidate.priority, -candidate.job) > (best.priority, -best.job)
            ):
                best = candidate
        return best


class Board:
    """The queue heads during one `match`, by owner, kept up to date as it assigns: a queue
    whose head was taken is read again (`reload`) only when a pick needs it."""

    def __init__(
        self,
        heads: Iterable[Head],
        accounts: dict[str, Account],
        reload: Reload,
    ) -> None:
        self.accounts = accounts
        self._reload = reload
        self._taken: list[Head] = []
        for head in heads:
            accounts[head.owner].heads[head.queue] = head

    @classmethod
    def build(
        cls,
        heads: list[Head],
        users: dict[str, User | None],
        tallies: dict[str, Tally],
        now: float,
        half_life: float,
        reload: Reload,
    ) -> Board:
        """`users` for every owner with a head; `tallies` for those that compete with another
        or have a limit (the others count as holding nothing)."""
        factor = factors(users, now, half_life) if len(users) > 1 else dict.fromkeys(users, 1.0)
        accounts = {}
        for owner, user in users.items():
            tally = tallies.get(owner)
            weight = max(_MIN_WEIGHT, (user.shares if user else 1.0) * factor[owner])
            limit = user.max_running if user else None
            cpus, running = (tally.cpus, tally.running) if tally else (0.0, 0)
            accounts[owner] = Account(owner, weight, cpus, running, limit)
        return cls(heads, accounts, reload)

    def pick(
        self, room: Room, tags: Collection[str], refused: Skip = None, held: Skip = None
    ) -> Head | None:
        """The job to assign next to a worker with `room` and `tags`, if any fits: not one
        of those `refused` (of accounts the worker does not run) or `held` (the targets of a
        long operation, bulk.py)."""
        for taken in self._taken:
            after = self._reload(taken.queue, None)
            heads = self.accounts[taken.owner].heads
            if after is None:
                del heads[taken.queue]
            else:
                heads[taken.queue] = after
        self._taken.clear()
        waiting = [a for a in self.accounts.values() if a.heads]
        budget = [REFUSED_WALK]
        for account in sorted(waiting, key=Account.order):
            if account.max_running is not None and account.running >= account.max_running:
                continue
            head = account.best(room, tags, refused, held, self._behind, budget)
            if head is not None:
                return head
        return None

    def _behind(self, head: Head) -> Head | None:
        return self._reload(head.queue, head)

    def took(self, head: Head) -> None:
        """`head` was assigned: its queue has a new head (or none)."""
        account = self.accounts[head.owner]
        account.cpus += head.request[0]
        account.running += 1
        self._taken.append(head)
