"""Launchers start and stop worker processes; they know nothing of the scheduler.

Each launcher is imported on first use (``from luigi_daisy.launchers import
SlurmLauncher`` works as before), so a run on local workers does not import the
batch systems' launchers before its workers start.
"""

import importlib

_MODULES = {
    "Launcher": ".base", "WorkerHandle": ".base", "WorkerSpec": ".base",
    "BatchJob": ".batch", "BatchLauncher": ".batch",
    "CommandLauncher": ".command",
    "ForkedWorker": ".local", "LocalLauncher": ".local", "SpawnedWorker": ".local",
    "LsfLauncher": ".lsf",
    "PerTaskLauncher": ".per_task",
    "SlurmLauncher": ".slurm",
}

__all__ = ["BatchJob", "BatchLauncher", "CommandLauncher", "ForkedWorker", "Launcher",
           "LocalLauncher", "LsfLauncher", "PerTaskLauncher", "SlurmLauncher",
           "SpawnedWorker", "WorkerHandle", "WorkerSpec"]


def __getattr__(name: str):
    module_name = _MODULES.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
