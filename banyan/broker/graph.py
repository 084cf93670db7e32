"""Cycle checks for the dependency graph, run inside the transaction that adds the edges.

Nodes are jobs and groups. A job points at what it depends on; a group points at its members
(a job that depends on a group waits for every member). The graph on disk is acyclic, so a new
cycle must pass through something this request adds, which lets the walk stay small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from banyan.broker.records import Dep, Tx
from banyan.errors import Conflict

Node = tuple[str, int]  # ("job", id) or ("group", id)
# Steps of a cycle a refusal names before it says how long the cycle is.
CYCLE_SHOWN = 10


class DepGraph:
    def __init__(self, tx: Tx, label: Callable[[int], str | None] | None = None) -> None:
        """`label` names a job this request makes, as its sender knows it (`jobs[1] (b)`):
        its id is not given out unless the request goes through."""
        self.tx = tx
        self.label = label

    def check(
        self,
        new: dict[int, list[Dep]],
        members: dict[int, list[int]],
        joined: set[int],
        existing: bool = False,
    ) -> None:
        """Refuse the request if adding these edges closes a cycle.

        `new` maps job ids to their (new) dependencies, `members` maps group ids to the jobs
        joining them in this request, `joined` holds the existing open groups that gain members.
        With `existing`, the jobs in `new` are already stored (a modify of `depends_on`).
        Without it and with no joined group, nothing stored can reach a new job, so the walk
        stops at stored nodes.
        """
        self.new = new
        self.members = members
        self.prune = not existing and not joined
        color: dict[Node, int] = {}  # 1 = on the current path, 2 = done, no cycle through it
        for job_id in new:
            self._walk(("job", job_id), color)

    def _walk(self, start: Node, color: dict[Node, int]) -> None:
        if color.get(start):
            return
        path: list[Node] = [start]
        stack: list[Iterable[Node]] = [iter(self._next(start))]
        color[start] = 1
        while stack:
            node = next(stack[-1], None)  # type: ignore[call-overload]
            if node is None:
                stack.pop()
                color[path.pop()] = 2
                continue
            state = color.get(node)
            if state == 1:
                loop = [*path[path.index(node) :], node]
                shown = [self._label(n) for n in loop[:CYCLE_SHOWN]]
                if len(loop) > CYCLE_SHOWN:  # a long cycle is named by its start, not whole
                    shown.append(f"... ({len(loop) - 1} jobs and groups in all)")
                raise Conflict("dependency cycle: " + " -> ".join(shown))
            if state == 2:
                continue
            color[node] = 1
            path.append(node)
            stack.append(iter(self._next(node)))

    def _next(self, node: Node) -> list[Node]:
        kind, ident = node
        if kind == "group":
            out = [("job", m) for m in self.members.get(ident, ())]
            if not (self.prune and ident not in self.members):
                out += [("job", m) for m in self.tx.group_members(ident)]
            return out
        deps = self.new.get(ident)
        if deps is not None:
            return [(d.target, d.id) for d in deps]
        if self.prune:
            return []
        job = self.tx.get_job(ident)
        if job is None or job.st.terminal:
            return []  # an ended job waits for nothing, so no cycle runs through it
        return [(target, tid) for _, target, tid in job.depends_on]

    def _label(self, node: Node) -> str:
        kind, ident = node
        if kind == "group":
            group = self.tx.get_group(ident)
            return f"group {group.name!r}" if group else f"group {ident}"
        said = self.label(ident) if self.label is not None and ident in self.new else None
        return said or f"job {ident}"
