"""banyan-submit: queue shell commands, arrays of them, or a whole workflow, in one request.

Every form becomes one `submit` request, so a 100,000-job array lands (or fails) atomically and
fast. `--wait` then blocks on the broker's `wait` and shows the jobs' progress meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import Counter
from typing import Any

from banyan import arrays, defaults, export
from banyan.cli import EXIT_OK, EXIT_REFUSED
from banyan.cli.output import (
    CONNECT_OPTIONS,
    Args,
    LiveLine,
    UsageError,
    bar,
    connect,
    number,
    parse_duration,
    parse_memory,
    plural,
    print_json,
    run,
)
from banyan.cli.usage import flag_words
from banyan.cli.workflow import DEP_KINDS, load_workflow, read_text
from banyan.client import Client, JobInfo, Waited
from banyan.errors import BanyanError, BrokerUnavailable, Invalid
from banyan.protocol import ProtocolError

TOOL = "banyan-submit"
USAGE = (
    """banyan-submit: queue shell commands on a Banyan cluster.

Usage:
  banyan-submit [options] [--tag T]... [--env K=V]... [--group NAME]... [--after IDS]...
                [--after-any IDS]... [--after-fail IDS]... [--] [COMMAND...]

A COMMAND is required unless --file gives the jobs. It runs with /bin/sh -c on a worker.
Several words are joined with spaces (as ssh does); quote the whole command to keep pipes and
redirections for the job's shell. Options go before the command: everything from its first
word on belongs to the command.

Options:
  --name NAME           A label (default: the command). With --each or --array, {} in it
                        is replaced as in the command.
  -c --cpus N           CPUs to reserve; fractions are fine (default: 1).
  --memory SIZE         Memory to reserve: MiB, or a size such as 512M or 4G (default: none).
  --gpus N              GPUs to reserve (default: 0).
  --tag T               A label the worker must carry; repeat for more.
  --priority P          Among your own jobs, higher runs first; equal priorities run oldest
                        first (default: 0). Between users, fair share decides.
  --attempts N          Runs allowed in total: failures are retried (default: 1).
  -t --time-limit T     Wall-clock limit per attempt: seconds, 90s, 1h30m or HH:MM:SS.
  --cancel-grace T      Time from SIGTERM to SIGKILL when cancelled (default: 10s).
  --after IDS           Run after these jobs (comma-separated ids) or this group succeed.
  --after-any IDS       Run after these jobs or this group end, whatever the outcome.
  --after-fail IDS      Run only if these jobs or this group end without success.
  --group NAME          Put the jobs in this group: a new one (sealed when this
                        submission lands, unless --open) or an existing open one.
  --open                Create the group open, so later submissions may join it.
  --hold                Submit held: nothing runs until `banyan-modify ID --release`.
  --cwd DIR             Working directory on the worker (default: the current one).
  --export SPEC         Which of this shell's variables the jobs get, as sbatch: ALL, NONE
                        (the account's clean login environment), VAR,VAR=value (only these)
                        or ALL,VAR=value [default: ALL].
  --env K=V             An extra environment variable; a bare K passes this shell's value.
  --umask MODE          The jobs' umask, in octal (default: 022).
  -o --output TEMPLATE  Where output goes on the worker; {job}, {attempt}, {stream} expand.
  --each FILE           One job per non-empty line of FILE (- reads stdin): {} in the
                        command is replaced by the line, else the line is appended quoted.
  --array RANGE         One job per index of N-M, N-M:STEP or a comma list of those: {} is
                        replaced by the index, which is also in $BANYAN_ARRAY_INDEX.
  -f --file JOBS.json   A whole workflow: jobs, groups and dependencies (docs/workflow.md).
                        Options given here apply to every job that does not set its own.
  --submit-key KEY      Make the submission idempotent: repeating it returns the first ids
                        (while the broker keeps the key: its --retention, 30 days).
  -w --wait             Wait until every job has ended; exit 0 only if all succeeded.
                        With --json, a second document then says how each ended.
"""
    + CONNECT_OPTIONS
)

DEP_OPTIONS = tuple(zip(("--after", "--after-any", "--after-fail"), DEP_KINDS, strict=True))


def main(argv: list[str] | None = None) -> int:
    return run(TOOL, USAGE, argv, submit, options_first=True)


def submit(args: Args) -> int:
    jobs, groups, array, each = build(args)
    spec = args.get("--export") or export.ALL
    try:
        captured = export.capture(spec)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name in export.left_out(spec, captured):
        print(
            f"{TOOL}: warning: {name} is not UTF-8 text, which a job's environment cannot carry; "
            "the jobs get no such variable (--export VAR,... or NONE chooses what they get)",
            file=sys.stderr,
        )
    with connect(args) as client:
        # Where the event log ends before the jobs exist: the live display follows from here.
        head = client.events_head() if args["--wait"] else 0
        try:
            result = client.submit(
                jobs=jobs,
                groups=groups,
                submit_key=args["--submit-key"],
                array=array,
                each=each,
                export=spec,
            )
        except (ProtocolError, BanyanError) as e:
            raise _in_words(e, args["--file"]) from None
        if args["--json"]:
            print_json({"jobs": result.jobs, "groups": result.groups})
        else:
            sys.stdout.write("".join(f"{j}\n" for j in result.jobs))
        sys.stdout.flush()
        if not args["--wait"] or not result.jobs:
            return EXIT_OK
        known = None if args["--submit-key"] else ("inactive" if args["--hold"] else "available")
        waited = wait(client, result.jobs, head, known, display=not args["--json"])
        if args["--json"]:
            print_json(
                {"ended": [_ended(j) for j in waited.jobs], "succeeded": waited.all_succeeded}
            )
        else:
            _summary(waited)
        return EXIT_OK if waited.all_succeeded else EXIT_REFUSED


def _in_words(e: ProtocolError | BanyanError, path: str | None) -> Exception:
    """A refusal about request fields in the words of what set them: the options, or the
    workflow file (whose own names and indices the request keeps). A value refused before
    sending is a usage error."""
    if isinstance(e, BrokerUnavailable):
        return e
    text = e.reason if isinstance(e, ProtocolError) else e.message
    text = f"--file: {path}: {text}" if path else flag_words(text)
    if isinstance(e, (ProtocolError, Invalid)):
        return UsageError(text)
    return type(e)(text, e.code)


def build(
    args: Args,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None, list[str] | None]:
    """The submission's jobs, groups, array range and each lines, from the command line (and
    the --file, if any). An array or each lines go as their one template job and the range or
    the lines: the broker makes the jobs."""
    if args["--open"] and not args["--group"]:
        raise UsageError("--open needs --group NAME")
    if sum(bool(args[o]) for o in ("--each", "--array", "--file")) > 1:
        raise UsageError("--each, --array and --file exclude each other")
    groups = [{"name": name, "open": bool(args["--open"])} for name in args["--group"]]
    fields = job_fields(args)
    cwd = fields.pop("cwd", None) or os.getcwd()
    if args["--group"]:
        fields["groups"] = list(args["--group"])
    if args["--hold"]:
        fields["hold"] = True
    if args["--file"]:
        if args["COMMAND"]:
            raise UsageError("give a COMMAND or --file, not both")
        jobs, file_groups = load_workflow(args["--file"], fields, cwd)
        listed = {g["name"] for g in file_groups}
        return jobs, file_groups + [g for g in groups if g["name"] not in listed], None, None
    base = {**fields, "cwd": cwd, "command": command_line(args["COMMAND"])}
    if args["--each"]:
        return [base], groups, None, sized(base, read_lines(args["--each"]))
    if args["--array"]:
        array_count(args["--array"])  # a bad range or size is a usage error, found here
        try:
            arrays.check_size(arrays.array_bytes(base, args["--array"]), "--array")
        except ValueError as e:
            raise UsageError(str(e)) from None
        return [base], groups, args["--array"], None
    return [base], groups, None, None


def command_line(words: list[str]) -> str:
    if not words or not "".join(words).strip():
        raise UsageError("no command given")
    return words[0] if len(words) == 1 else " ".join(words)


def job_fields(args: Args) -> dict[str, Any]:
    """The editable JobSpec fields the options name, only those given (banyan-modify too)."""
    f: dict[str, Any] = {}
    for option, key in (("--name", "name"), ("--output", "output"), ("--command", "command")):
        if args.get(option) is not None:
            f[key] = args[option]
    if args.get("--cpus") is not None:
        f["cpus"] = number(args["--cpus"], "--cpus", positive=True)
    if args.get("--memory") is not None:
        f["memory"] = parse_memory(args["--memory"], "--memory")
    if args.get("--gpus") is not None:
        f["gpus"] = number(args["--gpus"], "--gpus", integer=True)
    if args.get("--tag"):
        f["tags"] = list(args["--tag"])
    if args.get("--priority") is not None:
        f["priority"] = number(args["--priority"], "--priority", minimum=-(2**31), integer=True)
    if args.get("--attempts") is not None:
        f["max_attempts"] = number(args["--attempts"], "--attempts", minimum=1, integer=True)
    if args.get("--time-limit") is not None:
        f["time_limit"] = parse_duration(args["--time-limit"], "--time-limit")
        if f["time_limit"] <= 0:
            raise UsageError("--time-limit: must be more than 0")
    if args.get("--cancel-grace") is not None:
        f["cancel_grace"] = parse_duration(args["--cancel-grace"], "--cancel-grace")
    if args.get("--env"):
        f["env"] = environment(args["--env"])
    if args.get("--cwd") is not None:
        f["cwd"] = os.path.abspath(args["--cwd"])
    if args.get("--umask") is not None:
        f["umask"] = umask(args["--umask"])
    deps = dependencies(args)
    if deps:
        f["depends_on"] = deps
    return f


def umask(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777:
        raise UsageError(f"--umask: expected an octal mode such as 077, got {text!r}")
    return value


def environment(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not key:
            raise UsageError(f"--env: expected K=V, got {item!r}")
        if not eq:
            if key not in os.environ:
                raise UsageError(f"--env: {key} is not set here; give --env {key}=VALUE")
            value = os.environ[key]
        if not (export.utf8(key) and export.utf8(value)):
            raise UsageError(
                f"--env: {export.shown(key)} is not UTF-8 text, which a job's environment "
                "cannot carry"
            )
        env[key] = value
    return env


def dependencies(args: Args) -> list[dict[str, Any]]:
    """`--after 12,13` names jobs; a name that is not a number names a group."""
    deps: list[dict[str, Any]] = []
    for option, kind in DEP_OPTIONS:
        for value in args.get(option) or ():
            for ref in value.split(","):
                ref = ref.strip()
                if not ref:
                    raise UsageError(f"{option}: expected ID[,ID...] or a group, got {value!r}")
                target = "job" if ref.isdigit() else "group"
                deps.append({"kind": kind, target: int(ref) if ref.isdigit() else ref})
    return deps


# ---- many jobs from one command ---------------------------------------------------------------


def read_lines(path: str) -> list[str]:
    text = read_text("--each", path)
    items = [line.strip() for line in text.splitlines() if line.strip()]
    if not items:
        raise UsageError(f"--each: {path} has no non-empty lines")
    return items


def array_count(spec: str) -> int:
    """How many jobs `0-9`, `1-99:2`, `3` or a comma list of those makes (arrays.ranges)."""
    try:
        return arrays.count(spec)
    except ValueError as e:
        raise UsageError(f"--array: {e}") from None


def sized(base: dict[str, Any], items: list[str]) -> list[str]:
    """--each lines that make no more jobs, and no more bytes of job text, than a submission
    may carry (arrays.check_size)."""
    if len(items) > defaults.MAX_JOBS_PER_SUBMIT:
        raise UsageError(f"--each: {arrays.too_many(len(items))}")
    try:
        arrays.check_size(arrays.each_bytes(base, items), f"--each: {len(items)} lines")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return items


# ---- --wait -----------------------------------------------------------------------------------

REFRESH = 0.25  # the live display's pace: lively for a person, light for the broker
AWAY_REFRESH = 2.0  # its pace while the broker cannot be reached: no new socket every frame
PROGRESS_PEEK = 8  # running jobs asked about for the progress line per refresh
EVENT_PAGES = 20  # event pages read per refresh at most, so a flood cannot stall the display
SHOWN = ("succeeded", "failed", "cancelled", "running", "queued", "held")


def wait(client: Client, ids: list[int], head: int, known: str | None, display: bool) -> Waited:
    """Block on the broker's `wait` until every job has ended.

    The wait runs on its own connection in a thread; meanwhile this thread follows the event
    log for counts and asks about a few running jobs for their progress. Only the `wait`
    reply decides the outcome. The wait outlives the broker's absence (Client.wait); what it
    says about that goes on stderr, except with --json.
    """
    line = LiveLine(sys.stderr)
    if not display and not line.tty:
        return client.wait(ids)
    box: dict[str, Any] = {}
    notes: list[str] = []  # what the wait has to say about the broker, for this thread to show
    done = threading.Event()

    def waiter() -> None:
        try:
            with Client(client.endpoint, client.home, timeout=client.timeout) as own:
                own.reached = client.reached  # the submission got through: the broker is there
                box["waited"] = own.wait(ids, notice=notes.append if display else None)
        except BaseException as e:  # handed to the main thread, which reports it
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=waiter, name="banyan-wait", daemon=True).start()
    board = Board(ids, head, known, client)
    next_refresh = 0.0
    try:
        while True:
            # The display may miss frames while the broker is away; the wait carries on, and
            # it alone decides. Meanwhile the display asks again only now and then.
            if time.monotonic() >= next_refresh:
                try:
                    board.refresh()
                except BrokerUnavailable:
                    next_refresh = time.monotonic() + AWAY_REFRESH
            while notes:
                line.note(f"{TOOL}: {notes.pop(0)}")
            line.show(board.line(), major=board.counts())
            if done.wait(REFRESH):
                break
        if "waited" in box:  # the last frame shows every job ended
            with contextlib.suppress(BrokerUnavailable):
                board.refresh()
            line.show(board.line(), major=board.counts())
    except KeyboardInterrupt:
        line.close()
        print(f"{TOOL}: stopped waiting; the jobs keep running", file=sys.stderr)
        raise
    line.close()
    if "error" in box:
        raise box["error"]
    waited: Waited = box["waited"]
    return waited


def _summary(waited: Waited) -> None:
    bad = [j for j in waited.jobs if not j.succeeded]
    text = f"{TOOL}: {plural(len(waited.jobs), 'job')} ended"
    if not bad:
        print(f"{text}, all succeeded", file=sys.stderr)
        return
    shown = ", ".join(f"{j.id} {_why(j)}" for j in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    print(f"{text}; {len(bad)} did not succeed: {shown}{more}", file=sys.stderr)


def _ended(job: JobInfo) -> dict[str, Any]:
    """A job as `--wait --json` shows it once it has ended."""
    keys = ("id", "name", "owner", "state", "outcome", "exit_code", "attempts", "worker")
    return {k: getattr(job, k) for k in keys}


def _why(job: JobInfo) -> str:
    if job.state == "cancelled":
        return "(cancelled)"
    if job.exit_code not in (None, 0):
        return f"({job.outcome}, exit {job.exit_code})"
    return f"({job.outcome or job.state})"


class Board:
    """The submission's jobs by state, kept current from the broker's event log."""

    def __init__(self, ids: list[int], head: int, known: str | None, client: Client) -> None:
        self.client = client
        self.since = head
        self.total = len(ids)
        self.where: dict[int, str] = {}
        self.tally: Counter[str] = Counter()
        self.running: dict[int, None] = {}  # in the order they started
        self.progress = ""
        if known is None:  # a repeated --submit-key: the jobs may be anywhere by now
            for job in client.status(ids, limit=len(ids)).jobs:
                self._move(job.id, _bucket(job.state, job.outcome))
        else:
            self.where = dict.fromkeys(ids, _bucket(known, None))
            self.tally[_bucket(known, None)] = len(ids)

    def _move(self, job: int, bucket: str) -> None:
        old = self.where.get(job)
        if old is not None:
            self.tally[old] -= 1
        self.where[job] = bucket
        self.tally[bucket] += 1
        if bucket == "running":
            self.running[job] = None
        else:
            self.running.pop(job, None)

    def refresh(self) -> None:
        for _ in range(EVENT_PAGES):
            events, self.since = self.client.events(self.since, defaults.EVENTS_LIMIT)
            for _seq, _time, job, _frm, to, reason in events:
                if job in self.where:
                    # A terminated event's reason is the final outcome ("success", "failed"…).
                    self._move(job, _bucket(to, reason))
            if len(events) < defaults.EVENTS_LIMIT:
                break
        self.progress = ""
        latest = list(self.running)[-PROGRESS_PEEK:]
        if latest:
            jobs = self.client.status(latest, limit=len(latest)).jobs
            moving = [j for j in jobs if j.progress is not None or j.progress_message]
            if moving:
                j = moving[-1]
                pct = "" if j.progress is None else f"{j.progress:g}% "
                self.progress = f"job {j.id}: {pct}{j.progress_message or ''}".rstrip()

    def counts(self) -> str:
        done = sum(self.tally[b] for b in ("succeeded", "failed", "cancelled"))
        parts = [f"{self.tally[b]} {b}" for b in SHOWN if self.tally[b]]
        return f"{done}/{self.total} done: " + ", ".join(parts)

    def line(self) -> str:
        done = sum(self.tally[b] for b in ("succeeded", "failed", "cancelled"))
        text = f"{bar(done / self.total)} {self.counts()}"
        return f"{text}  |  {self.progress}" if self.progress else text


def _bucket(state: str, outcome: str | None) -> str:
    if state == "terminated":
        return "succeeded" if outcome == "success" else "failed"
    return {
        "inactive": "held",
        "available": "queued",
        "pending_cancellation": "running",
    }.get(state, state)


if __name__ == "__main__":
    sys.exit(main())
