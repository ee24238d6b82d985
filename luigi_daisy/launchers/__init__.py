"""Launchers start and stop worker processes; they know nothing of the scheduler."""

from .local import LocalLauncher, WorkerProcess

__all__ = ["LocalLauncher", "WorkerProcess"]
