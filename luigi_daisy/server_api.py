"""daisy's ``Server`` and ``SerialServer``: objects whose ``run_blockwise(tasks)`` runs
tasks, with worker processes or in the calling process.

Both are thin fronts of :func:`luigi_daisy.run.run_blockwise`, so a script written for
daisy 1.x (``daisy.Server().run_blockwise([task])``) gets the same run, ledgers, summary
and :class:`~luigi_daisy.summary.RunResult` as ``run_blockwise`` gives.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import SchedulerError
from .summary import RunResult
from .task import Task


def _refuse_scheduler(owner: str, scheduler: Any) -> None:
    if scheduler is not None:
        raise SchedulerError(
            f"{owner}.run_blockwise builds its own scheduler from the tasks; got "
            f"scheduler={scheduler!r}. Pass only the tasks (their upstream tasks are "
            f"pulled in)")


class Server:
    """Runs tasks with ``num_workers`` worker processes per task (daisy's ``Server``).

    Parameters
    ----------
    stop_event:
        An event (``threading.Event``, ``multiprocessing.Event``) that, once set, ends a
        run started by :meth:`run_blockwise` with its blocks as they are.
    host:
        Interface the block server listens on (default ``127.0.0.1``).
    """

    def __init__(self, stop_event: Any = None, host: str | None = None) -> None:
        self.stop_event = stop_event
        self.host = host or "127.0.0.1"

    def run_blockwise(self, tasks: Task | Iterable[Task], scheduler: Any = None,
                      **options: Any) -> RunResult:
        """Run ``tasks`` (and their upstream tasks) to completion; ``options`` are those
        of :func:`luigi_daisy.run_blockwise` (``progress``, ``log_dir``, ``ledger_dir``,
        ``fresh``)."""
        _refuse_scheduler("Server", scheduler)
        from .run import run_blockwise
        return run_blockwise(tasks, multiprocessing=True, host=self.host,
                             stop_event=self.stop_event, **options)


class SerialServer:
    """Runs every block in the calling process, one after the other (daisy's
    ``SerialServer``). An exception in a process function fails that block, as with
    workers."""

    def run_blockwise(self, tasks: Task | Iterable[Task], scheduler: Any = None,
                      **options: Any) -> RunResult:
        """Run ``tasks`` (and their upstream tasks) in this process; ``options`` are those
        of :func:`luigi_daisy.run_blockwise` (``progress``, ``ledger_dir``, ``fresh``)."""
        _refuse_scheduler("SerialServer", scheduler)
        from .run import run_blockwise
        return run_blockwise(tasks, multiprocessing=False, **options)


__all__ = ["SerialServer", "Server"]
