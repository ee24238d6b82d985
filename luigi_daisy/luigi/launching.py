"""The launcher of a pipelined run, built from its tasks' parameters and ``[luigi_daisy]``."""

from __future__ import annotations

from ..errors import ConfigError, LauncherError
from ..launchers.base import Launcher
from ..launchers.batch import check_poll_interval
from ..launchers.command import CommandLauncher
from ..launchers.local import LocalLauncher
from ..launchers.lsf import LsfLauncher
from ..launchers.per_task import PerTaskLauncher
from ..launchers.slurm import SlurmLauncher

#: the BlockwiseTask parameters that describe a worker job
RESOURCE_PARAMETERS = ("queue", "account", "walltime", "cpus_per_worker", "gpus_per_worker",
                       "memory_per_worker", "job_extra")


def make_launcher(name: str, resources: dict, config) -> Launcher:
    """A launcher called ``name`` (``local``, ``slurm``, ``lsf``, ``command``).

    Parameters
    ----------
    resources:
        ``queue``, ``account``, ``walltime``, ``cpus_per_worker``, ``gpus_per_worker``,
        ``memory_per_worker``, ``job_extra`` (ignored by ``local``).
    config:
        The ``[luigi_daisy]`` settings (``log_dir``, templates, ``job_poll_interval``).
    """
    check_job_poll_interval(config.job_poll_interval)
    if name == "local":
        return LocalLauncher(config.log_dir, start_method=config.start_method)
    common = dict(resources, log_dir=config.log_dir, poll_interval=config.job_poll_interval)
    if name == "slurm":
        return SlurmLauncher(**common)
    if name == "lsf":
        return LsfLauncher(**common)
    if name == "command":
        return CommandLauncher(submit_command=config.submit_command,
                               cancel_command=config.cancel_command,
                               job_id_pattern=config.job_id_pattern,
                               status_command=config.status_command or None, **common)
    raise ConfigError(f"launcher = {name!r} is not one of local, slurm, lsf, command")


def check_job_poll_interval(value: object) -> None:
    """Refuse a ``[luigi_daisy] job_poll_interval`` below the minimum, naming the key.

    Raises
    ------
    ConfigError
        Naming ``job_poll_interval``, the value and the minimum.
    """
    try:
        check_poll_interval(value, "job_poll_interval")
    except LauncherError as error:
        raise ConfigError(f"[luigi_daisy] {error}") from None


def launcher_for_closure(tasks, config) -> Launcher:
    """One launcher per distinct (launcher, resources) among ``tasks``, behind one
    :class:`PerTaskLauncher`."""
    shared: dict[tuple, Launcher] = {}
    per_task: dict[str, Launcher] = {}
    for task in tasks:
        resources = {name: getattr(task, name) for name in RESOURCE_PARAMETERS}
        key = (task.launcher, *sorted(resources.items()))
        if key not in shared:
            shared[key] = make_launcher(task.launcher, resources, config)
        per_task[task.task_id] = shared[key]
    if len(shared) == 1:
        (only,) = shared.values()
        return only
    return PerTaskLauncher(per_task)
