"""Summarise a py-spy raw (collapsed stacks) profile: where the time went, by function.

    py-spy record --pid PID --format raw --idle -o broker.txt    # or any bench's --profile DIR
    python bench/hotspots.py broker.txt [--top 25] [--busy]

`self` is time with the function on top of the stack, `total` time with it anywhere on it.
With --busy, samples idle in the poll loop's wait are left out, so percentages are of busy time.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

# A frame in py-spy's raw format: "function (path/to/file.py:line)".
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")
# Where the loops wait for input: samples ending here are idle, not work.
IDLE = ("Poller.poll (zmq/sugar/poll.py)", "select (selectors.py)", "poll (zmq/sugar/socket.py)")


def frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    return f"{m['func']} ({m['file']})" if m else frame.strip()


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append(([frame_name(f) for f in stack.split(";")], int(count)))
    return stacks


def summarise(stacks: list[tuple[list[str], int]], busy: bool) -> tuple[int, int, list[str]]:
    idle = sum(n for frames, n in stacks if frames[-1] in IDLE)
    if busy:
        stacks = [(f, n) for f, n in stacks if f[-1] not in IDLE]
    total = sum(n for _, n in stacks)
    self_time: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        self_time[frames[-1]] += n
        for name in set(frames):
            incl[name] += n
    return total, idle, _rows(self_time, incl, total)


def _rows(
    self_time: collections.Counter[str], incl: collections.Counter[str], total: int
) -> list[str]:
    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f}%" if total else "  -  "

    by_total = [f"{pct(n)} {pct(self_time[name])}  {name}" for name, n in incl.most_common()]
    by_self = [f"{pct(n)} {pct(incl[name])}  {name}" for name, n in self_time.most_common()]
    return ["by total:  total   self", *by_total, "", "by self:   self  total", *by_self]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile", type=Path, nargs="+")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--busy", action="store_true", help="leave out samples idle in poll()")
    args = p.parse_args()
    for path in args.profile:
        total, idle, rows = summarise(load(path), args.busy)
        print(f"== {path}: {total} samples, {idle} idle in poll")
        total_rows = rows[: rows.index("") + 1]
        self_rows = rows[rows.index("") + 1 :]
        print("\n".join(total_rows[: args.top + 1]))
        print("\n".join(self_rows[: args.top + 1]))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
