"""Pipelined runs of chained blockwise tasks inside a Luigi DAG.

A blockwise task's ``run()`` runs its *pipelined closure*: itself plus every incomplete
blockwise task upstream of it, in one scheduler with block-level dependencies. Each task
of the closure is claimed with an exclusive OS file lock next to its ledger; a task
claimed by another live run (another Luigi worker process, another ``luigi`` command) is
followed through its ledger instead, and taken over when that run's lock frees.
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
