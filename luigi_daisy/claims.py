"""Claims on tasks: which run processes a task, and how another run follows it.

A run claims each task it processes with an exclusive OS file lock beside the task's
ledger (``<ledger file>.lock``); the OS frees it when the holder dies, however it dies.
A task claimed by another live run is *followed*: its finished blocks are read from
that run's ledger as they appear, and release the blocks here that wait for them. When
the holder is gone the lock is free, and the follower takes the task over and resumes it
from the ledger. ``run_blockwise`` and ``BlockwiseTask.run()`` take the same locks, so any
mix of scripts and ``luigi`` commands processes each block of a task once.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import (
    LedgerError,
    LedgerStorageError,
)
from .ledger import DoneView, Ledger, folder_problem, ledger_path, legacy_path
from .safe_files import check_folder, open_own

logger = logging.getLogger(__name__)


def lock_path(ledger_file: str | os.PathLike) -> Path:
    """The lock file of the task whose ledger is ``ledger_file``."""
    return Path(f"{ledger_file}.lock")


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
        try:
            check_folder(self.path.parent, "ledger folder")
            descriptor = open_own(self.path, os.O_RDWR | os.O_CREAT, "task lock")
        except OSError as error:
            raise self._error(error) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            return False
        try:  # who holds it, for people; a full disk must not stop the claim
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
        except OSError:
            pass
        self._descriptor = descriptor
        return True

    def _error(self, error: OSError) -> LedgerError:
        """What an ``OSError`` creating the lock file means, as a ``LedgerError`` that
        names the folder at fault and says what to change."""
        problem = folder_problem(self.path, error, "task lock")
        if problem is not None:
            return problem
        return LedgerStorageError(f"cannot create the task lock {self.path}: {error}")

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
        self._view: DoneView | None = None
        self._reader: Ledger | None = None

    def _ledger(self) -> Ledger | None:
        if self._reader is None and (self.ledger_file.exists()
                                     or legacy_path(self.ledger_file).exists()):
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
        self._view, blocks = ledger.done_since(self._view)
        return blocks.tolist()

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


class Claims:
    """The locks a run holds on its tasks, and followers of the tasks another live run
    holds.

    Attributes
    ----------
    locks:
        ``task_id -> TaskLock`` of every task with a ledger, held or not.
    followed:
        ``task_id -> LedgerFollower`` for the tasks another run holds.
    """

    def __init__(self) -> None:
        self.locks: dict[str, TaskLock] = {}
        self.followed: dict[str, LedgerFollower] = {}

    def claim(self, task_id: str, ledger_file: Path, geometry: dict) -> bool:
        """Take the lock beside ``ledger_file``; True when this run holds the task now,
        False when another live run does (the task is followed from then on)."""
        lock = TaskLock(lock_path(ledger_file))
        self.locks[task_id] = lock
        if lock.try_acquire():
            return True
        self.followed[task_id] = LedgerFollower(task_id, ledger_file, geometry, lock)
        return False

    @classmethod
    def take(cls, tasks: Iterable, default_folder: str | os.PathLike | None) -> Claims:
        """Claim every task of ``tasks`` that keeps a ledger (``task.ledger``, else
        ``default_folder``); follow those another live run holds. A task without a
        ledger has nothing to coordinate through and is not claimed."""
        claims = cls()
        try:
            for task in tasks:
                folder = task.ledger if task.ledger is not None else default_folder
                if folder is None:
                    continue
                ledger_file = ledger_path(folder, task.task_id)
                if not claims.claim(task.task_id, ledger_file, task.grid.describe()):
                    logger.warning("task %r is being run by another process (its lock %s "
                                   "is held); following it", task.task_id,
                                   claims.locks[task.task_id].path)
        except BaseException:
            claims.release()
            raise
        return claims

    def release(self) -> None:
        """Close the followers' views and let every lock go."""
        for follower in self.followed.values():
            follower.close()
        for lock in self.locks.values():
            lock.release()
