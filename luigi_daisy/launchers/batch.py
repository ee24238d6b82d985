"""What every batch-system launcher shares: one job per worker, job ids kept, states
polled in one command, every job cancelled and waited for at the end.

A subclass says how to build the submit command, read the job id from its output, ask
for the states of many jobs in one call and cancel jobs (see ``slurm.py``, ``lsf.py``,
``command.py``). The names of the worker's payload file and of its context file (the
context holds the run's token; the worker deletes the file once read) travel in the
submit command's environment, never on its command line: ``ps`` and ``squeue`` show
command lines to every user, and a batch system may keep a job's environment where
others can query it (``qstat -f`` after ``qsub -V``). Both files are in
``<log_dir>/.payloads-<uid>`` (mode 0700), readable by their owner only; the run holds
one lock there for its life, whatever the number of its jobs (see
:class:`~luigi_daisy.payload.RunFiles`), and refreshes it on the control thread.

No batch command runs on the caller's thread (the run's event loop, which hands out
blocks). A launcher owns two background threads, created on first use:

- the *submit* thread runs the submit commands one after the other, in the order of
  :meth:`BatchLauncher.start` calls; ``start`` returns a handle at once, a job "being
  submitted" (pending, no exit code, no job id yet);
- the *control* thread runs the state queries (at most one at a time, one command for
  all jobs) and the cancellations.

Their answers are applied by :meth:`BatchLauncher.poll`, on the caller's thread, so a
job's fields and ``jobs`` only ever change there. ``stop_all`` (the end of a run) is the
one call that waits: for the submission in flight (submissions not started yet are
dropped), then for the cancellations and for the batch system to confirm every job gone.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..context import DAISY_ENV_VARIABLE, ENV_VARIABLE
from ..errors import LauncherError
from ..payload import (
    CONTEXT_FILE_VARIABLE,
    LOCK_REFRESH_INTERVAL,
    PAYLOAD_FILE_VARIABLE,
    RunFiles,
    WorkerPayload,
    payload_folder,
)
from ..safe_files import check_log_folders, open_log
from .base import Launcher, WorkerHandle, WorkerSpec

logger = logging.getLogger(__name__)

#: seconds between the answer to one state query and the start of the next
DEFAULT_POLL_INTERVAL = 2.0
#: the least ``poll_interval`` (``job_poll_interval``) accepted, in seconds. One query
#: covers every job of the run, but a run may last days and a cluster has many users: a
#: controller answers every ``squeue`` under its job lock, and sites ask for loops no
#: tighter than that (Nextflow polls every 5 s by default, Parsl every 60 s).
MIN_POLL_INTERVAL = 1.0
#: seconds a batch command (submit, query, cancel) may take
COMMAND_TIMEOUT = 60.0
#: exit code reported for a job that ended without one the batch system could tell
EXIT_UNKNOWN = -1
#: exit code reported for a job cancelled before it ran
EXIT_CANCELLED = -15



def check_poll_interval(value: object, key: str = "poll_interval") -> float:
    """``value`` as seconds between two state queries, or a :class:`LauncherError` that
    names ``key`` and :data:`MIN_POLL_INTERVAL`."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not seconds >= MIN_POLL_INTERVAL or math.isinf(seconds):
        raise LauncherError(
            f"{key}={value!r}: the batch system's job states are queried at most once "
            f"every {MIN_POLL_INTERVAL:g} s (every query asks the cluster's controller); "
            f"give {MIN_POLL_INTERVAL:g} or more (default {DEFAULT_POLL_INTERVAL:g})")
    return seconds


_MEMORY = re.compile(r"^\s*(\d+)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def parse_memory_mb(memory: str, owner: str = "memory_per_worker") -> int:
    """``"16G"`` -> 16384 (MB); plain numbers are MB, suffixes K, M, G, T."""
    match = _MEMORY.match(str(memory))
    if match is None:
        raise LauncherError(
            f"{owner}={memory!r} is not a memory size; write it as a number with an "
            f"optional unit K, M, G or T, e.g. 16G or 500M")
    number, unit = int(match.group(1)), match.group(2).upper()
    factor = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    return max(1, math.ceil(number * factor))


_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_walltime_seconds(walltime: str, owner: str = "walltime") -> int:
    """Seconds of a wall time in SLURM's notation.

    ``minutes``, ``minutes:seconds``, ``hours:minutes:seconds``, ``days-hours``,
    ``days-hours:minutes``, ``days-hours:minutes:seconds``.
    """
    match = _WALLTIME.match(str(walltime).strip())
    if match is None:
        raise LauncherError(
            f"{owner}={walltime!r} is not a wall time; write minutes (90), "
            f"hours:minutes:seconds (01:30:00) or days-hours:minutes:seconds (1-12:00:00)")
    days, first, second, third = match.groups()
    if days is not None:
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if third is not None:
        return (int(first) * 60 + int(second)) * 60 + int(third)
    if second is not None:
        return int(first) * 60 + int(second)
    return int(first) * 60


@dataclass
class JobStatus:
    """What the batch system says about one job."""

    state: str
    reason: str = ""
    #: None while the job is pending or running
    exit_code: int | None = None


@dataclass(eq=False)
class BatchJob(WorkerHandle):
    """One worker job: being submitted (``job_id`` None), then submitted.

    Its fields change only in :meth:`BatchLauncher.poll` (and ``stop_all``), on the
    thread that calls them.
    """

    launcher: BatchLauncher = field(repr=False)
    task_id: str
    worker_id: int
    #: None while the submission is queued or running, and for a job never submitted
    job_id: str | None
    job_name: str
    stdout_path: Path
    stderr_path: Path
    #: when the submission was asked for, then (once it returned) when it was submitted
    submitted_at: float
    state: str = "SUBMITTING"
    reason: str = ""
    started_at: float | None = None
    #: why the submit command failed (its command line and output), else None
    submit_error: str | None = None
    #: kill() was called: cancel the job as soon as its id is known
    cancel_requested: bool = False
    cancel_sent: bool = False
    _exit_code: int | None = None
    _unseen_polls: int = 0

    def exit_code(self) -> int | None:
        """None while the job is being submitted, pending or running, else its exit code
        (negative: ended by that signal, cancelled, or never submitted)."""
        return self._exit_code

    def start_error(self) -> str | None:
        """The submit command's error when the batch system refused the job."""
        return self.submit_error

    @property
    def finished(self) -> bool:
        """Whether the job has ended (or was never submitted)."""
        return self._exit_code is not None

    def kill(self) -> None:
        """Cancel the job, without waiting (once submitted, if it is being submitted)."""
        self.launcher.cancel_later([self])

    def describe(self) -> str:
        """Job id, name, state and log files, for messages."""
        if self.job_id is None:
            error = f": {self.submit_error}" if self.submit_error else ""
            return f"{self.launcher.name} job {self.job_name} ({self.state}{error})"
        reason = f", {self.reason}" if self.reason and self.reason != "None" else ""
        return (f"{self.launcher.name} job {self.job_id} ({self.job_name}, "
                f"{self.state}{reason}; logs {self.stdout_path}, {self.stderr_path})")


@dataclass
class _QueryAnswer:
    """What one state query said, for the jobs it asked about."""

    jobs: list[BatchJob]
    statuses: dict[str, JobStatus] | None
    error: Exception | None
    ended_at: float


class BatchLauncher(Launcher):
    """Starts each worker as one batch job.

    Batch commands run on two background threads (see the module's docstring):
    :meth:`start`, :meth:`poll` and :meth:`BatchJob.kill` return at once.

    Parameters
    ----------
    log_dir:
        Folder of the jobs' logs and of the payload files (0600, in a 0700 folder); on
        a cluster it must be on a filesystem the nodes share.
    queue:
        Partition (SLURM) or queue (LSF).
    account:
        Account (SLURM) or project (LSF).
    walltime:
        Wall time per job, SLURM notation (``90``, ``01:30:00``, ``1-00:00:00``).
    cpus_per_worker, gpus_per_worker:
        CPUs and GPUs per job.
    memory_per_worker:
        Memory per job, e.g. ``16G``.
    job_extra:
        Extra submit options, passed as written (a string, split like a shell would).
    python:
        Python interpreter the jobs run (the same path must exist on the nodes).
    poll_interval:
        Seconds from the answer to one state query to the start of the next; at least
        :data:`MIN_POLL_INTERVAL`.

    Attributes
    ----------
    jobs:
        Submitted jobs by job id.
    command_counts:
        How many submit, query and cancel commands ran (``"submit"``, ``"query"``,
        ``"cancel"``).
    """

    #: name in ``[luigi_daisy] launcher``
    name = "batch"

    def __init__(self, log_dir: str | os.PathLike = "daisy_logs", queue: str | None = None,
                 account: str | None = None, walltime: str | None = None,
                 cpus_per_worker: int = 1, gpus_per_worker: int = 0,
                 memory_per_worker: str | None = None,
                 job_extra: str | list[str] | None = None, python: str | None = None,
                 poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
        if cpus_per_worker < 1:
            raise LauncherError(f"cpus_per_worker={cpus_per_worker}: a job needs at least 1")
        if gpus_per_worker < 0:
            raise LauncherError(f"gpus_per_worker={gpus_per_worker} cannot be negative")
        self.queue = queue or None
        self.account = account or None
        self.walltime_seconds = (parse_walltime_seconds(walltime)
                                 if walltime not in (None, "") else None)
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.memory_mb = (parse_memory_mb(memory_per_worker)
                          if memory_per_worker not in (None, "") else None)
        if isinstance(job_extra, str):
            job_extra = shlex.split(job_extra)
        self.job_extra = list(job_extra or [])
        self.log_dir = Path(log_dir)
        self.python = python or sys.executable
        self._payload_files: dict[int, Path] = {}
        #: this run's files in ``.payloads-<uid>`` (one lock, however many jobs)
        self._run_files: RunFiles | None = None
        self._last_lock_refresh = -math.inf
        self._checked_folders: set[Path] = set()
        self.poll_interval = check_poll_interval(poll_interval)
        self.jobs: dict[str, BatchJob] = {}
        self.command_counts: collections.Counter[str] = collections.Counter()
        self._count_lock = threading.Lock()
        self._failed_queries = 0
        # submissions handed to the submit thread and not yet applied
        self._submitting: set[BatchJob] = set()
        self._submitted: collections.deque[tuple[BatchJob, str | None, str | None]] = \
            collections.deque()
        self._any_submitted = False
        self._refused: LauncherError | None = None
        self._query: concurrent.futures.Future[_QueryAnswer] | None = None
        self._last_answer = -math.inf
        self._closing = threading.Event()
        self._submit_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._control_thread: concurrent.futures.ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ subclass part
    def submit_command(self, spec: WorkerSpec, job_name: str) -> list[str]:
        """The command that submits one worker job."""
        raise NotImplementedError

    def parse_job_id(self, output: str) -> str:
        """The job id in the submit command's output."""
        raise NotImplementedError

    def query(self, jobs: list[BatchJob]) -> dict[str, JobStatus]:
        """States of ``jobs`` in as few commands as possible; jobs the batch system no
        longer knows are left out."""
        raise NotImplementedError

    def cancel_commands(self, job_ids: list[str]) -> list[list[str]]:
        """Commands that cancel ``job_ids``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ interface
    def worker_command(self) -> list[str]:
        """What each job runs."""
        return [self.python, "-m", "luigi_daisy.worker"]

    def job_name(self, spec: WorkerSpec) -> str:
        """``<task>.worker<id>``, only characters every batch system takes."""
        name = f"{spec.task_id}.worker{spec.worker_id}"
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)[-120:]

    def start(self, spec: WorkerSpec) -> BatchJob:
        """Queue the submission of one job for ``spec`` and return its handle at once.

        The command is built here (a template error raises :class:`LauncherError` now);
        it runs on the submit thread. A refused submission shows in the handle
        (:meth:`BatchJob.start_error`, an exit code); when no job of this launcher was
        submitted before it, the next :meth:`poll` raises it as a :class:`LauncherError`
        (a missing command, a partition that does not exist).
        """
        # absolute: a job may start in another directory than this process
        stdout_path = Path(spec.stdout_path).absolute()
        stderr_path = Path(spec.stderr_path).absolute()
        spec = dataclasses.replace(spec, stdout_path=stdout_path, stderr_path=stderr_path)
        for path in (stdout_path, stderr_path):
            check_log_folders(path.parent, self._checked_folders)
            # made here, by this user: the batch system appends to it, not to a link
            os.close(open_log(path))
        environment = {**self.submit_environment(), **self.job_environment(spec)}
        job_name = self.job_name(spec)
        command = self.submit_command(spec, job_name)
        job = BatchJob(self, spec.task_id, int(spec.worker_id), None, job_name,
                       stdout_path, stderr_path, submitted_at=time.monotonic())
        self._submitting.add(job)
        self._thread("submit").submit(self._submit, job, command, environment,
                                      spec.environment.get(ENV_VARIABLE))
        return job

    def _submit(self, job: BatchJob, command: list[str], environment: dict[str, str],
                context: str | None) -> None:
        """On the submit thread: write the job's context file (one per job: a file on a
        shared file system is not written on the caller's loop), run one submit
        command, leave the answer for poll()."""
        if self._closing.is_set() or job.cancel_requested:
            self._submitted.append((job, None, None))  # the run ended first
            return
        try:
            if context is not None:
                environment = {**environment, CONTEXT_FILE_VARIABLE: str(
                    self._files().write("context", context.encode(), ".txt"))}
            result = self._run(command, environment, "submit")
            job_id = self.parse_job_id(result.stdout)
        except LauncherError as error:
            self._submitted.append((job, None, str(error)))
        except Exception as error:  # noqa: BLE001 - reported through the job, not lost
            self._submitted.append((job, None, f"the {self.name} launcher could not submit "
                                               f"{job.job_name}: {error!r}"))
        else:
            self._submitted.append((job, job_id, None))

    def _apply_submissions(self) -> None:
        """Give the jobs whose submission returned their ids (or their errors)."""
        while self._submitted:
            job, job_id, error = self._submitted.popleft()
            self._submitting.discard(job)
            if error is not None:
                job.state, job.submit_error, job._exit_code = "NOT SUBMITTED", error, \
                    EXIT_UNKNOWN
                logger.error("%s", error)
                if not self._any_submitted and self._refused is None:
                    self._refused = LauncherError(error)
            elif job_id is None:
                job.state, job._exit_code = "NOT SUBMITTED (the run ended first)", \
                    EXIT_CANCELLED
            else:
                self._any_submitted = True
                job.job_id, job.state, job.submitted_at = job_id, "SUBMITTED", \
                    time.monotonic()
                self.jobs[job_id] = job
                logger.debug("submitted %s", job.describe())
                if job.cancel_requested:
                    self.cancel_later([job])

    def submit_environment(self) -> dict[str, str]:
        """The environment the submit command starts from: this process's, without what
        a worker of another run has (a run started from a block: a nested run): that
        run's context (its token is not this run's to pass on, and a batch system may
        show it to others) and the pid of its parent (a job has none here)."""
        from ..worker import PARENT_PID_VARIABLE

        return {key: value for key, value in os.environ.items()
                if key not in (ENV_VARIABLE, DAISY_ENV_VARIABLE, CONTEXT_FILE_VARIABLE,
                               PARENT_PID_VARIABLE)}

    def job_environment(self, spec: WorkerSpec) -> dict[str, str]:
        """Variables the job gets on top of the submitting environment: the name of its
        payload file (one file per payload), and not its context (the run's token: a
        batch system may show a job's environment to other users, e.g. ``qstat -f``
        after ``qsub -V``), which goes in a context file of its own, written on the
        submit thread and named by ``LUIGI_DAISY_CONTEXT_FILE``."""
        environment = {key: str(value) for key, value in dict(spec.environment).items()
                       if key not in (ENV_VARIABLE, DAISY_ENV_VARIABLE)}
        environment[PAYLOAD_FILE_VARIABLE] = str(self._payload_file(spec.payload))
        return environment

    def _files(self) -> RunFiles:
        """This run's files; the first file of a run removes those of runs that are
        gone (killed outright: nothing of theirs removed them)."""
        if self._run_files is None:
            self._run_files = RunFiles(payload_folder(self.log_dir))
            self._last_lock_refresh = time.monotonic()
        return self._run_files

    def _payload_file(self, payload: WorkerPayload) -> Path:
        path = self._payload_files.get(id(payload))
        if path is None:
            path = self._files().write("payload", payload.to_bytes(), ".pickle")
            self._payload_files[id(payload)] = path
        return path

    def _remove_payload_files(self) -> None:
        if self._run_files is not None:
            self._run_files.close()
            self._run_files = None
        self._payload_files.clear()

    def _refresh_lock_later(self) -> None:
        """Every ``LOCK_REFRESH_INTERVAL``: refresh the run's lock file on the control
        thread (a file system may be slow; the caller is the event loop)."""
        if self._run_files is not None and \
                time.monotonic() - self._last_lock_refresh >= LOCK_REFRESH_INTERVAL:
            self._last_lock_refresh = time.monotonic()
            self._thread("control").submit(self._run_files.refresh)

    def poll(self) -> None:
        """Apply the answers that came back (submissions, the last state query) and,
        when ``poll_interval`` has passed since the last answer and no query is
        running, start one query of every unfinished job. Never waits.

        Raises
        ------
        LauncherError
            Once, when a submission failed before any job of this launcher was
            submitted: the message names the command and holds its output.
        """
        self._apply_submissions()
        self._apply_query()
        self._refresh_lock_later()
        if self._refused is not None:
            refused, self._refused = self._refused, None
            raise refused
        if self._query is None and \
                time.monotonic() - self._last_answer >= self.poll_interval:
            self._start_query()

    def _start_query(self) -> bool:
        unfinished = [job for job in self.jobs.values() if not job.finished]
        if not unfinished:
            return False
        self._query = self._thread("control").submit(self._ask, unfinished)
        return True

    def _ask(self, jobs: list[BatchJob]) -> _QueryAnswer:
        """On the control thread: one state query."""
        try:
            statuses = self.query(jobs)
        except Exception as error:  # noqa: BLE001 - applied (and logged) by poll()
            return _QueryAnswer(jobs, None, error, time.monotonic())
        return _QueryAnswer(jobs, statuses, None, time.monotonic())

    def _apply_query(self) -> None:
        """Apply the answer of the last query if it has come."""
        if self._query is None or not self._query.done():
            return
        answer, self._query = self._query.result(), None
        self._last_answer = answer.ended_at
        if answer.statuses is None:
            # a batch system that does not answer for a while must not end a long run
            self._failed_queries += 1
            if self._failed_queries in (1, 10) or self._failed_queries % 100 == 0:
                if isinstance(answer.error, LauncherError):
                    logger.warning("job states unknown (%d queries failed in a row): %s",
                                   self._failed_queries, answer.error)
                else:
                    logger.error("job states unknown (%d queries failed in a row)",
                                 self._failed_queries, exc_info=answer.error)
            return
        self._failed_queries = 0
        now = time.monotonic()
        for job in answer.jobs:
            if job.finished:
                continue
            status = answer.statuses.get(job.job_id)
            if status is None:
                # a job can vanish from the batch system's books once it has ended
                job._unseen_polls += 1
                if job._unseen_polls >= 2:
                    if job.state == "SUBMITTED":
                        job.state = "GONE"
                    job._exit_code = EXIT_UNKNOWN
                continue
            job._unseen_polls = 0
            if job.started_at is None and status.state not in ("PENDING", "PEND",
                                                               "SUBMITTED"):
                job.started_at = now
            job.state, job.reason = status.state, status.reason
            job._exit_code = status.exit_code

    def _refresh(self, deadline: float) -> bool:
        """Query now (``MIN_POLL_INTERVAL`` after the last answer) and wait for the
        answer, until ``deadline``; False when no job was left to ask about. For the
        end of a run only: it waits."""
        self._wait_for_query(deadline)
        if not any(not job.finished for job in self.jobs.values()):
            return False
        pause = self._last_answer + MIN_POLL_INTERVAL - time.monotonic()
        if pause > 0:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        if time.monotonic() < deadline and self._start_query():
            self._wait_for_query(deadline)
        return True

    def _wait_for_query(self, deadline: float) -> None:
        if self._query is not None:
            try:
                self._query.exception(timeout=max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                return
            self._apply_query()

    def pending_jobs(self, longer_than: float) -> list[BatchJob]:
        """Submitted jobs still pending ``longer_than`` seconds after their submission."""
        self._apply_submissions()
        now = time.monotonic()
        return [job for job in self.jobs.values()
                if not job.finished and job.started_at is None
                and now - job.submitted_at >= longer_than]

    def cancel(self, jobs: list[BatchJob]) -> None:
        """Run the commands that end ``jobs``, in this thread (errors are logged, not
        raised). The run's own calls go through :meth:`cancel_later`."""
        job_ids = [job.job_id for job in jobs if not job.finished and job.job_id is not None]
        if not job_ids:
            return
        for command in self.cancel_commands(job_ids):
            try:
                self._run(command, None, "cancel", check=False)
            except LauncherError as error:
                logger.warning("%s", error)

    def cancel_later(self, jobs: list[BatchJob]) -> None:
        """Cancel ``jobs`` on the control thread, without waiting; a job still being
        submitted is cancelled once its id is known (or not submitted at all)."""
        ready = []
        for job in jobs:
            if job.finished or job.cancel_sent:
                continue
            job.cancel_requested = True
            if job.job_id is not None:
                job.cancel_sent = True
                ready.append(job)
        if ready:
            self._thread("control").submit(self._cancel_logged, ready)

    def _cancel_logged(self, jobs: list[BatchJob]) -> None:
        try:
            self.cancel(jobs)
        except Exception:
            logger.exception("cancelling %d %s jobs failed", len(jobs), self.name)

    def cancel_all(self) -> None:
        """Ask the batch system to end every job, without waiting; submissions not
        started yet are dropped."""
        self._closing.set()
        self._apply_submissions()
        self.cancel_later(list(self.jobs.values()))

    def stop_all(self, timeout: float) -> list[str]:
        """End every job and wait until the batch system says they ended; return
        descriptions of the jobs not confirmed gone within ``timeout``.

        Submissions not started yet are dropped; the one running is waited for and its
        job cancelled, so no job outlives the run. This call waits: it is the end of
        the run.
        """
        deadline = time.monotonic() + timeout
        self._closing.set()
        try:
            if self._submit_thread is not None:  # after the submission running now
                self._submit_thread.submit(lambda: None).result(
                    timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            pass
        for job in self._submitting:  # still running: cancelled once it has an id
            job.cancel_requested = True
        self._apply_submissions()
        self._wait_for_query(deadline)
        if time.monotonic() - self._last_answer >= MIN_POLL_INTERVAL:
            self._refresh(deadline)  # jobs that ended on their own are not cancelled
        self.cancel_later(list(self.jobs.values()))
        if self._control_thread is not None:  # after the cancellations
            try:
                self._control_thread.submit(lambda: None).result(
                    timeout=max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                pass
        while True:
            self._apply_submissions()
            left = [job for job in self.jobs.values() if not job.finished]
            left += [job for job in self._submitting if not job.finished]
            if not left or time.monotonic() >= deadline:
                break
            if not self._refresh(deadline):  # only submissions left: wait for them
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        # the run is over: a refused submission is in its job's description now
        self._refused = None
        if not left:
            self._remove_payload_files()
            self._stop_threads()
        elif self._submitting:
            # a submission still runs past the deadline: its job is ended on the submit
            # thread as soon as its id arrives, after this call has returned
            self._thread("submit").submit(self._cancel_late_submissions)
        self._closing.clear()  # submissions dropped above are marked cancel_requested
        return [job.describe() for job in left]

    def _cancel_late_submissions(self) -> None:
        """On the submit thread, after :meth:`stop_all` stopped waiting: end the jobs
        whose submission returned since, so that no job outlives its run."""
        while self._submitted:
            job, job_id, error = self._submitted.popleft()
            self._submitting.discard(job)
            if job_id is not None:
                job.job_id, job.state = job_id, "SUBMITTED"
                self.jobs[job_id] = job
                self.cancel([job])
                logger.warning("ended %s, whose submission returned after the run had "
                               "stopped waiting for it", job.describe())

    def _stop_threads(self) -> None:
        for executor in (self._submit_thread, self._control_thread):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        self._submit_thread = self._control_thread = None
        self._query = None

    def _thread(self, which: str) -> concurrent.futures.ThreadPoolExecutor:
        """The submit or control thread (started on first use)."""
        attribute = f"_{which}_thread"
        executor = getattr(self, attribute)
        if executor is None:
            executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"luigi_daisy-{self.name}-{which}")
            setattr(self, attribute, executor)
        return executor

    # ------------------------------------------------------------------ helpers
    def _run(self, command: list[str], environment: dict[str, str] | None, what: str,
             check: bool = True, input_text: str | None = None) -> subprocess.CompletedProcess:
        """Run one batch command (never on the event loop: the submit or control
        thread, or ``stop_all``)."""
        with self._count_lock:
            self.command_counts[what] += 1
        try:
            result = subprocess.run(command, env=environment, capture_output=True, text=True,
                                    timeout=COMMAND_TIMEOUT, input=input_text,
                                    stdin=None if input_text is not None else subprocess.DEVNULL)
        except FileNotFoundError:
            raise LauncherError(
                f"the {self.name} launcher cannot {what} jobs: {command[0]!r} is not "
                f"installed or not on PATH") from None
        except PermissionError:
            raise LauncherError(
                f"the {self.name} launcher cannot {what} jobs: {command[0]!r} is not "
                f"executable") from None
        except subprocess.TimeoutExpired:
            raise LauncherError(
                f"the {self.name} launcher's {what} command {command[0]!r} did not answer "
                f"within {COMMAND_TIMEOUT} s") from None
        if check and result.returncode != 0:
            raise LauncherError(
                f"the {self.name} launcher's {what} command {shlex.join(command)} exited with "
                f"{result.returncode}: {(result.stderr or result.stdout).strip()[:2000]}")
        return result
