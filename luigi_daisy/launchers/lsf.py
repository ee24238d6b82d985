"""LSF launcher: each worker is one job submitted with ``bsub``.

``bsub`` prints ``Job <123> is submitted to queue <normal>.``; states come from one
``bjobs -a -noheader -o "jobid stat exit_code pend_reason delimiter='|'"`` call (LSF's
documented custom output); jobs are ended with ``bkill``. ``bsub`` copies the submitting
environment into the job, which is how the worker's context reaches it.
"""

from __future__ import annotations

import math
import re

from ..errors import LauncherError
from .batch import EXIT_UNKNOWN, BatchJob, BatchLauncher, JobStatus

#: states after which a job runs no more
FINISHED_STATES = frozenset({"DONE", "EXIT"})

BJOBS_FORMAT = "jobid stat exit_code pend_reason delimiter='|'"
_SUBMITTED = re.compile(r"Job <(\d+(?:\[\d+\])?)> is submitted")


def format_walltime(seconds: int) -> str:
    """``hours:minutes`` for ``bsub -W`` (LSF counts whole minutes; rounded up)."""
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 60}:{minutes % 60:02d}"


def parse_bsub(output: str) -> str:
    """The job id in ``bsub``'s answer."""
    match = _SUBMITTED.search(output)
    if match is None:
        raise LauncherError(f"bsub printed {output.strip()[:200]!r}, not 'Job <id> is "
                            f"submitted ...'")
    return match.group(1)


def parse_bjobs(output: str) -> dict[str, JobStatus]:
    """Parse ``bjobs -noheader -o "<BJOBS_FORMAT>"`` output."""
    statuses = {}
    for line in output.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) < 2 or not parts[0].strip().isdigit():
            continue  # "Job <12> is not found" and the like
        parts += [""] * (4 - len(parts))
        job_id, state, raw_exit, reason = (part.strip() for part in parts)
        exit_code = None
        if state == "DONE":
            exit_code = 0
        elif state == "EXIT":
            exit_code = int(raw_exit) if raw_exit.lstrip("-").isdigit() else EXIT_UNKNOWN
            exit_code = exit_code or EXIT_UNKNOWN
        statuses[job_id] = JobStatus(state, "" if reason == "-" else reason, exit_code)
    return statuses


class LsfLauncher(BatchLauncher):
    """Submits workers with ``bsub`` (see :class:`BatchLauncher` for the resources);
    ``queue`` is the LSF queue and ``account`` the LSF project."""

    name = "lsf"

    def submit_command(self, spec, job_name: str) -> list[str]:
        """``bsub -J <name> -o <out> -e <err> ... python -m luigi_daisy.worker``."""
        command = ["bsub", "-J", job_name, "-o", str(spec.stdout_path),
                   "-e", str(spec.stderr_path), "-n", str(self.cpus_per_worker),
                   "-R", "span[hosts=1]"]
        if self.queue:
            command += ["-q", self.queue]
        if self.account:
            command += ["-P", self.account]
        if self.walltime_seconds is not None:
            command += ["-W", format_walltime(self.walltime_seconds)]
        if self.gpus_per_worker:
            command += ["-gpu", f"num={self.gpus_per_worker}"]
        if self.memory_mb is not None:
            command += ["-M", f"{self.memory_mb}MB", "-R", f"rusage[mem={self.memory_mb}MB]"]
        command += self.job_extra
        command += self.worker_command()
        return command

    def parse_job_id(self, output: str) -> str:
        """``Job <123> is submitted to queue <normal>.`` -> ``123``."""
        return parse_bsub(output)

    def query(self, jobs: list[BatchJob]) -> dict[str, JobStatus]:
        """``bjobs -a`` for the jobs, a few hundred ids per call."""
        statuses: dict[str, JobStatus] = {}
        job_ids = [job.job_id for job in jobs]
        for start in range(0, len(job_ids), 500):
            command = ["bjobs", "-a", "-noheader", "-o", BJOBS_FORMAT,
                       *job_ids[start:start + 500]]
            # bjobs exits non-zero when one of the ids is no longer known
            result = self._run(command, None, "query", check=False)
            if result.returncode != 0 and not result.stdout.strip() and \
                    "not found" not in result.stderr:
                raise LauncherError(f"bjobs exited with {result.returncode}: "
                                    f"{result.stderr.strip()[:2000]}")
            statuses.update(parse_bjobs(result.stdout))
        return statuses

    def cancel_commands(self, job_ids: list[str]) -> list[list[str]]:
        """``bkill`` in batches of a few hundred ids."""
        return [["bkill", *job_ids[start:start + 500]]
                for start in range(0, len(job_ids), 500)]
