"""Command launcher: workers submitted through command templates (PBS, HTCondor, ...).

``submit_command`` is split like a shell would split it (no shell runs it) and each
word has its placeholders filled in:

=====================  ===================================================================
``{worker_command}``   what the job must run; as a word of its own it becomes several
                       words
``{job_name}``         ``<task>.worker<id>``
``{stdout}``           file the job's standard output should go to
``{stderr}``           file the job's standard error should go to
``{queue}``            ``queue`` (empty when not set), likewise ``{account}``
``{cpus}``             ``cpus_per_worker``, likewise ``{gpus}``
``{memory_mb}``        ``memory_per_worker`` in MB (empty when not set)
``{walltime_minutes}`` ``walltime`` in whole minutes (empty when not set)
``{job_extra}``        ``job_extra``, split into words (as a word of its own)
``{job_id}``           (``cancel_command``, ``status_command``) the id read from the
                       submit command's output with ``job_id_pattern``
=====================  ===================================================================

A placeholder that is a word of its own is passed as one word (several for
``{worker_command}`` and ``{job_extra}``), as it is. Inside a longer word, such as the
script of ``sh -c "{worker_command} > {stdout}"``, every value is shell-quoted
(``shlex.quote``; values of plain letters, digits and ``@%+=:,./-`` are unchanged), so
a folder name with ``$(...)`` or a space stays a name. A value with other characters
inside a word that no shell reads (``--output={stdout}``) would keep its quotes: write
such options as two words (``--output {stdout}``).

``job_id_pattern`` is a regular expression whose first group (or group ``job_id``) is the
job id, e.g. ``Job <(\\d+)>`` for ``bsub`` or ``(\\S+)`` for ``qsub``. The optional
``status_command`` exits 0 while the job is queued or running and non-zero once the
batch system no longer runs it. It names one job, so each state query runs it once for
every unfinished job whose exit code is not recorded yet, up to
:data:`STATUS_CONCURRENCY` at a time (a query takes about as long as one call, not one
call per job); queries are ``job_poll_interval`` apart, off the run's event loop.
Without it, a job counts as ended when its worker command has finished (it records its
exit code next to the job's logs) or when ``cancel_command`` succeeded for it, so a job
killed from outside is not replaced.

The job needs the variables the run adds to the submit command's environment
(``LUIGI_DAISY_PAYLOAD_FILE``, ``LUIGI_DAISY_CONTEXT_FILE``, ``PYTHONPATH``): the
template must make the batch system pass them on (``qsub -V``, HTCondor
``getenv = True``, ...). Those copy the submitting process's whole environment into the
job's record, which other users may query (``qstat -f``, ``condor_q -l``); the run's
token is not in it (it travels in a file only its owner can read), but any other
secret in the environment of the process that runs the workflow is.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import shlex
import string
from pathlib import Path

from ..errors import LauncherError, UnsafePathError
from ..safe_files import read_own
from .batch import EXIT_CANCELLED, EXIT_UNKNOWN, BatchJob, BatchLauncher, JobStatus

logger = logging.getLogger(__name__)

#: status commands one state query runs at once
STATUS_CONCURRENCY = 16

PLACEHOLDERS = ("worker_command", "job_name", "stdout", "stderr", "queue", "account", "cpus",
                "gpus", "memory_mb", "walltime_minutes", "job_extra", "job_id")

# the worker's exit code is written to the file named by $0, whatever ended it: into a
# fresh temporary file (mktemp: O_EXCL, mode 0600, never through a planted link), renamed
_RECORD_EXIT = ('"$@"; code=$?; tmp=$(mktemp "$0.XXXXXX") && echo "$code" > "$tmp" && '
                'mv -f "$tmp" "$0"; exit "$code"')


def _fields_of(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def fill(template: str, values: dict[str, str | list[str]], key: str) -> list[str]:
    """Split ``template`` into words and fill in ``values``; a word that is exactly one
    list-valued placeholder becomes several words."""
    try:
        words = shlex.split(template)
    except ValueError as error:
        raise LauncherError(f"{key} = {template!r} cannot be split into words: {error}") from None
    command: list[str] = []
    for word in words:
        unknown = _fields_of(word) - set(values)
        if unknown:
            raise LauncherError(
                f"{key} = {template!r} uses unknown placeholder(s) "
                f"{', '.join('{' + name + '}' for name in sorted(unknown))}; known here: "
                f"{', '.join('{' + name + '}' for name in values)}")
        stripped = word.strip()
        if stripped.startswith("{") and stripped.endswith("}") and stripped[1:-1] in values:
            value = values[stripped[1:-1]]  # a word of its own: no shell reads it
            if isinstance(value, list):
                command.extend(value)
            else:
                command.append(value)
            continue
        # inside a word (``sh -c "... > {stdout}"``, ``--wrap=...``) every value is
        # shell-quoted: a folder named ``$(...)`` must not run in the job's shell
        flat = {name: shlex.join(value) if isinstance(value, list)
                else shlex.quote(value) if value else value
                for name, value in values.items()}
        try:
            command.append(word.format(**flat))
        except (ValueError, IndexError, KeyError) as error:
            raise LauncherError(f"{key} = {template!r}: cannot fill in {word!r}: "
                                f"{error}") from None
    if not command:
        raise LauncherError(f"{key} is empty; it must name the command to run")
    return command


class CommandLauncher(BatchLauncher):
    """Submits workers with a command template (see the module's docstring).

    Parameters
    ----------
    submit_command:
        Template of the command that submits one worker job.
    cancel_command:
        Template of the command that cancels a job (``{job_id}``).
    job_id_pattern:
        Regular expression that finds the job id in the submit command's output.
    status_command:
        Optional template of a command that exits 0 while job ``{job_id}`` is queued or
        running.
    **resources:
        ``queue``, ``account``, ``walltime``, ... as in :class:`BatchLauncher`.
    """

    name = "command"

    def __init__(self, submit_command: str, cancel_command: str,
                 job_id_pattern: str = r"(\S+)", status_command: str | None = None,
                 **resources) -> None:
        super().__init__(**resources)
        if not submit_command:
            raise LauncherError("launcher = command needs submit_command (a template with "
                                "{worker_command}) in [luigi_daisy]")
        if not cancel_command:
            raise LauncherError("launcher = command needs cancel_command (a template with "
                                "{job_id}) in [luigi_daisy]")
        if "worker_command" not in _fields_of(submit_command):
            raise LauncherError(f"submit_command = {submit_command!r} does not contain "
                                f"{{worker_command}}, so the job would not run a worker")
        if self.job_extra and "job_extra" not in _fields_of(submit_command):
            raise LauncherError(f"job_extra = {' '.join(self.job_extra)!r} is set but "
                                f"submit_command = {submit_command!r} has no {{job_extra}} "
                                f"to put it in")
        if "job_id" not in _fields_of(cancel_command):
            raise LauncherError(f"cancel_command = {cancel_command!r} does not contain "
                                f"{{job_id}}, so it cannot name the job to cancel")
        try:
            self.job_id_pattern = re.compile(job_id_pattern)
        except re.error as error:
            raise LauncherError(f"job_id_pattern = {job_id_pattern!r} is not a regular "
                                f"expression: {error}") from None
        if self.job_id_pattern.groups < 1:
            raise LauncherError(f"job_id_pattern = {job_id_pattern!r} has no group; put the "
                                f"job id in parentheses, e.g. 'Job <(\\d+)>'")
        self.submit_template = submit_command
        self.cancel_template = cancel_command
        self.status_template = status_command or None
        self._cancelled: set[str] = set()
        # filled in once now, so that an unknown placeholder is refused before any job
        submit_values = dict(self._values(), worker_command=["worker"], stdout="out",
                             stderr="err")
        del submit_values["job_id"]
        fill(submit_command, submit_values, "submit_command")
        fill(cancel_command, self._values(job_id="1"), "cancel_command")
        if status_command:
            fill(status_command, self._values(job_id="1"), "status_command")

    # ------------------------------------------------------------------ templates
    def _values(self, spec=None, job_name: str = "", job_id: str = "") -> dict:
        values: dict[str, str | list[str]] = {
            "queue": self.queue or "", "account": self.account or "",
            "cpus": str(self.cpus_per_worker), "gpus": str(self.gpus_per_worker),
            "memory_mb": "" if self.memory_mb is None else str(self.memory_mb),
            "walltime_minutes": ("" if self.walltime_seconds is None
                                 else str(-(-self.walltime_seconds // 60))),
            "job_name": job_name, "job_id": job_id, "job_extra": list(self.job_extra),
        }
        if spec is not None:
            values.update(stdout=str(spec.stdout_path), stderr=str(spec.stderr_path),
                          worker_command=self._recording_command(spec))
        return values

    @staticmethod
    def exit_file(job_or_spec) -> Path:
        """Where a job's worker command records its exit code."""
        return Path(f"{job_or_spec.stderr_path}.exit")

    def _recording_command(self, spec) -> list[str]:
        return ["/bin/sh", "-c", _RECORD_EXIT, str(self.exit_file(spec)),
                *self.worker_command()]

    def submit_command(self, spec, job_name: str) -> list[str]:
        """``submit_command`` filled in for one worker."""
        self.exit_file(spec).unlink(missing_ok=True)
        values = self._values(spec, job_name)
        del values["job_id"]
        return fill(self.submit_template, values, "submit_command")

    def parse_job_id(self, output: str) -> str:
        """The first ``job_id_pattern`` match in the submit command's output."""
        match = self.job_id_pattern.search(output)
        if match is None:
            raise LauncherError(f"job_id_pattern {self.job_id_pattern.pattern!r} finds no job "
                                f"id in the submit command's output {output.strip()[:300]!r}")
        if "job_id" in self.job_id_pattern.groupindex:
            return match.group("job_id")
        return match.group(1)

    def cancel_commands(self, job_ids: list[str]) -> list[list[str]]:
        """``cancel_command`` once per job."""
        return [fill(self.cancel_template, self._values(job_id=job_id), "cancel_command")
                for job_id in job_ids]

    def cancel(self, jobs: list[BatchJob]) -> None:
        """Run ``cancel_command`` for each unfinished job; remember those it ended."""
        for job in jobs:
            if job.finished or job.job_id is None:
                continue
            (command,) = self.cancel_commands([job.job_id])
            try:
                result = self._run(command, None, "cancel", check=False)
            except LauncherError as error:
                self._log_cancel_failure(job, str(error))
                continue
            if result.returncode == 0:
                self._cancelled.add(job.job_id)
            else:
                self._log_cancel_failure(job, (result.stderr or result.stdout).strip())

    @staticmethod
    def _log_cancel_failure(job: BatchJob, text: str) -> None:
        logger.warning("cancelling %s failed: %s", job.describe(),
                                            text[:500])

    def query(self, jobs: list[BatchJob]) -> dict[str, JobStatus]:
        """Exit files first, then ``status_command`` (if any) for the rest, up to
        :data:`STATUS_CONCURRENCY` at once."""
        statuses: dict[str, JobStatus] = {}
        unknown: list[BatchJob] = []
        for job in jobs:
            recorded = self._recorded_exit(job)
            if recorded is not None:
                statuses[job.job_id] = JobStatus("DONE" if recorded == 0 else "EXIT", "",
                                                 recorded)
            elif self.status_template is not None:
                unknown.append(job)
            elif job.job_id in self._cancelled:
                statuses[job.job_id] = JobStatus("CANCELLED", "", EXIT_CANCELLED)
            else:
                statuses[job.job_id] = JobStatus("RUNNING")
        if len(unknown) == 1:
            statuses[unknown[0].job_id] = self._status(unknown[0])
        elif unknown:
            with concurrent.futures.ThreadPoolExecutor(
                    max_workers=min(STATUS_CONCURRENCY, len(unknown)),
                    thread_name_prefix="luigi_daisy-status") as pool:
                for job, status in zip(unknown, pool.map(self._status, unknown)):
                    statuses[job.job_id] = status
        return statuses

    def _status(self, job: BatchJob) -> JobStatus:
        """``status_command`` for one job."""
        command = fill(self.status_template, self._values(job_id=job.job_id),
                       "status_command")
        result = self._run(command, None, "query", check=False)
        if result.returncode == 0:
            return JobStatus("RUNNING")
        recorded = self._recorded_exit(job)
        return JobStatus("ENDED", "", recorded if recorded is not None else
                         EXIT_CANCELLED if job.job_id in self._cancelled else EXIT_UNKNOWN)

    def _recorded_exit(self, job: BatchJob) -> int | None:
        try:
            data = read_own(self.exit_file(job), "exit file")
        except (OSError, UnsafePathError):
            return None  # a link or another user's file records nothing of ours
        if data is None:
            return None
        text = data.decode(errors="replace").strip()
        try:
            code = int(text)
        except ValueError:
            return None
        # the shell reports a worker ended by signal N as 128 + N
        return -(code - 128) if code > 128 else code
