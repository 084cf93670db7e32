"""banyan-status: the queue (like squeue) or its history (like sacct), newest first, or one job
in full detail."""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any

from banyan import defaults
from banyan.cli import EXIT_OK
from banyan.cli.output import (
    CONNECT_OPTIONS,
    Args,
    Cell,
    Screen,
    UsageError,
    ago,
    clip,
    connect,
    dependencies,
    duration,
    job_color,
    mib,
    number,
    parse_duration,
    plural,
    print_json,
    report_errors,
    run,
    since,
    size,
    table,
    target_errors,
    use_color,
    visible,
)
from banyan.client import BrokerUnavailable, Client, Status

TOOL = "banyan-status"
USAGE = (
    """banyan-status: what is queued, running and done.

Usage:
  banyan-status [options] [ID...]

With no ID it lists the active jobs (held, queued, running, being cancelled), newest first,
with the reason each waiting job waits; the last line counts every job that matched, shown
or not. With IDs it shows each job in full: its attempts, worker, progress, usage, exit and
the tail of its output; an ID that is not a job is reported, the others are shown, and the
exit status is 1.

Options:
  --group G             Every job of group G, with the group's summary (an array's group
                        is array-ID, ID being its first job).
  --state S             Only jobs in state S: inactive, available, running,
                        pending_cancellation, terminated or cancelled.
  --user U              Only jobs submitted by U.
  --name GLOB           Only jobs whose name (the command, if unnamed) matches GLOB.
  -a --all              Ended jobs too.
  --since WHEN          Only jobs submitted at or after WHEN: a date and time such as
                        2024-06-01 or 2024-06-01T13:30 (local time), @UNIXTIME, or a
                        duration ago such as 2h or 3d.
  --until WHEN          Only jobs submitted before WHEN.
  --limit N             Show at most N jobs, the newest [default: 1000].
  --cursor C            Go on from a previous --json page: its "next".
  -w --watch            Redraw until Ctrl-C.
  --interval SECONDS    Time between redraws with --watch [default: 2].
  --count N             With --watch, stop after N redraws.
  --until-done          With --watch, stop once every job shown has ended (a listing:
                        once it shows no active job).
"""
    + CONNECT_OPTIONS
)

NAME_WIDTH = 32
PROGRESS_WIDTH = 28
MIN_INTERVAL, MAX_INTERVAL = 0.2, 3600.0


def main(argv: list[str] | None = None) -> int:
    return run(TOOL, USAGE, argv, status, many="ID")


def status(args: Args) -> int:
    for ref in args["ID"]:
        if not ref.isdigit():
            raise UsageError(f"expected job ids, got {ref!r} (use --group for a group)")
    now = time.time()
    args["since"] = when(args["--since"], "--since", now)
    args["until"] = when(args["--until"], "--until", now)
    args["cursor"] = (
        number(args["--cursor"], "--cursor", minimum=1, integer=True) if args["--cursor"] else None
    )
    limit = number(args["--limit"], "--limit", minimum=1, integer=True)
    interval = number(args["--interval"], "--interval", minimum=MIN_INTERVAL)
    if interval > MAX_INTERVAL:
        raise UsageError(f"--interval: at most {MAX_INTERVAL:g} seconds")
    count = number(args["--count"], "--count", minimum=1, integer=True) if args["--count"] else 0
    if count and not args["--watch"]:
        raise UsageError("--count counts the redraws of --watch: give --watch too")
    with connect(args) as client:
        if not args["--watch"]:
            st = fetch(client, args, limit)
            show(st, args)
            return report_errors(TOOL, st.errors, args["--json"])
        return watch(client, args, limit, interval, count)


def when(text: str | None, option: str, now: float) -> float | None:
    """A time from `2024-06-01`, `2024-06-01T13:30` (local), `@1717200000`, or `2h` (ago)."""
    if text is None:
        return None
    if text.startswith("@"):
        return float(number(text[1:], option))
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        pass
    try:
        return now - parse_duration(text, option)
    except UsageError:
        raise UsageError(
            f"{option}: expected a date (2024-06-01T13:30), @UNIXTIME or a duration ago "
            f"(2h), got {text!r}"
        ) from None


def fetch(client: Client, args: Args, limit: int) -> Status:
    return client.status(
        [int(i) for i in args["ID"]],
        group=args["--group"],
        state=args["--state"],
        owner=args["--user"],
        all=args["--all"],
        detail=bool(args["ID"]),
        limit=limit,
        name=args["--name"],
        since=args["since"],
        until=args["until"],
        cursor=args["cursor"],
        each=True,
    )


def show(st: Status, args: Args) -> None:
    if args["--json"]:
        out: dict[str, Any] = {"jobs": [j.raw for j in st.jobs], "groups": st.groups}
        out["truncated"] = st.truncated
        if args["ID"]:
            out["errors"] = target_errors(st.errors)
        else:
            out |= {"next": st.next, "counts": st.counts, "matched": st.matched}
            out["exact"] = st.exact
        print_json(out)
    elif st.jobs or not args["ID"]:
        sys.stdout.write(render(st, args, use_color(sys.stdout)) + "\n")
    sys.stdout.flush()


def watch(client: Client, args: Args, limit: int, interval: float, count: int) -> int:
    """Redraw every `interval` s; Ctrl-C (or `--count` redraws) ends it, with exit 0."""
    screen = Screen(sys.stdout)
    shown = 0
    try:
        while True:
            done = False
            try:
                st = fetch(client, args, limit)
                done = all(j.terminal for j in st.jobs)
            except BrokerUnavailable as e:  # a broker restart: keep watching
                if args["--json"]:
                    raise
                screen.show(f"{TOOL}: {e}")
            else:
                if args["--json"]:
                    show(st, args)
                else:
                    head = f"every {duration(interval)}, Ctrl-C to stop"
                    screen.show(f"{head}\n\n" + render(st, args, use_color(sys.stdout)))
            shown += 1
            if count and shown >= count:
                return EXIT_OK
            if done and args["--until-done"]:
                return EXIT_OK
            time.sleep(interval)  # the refresh pace the user asked for
    except KeyboardInterrupt:
        return EXIT_OK


def render(st: Status, args: Args, color: bool) -> str:
    if args["ID"]:
        return "\n\n".join(detail(j.raw, color) for j in st.jobs)
    out = [group_line(g) for g in st.groups]
    if not st.jobs:
        filtered = any(args[o] for o in ("--all", "--state", "--group", "--name", "--since"))
        what = "jobs" if filtered or args["--until"] else "active jobs"
        out.append(f"no {what}" + ("" if args["--all"] else " (--all shows ended ones)"))
        return "\n".join(out)
    now = time.time()
    rows = [row(j.raw, now) for j in st.jobs]
    out.append(table(HEADERS, rows, color))
    out.append(summary(st, args.get("cursor")))
    return "\n".join(out)


def summary(st: Status, cursor: int | None = None) -> str:
    """Every job that matched, by state; how many of them are shown (those before `cursor`,
    when the listing went on from one)."""
    counts = st.counts
    total = st.matched
    if total is None:  # jobs named by id: what is shown is what matched
        counts = {}
        for j in st.jobs:
            counts[j.state] = counts.get(j.state, 0) + 1
        total = len(st.jobs)
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    text = ("at least " if not st.exact else "") + f"{plural(total, 'job')}: {tally}"
    if cursor is not None:  # a page from further down: not the newest
        text += f"; {len(st.jobs)} shown, those before job {cursor}"
    elif len(st.jobs) < total or st.truncated:
        text += f"; the newest {len(st.jobs)} shown (--limit N for more)"
    return text


HEADERS = ("ID", "NAME", "USER", "STATE", "ATTEMPT", "WORKER", "PROGRESS", "TIME", "REASON")


def row(r: dict[str, Any], now: float) -> list[Cell]:
    state = r["state"]
    return [
        str(r["id"]),
        clip(r.get("name") or "", NAME_WIDTH),
        r.get("owner") or "-",
        (state, job_color(state, r.get("outcome"))),
        f"{counted(r)}/{r.get('max_attempts', 1)}",
        r.get("worker") or "-",
        clip(progress(r), PROGRESS_WIDTH),
        elapsed(r, now),
        reason(r),
    ]


def progress(r: dict[str, Any]) -> str:
    parts = [] if r.get("progress") is None else [f"{r['progress']:g}%"]
    if r.get("progress_message"):
        parts.append(r["progress_message"])
    return " ".join(parts) or "-"


def counted(r: dict[str, Any]) -> int:
    """Attempts that counted against max_attempts: not those put back without spending one
    (a lost or stopped worker, a cold stop). A broker that does not say counts them all."""
    return int(r.get("counted", r.get("attempts", 0)))


def elapsed(r: dict[str, Any], now: float) -> str:
    """How long since it was submitted, for a job that waits; how long its attempt has run,
    for a running job; how long its last attempt ran, for an ended one."""
    if r["state"] in ("available", "inactive"):
        return since(r.get("submitted"), now)
    start = r.get("attempt_started", r.get("started"))
    if start is None:
        return "-"
    return since(start, r.get("attempt_ended") or r.get("ended") or now)


def reason(r: dict[str, Any]) -> str:
    """Why it waits, or how it ended."""
    if r.get("reason"):
        return str(r["reason"])
    if r["state"] == "cancelled":
        return r.get("cancel_reason") or "cancelled"
    if r["state"] == "terminated":
        return ending(r)
    return ""


def ending(r: dict[str, Any]) -> str:
    outcome = r.get("outcome")
    if r.get("signal"):
        return f"{outcome}: killed by signal {r['signal']}"
    if outcome == "timeout":
        return "timeout: time limit reached"
    if outcome == "lost":
        return "lost: its worker stopped answering"
    code = r.get("exit_code")
    return f"{outcome}: exit {code}" if code is not None else str(outcome)


def group_line(g: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(g.get("counts", {}).items()))
    sealed = "open" if g.get("open") else "sealed"
    text = (
        f"group {g['name']} (id {g['id']}, {sealed}, owner {g.get('owner', '-')}): "
        f"{plural(g.get('total', 0), 'job')}, {g.get('done', 0)} done, "
        f"{g.get('succeeded', 0)} succeeded"
    )
    text += f"; {counts}" if counts else ""
    if g.get("cancel_reason"):
        text += f"; {g['cancel_reason']}"
    return visible(text)


# ---- one job in full -------------------------------------------------------------------------


def detail(r: dict[str, Any], color: bool) -> str:
    now = time.time()
    facts: list[tuple[str, str]] = [("state", state_line(r, now)), ("command", r["command"])]
    if r.get("reason"):
        facts.append(("waiting", r["reason"]))
    if r.get("cancel_reason"):
        facts.append(("cancelled", r["cancel_reason"]))
    if r["state"] == "terminated":
        facts.append(("result", ending(r)))
    facts += [
        ("owner", _owner(r)),
        ("submitted", _submitted(r, now)),
        ("needs", needs(r)),
        ("priority", str(r.get("priority", 0))),
        ("limits", limits(r)),
    ]
    if r.get("depends_on"):
        pending = r.get("pending_dependencies") or 0
        left = f" ({pending} not yet met)" if pending else ""
        facts.append(("depends on", dependencies(r["depends_on"]) + left))
    if r.get("groups"):
        facts.append(("groups", ", ".join(r["groups"])))
    if r.get("progress") is not None or r.get("progress_message"):
        facts.append(("progress", progress(r)))
    usage = r.get("usage") or {}
    if usage.get("cpu_percent") is not None or usage.get("rss") is not None:
        facts.append(("usage", _usage(usage.get("cpu_percent"), usage.get("rss"))))
    if r.get("cwd"):
        facts.append(("cwd", str(r["cwd"])))
    facts += outputs(r)
    if r.get("env"):
        facts.append(("env", " ".join(f"{k}={v}" for k, v in r["env"].items())))
    if r.get("env_hidden"):
        facts.append(("env", "only its owner and admins may see it"))
    if r.get("output_hidden"):
        facts.append(("output tail", "only its owner and admins may read it"))
    title = f"job {r['id']}  {clip(r.get('name') or '', 60)}"
    lines = [title] + [f"  {k:<11} {visible(v)}" for k, v in facts]
    history = r.get("history") or []
    if history:
        lines += [
            "",
            _indent(
                table(
                    ATTEMPT_HEADERS,
                    [
                        attempt_row(a, now, held=bool(r.get("ahead")) and a is history[-1])
                        for a in history
                    ],
                    color,
                )
            ),
        ]
    for stream, text in (r.get("output_tail") or {}).items():
        if text:
            whole = len(text.encode()) < defaults.OUTPUT_TAIL_BYTES
            note = "" if whole else f" (the last {size(defaults.OUTPUT_TAIL_BYTES)}; banyan-logs)"
            lines += ["", f"  {stream}{note}:"]
            lines += [f"    {visible(line, tabs=True)}" for line in text.rstrip("\n").split("\n")]
    return "\n".join(lines)


def outputs(r: dict[str, Any]) -> list[tuple[str, str]]:
    """Each attempt's output files as its worker named them (its `--output` expanded), or
    the template while no attempt has any."""
    named = [a for a in r.get("history") or () if a.get("stdout")]
    if not named:
        return [("output", str(r["output"]))] if r.get("output") else []
    lines = []
    for a in named:
        files = a["stdout"] if a["stdout"] == a.get("stderr") else f"{a['stdout']}, {a['stderr']}"
        lines.append(f"attempt {a['attempt']}: {files}" if len(named) > 1 else files)
    return [("output", lines[0])] + [("", line) for line in lines[1:]]


def state_line(r: dict[str, Any], now: float) -> str:
    text = str(r["state"])
    spent, allowed = counted(r), r.get("max_attempts", 1)
    if r["state"] in ("available", "inactive"):
        text += f", {spent} of {plural(allowed, 'attempt')} spent" if spent else ""
    elif spent:
        text += f", attempt {spent} of {allowed}"
    free = r.get("attempts", 0) - spent
    if free > 0:
        text += f" ({plural(free, 'run')} requeued without spending an attempt)"
    if r.get("ahead"):
        text += f", held ahead on {r['worker']}"
    elif r.get("worker") and r["state"] in ("running", "pending_cancellation"):
        text += f", on {r['worker']} for {elapsed(r, now)}"
    elif r.get("ended"):
        text += f", ended {ago(r['ended'], now)}"
    return text


def _submitted(r: dict[str, Any], now: float) -> str:
    text = ago(r.get("submitted"), now)
    if r.get("started") and r.get("submitted"):
        text += f"; waited {duration(r['started'] - r['submitted'])} to start"
    return text


def needs(r: dict[str, Any]) -> str:
    parts = [plural_float(r.get("cpus", 1), "cpu")]
    parts.append(mib(r["memory"]) if r.get("memory") else "no memory reservation")
    if r.get("gpus"):
        parts.append(plural(r["gpus"], "gpu"))
    if r.get("tags"):
        parts.append("tags " + ", ".join(r["tags"]))
    return ", ".join(parts)


def plural_float(n: float, word: str) -> str:
    return f"{n:g} {word}{'' if n == 1 else 's'}"


def limits(r: dict[str, Any]) -> str:
    limit = r.get("time_limit")
    text = f"time {duration(limit)}" if limit else "no time limit"
    if r.get("cancel_grace") is not None:
        text += f", cancel grace {duration(r['cancel_grace'])}"
    return text


def _usage(cpu: float | None, rss: int | None) -> str:
    cpu_text = "-" if cpu is None else f"{cpu:.0f}%"
    return f"cpu {cpu_text}, rss {size(rss)}"


ATTEMPT_HEADERS = ("ATTEMPT", "WORKER", "STARTED", "RAN", "OUTCOME", "EXIT", "CPU", "RSS", "NOTE")


def attempt_row(a: dict[str, Any], now: float, held: bool = False) -> list[Cell]:
    """`held`: the attempt of a job held ahead on its worker, not started yet."""
    outcome = a.get("outcome") or ("held ahead" if held else "running")
    # Given back unstarted (held ahead, handed back, never sent), or held ahead: not started.
    started = None if outcome == "returned" or held else a.get("started") or a.get("claimed")
    exit_text = f"signal {a['signal']}" if a.get("signal") else str(a.get("exit_code") or "-")
    if a.get("exit_code") == 0:
        exit_text = "0"
    cpu = a.get("cpu_percent")
    return [
        str(a.get("attempt", "-")),
        a.get("worker") or "-",
        ago(started, now) if started else "-",
        since(started, a.get("ended") or now) if started else "-",
        (outcome, "green" if outcome == "success" else "red" if a.get("ended") else None),
        exit_text,
        "-" if cpu is None else f"{cpu:.0f}%",
        size(a.get("rss")),
        a.get("reason") or "",
    ]


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())


def _owner(r: dict[str, Any]) -> str:
    """The owner, and the Unix account its jobs run as when that is another name."""
    owner = r.get("owner") or "-"
    account = r.get("account")
    return f"{owner} (runs as {account})" if account and account != owner else owner
