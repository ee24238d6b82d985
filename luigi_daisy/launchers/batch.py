"""What every batch-system launcher shares: one job per worker, job ids kept, states
polled in one command, every job cancelled and waited for at the end.

A subclass says how to build the submit command, read the job id from its output, ask
for the states of many jobs in one call and cancel jobs (see ``slurm.py``, ``lsf.py``,
``command.py``). The worker's context (with the run's token) and the payload file's
name travel in the submit command's environment, never on its command line: ``ps`` and
``squeue`` show command lines to every user.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LauncherError
from ..payload import PAYLOAD_FILE_VARIABLE, WorkerPayload, write_payload_file
from .base import Launcher, WorkerHandle, WorkerSpec

logger = logging.getLogger(__name__)

#: seconds between two state queries to the batch system (``poll(force=True)`` ignores it)
DEFAULT_POLL_INTERVAL = 2.0
#: seconds a batch command (submit, query, cancel) may take
COMMAND_TIMEOUT = 60.0
#: exit code reported for a job that ended without one the batch system could tell
EXIT_UNKNOWN = -1
#: exit code reported for a job cancelled before it ran
EXIT_CANCELLED = -15

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
    """One submitted worker job."""

    launcher: BatchLauncher = field(repr=False)
    task_id: str
    worker_id: int
    job_id: str
    job_name: str
    stdout_path: Path
    stderr_path: Path
    submitted_at: float
    state: str = "SUBMITTED"
    reason: str = ""
    started_at: float | None = None
    _exit_code: int | None = None
    _unseen_polls: int = 0

    def exit_code(self) -> int | None:
        """None while the job is pending or running, else its exit code (negative:
        ended by that signal, or cancelled)."""
        return self._exit_code

    @property
    def finished(self) -> bool:
        """Whether the batch system says the job has ended."""
        return self._exit_code is not None

    def kill(self) -> None:
        """Cancel the job."""
        self.launcher.cancel([self])

    def describe(self) -> str:
        """Job id, name, state and log files, for messages."""
        reason = f", {self.reason}" if self.reason and self.reason != "None" else ""
        return (f"{self.launcher.name} job {self.job_id} ({self.job_name}, "
                f"{self.state}{reason}; logs {self.stdout_path}, {self.stderr_path})")


class BatchLauncher(Launcher):
    """Starts each worker as one batch job.

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
        Seconds between two state queries to the batch system.
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
        self.poll_interval = poll_interval
        self.jobs: dict[str, BatchJob] = {}
        self._last_poll = -math.inf
        self._failed_queries = 0

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
        """Submit one job for ``spec``; its context travels in the environment."""
        # absolute: a job may start in another directory than this process
        stdout_path = Path(spec.stdout_path).absolute()
        stderr_path = Path(spec.stderr_path).absolute()
        spec = dataclasses.replace(spec, stdout_path=stdout_path, stderr_path=stderr_path)
        stdout_path.parent.mkdir(parents=True, exist_ok=True)
        stderr_path.parent.mkdir(parents=True, exist_ok=True)
        environment = {**self.submit_environment(), **self.job_environment(spec)}
        job_name = self.job_name(spec)
        command = self.submit_command(spec, job_name)
        result = self._run(command, environment, "submit")
        job_id = self.parse_job_id(result.stdout)
        job = BatchJob(self, spec.task_id, int(spec.worker_id), job_id, job_name,
                       stdout_path, stderr_path, submitted_at=time.monotonic())
        self.jobs[job_id] = job
        logger.debug("submitted %s", job.describe())
        return job

    def submit_environment(self) -> dict[str, str]:
        """The environment the submit command starts from (this process's)."""
        return dict(os.environ)

    def job_environment(self, spec: WorkerSpec) -> dict[str, str]:
        """Variables the job gets on top of the submitting environment: the worker's
        context and the name of its payload file (one file per payload)."""
        environment = {key: str(value) for key, value in dict(spec.environment).items()}
        environment[PAYLOAD_FILE_VARIABLE] = str(self._payload_file(spec.payload))
        return environment

    def _payload_file(self, payload: WorkerPayload) -> Path:
        path = self._payload_files.get(id(payload))
        if path is None:
            path = write_payload_file(payload, self.log_dir.absolute() / ".payloads")
            self._payload_files[id(payload)] = path
        return path

    def _remove_payload_files(self) -> None:
        for path in self._payload_files.values():
            path.unlink(missing_ok=True)
        self._payload_files.clear()

    def poll(self, force: bool = False) -> None:
        """Refresh the states of all unfinished jobs (one query, at most every
        ``poll_interval`` seconds unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_poll < self.poll_interval:
            return
        self._last_poll = now
        unfinished = [job for job in self.jobs.values() if not job.finished]
        if not unfinished:
            return
        try:
            statuses = self.query(unfinished)
        except LauncherError as error:
            # a batch system that does not answer for a while must not end a long run
            self._failed_queries += 1
            if self._failed_queries in (1, 10) or self._failed_queries % 100 == 0:
                logger.warning("job states unknown (%d queries failed in a row): %s",
                               self._failed_queries, error)
            return
        self._failed_queries = 0
        for job in unfinished:
            status = statuses.get(job.job_id)
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

    def pending_jobs(self, longer_than: float) -> list[BatchJob]:
        """Jobs still pending ``longer_than`` seconds after their submission."""
        now = time.monotonic()
        return [job for job in self.jobs.values()
                if not job.finished and job.started_at is None
                and now - job.submitted_at >= longer_than]

    def cancel(self, jobs: list[BatchJob]) -> None:
        """Ask the batch system to end ``jobs`` (errors are logged, not raised)."""
        job_ids = [job.job_id for job in jobs if not job.finished]
        if not job_ids:
            return
        for command in self.cancel_commands(job_ids):
            try:
                self._run(command, None, "cancel", check=False)
            except LauncherError as error:
                logger.warning("%s", error)

    def cancel_all(self) -> None:
        """Ask the batch system to end every unfinished job, without waiting."""
        self.cancel(list(self.jobs.values()))

    def stop_all(self, timeout: float) -> list[str]:
        """Cancel every unfinished job and wait until the batch system says they
        ended; return descriptions of the jobs not confirmed gone within ``timeout``."""
        deadline = time.monotonic() + timeout
        try:
            self.poll(force=True)
        except LauncherError as error:
            logger.warning("%s", error)
        self.cancel_all()
        delay = 0.1
        while True:
            try:
                self.poll(force=True)
            except LauncherError as error:
                logger.warning("%s", error)
            left = [job for job in self.jobs.values() if not job.finished]
            if not left or time.monotonic() >= deadline:
                if not left:
                    self._remove_payload_files()
                return [job.describe() for job in left]
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 1.0)

    # ------------------------------------------------------------------ helpers
    def _run(self, command: list[str], environment: dict[str, str] | None, what: str,
             check: bool = True, input_text: str | None = None) -> subprocess.CompletedProcess:
        try:
            result = subprocess.run(command, env=environment, capture_output=True, text=True,
                                    timeout=COMMAND_TIMEOUT, input=input_text,
                                    stdin=None if input_text is not None else subprocess.DEVNULL)
        except FileNotFoundError:
            raise LauncherError(
                f"the {self.name} launcher cannot {what} jobs: {command[0]!r} is not "
                f"installed or not on PATH") from None
        except subprocess.TimeoutExpired:
            raise LauncherError(
                f"the {self.name} launcher's {what} command {command[0]!r} did not answer "
                f"within {COMMAND_TIMEOUT} s") from None
        if check and result.returncode != 0:
            raise LauncherError(
                f"the {self.name} launcher's {what} command {shlex.join(command)} exited with "
                f"{result.returncode}: {(result.stderr or result.stdout).strip()[:2000]}")
        return result
