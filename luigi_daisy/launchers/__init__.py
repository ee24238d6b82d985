"""Launchers start and stop worker processes; they know nothing of the scheduler."""

from .base import Launcher, WorkerHandle, WorkerSpec
from .batch import BatchJob, BatchLauncher
from .command import CommandLauncher
from .local import ForkedWorker, LocalLauncher, SpawnedWorker
from .lsf import LsfLauncher
from .per_task import PerTaskLauncher
from .slurm import SlurmLauncher

__all__ = ["BatchJob", "BatchLauncher", "CommandLauncher", "ForkedWorker", "Launcher",
           "LocalLauncher", "LsfLauncher", "PerTaskLauncher", "SlurmLauncher",
           "SpawnedWorker", "WorkerHandle", "WorkerSpec"]
