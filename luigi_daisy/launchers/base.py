"""The interface between a run and the launchers that start its workers.

A launcher starts worker processes (or cluster jobs) from :class:`WorkerSpec`s, reports
their exit codes through :class:`WorkerHandle`s and ends them all when the run ends. It
knows nothing of the scheduler: which worker to start, and when, is the run's business.
Every launcher starts the same entry point, ``python -m luigi_daisy.worker``.
"""

from __future__ import annotations

import abc
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..context import safe_file_name
from ..payload import WorkerPayload


@dataclass
class WorkerSpec:
    """Everything a launcher needs to start one worker.

    Attributes
    ----------
    task_id, worker_id:
        Who the worker is.
    environment:
        Variables to set for the worker: its context (``LUIGI_DAISY_CONTEXT``, with the
        run's token), ``PYTHONPATH`` if set. Secrets travel here, never on a command line.
    payload:
        What the worker runs.
    stdout_path, stderr_path:
        Where its output goes.
    job_name:
        A name for the process or job (``luigi_daisy-<task>-worker-<id>``).
    private_fds:
        Descriptors of the run a worker must not keep (the block server's sockets); a
        launcher that forks closes them in the child.
    """

    task_id: str
    worker_id: int
    environment: dict[str, str]
    payload: WorkerPayload
    stdout_path: Path | None
    stderr_path: Path | None
    job_name: str
    private_fds: tuple[int, ...] = field(default=())


class WorkerHandle(abc.ABC):
    """One started worker, as its launcher sees it."""

    task_id: str
    worker_id: int
    stdout_path: Path | None
    stderr_path: Path | None

    @abc.abstractmethod
    def exit_code(self) -> int | None:
        """None while pending or running, else the exit code (negative: the signal that
        ended it). Reflects the launcher's last :meth:`Launcher.poll`."""

    @abc.abstractmethod
    def kill(self) -> None:
        """End the worker and whatever it started."""

    def start_error(self) -> str | None:
        """Why the worker was never started (a batch system that refused its job: the
        command and its output), else None. Such a worker also has an exit code."""
        return None

    @abc.abstractmethod
    def describe(self) -> str:
        """``"pid 1234"``, ``"SLURM job 42"``: for messages."""


class Launcher(abc.ABC):
    """Starts, watches and stops the workers of one run.

    ``log_dir`` is the folder of the workers' logs,
    ``<log_dir>/<task_id>/worker_<id>.out|.err`` (the id made a safe folder name by
    :func:`~luigi_daisy.context.safe_file_name`).
    """

    log_dir: Path | None = Path("daisy_logs")

    @abc.abstractmethod
    def start(self, spec: WorkerSpec) -> WorkerHandle:
        """Start one worker. Called on the run's event loop: must not wait for a batch
        system (a batch launcher submits in the background and returns at once)."""

    @abc.abstractmethod
    def poll(self) -> None:
        """Refresh the state of every worker in one go (one ``squeue`` for SLURM).
        Called on the run's event loop every few milliseconds: must not wait."""

    @abc.abstractmethod
    def stop_all(self, timeout: float) -> list[str]:
        """End every worker this launcher started and wait up to ``timeout`` seconds
        until they are gone; return descriptions of those not confirmed gone."""

    def prepare(self, payload: WorkerPayload) -> None:
        """Check, before any worker starts, that ``payload`` can reach this launcher's
        workers (the default: it serialises for a payload file).

        Raises
        ------
        UnserialisableFunctionError
            Naming the object that cannot travel.
        """
        payload.to_bytes()

    def for_task(self, task_id: str) -> Launcher:
        """The launcher that starts the workers of ``task_id``: this one, unless it
        sends tasks to launchers of their own. Workers of tasks with the same launcher
        form one pool."""
        return self

    def worker_command(self) -> list[str]:
        """The command that starts one worker (without the payload's own arguments)."""
        return [sys.executable, "-m", "luigi_daisy.worker"]

    def log_paths(self, task_id: str, worker_id: int) -> tuple[Path | None, Path | None]:
        """``(stdout, stderr)`` files of a worker under :attr:`log_dir`; ``(None, None)``
        when ``log_dir`` is None (``daisy.logging.set_log_basedir(None)``: no files)."""
        if self.log_dir is None:
            return None, None
        folder = Path(self.log_dir) / safe_file_name(task_id)
        return folder / f"worker_{worker_id}.out", folder / f"worker_{worker_id}.err"
