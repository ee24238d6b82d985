"""One launcher per task, behind the single launcher a run talks to.

Tasks of one pipelined run may ask for different resources (a GPU task feeding a CPU
task) or different launchers; tasks that ask for the same share one launcher, so one
``squeue`` serves them all.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from ..payload import WorkerPayload
from .base import Launcher, WorkerHandle, WorkerSpec


class PerTaskLauncher(Launcher):
    """Sends each task's workers to that task's launcher.

    Parameters
    ----------
    launchers:
        Launcher per task id (the same object may serve several tasks).
    """

    def __init__(self, launchers: Mapping[str, Launcher]) -> None:
        self.launchers = dict(launchers)
        self.distinct: list[Launcher] = []
        for launcher in self.launchers.values():
            if not any(launcher is known for known in self.distinct):
                self.distinct.append(launcher)
        self.name = "/".join(dict.fromkeys(getattr(launcher, "name", type(launcher).__name__)
                                           for launcher in self.distinct))
        self.log_dir = Path(getattr(self.distinct[0], "log_dir", "daisy_logs")
                            if self.distinct else "daisy_logs")

    def _for(self, task_id: str) -> Launcher:
        return self.launchers[task_id]

    def for_task(self, task_id: str) -> Launcher:
        """The task's own launcher."""
        return self.launchers[task_id].for_task(task_id)

    def prepare(self, payload: WorkerPayload) -> None:
        """Let the task's launcher check its payload."""
        self._for(payload.task_id).prepare(payload)

    def log_paths(self, task_id: str, worker_id: int) -> tuple[Path, Path]:
        """Log files as the task's launcher names them."""
        return self._for(task_id).log_paths(task_id, worker_id)

    def start(self, spec: WorkerSpec) -> WorkerHandle:
        """Start the worker with its task's launcher."""
        return self._for(spec.task_id).start(spec)

    def poll(self) -> None:
        """Poll every launcher."""
        for launcher in self.distinct:
            launcher.poll()

    def stop_all(self, timeout: float) -> list[str]:
        """Stop every launcher's workers within one shared ``timeout``."""
        deadline = time.monotonic() + timeout
        for launcher in self.distinct:  # every job gets its cancel before any wait
            cancel_all = getattr(launcher, "cancel_all", None)
            if cancel_all is not None:
                cancel_all()
        left: list[str] = []
        for launcher in self.distinct:
            left.extend(launcher.stop_all(max(0.0, deadline - time.monotonic())))
        return left

    def pending_jobs(self, longer_than: float) -> list:
        """Long-pending jobs of the launchers that submit jobs."""
        jobs: list = []
        for launcher in self.distinct:
            pending = getattr(launcher, "pending_jobs", None)
            if pending is not None:
                jobs.extend(pending(longer_than))
        return jobs
