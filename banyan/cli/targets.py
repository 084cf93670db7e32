"""What a bulk command line names: job ids, ranges of ids, group names and filters.

`banyan-cancel 12 100-2000 nightly --user alice` names job 12, a range and a group; the filters
(--user, --state, a name glob, --group) and the ranges become one selector for the broker,
which finds the jobs by index. Plain ids and group names stay strict: each must exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from banyan import defaults
from banyan.cli.output import Args, UsageError

STATES = ("inactive", "available", "running", "pending_cancellation", "terminated", "cancelled")
_RANGE = re.compile(r"(\d+)-(\d+)")


@dataclass
class Targets:
    ids: list[int]  # named jobs: each must exist
    groups: list[str]  # named groups: each must exist
    select: dict[str, Any] | None  # the ranges and the filters, as one selector

    @property
    def empty(self) -> bool:
        return not (self.ids or self.groups or self.select)

    @classmethod
    def parse(
        cls, words: list[str], args: Args, name_option: str, whole_groups: bool = True
    ) -> Targets:
        """With `whole_groups`, `--group G` with no other filter and no range names the group
        itself; otherwise it narrows the selector to G's members. With a filter, plain ids
        join the ranges. A group name among the words is a whole group, when allowed."""
        ids: list[int] = []
        ranges: list[list[int]] = []
        groups: list[str] = []
        for word in words:
            if word.isdigit():
                ids.append(int(word))
            elif (m := _RANGE.fullmatch(word)) is not None:
                first, last = int(m.group(1)), int(m.group(2))
                if not 0 < first <= last:
                    raise UsageError(f"{word}: a range is FIRST-LAST, 1 <= FIRST <= LAST")
                ranges.append([first, last])
            elif whole_groups:
                groups.append(word)
            else:
                raise UsageError(f"{word}: expected a job id or a range (--group for a group)")
        state = args.get("--state")
        if state is not None and state not in STATES:
            raise UsageError(f"--state: one of {', '.join(STATES)}; got {state!r}")
        filters = {"owner": args.get("--user"), "state": state, "name": args.get(name_option)}
        group = args.get("--group")
        if any(v is not None for v in filters.values()) or (group is not None and ranges):
            if groups:
                raise UsageError("a group and filters together: use --group NAME")
            ranges += [[i, i] for i in ids]
            ids = []
        elif group is not None and whole_groups:
            groups.append(group)
            group = None
        if len(ranges) > defaults.MAX_SELECT_RANGES:
            raise UsageError(
                f"{len(ranges)} id ranges, over the {defaults.MAX_SELECT_RANGES} one request may "
                "carry (MAX_SELECT_RANGES): give fewer, wider ranges, or a filter"
            )
        picked = any(v is not None for v in filters.values()) or group is not None or ranges
        select = {"ids": ranges, **filters, "group": group} if picked else None
        return cls(ids, groups, select)


def ids_text(ids: list[int]) -> str:
    shown = " ".join(map(str, ids[:20]))
    return shown + (f" … ({len(ids)} in all)" if len(ids) > 20 else "")
