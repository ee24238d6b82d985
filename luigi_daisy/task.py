"""``Task``: a daisy-compatible description of one blockwise computation."""

from __future__ import annotations

import datetime
import logging
import os
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from funlib.geometry import Roi

from .blocks import BlockGrid
from .errors import TaskDefinitionError

logger = logging.getLogger(__name__)

CheckFunction = Callable[[Any], bool]


def _check_count(task_id: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TaskDefinitionError(
            f"task {task_id!r}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _timeout_seconds(task_id: str, timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise TaskDefinitionError(
            f"task {task_id!r}: timeout must be a positive number of seconds (or a "
            f"timedelta) or None, got {timeout!r}")
    return float(timeout)


def _split_check(task_id: str, check_function: Any) -> tuple[CheckFunction | None,
                                                            CheckFunction | None]:
    """``(pre_check, post_check)`` from a single check function or a pair."""
    if check_function is None:
        return None, None
    if callable(check_function):
        return check_function, None
    if isinstance(check_function, (tuple, list)) and len(check_function) == 2 and all(
            function is None or callable(function) for function in check_function):
        return check_function[0], check_function[1]
    raise TaskDefinitionError(
        f"task {task_id!r}: check_function must be a callable or a (pre_check, "
        f"post_check) pair of callables, got {check_function!r}")


class Task:
    """A blockwise task: a function to run on every block of a tiled total ROI.

    Parameters
    ----------
    task_id:
        Unique name of the task.
    total_roi:
        The region the task may read; blocks tile it (see ``fit``).
    read_roi, write_roi:
        Templates of one block; ``write_roi`` lies inside ``read_roi`` and the
        difference is the block's context.
    process_function:
        Called with each ``Block``. A function taking no argument is a user worker that
        makes its own ``Client`` and loops over blocks.
    check_function:
        ``check(block) -> bool``: True skips a block that is already done. A pair
        ``(pre_check, post_check)`` also checks each processed block: a block whose
        post check returns False is failed.
    init_callback_fn:
        Called once with the run's context when the task starts.
    read_write_conflict:
        Whether blocks whose read and write ROIs overlap must not run concurrently.
    num_workers:
        Number of workers for this task (``max_workers`` is daisy 2's name).
    max_retries:
        How often a failed block is tried again before it fails for good.
    fit:
        ``"valid"``, ``"overhang"`` or ``"shrink"``: what to do with blocks at the border.
    timeout:
        Seconds a block may be processed before its worker is stopped and the block
        retried; ``None`` (the default) means no limit.
    upstream_tasks:
        Tasks this one reads from; a block starts when the upstream blocks whose write
        ROIs meet its read ROI succeeded.
    max_worker_restarts:
        How often a worker that keeps failing is restarted before the task stops
        starting workers.
    ledger:
        Folder of the ledger that remembers finished blocks across runs (the task's
        record in it is the folder ``<task_id>.ledger``, with the id made a safe file name by
        :func:`~luigi_daisy.context.safe_file_name`). Without one (and without
        ``run_blockwise(ledger_dir=...)``) nothing is remembered, as in daisy.
    """

    def __init__(
        self,
        task_id: str,
        total_roi: Roi,
        read_roi: Roi,
        write_roi: Roi,
        process_function: Callable[..., Any] | None,
        check_function: CheckFunction | Sequence[CheckFunction | None] | None = None,
        init_callback_fn: Callable[[Any], Any] | None = None,
        read_write_conflict: bool = True,
        num_workers: int = 1,
        max_retries: int = 2,
        fit: str = "valid",
        timeout: float | datetime.timedelta | None = None,
        upstream_tasks: Iterable[Task] | None = None,
        max_worker_restarts: int = 10,
        max_workers: int | None = None,
        ledger: str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(task_id, str) or not task_id:
            raise TaskDefinitionError(f"task_id must be a non-empty string, got {task_id!r}")
        self.task_id = task_id
        self.grid = BlockGrid(total_roi, read_roi, write_roi, fit, name=f"task {task_id!r}")
        if process_function is not None and not callable(process_function):
            raise TaskDefinitionError(
                f"task {task_id!r}: process_function must be callable, got {process_function!r}")
        self.process_function = process_function
        self.check_function = check_function
        self.pre_check, self.post_check = _split_check(task_id, check_function)
        if init_callback_fn is not None and not callable(init_callback_fn):
            raise TaskDefinitionError(
                f"task {task_id!r}: init_callback_fn must be callable, got {init_callback_fn!r}")
        self.init_callback_fn = init_callback_fn
        self.read_write_conflict = bool(read_write_conflict)
        if max_workers is not None:
            num_workers = max_workers
        self.num_workers = _check_count(task_id, "num_workers", num_workers, 1)
        self.max_retries = _check_count(task_id, "max_retries", max_retries, 0)
        self.max_worker_restarts = _check_count(
            task_id, "max_worker_restarts", max_worker_restarts, 0)
        self.timeout = _timeout_seconds(task_id, timeout)
        upstream = list(upstream_tasks or [])
        for other in upstream:
            if not isinstance(other, Task):
                raise TaskDefinitionError(
                    f"task {task_id!r}: upstream_tasks must hold Task objects, got {other!r}")
        self.upstream_tasks = upstream
        self.ledger = ledger

    def is_done_already(self, block) -> bool:
        """Whether the pre check says ``block`` is done (no check: False).

        A check that raises counts as "not done", so the block is processed; the error
        is logged.
        """
        if self.pre_check is None:
            return False
        try:
            return bool(self.pre_check(block))
        except Exception:
            logger.exception("check function of task %r raised on block %s; processing it",
                             self.task_id, block.block_id[1])
            return False

    def post_check_failure(self, block) -> str | None:
        """Run the post check on a processed block: None if it passed (or there is none),
        else the reason the block failed (with the traceback if the check raised)."""
        if self.post_check is None:
            return None
        try:
            passed = self.post_check(block)
        except Exception:  # noqa: BLE001 - user code may raise anything
            return f"post check raised:\n{traceback.format_exc()}"
        return None if passed else "post check returned False"

    @property
    def total_roi(self) -> Roi:
        """The region the task may read."""
        return self.grid.total_roi

    @property
    def read_roi(self) -> Roi:
        """Read ROI template of one block."""
        return self.grid.read_template

    @property
    def write_roi(self) -> Roi:
        """Write ROI template of one block."""
        return self.grid.write_template

    @property
    def fit(self) -> str:
        """How border blocks are handled."""
        return self.grid.fit

    @property
    def max_workers(self) -> int:
        """daisy 2's name for ``num_workers``."""
        return self.num_workers

    @property
    def num_blocks(self) -> int:
        """Number of blocks of the task."""
        return self.grid.num_blocks

    def __repr__(self) -> str:
        return (f"Task({self.task_id!r}, total_roi={self.total_roi}, read_roi={self.read_roi}, "
                f"write_roi={self.write_roi}, fit={self.fit!r}, blocks={self.num_blocks})")


def collect_tasks(tasks: Task | Iterable[Task]) -> list[Task]:
    """The given tasks plus every upstream task, upstream first, each once.

    Raises ``TaskDefinitionError`` on a dependency cycle or two different tasks with
    the same id.
    """
    if isinstance(tasks, Task):
        tasks = [tasks]
    ordered: list[Task] = []
    by_id: dict[str, Task] = {}
    visiting: set[int] = set()

    def visit(task: Task) -> None:
        if not isinstance(task, Task):
            raise TaskDefinitionError(f"expected a Task, got {task!r}")
        known = by_id.get(task.task_id)
        if known is task:
            return
        if known is not None:
            raise TaskDefinitionError(
                f"two different tasks share the task_id {task.task_id!r}; give each its own")
        if id(task) in visiting:
            raise TaskDefinitionError(
                f"task {task.task_id!r} depends on itself through upstream_tasks")
        visiting.add(id(task))
        for upstream in task.upstream_tasks:
            visit(upstream)
        visiting.discard(id(task))
        by_id[task.task_id] = task
        ordered.append(task)

    for task in tasks:
        visit(task)
    return ordered
