"""SLURM launcher: each worker is one batch job submitted with ``sbatch --parsable``.

Never an ``srun`` step (inside an allocation a step ignores the partition asked for).
Job states come from ``squeue`` (one call per poll for all jobs of this user; there is
no ``sacct`` without a database), jobs are ended with ``scancel``.
"""

from __future__ import annotations

import os
import shlex

from ..errors import LauncherError
from .batch import EXIT_CANCELLED, EXIT_UNKNOWN, BatchJob, BatchLauncher, JobStatus

#: states after which a job runs no more (squeue's long names)
FINISHED_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "SPECIAL_EXIT", "REVOKED"})

SQUEUE_FORMAT = "JobID:|,State:|,exit_code:|,Reason:"


def format_walltime(seconds: int) -> str:
    """``D-HH:MM:SS`` for ``sbatch --time``."""
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}-{hours:02d}:{minutes:02d}:{seconds:02d}"


def exit_code_of(state: str, raw: str) -> int:
    """The exit code of a finished job from squeue's ``exit_code`` (a wait status:
    ``code << 8``, or the signal that ended it)."""
    try:
        status = int(raw)
    except ValueError:
        status = 0
    code = -(status & 0x7F) if status & 0x7F else status >> 8
    if code == 0 and state == "CANCELLED":
        return EXIT_CANCELLED
    if code == 0 and state != "COMPLETED":
        return EXIT_UNKNOWN
    return code


def parse_squeue(output: str) -> dict[str, JobStatus]:
    """Parse ``squeue -h -t all -O '<SQUEUE_FORMAT>'`` output."""
    statuses = {}
    for line in output.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) < 4 or not parts[0]:
            continue
        job_id, state, raw_exit, reason = (part.strip() for part in parts)
        # squeue writes job arrays and heterogeneous jobs as 12_3 / 12+0; ours are plain
        state = state.split()[0] if state else "UNKNOWN"
        exit_code = exit_code_of(state, raw_exit) if state in FINISHED_STATES else None
        statuses[job_id] = JobStatus(state, reason, exit_code)
    return statuses


class SlurmLauncher(BatchLauncher):
    """Submits workers with ``sbatch --parsable`` (see :class:`BatchLauncher` for the
    resources); the job name is ``<task>.worker<id>``."""

    name = "slurm"

    def submit_command(self, spec, job_name: str) -> list[str]:
        """``sbatch --parsable ... --wrap 'exec python -m luigi_daisy.worker'``."""
        command = ["sbatch", "--parsable", f"--job-name={job_name}",
                   f"--output={spec.stdout_path}", f"--error={spec.stderr_path}",
                   "--ntasks=1", f"--cpus-per-task={self.cpus_per_worker}",
                   # a preempted worker is replaced by the run, not requeued by SLURM
                   "--no-requeue", "--export=ALL"]
        if self.queue:
            command.append(f"--partition={self.queue}")
        if self.account:
            command.append(f"--account={self.account}")
        if self.walltime_seconds is not None:
            command.append(f"--time={format_walltime(self.walltime_seconds)}")
        if self.gpus_per_worker:
            command.append(f"--gpus-per-task={self.gpus_per_worker}")
        if self.memory_mb is not None:
            command.append(f"--mem={self.memory_mb}M")
        command.extend(self.job_extra)
        command.append(f"--wrap=exec {shlex.join(self.worker_command())}")
        return command

    def submit_environment(self) -> dict[str, str]:
        """This process's environment without the ``SLURM_*`` variables of an
        allocation it may run in (they would leak into the job's options, e.g. a
        ``SLURM_MEM_PER_CPU`` clashing with ``--mem``); ``SLURM_CONF`` and the user's
        ``SBATCH_*`` defaults stay."""
        return {key: value for key, value in os.environ.items()
                if not key.startswith("SLURM_") or key == "SLURM_CONF"}

    def parse_job_id(self, output: str) -> str:
        """``sbatch --parsable`` prints ``<id>`` or ``<id>;<cluster>``."""
        first = output.strip().splitlines()[0] if output.strip() else ""
        job_id = first.split(";")[0].strip()
        if not job_id.isdigit():
            raise LauncherError(f"sbatch --parsable printed {output.strip()[:200]!r}, "
                                f"not a job id")
        return job_id

    def query(self, jobs: list[BatchJob]) -> dict[str, JobStatus]:
        """One ``squeue`` call for every job of this user, pending to finished."""
        command = ["squeue", "--noheader", "--states=all", f"--user={os.getuid()}",
                   f"--Format={SQUEUE_FORMAT}"]
        result = self._run(command, None, "query")
        wanted = {job.job_id for job in jobs}
        return {job_id: status for job_id, status in parse_squeue(result.stdout).items()
                if job_id in wanted}

    def cancel_commands(self, job_ids: list[str]) -> list[list[str]]:
        """``scancel`` in batches of a few hundred ids."""
        return [["scancel", *job_ids[start:start + 500]]
                for start in range(0, len(job_ids), 500)]
