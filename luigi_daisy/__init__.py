"""luigi_daisy: blockwise processing of huge nD volumes, daisy-compatible, in Luigi.

Scripts written for daisy run with ``import luigi_daisy as daisy``.
"""

from funlib.geometry import Coordinate, Roi

from .blocks import Block, BlockStatus
from .client import Client
from .context import Context
from .datasets import Array, check_write_alignment, open_ds, prepare_ds
from .errors import GeometryError, LuigiDaisyError, SchedulerError, TaskDefinitionError
from .luigi import BlockwiseRunError, BlockwiseTask, LedgerTarget, ZarrTarget
from .run import run_blockwise
from .scheduler import BlockScheduler, ReleaseOutcome, Scheduler, TaskState
from .summary import RunResult
from .task import Task

__version__ = "0.1.0"

__all__ = [
    "Array", "Block", "BlockScheduler", "BlockStatus", "BlockwiseRunError", "BlockwiseTask", "Client",
    "Context", "Coordinate", "GeometryError", "LedgerTarget", "LuigiDaisyError",
    "ReleaseOutcome", "Roi", "RunResult", "Scheduler", "SchedulerError", "Task",
    "TaskDefinitionError", "TaskState", "ZarrTarget", "check_write_alignment", "open_ds",
    "prepare_ds", "run_blockwise",
]
