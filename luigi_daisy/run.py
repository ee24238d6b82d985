"""``run_blockwise``: run tasks to completion and print daisy's execution summary."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable

from .blocks import Block, BlockStatus
from .context import Context
from .errors import TaskDefinitionError
from .progress import ProgressBars
from .scheduler import Scheduler
from .summary import RunResult, format_summary
from .task import Task, collect_tasks

logger = logging.getLogger(__name__)


def process_one_block(process_function, block: Block) -> None:
    """Run a process function on a block and record the outcome in ``block.status``.

    An exception fails the block (its traceback goes to ``block.error`` and the log),
    never the caller; a function that sets ``block.status = FAILED`` fails it too.
    """
    try:
        process_function(block)
    except Exception:  # noqa: BLE001 - a user function may raise anything
        block.status = BlockStatus.FAILED
        block.error = traceback.format_exc()
        logger.error("block %s of task %r failed:\n%s", block.index, block.task_id,
                     block.error)
        return
    if block.status != BlockStatus.FAILED:
        block.status = BlockStatus.SUCCESS


def _takes_block(task: Task) -> bool:
    """Whether the process function is called per block (not a user worker loop)."""
    import inspect
    try:
        signature = inspect.signature(task.process_function)
    except (TypeError, ValueError):
        return True
    required = [
        parameter for parameter in signature.parameters.values()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD,
                              parameter.VAR_POSITIONAL)]
    return bool(required)


def run_in_process(tasks: list[Task], progress: bool = True) -> RunResult:
    """Run every block of ``tasks`` in the calling process, one at a time."""
    for task in tasks:
        if task.process_function is None or not _takes_block(task):
            raise TaskDefinitionError(
                f"task {task.task_id!r}: multiprocessing=False runs process_function(block) "
                f"in this process, so it must take the block as its argument; a worker "
                f"function without arguments needs multiprocessing=True")
    scheduler = Scheduler(tasks)
    for task in tasks:
        if task.init_callback_fn is not None:
            task.init_callback_fn(Context(task_id=task.task_id, worker_id="0"))
    bars = ProgressBars(scheduler.task_states, enabled=progress)
    try:
        progressed = True
        while progressed:
            progressed = False
            for task in tasks:
                block = scheduler.acquire_block(task.task_id)
                while block is not None:
                    progressed = True
                    process_one_block(task.process_function, block)
                    scheduler.release_block(block)
                    bars.update()
                    block = scheduler.acquire_block(task.task_id)
    finally:
        bars.close()
    return RunResult(scheduler.task_states)


def run_blockwise(tasks: Task | Iterable[Task], multiprocessing: bool = True,
                  progress: bool = True, return_states: bool = True) -> RunResult:
    """Run blockwise tasks (and their upstream tasks) to completion.

    Parameters
    ----------
    tasks:
        A task or a list of tasks; upstream tasks are pulled in.
    multiprocessing:
        Whether to run workers in their own processes (default) or every block in the
        calling process.
    progress:
        Show a progress bar per task.
    return_states:
        Accepted for daisy 2 compatibility; the result is always the mapping.

    Returns
    -------
    RunResult
        ``task_id -> TaskState``; true exactly when every block succeeded.
    """
    ordered = collect_tasks(tasks)
    result = run_in_process(ordered, progress=progress)
    print(format_summary(result))
    return result
