"""luigi_daisy: blockwise processing of huge nD volumes, daisy-compatible, in Luigi.

Scripts written for daisy run with ``import luigi_daisy as daisy``.

Geometry, blocks and errors are imported eagerly; the scheduler and tasks, the run
machinery (tornado, tqdm), zarr datasets and the Luigi layer are imported on first use,
so a worker process, which needs none of them, starts sooner, and a script that only
schedules blocks does not pay for the rest.
"""

import importlib

from funlib.geometry import Coordinate, Roi

from .blocks import Block, BlockStatus
from .context import Context
from .errors import (
    BlockwiseRunError,
    ConfigError,
    ContextError,
    DatasetError,
    GeometryError,
    LauncherError,
    LedgerError,
    LuigiDaisyError,
    PayloadError,
    ProtocolError,
    RefusedByServerError,
    SchedulerError,
    ServerUnreachableError,
    TaskDefinitionError,
    UnsafePathError,
    UnserialisableFunctionError,
    WorkerSetupError,
)

__version__ = "0.1.0"

_LAZY = {
    "BlockScheduler": ".scheduler",
    "ReleaseOutcome": ".scheduler",
    "Scheduler": ".scheduler",
    "TaskState": ".scheduler",
    "RunResult": ".summary",
    "Task": ".task",
    "BlockwiseDependencyGraph": ".dependency_graph",
    "DependencyGraph": ".dependency_graph",
    "SerialServer": ".server_api",
    "Server": ".server_api",
    "Client": ".client",
    "run_blockwise": ".run",
    "Array": ".datasets",
    "check_write_alignment": ".datasets",
    "open_ds": ".datasets",
    "prepare_ds": ".datasets",
    "BlockwiseTask": ".luigi",
    "LedgerTarget": ".luigi",
    "ZarrTarget": ".luigi",
}


def __getattr__(name: str):
    if name == "logging":  # daisy.logging: the module, imported on first use
        return importlib.import_module(".logging", __name__)
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'luigi_daisy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Array", "Block", "BlockScheduler", "BlockStatus", "BlockwiseDependencyGraph",
    "BlockwiseRunError", "BlockwiseTask", "Client", "ConfigError", "Context",
    "ContextError", "Coordinate", "DatasetError", "DependencyGraph", "GeometryError",
    "LauncherError", "LedgerError", "LedgerTarget", "LuigiDaisyError", "PayloadError",
    "ProtocolError", "RefusedByServerError", "ReleaseOutcome", "Roi", "RunResult",
    "Scheduler", "SchedulerError", "SerialServer", "Server", "ServerUnreachableError",
    "Task", "TaskDefinitionError", "TaskState", "UnsafePathError",
    "UnserialisableFunctionError",
    "WorkerSetupError", "ZarrTarget", "check_write_alignment", "logging", "open_ds",
    "prepare_ds", "run_blockwise",
]
