"""Pipelined runs of chained blockwise tasks inside a Luigi DAG.

Luigi's DAG is the one ``requires()`` gives, so Luigi starts a blockwise task once its
upstream tasks are complete, and every task shows in luigid's graph and in Luigi's
execution summary. Its ``run()`` runs its *pipelined closure* in one scheduler with
block-level dependencies: itself, plus the blockwise tasks that Luigi scheduled after it
on this worker (asked from Luigi's scheduler, :func:`scheduled_dependents`) and that read
it through blockwise edges only. Their blocks start as soon as the blocks they read are
written; Luigi runs those tasks afterwards, as no-ops, or to report the failure their
blocks met (:class:`RunOutcome`).

Each task of the closure is claimed with an exclusive OS file lock next to its ledger; a
task claimed by another live run (another Luigi worker process, another ``luigi``
command) is followed through its ledger instead, and taken over when that run's lock
frees.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from ..errors import LedgerError
from ..ledger import Ledger

logger = logging.getLogger(__name__)


class TaskLock:
    """An exclusive, non-blocking ``flock`` on a file; the OS frees it when we die."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._descriptor: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._descriptor is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; never waits."""
        if self._descriptor is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            return False
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        self._descriptor = descriptor
        return True

    def release(self) -> None:
        """Let the lock go."""
        if self._descriptor is not None:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None


class LedgerFollower:
    """Follows a task that another run processes, through that run's ledger.

    Parameters
    ----------
    task_id, ledger_file, geometry:
        The followed task and its ledger.
    lock:
        The task's lock; taking it means the other run is gone.
    """

    def __init__(self, task_id: str, ledger_file: Path, geometry: dict, lock: TaskLock) -> None:
        self.task_id = task_id
        self.ledger_file = ledger_file
        self.geometry = geometry
        self.lock = lock
        self._seq = 0
        self._reader: Ledger | None = None

    def _ledger(self) -> Ledger | None:
        if self._reader is None and self.ledger_file.exists():
            try:
                self._reader = Ledger(self.ledger_file, self.task_id, self.geometry,
                                      read_only=True)
            except LedgerError:
                return None  # not created completely yet: look again next time
        return self._reader

    def initial_done(self) -> list[int]:
        """Blocks the other run has finished so far."""
        return self.new_done()

    def new_done(self) -> list[int]:
        """Blocks the other run finished since the last call."""
        ledger = self._ledger()
        if ledger is None:
            return []
        self._seq, blocks = ledger.done_since(self._seq)
        return blocks

    def try_claim(self) -> Ledger | None:
        """Take the task over when its lock is free; return the ledger to write then."""
        if not self.lock.try_acquire():
            return None
        self.close()
        ledger = Ledger(self.ledger_file, self.task_id, self.geometry)
        self._reader = ledger
        return ledger

    def close(self) -> None:
        """Let go of the read-only view of the other run's ledger."""
        if self._reader is not None and self._reader.read_only:
            self._reader.close()
        self._reader = None


# --------------------------------------------------------------------------- Luigi's side
def luigi_scheduler_of(task) -> tuple[object | None, str | None]:
    """The Luigi scheduler connection running ``task`` and the Luigi worker's id.

    Luigi hands a running task its status hooks (``set_status_message``, ...), bound to
    a reporter that holds both; outside a Luigi run there is neither.
    """
    reporter = getattr(getattr(task, "set_status_message", None), "__self__", None)
    return getattr(reporter, "_scheduler", None), getattr(reporter, "_worker_id", None)


def scheduled_dependents(scheduler, worker_id: str | None, task_id: str) -> list:
    """Tasks that depend on ``task_id`` (directly or not) and that Luigi will run later
    on this worker: PENDING in Luigi's scheduler with this worker able to run them.

    They are rebuilt from their family and parameters (the tasks of this process's
    Luigi DAG; a family not imported here is skipped).
    """
    import luigi.task_register

    if scheduler is None or worker_id is None:
        return []
    try:
        graph = scheduler.inverse_dep_graph(task_id=task_id, include_done=False)
    except Exception:  # noqa: BLE001 - no pipelining beats a failed run
        logger.exception("could not ask the Luigi scheduler for the tasks after %s", task_id)
        return []
    dependents = []
    for dependent_id, node in (graph or {}).items():
        if dependent_id == task_id or node.get("status") != "PENDING":
            continue
        if worker_id not in (node.get("workers") or ()):
            continue
        try:
            family = luigi.task_register.Register.get_task_cls(node["name"])
            dependent = family.from_str_params(node.get("params") or {})
        except Exception:  # noqa: BLE001 - not a task this process can rebuild
            continue
        if dependent.task_id == dependent_id:
            dependents.append(dependent)
    return dependents


class RunOutcome:
    """How a blockwise task ended in the pipelined run of another task.

    Luigi runs a task whose blocks were processed in an upstream task's pipelined run
    later (its upstream task must be DONE first). If they failed there, that later
    ``run()`` reports the same failure instead of processing the failed blocks again
    within the same ``luigi`` command (one message, not one per attempt). The record
    is a small JSON file beside the task's ledger, keyed by the Luigi worker id.
    """

    def __init__(self, ledger_file: Path) -> None:
        self.path = Path(f"{ledger_file}.outcome.json")

    def write(self, worker_id: str | None, succeeded: bool, message: str) -> None:
        """Record the outcome (atomically: written beside and renamed)."""
        import json

        partial = self.path.with_name(f"{self.path.name}.{os.getpid()}")
        partial.write_text(json.dumps({"luigi_worker": worker_id, "succeeded": succeeded,
                                       "message": message}))
        os.replace(partial, self.path)

    def failure_for(self, worker_id: str | None) -> str | None:
        """The failure message recorded by this Luigi worker, if there is one."""
        import json

        if worker_id is None or not self.path.exists():
            return None
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if record.get("luigi_worker") != worker_id or record.get("succeeded"):
            return None
        return record.get("message")

    def clear(self) -> None:
        """Forget the outcome (a new run of the task starts)."""
        self.path.unlink(missing_ok=True)
