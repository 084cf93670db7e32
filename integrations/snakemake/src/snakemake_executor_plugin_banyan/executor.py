"""The executor: Snakemake's jobs as Banyan jobs, one submission per scheduling round.

Three threads talk to the broker, each with a client of its own:

- Snakemake's scheduler (`run_jobs`, `cancel`, `shutdown`) submits a round's jobs in one
  request, with a submit key, into an open group named for this run;
- the status thread (`check_active_jobs`) follows the broker's event log with one read
  outstanding: the read returns with the commit that ends a job, and the jobs that ended are
  read back in one status request, so Snakemake hears of an end within milliseconds and no
  job is ever polled;
- (the broker's own) nothing else: no process per job, no status command.

While the broker is away, submitting and following wait and try again (with the same submit
key: nothing is submitted twice), and the run goes on when it is back. Ctrl-C cancels the
run's group: sealed, no submission still on its way can add to it, and every job in it is
cancelled and waited for until its processes are gone.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface

from banyan import defaults as banyan_defaults
from banyan.client import Client
from banyan.errors import BanyanError, BrokerUnavailable, KeyRefused, WrongPort
from snakemake_executor_plugin_banyan import direct, request

T = TypeVar("T")
# How long a read of the event log waits for a commit before the status thread looks again.
EVENT_WAIT = 1.0
# Queued jobs are asked about this often whether some worker could ever run them (workers
# come and go); right after its submission, every job is.
RUNNABLE_RECHECK = 30.0
RETRY_MIN, RETRY_MAX = 0.2, 5.0
# While the broker is away, say so this often, not at every try.
SAY_AGAIN = 30.0
# A cancel on Ctrl-C is tried this long; past it the run's group is named for banyan-cancel.
CANCEL_TRIES = 30.0
# After the cancel, how long to wait for the jobs' processes to be gone (their cancel grace
# is 10 s unless the job says otherwise).
CANCEL_WAIT = 15.0
TERMINAL = ("terminated", "cancelled")


class Executor(RemoteExecutor):  # type: ignore[misc]
    def __init__(self, workflow: Any, logger: Any) -> None:
        # Everything the status thread reads is made before RemoteExecutor starts it.
        settings = workflow.executor_settings
        self.run = uuid.uuid4().hex[:12]
        self.group = f"snakemake-{self.run}"
        self.lock_jobs = threading.Lock()
        self.jobs: dict[int, SubmittedJobInfo] = {}  # Banyan id -> the Snakemake job
        self.ended: set[int] = set()
        self.started: set[int] = set()
        self.refused: dict[int, str] = {}  # jobs no worker can ever run, and why
        self.group_made = False
        self.cancelled = False
        self.closed = False
        self.next_recheck = time.monotonic() + RUNNABLE_RECHECK
        self.workdir = str(workflow.workdir_init)
        Path(self.workdir, ".snakemake", "banyan_logs").mkdir(parents=True, exist_ok=True)
        timeout = settings.timeout or banyan_defaults.CLIENT_TIMEOUT
        self.address = (settings.broker, settings.home, timeout)
        self.trouble_said: dict[str, float] = {}  # what was being done -> when said
        self.follow_backoff = RETRY_MIN
        self.logger = logger  # _retry may log before RemoteExecutor sets it
        self.client = self._retry("connecting", lambda: Client(*self.address))
        self.status = self._retry("connecting", lambda: Client(*self.address))
        self.since = self._retry("reading the event log", self.status.events_head)
        super().__init__(workflow, logger)

    def __post_init__(self) -> None:
        self.deployment = set(self.workflow.deployment_settings.deployment_method)
        self.spawn_all = bool(self.workflow.executor_settings.spawn_snakemake)

    # ---- submitting -------------------------------------------------------------------------

    def run_job(self, job: JobExecutorInterface) -> None:
        self.run_jobs([job])

    def run_jobs(self, jobs: list[JobExecutorInterface]) -> None:
        """A scheduling round: its jobs in one request, under one submit key."""
        specs, ready = [], []
        for job in jobs:
            self.run_job_pre(job)
            try:
                specs.append(self._spec(job))
                ready.append(job)
            except (request.BadResource, WorkflowError) as e:
                self.report_job_error(SubmittedJobInfo(job), msg=f"{e}\n")
        if not ready:
            return
        key = request.submit_key(self.run, [(j.jobid, j.attempt) for j in ready])
        groups = [] if self.group_made else [{"name": self.group, "open": True}]

        def submit() -> list[int]:
            done = self.client.submit(jobs=specs, groups=groups, submit_key=key, export="ALL")
            return done.jobs

        # The event log is read under this lock too: a job's end is looked at only once it
        # is registered here, however soon it comes.
        with self.lock_jobs:
            try:
                ids = self._retry("submitting jobs", submit)
            except BanyanError as e:
                refused, why = [SubmittedJobInfo(job) for job in ready], e.message
            else:
                refused, why = [], ""
                self.group_made = True
                infos = [
                    SubmittedJobInfo(job, external_jobid=str(i), aux={"banyan": i})
                    for job, i in zip(ready, ids, strict=True)
                ]
                self.jobs.update(zip(ids, infos, strict=True))
        for info in refused:
            self.report_job_error(info, msg=f"Banyan refused the submission: {why}\n")
        if refused:
            return
        for info in infos:
            self.report_job_submission(info)
        self._check_runnable(self.client, ids)

    def _spec(self, job: JobExecutorInterface) -> dict[str, Any]:
        """The Banyan job for one Snakemake job."""
        fields = request.resources(job.threads, job.resources, getattr(job, "priority", 0))
        run = None if self.spawn_all else direct.command(job, self.deployment)
        if run is not None:
            line, env = run
            # As Snakemake's own local executor does before it runs a job.
            self.workflow.async_run(job.prepare())
        else:
            line, env = self.format_job_exec(job), dict(self.envvars())
        name = f"{job.name}.{job.jobid}"  # its rule (or group) and Snakemake's job id
        return {
            "command": line,
            "name": name,
            "cwd": self.workdir,
            "env": env,
            "groups": [self.group],
            "output": f".snakemake/banyan_logs/{name}.{{job}}.{{stream}}.log",
            **fields,
        }

    def _check_runnable(self, client: Client, ids: Iterable[int]) -> None:
        """Jobs that no worker can ever run (they ask for more than any has) are cancelled
        and reported as failed with Banyan's reason, instead of waiting for ever."""
        ids = list(ids)
        if not ids:
            return
        try:
            listed = client.status(ids, each=True).jobs
        except BrokerUnavailable:
            return  # asked again at the next recheck
        never = {j.id: j.reason for j in listed if (j.reason or "").startswith(request.UNRUNNABLE)}
        if not never:
            return
        with self.lock_jobs:
            self.refused.update({i: str(why) for i, why in never.items()})
        # Failed in Snakemake either way; if the broker is away, the group's cancel at the
        # end takes it.
        with contextlib.suppress(BrokerUnavailable):
            client.cancel(list(never), reason="no worker can ever run it", each=True)

    # ---- learning of ends -------------------------------------------------------------------

    async def check_active_jobs(
        self, active_jobs: list[SubmittedJobInfo]
    ) -> AsyncGenerator[SubmittedJobInfo, None]:
        mine = {int(info.aux["banyan"]): info for info in active_jobs}
        with self.lock_jobs:
            news = any(i in self.ended or i in self.refused for i in mine)
        try:
            # With nothing to report yet, this read is where the thread waits: it returns
            # with the commit of the next change, of any job.
            self._follow(wait=None if news else EVENT_WAIT)
            details = self._ended_details(mine)
            self._recheck(mine)
        except BrokerUnavailable as e:
            self._say_trouble("following the jobs", e)
            time.sleep(self.follow_backoff)
            self.follow_backoff = min(self.follow_backoff * 2, RETRY_MAX)
            for info in active_jobs:
                yield info
            return
        self.follow_backoff = RETRY_MIN
        for banyan_id, info in mine.items():
            with self.lock_jobs:
                why = self.refused.pop(banyan_id, None)
            if why is not None:
                self._forget(banyan_id)
                self.report_job_error(info, msg=f"Banyan cannot run this job: {why}.\n")
            elif banyan_id in details:
                self._forget(banyan_id)
                self._report(info, details[banyan_id])
            else:
                yield info

    def _follow(self, wait: float | None) -> None:
        """Read the event log from where the last read ended (waiting up to `wait` for it to
        grow), and note the ends and starts of this run's jobs."""
        events, since = self.status.events(self.since, banyan_defaults.EVENTS_LIMIT, wait)
        with self.lock_jobs:
            self.since = since
            for _seq, _time, job, _frm, to, _why in events:
                if job not in self.jobs:
                    continue
                if to in TERMINAL:
                    self.ended.add(job)
                elif to == "running":
                    self.started.add(job)

    def _ended_details(self, mine: dict[int, SubmittedJobInfo]) -> dict[int, dict[str, Any]]:
        with self.lock_jobs:
            ended = [i for i in mine if i in self.ended and i not in self.refused]
        out: dict[int, dict[str, Any]] = {}
        page = banyan_defaults.STATUS_PAGE
        for start in range(0, len(ended), page):
            st = self.status.status(ended[start : start + page], detail=True, each=True)
            out.update({j.id: j.raw for j in st.jobs})
            for e in st.errors:  # purged meanwhile: it ended long ago, outcome unknown
                out[int(e.target)] = {"id": e.target, "state": "unknown", "reason": e.message}
        return out

    def _recheck(self, mine: dict[int, SubmittedJobInfo]) -> None:
        if time.monotonic() < self.next_recheck:
            return
        self.next_recheck = time.monotonic() + RUNNABLE_RECHECK
        with self.lock_jobs:
            waiting = [i for i in mine if i not in self.started and i not in self.ended]
        for start in range(0, len(waiting), banyan_defaults.STATUS_PAGE):
            self._check_runnable(self.status, waiting[start : start + banyan_defaults.STATUS_PAGE])

    def _forget(self, banyan_id: int) -> None:
        with self.lock_jobs:
            self.jobs.pop(banyan_id, None)
            self.ended.discard(banyan_id)
            self.started.discard(banyan_id)

    def _report(self, info: SubmittedJobInfo, job: dict[str, Any]) -> None:
        if job.get("ended"):  # the broker's wall clock and ours: one clock on one machine
            late = (time.time() - float(job["ended"])) * 1e3
            self.logger.debug(f"Banyan job {job['id']} ended {late:.1f} ms before this report")
        if job["state"] == "terminated" and job.get("outcome") == "success":
            self.report_job_success(info)
            return
        logs = [a[k] for a in (job.get("history") or [])[-1:] for k in ("stdout", "stderr")]
        logs = sorted({p for p in logs if p})
        self.report_job_error(info, msg=request.failure(job), aux_logs=logs)

    async def sleep(self) -> None:
        """No pause between rounds: each round waits in its read of the event log."""

    # ---- stopping ---------------------------------------------------------------------------

    def cancel_jobs(self, active_jobs: list[SubmittedJobInfo]) -> None:
        self._cancel_run()

    def cancel(self) -> None:
        """Ctrl-C: cancel this run's group, whatever Snakemake thinks is active (a job whose
        submission was on its way is in it, or refused because it is sealed), and wait until
        the jobs' processes are gone."""
        self._cancel_run()
        self.shutdown()

    def _cancel_run(self) -> None:
        if self.cancelled or not self.group_made:
            self.cancelled = True
            return
        self.cancelled = True
        end = time.monotonic() + CANCEL_TRIES
        done = None
        while done is None and time.monotonic() < end:
            try:
                done = self.client.cancel(
                    groups=[self.group], reason="Snakemake was interrupted", each=True
                )
            except BrokerUnavailable as e:
                self._say_trouble("cancelling this run's jobs", e)
                time.sleep(RETRY_MIN)
        if done is None:
            self.logger.error(
                f"Could not cancel this run's Banyan jobs; cancel them with: "
                f"banyan-cancel {self.group}"
            )
            return
        count = len(done.cancelled) + len(done.pending)
        self.logger.info(f"Cancelled {count} Banyan jobs (group {self.group}).")
        if done.pending:
            with contextlib.suppress(BrokerUnavailable):
                self.client.wait(done.pending, timeout=CANCEL_WAIT)

    def shutdown(self) -> None:
        if self.closed:  # after a cancel, Snakemake may shut down again
            return
        self.closed = True
        super().shutdown()
        if self.group_made and not self.cancelled:
            with contextlib.suppress(BanyanError):  # sealed: kept no longer than its last job
                self.client.close_group(self.group)
        self.client.close()
        self.status.close()

    # ---- the broker away --------------------------------------------------------------------

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()`, tried again while the broker cannot be reached: a run never fails for
        that. A refused key, or an address that is the broker's other port, fails the run at
        once, with what to do: waiting changes neither."""
        backoff = RETRY_MIN
        while True:
            try:
                return fn()
            except KeyRefused as e:
                raise WorkflowError(f"Banyan refused this machine's key: {e}") from None
            except WrongPort as e:
                raise WorkflowError(f"Banyan's broker address is wrong: {e}") from None
            except BrokerUnavailable as e:
                self._say_trouble(what, e)
                time.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)

    def _say_trouble(self, what: str, e: Exception) -> None:
        now = time.monotonic()
        if now - self.trouble_said.get(what, -SAY_AGAIN) >= SAY_AGAIN:
            self.trouble_said[what] = now
            self.logger.warning(f"Banyan: {what}: {e}; waiting for the broker and trying again")
