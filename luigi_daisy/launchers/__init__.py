"""Launchers start and stop worker processes; they know nothing of the scheduler."""

from .base import Launcher, WorkerHandle, WorkerSpec
from .local import ForkedWorker, LocalLauncher, SpawnedWorker

__all__ = ["ForkedWorker", "Launcher", "LocalLauncher", "SpawnedWorker", "WorkerHandle",
           "WorkerSpec"]
