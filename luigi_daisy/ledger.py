"""The ledger: a durable record of the finished blocks of one task (an SQLite file).

Only the block server writes it, in batches of one transaction each. It remembers the
task's geometry and refuses to resume a task whose geometry changed. ``complete()`` is a
single query. The file for task ``T`` in folder ``D`` is ``D/T.ledger.sqlite``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .context import safe_file_name
from .errors import LedgerError

if TYPE_CHECKING:
    import numpy as np

#: 3: written since block ids are daisy's numbers. Format 2 ledgers hold the same dense
#: indices, but were written by versions that showed users other block ids, so they are
#: refused rather than mixed with the new numbering.
FORMAT_VERSION = 3
#: what the ``block`` column holds, recorded in every ledger
BLOCK_KEY = "row-major index in the overhang grid of the task's write ROIs"
SUFFIX = ".ledger.sqlite"
#: how to get past a ledger that cannot be used
AFRESH = ("delete the file, or start afresh (run_blockwise(..., fresh=True)) to process "
          "every block of the task again")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS done (seq INTEGER PRIMARY KEY, block INTEGER NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS failed (block INTEGER PRIMARY KEY, error TEXT) WITHOUT ROWID;
"""




def _check_format(path: Path, found: str | None) -> None:
    """Refuse a ledger of another format, saying what it is and how to get past it."""
    if found == str(FORMAT_VERSION):
        return
    if found is not None and found.isdigit() and int(found) < FORMAT_VERSION:
        raise LedgerError(
            f"ledger {path} has format {found}, written by a luigi_daisy that numbered "
            f"blocks before block ids followed daisy's (Cantor) numbering; this version "
            f"reads format {FORMAT_VERSION} only and will not guess which blocks it "
            f"records. To process the task again, {AFRESH}")
    raise LedgerError(
        f"ledger {path} has format {found!r}, this version reads {FORMAT_VERSION}; "
        f"{AFRESH}")


def ledger_path(folder: str | os.PathLike, task_id: str) -> Path:
    """The ledger file of ``task_id`` inside ``folder``."""
    return Path(folder) / f"{safe_file_name(task_id)}{SUFFIX}"


class Ledger:
    """Finished blocks of one task, stored in SQLite.

    Parameters
    ----------
    path:
        The ledger file; created when missing.
    task_id:
        The task the ledger belongs to; a file of another task is refused.
    geometry:
        Plain-data description of the task's blocks (total, read and write ROI, fit,
        number of blocks). A ledger written for another geometry is refused.
    fresh:
        Forget what the file holds and start afresh.
    read_only:
        Only read the file, which another process writes (to follow its progress).
    """

    def __init__(self, path: str | os.PathLike, task_id: str, geometry: dict,
                 fresh: bool = False, read_only: bool = False) -> None:
        self.path = Path(path)
        self.task_id = task_id
        self.geometry = geometry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()
        self._pending_done: list[int] = []
        self._pending_failed: dict[int, str | None] = {}
        self._connection = None
        self.read_only = read_only
        try:
            if read_only:
                self._connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                                   isolation_level=None,
                                                   check_same_thread=False)
            else:
                self._connection = sqlite3.connect(self.path, isolation_level=None,
                                                   check_same_thread=False)
                self._connection.execute("PRAGMA journal_mode=WAL")
                self._connection.execute("PRAGMA synchronous=NORMAL")
                self._connection.executescript(_SCHEMA)
                self._check_integrity()
            self._check_or_write_meta()
        except sqlite3.DatabaseError as error:
            self._close_connection()
            raise LedgerError(
                f"ledger {self.path} of task {task_id!r} is not a usable SQLite file "
                f"({error}); {AFRESH}") from None
        except LedgerError:
            self._close_connection()
            raise

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _check_or_write_meta(self) -> None:
        expected = {"format": str(FORMAT_VERSION), "task_id": self.task_id,
                    "geometry": json.dumps(self.geometry, sort_keys=True),
                    "block_key": BLOCK_KEY}
        if not self.read_only:
            # OR IGNORE: another process may be creating the same ledger right now
            with self._transaction():
                self._connection.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)",
                                             expected.items())
        meta = dict(self._connection.execute("SELECT key, value FROM meta"))
        if meta.get("task_id") != self.task_id:
            raise LedgerError(
                f"ledger {self.path} belongs to task {meta.get('task_id')!r}, not "
                f"{self.task_id!r}; use another ledger folder or delete the file")
        _check_format(self.path, meta.get("format"))
        if meta.get("geometry") != expected["geometry"]:
            raise LedgerError(
                f"ledger {self.path} of task {self.task_id!r} was written for geometry "
                f"{meta.get('geometry')}, but the task now has {expected['geometry']}; "
                f"its finished blocks do not match the new blocks. Restore the old "
                f"geometry, or {AFRESH}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._guarded():
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        """Turn SQLite's errors into a ``LedgerError`` that names the file."""
        try:
            yield
        except sqlite3.DatabaseError as error:
            raise LedgerError(
                f"ledger {self.path} of task {self.task_id!r} cannot be read or written "
                f"({error}); if it is damaged, {AFRESH}") from None

    def _check_integrity(self) -> None:
        """Refuse a damaged file: SQLite keeps no checksums, but a damaged page breaks
        the consistency between the table and its index, which this check finds."""
        problems = [row[0] for row in self._connection.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise LedgerError(
                f"ledger {self.path} of task {self.task_id!r} is damaged "
                f"({'; '.join(problems[:3])}); {AFRESH}")

    # ------------------------------------------------------------------ reading
    def done_count(self) -> int:
        """How many blocks are recorded as done (one query)."""
        with self._guarded():
            return self._connection.execute("SELECT COUNT(*) FROM done").fetchone()[0]

    def failed_count(self) -> int:
        """How many blocks failed for good in the last run that recorded them."""
        with self._guarded():
            return self._connection.execute("SELECT COUNT(*) FROM failed").fetchone()[0]

    def done_indices(self) -> np.ndarray:
        """Indices of the done blocks, sorted (streamed: no Python object per row)."""
        import numpy as np  # here: a run without a ledger starts without numpy

        with self._guarded():
            cursor = self._connection.execute("SELECT block FROM done ORDER BY block")
            try:
                indices = np.fromiter((row[0] for row in cursor), dtype=np.int64)
            except (TypeError, ValueError, OverflowError):
                indices = None
        if indices is None or (indices.size and indices[0] < 0):
            raise LedgerError(
                f"ledger {self.path} of task {self.task_id!r} holds a block index that is "
                f"not a non-negative integer; it is damaged: {AFRESH}")
        return indices

    def done_since(self, seq: int) -> tuple[int, list[int]]:
        """Blocks recorded after record number ``seq``, and the newest record number.

        Lets another run follow this task's progress without re-reading the ledger.
        """
        with self._guarded():
            rows = self._connection.execute(
                "SELECT seq, block FROM done WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
        if not rows:
            return seq, []
        return rows[-1][0], [block for _, block in rows]

    def is_complete(self, total_blocks: int) -> bool:
        """Whether every one of ``total_blocks`` blocks is done (one query)."""
        return self.done_count() >= total_blocks

    # ------------------------------------------------------------------ writing
    def record_done(self, index: int) -> None:
        """Remember a finished block; written at the next :meth:`flush`."""
        self._pending_done.append(index)

    def record_failed(self, index: int, error: str | None) -> None:
        """Remember a block that failed for good; written at the next :meth:`flush`."""
        self._pending_failed[index] = error

    @property
    def pending(self) -> int:
        """Records not yet written."""
        return len(self._pending_done) + len(self._pending_failed)

    def flush(self) -> int:
        """Write the pending records in one transaction; return how many."""
        done, failed = self._pending_done, self._pending_failed
        if not done and not failed:
            return 0
        if self.read_only:
            raise LedgerError(f"ledger {self.path} was opened read-only; it cannot record")
        with self._transaction():
            self._connection.executemany(
                "INSERT OR IGNORE INTO done (block) VALUES (?)", ((index,) for index in done))
            if done:
                self._connection.executemany(
                    "DELETE FROM failed WHERE block = ?", ((index,) for index in done))
            self._connection.executemany(
                "INSERT OR REPLACE INTO failed VALUES (?, ?)", failed.items())
        # only once committed: a failed transaction keeps them for the next flush
        self._pending_done, self._pending_failed = [], {}
        return len(done) + len(failed)

    def forget_failures(self, indices: Iterable[int] | None = None) -> None:
        """Drop failure records (all of them when ``indices`` is None)."""
        with self._transaction():
            if indices is None:
                self._connection.execute("DELETE FROM failed")
            else:
                self._connection.executemany(
                    "DELETE FROM failed WHERE block = ?", ((index,) for index in indices))

    def close(self) -> None:
        """Flush and close the file.

        The writer leaves the file in rollback-journal mode: SQLite removes a WAL's
        ``-wal`` and ``-shm`` files only when a writing connection closes last, so
        read-only connections (``complete()``, followers, ``luigi-daisy status``) would
        otherwise leave them beside every ledger.
        """
        if self._connection is None:
            return
        try:
            self.flush()
            if not self.read_only:
                try:
                    self._connection.execute("PRAGMA journal_mode=DELETE")
                except sqlite3.OperationalError:
                    pass  # a reader still has it open; the next writer's close retries
        finally:
            self._close_connection()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_ledger_summary(path: str | os.PathLike) -> dict:
    """Task id, geometry and counts of a ledger file, without knowing its task.

    One read-only query, so ``BlockwiseTask.complete()`` can afford it.
    """
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"no ledger file at {path}")
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            done, failed, task_id, geometry, found_format = connection.execute(
                "SELECT (SELECT COUNT(*) FROM done), (SELECT COUNT(*) FROM failed), "
                "(SELECT value FROM meta WHERE key = 'task_id'), "
                "(SELECT value FROM meta WHERE key = 'geometry'), "
                "(SELECT value FROM meta WHERE key = 'format')").fetchone()
        finally:
            connection.close()
    except sqlite3.DatabaseError as error:
        raise LedgerError(f"ledger {path} is not a usable SQLite file ({error})") from None
    if task_id is None or geometry is None:
        raise LedgerError(f"ledger {path} has no task id or geometry recorded")
    _check_format(path, found_format)
    geometry = json.loads(geometry)
    return {"path": str(path), "task_id": task_id, "geometry": geometry,
            "done": done, "failed": failed, "total": geometry.get("num_blocks")}


class LedgerSet:
    """The ledgers of the tasks of one run, flushed together at least every second.

    Parameters
    ----------
    ledgers:
        ``task_id -> Ledger`` for the tasks that keep one.
    flush_interval:
        Longest time, in seconds, a finished block waits before it is written.
    max_pending:
        Write as soon as this many records wait, whatever the time.
    """

    def __init__(self, ledgers: dict[str, Ledger], flush_interval: float = 1.0,
                 max_pending: int = 50_000) -> None:
        self.ledgers = ledgers
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self._last_flush: float | None = None

    @classmethod
    def open(cls, tasks, default_folder: str | os.PathLike | None = None,
             fresh: bool = False) -> LedgerSet:
        """Open (or create) the ledger of every task that has a ledger folder."""
        opened = cls({})
        try:
            for task in tasks:
                folder = task.ledger if task.ledger is not None else default_folder
                if folder is not None:
                    opened.ledgers[task.task_id] = Ledger(
                        ledger_path(folder, task.task_id), task.task_id, task.grid.describe(),
                        fresh=fresh)
        except BaseException:
            opened.close()
            raise
        return opened

    def done_blocks(self) -> dict[str, np.ndarray]:
        """Per task, the blocks recorded as done."""
        return {task_id: ledger.done_indices() for task_id, ledger in self.ledgers.items()}

    def record_done(self, task_id: str, index: int) -> None:
        """Remember a finished block of ``task_id`` (if that task keeps a ledger)."""
        ledger = self.ledgers.get(task_id)
        if ledger is not None:
            ledger.record_done(index)
            if ledger.pending >= self.max_pending:
                ledger.flush()

    def record_failed(self, task_id: str, index: int, error: str | None) -> None:
        """Remember a block of ``task_id`` that failed for good."""
        ledger = self.ledgers.get(task_id)
        if ledger is not None:
            ledger.record_failed(index, error)

    def flush_if_due(self, now: float) -> int:
        """Write pending records when the flush interval has passed since the last write."""
        if self._last_flush is not None and now - self._last_flush < self.flush_interval:
            return 0
        self._last_flush = now
        return self.flush()

    def flush(self) -> int:
        """Write every pending record, one transaction per ledger."""
        return sum(ledger.flush() for ledger in self.ledgers.values())

    def close(self) -> None:
        """Flush and close every ledger (all of them, even if one fails)."""
        errors = []
        for ledger in self.ledgers.values():
            try:
                ledger.close()
            except LedgerError as error:
                errors.append(error)
        if errors:
            raise errors[0]
