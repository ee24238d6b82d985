"""The ledger: a durable record of the finished blocks of one task (an SQLite file).

Only the block server writes it, in batches of one transaction each, from a writer
thread of its own (:class:`LedgerSet`), so that a slow or full file system never stalls
the hand-out of blocks. It remembers the task's geometry and refuses to resume a task
whose geometry changed. ``complete()`` is a single query. The file for task ``T`` in
folder ``D`` is ``D/T.ledger.sqlite``, or ``D/<prefix>@<hash>.ledger.sqlite`` when ``T`` is
not a plain file name (:func:`~luigi_daisy.context.safe_file_name`).

When the file system fails the writes (full, read-only, an I/O error) the records wait in
memory and the writes are retried; each kind of failure has its own error class
(:mod:`luigi_daisy.errors`) and message, and only a damaged file is met with the advice to
delete it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .context import safe_file_name
from .errors import (
    LedgerDamagedError,
    LedgerDiskFullError,
    LedgerError,
    LedgerReadOnlyError,
    LedgerStorageError,
)
from .safe_files import check_folder, open_own, refuse_links

logger = logging.getLogger(__name__)

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

#: seconds a run keeps serving while its ledger writes fail (full disk, read-only
#: folder, I/O errors) before it stops; the finished blocks wait in memory meanwhile
STORAGE_PATIENCE = 600.0
#: seconds the end of a run keeps retrying the last writes of a failing file system
FINAL_PATIENCE = 60.0

# SQLite's primary result codes (the low byte of an extended code)
_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_CORRUPT, _SQLITE_FULL = 3, 8, 11, 13
_SQLITE_CANTOPEN, _SQLITE_NOTADB = 14, 26


#: where a task's ledger folder is chosen, for messages that ask for another
ELSEWHERE = ("give the task another ledger folder (run_blockwise(ledger_dir=...), "
             "Task(ledger=...), ledger_dir in [luigi_daisy])")


def _exists(path: Path) -> bool:
    """``path.exists()``, False where the path cannot even be looked at."""
    try:
        return path.exists()
    except OSError:
        return False


def _user() -> str:
    """This process's user, for messages: ``name (uid N)``."""
    uid = os.geteuid()
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _owner_and_mode(path: Path) -> str:
    """``owner uid N, mode 755`` of ``path``, for messages."""
    try:
        status = path.stat()
    except OSError:
        return "owner and mode unknown"
    return f"owner uid {status.st_uid}, mode {status.st_mode & 0o7777:o}"


def folder_problem(path: Path, error: BaseException | None = None, kind: str = "ledger",
                   task_id: str | None = None) -> LedgerError | None:
    """What keeps ``path`` (a ledger, its lock) from being created or written, as a
    ``LedgerError`` that names the folder at fault and says what to change; None when
    nothing is wrong with the folder as far as can be seen.

    Looks at the nearest folder of ``path`` that exists: a file where a folder should
    be, a read-only file system, a folder this user may not write in, a file this user
    may not write, a full file system, a path too long.
    """
    folder = path.parent
    existing = folder
    while not _exists(existing) and existing != existing.parent:
        existing = existing.parent
    code = getattr(error, "errno", None)
    reason = f" ({error.strerror or error})" if isinstance(error, OSError) else (
        f" ({error})" if error is not None else "")
    what = f"the {kind} {path}" + (f" of task {task_id!r}" if task_id is not None else "")
    create = (f"{what} cannot be created" if existing == folder
              else f"the ledger folder {folder} cannot be created for {what}")
    if existing.exists() and not existing.is_dir():
        return LedgerStorageError(
            f"{create}: {existing} is a file, not a folder{reason}. Move that file away, "
            f"or {ELSEWHERE}")
    if code == errno.ENAMETOOLONG:
        return LedgerStorageError(
            f"{create}: the path is too long for the file system{reason}; {ELSEWHERE} "
            f"with a shorter path")
    try:
        read_only_mount = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only_mount = False
    if code == errno.EROFS or read_only_mount:
        return LedgerReadOnlyError(
            f"{create}: {existing} is on a read-only file system{reason}. Mount it "
            f"writable, or {ELSEWHERE}")
    if not os.access(existing, os.W_OK | os.X_OK):
        return LedgerReadOnlyError(
            f"{create}: this user, {_user()}, may not create files in the folder "
            f"{existing} ({_owner_and_mode(existing)}){reason}. Give this user write "
            f"permission there (chmod u+w, or ask its owner: chmod g+w or o+w), or "
            f"{ELSEWHERE}")
    if existing == folder and _exists(path) and not os.access(path, os.W_OK):
        return LedgerReadOnlyError(
            f"{what} cannot be written: this user, {_user()}, may not write "
            f"the file ({_owner_and_mode(path)}){reason}. Give this user write permission "
            f"on it (chmod u+w, or ask its owner), or {ELSEWHERE}")
    if code in (errno.ENOSPC, errno.EDQUOT) or _full_place(existing):
        return LedgerDiskFullError(
            f"{create}: the file system holding {existing} is full{reason}. Free space "
            f"there, or {ELSEWHERE} on another file system")
    if code in (errno.EACCES, errno.EPERM):
        return LedgerReadOnlyError(
            f"{create}: permission denied in {existing} ({_owner_and_mode(existing)})"
            f"{reason}. Check who may write there (a security policy, an ACL), or "
            f"{ELSEWHERE}")
    return None


def _full_place(folder: Path) -> bool:
    """Whether the file system holding ``folder`` has no space left for us."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail == 0 or stats.f_favail == 0


def storage_error(path: Path, task_id: str, error: sqlite3.Error,
                  action: str = "read or written") -> LedgerError:
    """The ``LedgerError`` that says what an SQLite error on ledger ``path`` means.

    A damaged file (:class:`~luigi_daisy.errors.LedgerDamagedError`, the only one whose
    message advises deleting the file, and only for a file that exists), a full file
    system (:class:`~luigi_daisy.errors.LedgerDiskFullError`), a folder or file that
    cannot be written (:class:`~luigi_daisy.errors.LedgerReadOnlyError`: a read-only
    mount or permissions), or another error of the file system
    (:class:`~luigi_daisy.errors.LedgerStorageError`).
    """
    code = getattr(error, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    where = f"ledger {path} of task {task_id!r}"
    exists = _exists(path)
    keep = ("the ledger is not damaged: keep it (the blocks it records are skipped when "
            "the task runs again)" if exists else "nothing was recorded yet")
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB) and exists:
        return LedgerDamagedError(f"{where} is damaged ({error}); {AFRESH}")
    problem = folder_problem(path, error, "ledger", task_id)
    if problem is not None:
        return type(problem)(f"{problem}; {keep}")
    if primary in (_SQLITE_READONLY, _SQLITE_PERM):
        return LedgerReadOnlyError(
            f"{where} cannot be {action}: it is read-only ({error}). Make it and its "
            f"folder {path.parent} writable, or {ELSEWHERE}; {keep}")
    if primary == _SQLITE_FULL:
        return LedgerDiskFullError(
            f"{where} cannot be {action}: the file system holding {path.parent} is full "
            f"({error}). Free space there, or {ELSEWHERE} on another file system; {keep}")
    if primary == _SQLITE_CANTOPEN:
        return LedgerStorageError(
            f"{where} cannot be opened ({error}); check that its folder {path.parent} "
            f"exists and can be written, or {ELSEWHERE}; {keep}")
    return LedgerStorageError(
        f"{where} cannot be {action} ({error}): the file system holding {path.parent} "
        f"reported an error. Check that file system (a network mount, a disk); the error "
        f"does not say that the ledger is damaged: keep it")


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


def _check_place(path: Path) -> None:
    """Refuse a ledger folder others can write (unless sticky), and a ledger, or a file
    SQLite keeps beside it, that is a symbolic link or another user's (SQLite would
    write through it)."""
    check_folder(path.parent, "ledger folder")
    refuse_links(path, "ledger", ("-wal", "-shm", "-journal"))


def _create(path: Path) -> None:
    """Create a missing ledger file without following a link (an empty file is a new
    SQLite database); a failure is left for SQLite to report."""
    try:
        os.close(open_own(path, os.O_WRONLY | os.O_CREAT, "ledger"))
    except OSError:
        pass


def ledger_path(folder: str | os.PathLike, task_id: str) -> Path:
    """The ledger file of ``task_id`` inside ``folder`` (its name from
    :func:`~luigi_daisy.context.safe_file_name`)."""
    return Path(folder) / f"{safe_file_name(task_id)}{SUFFIX}"


def old_ledger_path(folder: str | os.PathLike, task_id: str) -> Path | None:
    """Where versions before hashed file names kept the ledger of ``task_id``, when that
    is not :func:`ledger_path` (only ids that are not plain file names moved)."""
    name = re.sub(r"[^A-Za-z0-9_.=+-]", "_", task_id)
    path = Path(folder) / f"{'_' + name if name.startswith('.') else name}{SUFFIX}"
    return None if path == ledger_path(folder, task_id) else path


def _of_another_task(path: Path, task_id: str, owner: str | None) -> str:
    """The message for ledger ``path`` of task ``task_id`` that records ``owner``."""
    if owner is None:
        return (f"ledger {path} of task {task_id!r} records no task id: it was not "
                f"written by luigi_daisy, or is damaged; {AFRESH}")
    owners_path = ledger_path(path.parent, owner)
    move = (f"move it to {owners_path}, where this version keeps the ledger of "
            f"{owner!r}, " if owners_path != path else "")
    return (f"ledger {path} belongs to task {owner!r}, not {task_id!r}: it records the "
            f"finished blocks of {owner!r} (versions before hashed file names gave ids "
            f"like 'a/b' and 'a_b' the same file; or it was copied here). Keep it while "
            f"task {owner!r} needs it: {move}or {ELSEWHERE} for {task_id!r}")


def _refuse_old_name(folder: str | os.PathLike, task_id: str) -> None:
    """Refuse to start ``task_id`` afresh beside the ledger an older version kept for it
    under another name (a run in progress before an upgrade): say how to resume it."""
    old = old_ledger_path(folder, task_id)
    new = ledger_path(folder, task_id)
    try:
        if old is None or new.exists() or not old.is_file():
            return
    except OSError:
        return  # a name too long for the file system: no file has it
    try:
        summary = read_ledger_summary(old)
    except LedgerError:
        return  # another task's, or not a ledger: not this task's record
    if summary["task_id"] != task_id:
        return
    raise LedgerError(
        f"task {task_id!r} has a ledger under its old name {old}, recording "
        f"{summary['done']:,} finished blocks: its file name now carries a hash of the "
        f"id ({new.name}), so that no two task ids share a file. To resume from it, move "
        f"it (and nothing else) to {new}; to process every block again, start afresh "
        f"(run_blockwise(..., fresh=True)) or delete it")


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
        try:
            if read_only:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            else:
                _check_place(self.path)
        except OSError as error:
            raise (folder_problem(self.path, error, "ledger", task_id)
                   or LedgerStorageError(
                       f"the ledger folder {self.path.parent} of task {task_id!r} cannot "
                       f"be created ({error}); {ELSEWHERE}")) from None
        if fresh and self.path.exists():
            self.path.unlink()
        if not read_only:
            _create(self.path)
        self._pending_done: list[int] = []
        self._pending_failed: dict[int, str | None] = {}
        #: guards the pending records: the loop appends, the writer thread takes them
        self._pending_lock = threading.Lock()
        #: guards the connection: one statement or transaction at a time, whichever
        #: thread (the writer thread, or the run's thread when it reads or closes)
        self._connection_lock = threading.RLock()
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
            found = storage_error(self.path, task_id, error,
                                  "read" if read_only else "opened for writing")
            if isinstance(found, LedgerDamagedError) or (
                    type(error) is sqlite3.DatabaseError and _exists(self.path)):
                raise LedgerDamagedError(
                    f"ledger {self.path} of task {task_id!r} is not a usable SQLite file "
                    f"({error}); {AFRESH}") from None
            raise found from None
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
            raise LedgerError(_of_another_task(self.path, self.task_id, meta.get("task_id")))
        _check_format(self.path, meta.get("format"))
        if meta.get("geometry") != expected["geometry"]:
            raise LedgerError(
                f"ledger {self.path} of task {self.task_id!r} was written for geometry "
                f"{meta.get('geometry')}, but the task now has {expected['geometry']}; "
                f"its finished blocks do not match the new blocks. Restore the old "
                f"geometry, or {AFRESH}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction; whatever fails in it (a full disk at ``COMMIT``
        included) leaves the file as it was before ``BEGIN``."""
        with self._guarded("written"):
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._connection.execute("COMMIT")
            except BaseException:
                if self._connection.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._connection.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _guarded(self, action: str = "read or written") -> Iterator[None]:
        """Hold the connection, and turn SQLite's errors into a ``LedgerError`` that
        names the file and says what happened (:func:`storage_error`)."""
        with self._connection_lock:
            if self._connection is None:
                raise LedgerError(f"ledger {self.path} of task {self.task_id!r} is closed")
            try:
                yield
            except sqlite3.DatabaseError as error:
                raise storage_error(self.path, self.task_id, error, action) from None

    def _check_integrity(self) -> None:
        """Refuse a damaged file: SQLite keeps no checksums, but a damaged page breaks
        the consistency between the table and its index, which this check finds."""
        problems = [row[0] for row in self._connection.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise LedgerDamagedError(
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
            raise LedgerDamagedError(
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
        """Remember a finished block; written at the next :meth:`flush`.

        Cheap and never touches the file: safe to call from the server's loop while
        another thread flushes."""
        with self._pending_lock:
            self._pending_done.append(index)

    def record_failed(self, index: int, error: str | None) -> None:
        """Remember a block that failed for good; written at the next :meth:`flush`."""
        with self._pending_lock:
            self._pending_failed[index] = error

    @property
    def pending(self) -> int:
        """Records not yet written."""
        return len(self._pending_done) + len(self._pending_failed)

    def discard_pending(self) -> int:
        """Forget the records not yet written (their blocks will run again); return how
        many. For a run that stops because its ledger cannot be written."""
        with self._pending_lock:
            count = len(self._pending_done) + len(self._pending_failed)
            self._pending_done, self._pending_failed = [], {}
        return count

    def flush(self) -> int:
        """Write the pending records in one transaction; return how many.

        Callable from any thread (one flush at a time). When the transaction fails the
        file is unchanged and the records stay pending for the next flush.

        Raises
        ------
        LedgerError
            Of the class that says what happened (see :func:`storage_error`).
        """
        with self._connection_lock:
            with self._pending_lock:
                done, failed = self._pending_done, self._pending_failed
                self._pending_done, self._pending_failed = [], {}
            if not done and not failed:
                return 0
            try:
                if self.read_only:
                    raise LedgerError(
                        f"ledger {self.path} was opened read-only; it cannot record")
                self._commit(done, failed)
            except BaseException:
                # not written: back in front of the records that came in meanwhile
                with self._pending_lock:
                    self._pending_done[:0] = done
                    failed.update(self._pending_failed)
                    self._pending_failed = failed
                raise
        return len(done) + len(failed)

    def _commit(self, done: list[int], failed: dict[int, str | None]) -> None:
        """One transaction that records ``done`` and ``failed`` blocks."""
        with self._transaction():
            self._connection.executemany(
                "INSERT OR IGNORE INTO done (block) VALUES (?)", ((index,) for index in done))
            if done:
                self._connection.executemany(
                    "DELETE FROM failed WHERE block = ?", ((index,) for index in done))
            self._connection.executemany(
                "INSERT OR REPLACE INTO failed VALUES (?, ?)", failed.items())

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
        with self._connection_lock:
            if self._connection is None:
                return
            try:
                self.flush()
                if not self.read_only:
                    try:
                        self._connection.execute("PRAGMA journal_mode=DELETE")
                    except sqlite3.DatabaseError:
                        # a reader still has it open, or the disk is full: the WAL stays
                        # (intact, read by the next open); the next writer's close retries
                        pass
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

    Two ways of writing them. Synchronously, in the caller's thread (:meth:`flush`,
    :meth:`flush_if_due`; what tools and tests do). Or, during a run, from a writer thread
    of their own (:meth:`start_writer` ... :meth:`finish`): the run's loop then only
    appends records to an in-memory batch, and a commit that takes a second (NFS) or
    fails (a full disk) never stalls the hand-out of blocks. While the file system fails
    the writes, the records wait in memory, one warning says so, and the writes are
    retried every ``flush_interval``; after ``storage_patience`` seconds of failures
    (or at once for a damaged file) the writer gives up and :attr:`failure` holds the
    error the run stops with. A record is only ever written for a block that finished.

    Parameters
    ----------
    ledgers:
        ``task_id -> Ledger`` for the tasks that keep one.
    flush_interval:
        Longest time, in seconds, a finished block waits before it is written.
    max_pending:
        Write as soon as this many records wait, whatever the time.
    storage_patience:
        Seconds of failing writes after which a run stops (default
        :data:`STORAGE_PATIENCE`).
    final_patience:
        Seconds the end of a run retries its last writes (default
        :data:`FINAL_PATIENCE`).
    """

    def __init__(self, ledgers: dict[str, Ledger], flush_interval: float = 1.0,
                 max_pending: int = 50_000, storage_patience: float | None = None,
                 final_patience: float | None = None) -> None:
        self.ledgers = ledgers
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self.storage_patience = (STORAGE_PATIENCE if storage_patience is None
                                 else storage_patience)
        self.final_patience = FINAL_PATIENCE if final_patience is None else final_patience
        #: the error a run stops with once the writer gave up (None while all is well)
        self.failure: LedgerError | None = None
        self._last_flush: float | None = None
        self._wake = threading.Condition()
        self._writer: threading.Thread | None = None
        self._stopping = False
        self._hurry = False
        #: the error of the writes failing now, since when, and on which ledger
        self._failing: LedgerError | None = None
        self._failing_since: float | None = None
        self._failing_ledger: Ledger | None = None

    @classmethod
    def open(cls, tasks, default_folder: str | os.PathLike | None = None,
             fresh: bool = False) -> LedgerSet:
        """Open (or create) the ledger of every task that has a ledger folder."""
        opened = cls({})
        try:
            for task in tasks:
                folder = task.ledger if task.ledger is not None else default_folder
                if folder is not None:
                    if not fresh:
                        _refuse_old_name(folder, task.task_id)
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

    def add(self, task_id: str, ledger: Ledger) -> None:
        """Write ``ledger`` too from now on (a task this run took over)."""
        self.ledgers[task_id] = ledger

    def record_done(self, task_id: str, index: int) -> None:
        """Remember a finished block of ``task_id`` (if that task keeps a ledger)."""
        ledger = self.ledgers.get(task_id)
        if ledger is not None:
            ledger.record_done(index)
            if ledger.pending >= self.max_pending:
                if self._writer is not None:
                    self._nudge()
                else:
                    ledger.flush()

    def record_failed(self, task_id: str, index: int, error: str | None) -> None:
        """Remember a block of ``task_id`` that failed for good."""
        ledger = self.ledgers.get(task_id)
        if ledger is not None:
            ledger.record_failed(index, error)

    @property
    def pending(self) -> int:
        """Records of every ledger not yet written."""
        return sum(ledger.pending for ledger in list(self.ledgers.values()))

    def flush_if_due(self, now: float) -> int:
        """Write pending records when the flush interval has passed since the last write."""
        if self._last_flush is not None and now - self._last_flush < self.flush_interval:
            return 0
        self._last_flush = now
        return self.flush()

    def flush(self) -> int:
        """Write every pending record, one transaction per ledger (each ledger is tried
        even when another fails); raise the first error, a damaged file's first."""
        written, errors = self._flush_all()
        if errors:
            raise errors[0][1]
        return written

    def _flush_all(self) -> tuple[int, list[tuple[Ledger, LedgerError]]]:
        written, errors = 0, []
        for ledger in list(self.ledgers.values()):
            try:
                written += ledger.flush()
            except LedgerError as error:
                errors.append((ledger, error))
        errors.sort(key=lambda pair: not isinstance(pair[1], LedgerDamagedError))
        return written, errors

    # ------------------------------------------------------------ the writer thread
    def start_writer(self) -> None:
        """Write from a thread of its own from now on, every ``flush_interval``
        seconds; :meth:`finish` stops it and writes the rest."""
        if self._writer is not None:
            return  # (started with no ledgers too: a task taken over later adds one)
        self._stopping = False
        self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                        name="luigi_daisy-ledger-writer")
        self._writer.start()

    def _nudge(self) -> None:
        with self._wake:
            self._hurry = True
            self._wake.notify()

    def _stop_writer(self) -> None:
        writer = self._writer
        if writer is None:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify()
        writer.join()
        self._writer = None

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                if not self._stopping and not (self._hurry and self._failing is None):
                    self._wake.wait(self.flush_interval)
                self._hurry = False
                if self._stopping or self.failure is not None:
                    return  # stopped, or gave up: the run stops and says why
            now = time.monotonic()
            if self._attempt(now) or self.failure is not None:
                continue
            if now - self._failing_since >= self.storage_patience:
                self._give_up(f"they failed for {now - self._failing_since:.0f} s "
                              f"(storage_patience is {self.storage_patience:g} s)")

    def _attempt(self, now: float) -> bool:
        """Try to write everything pending; True when nothing is left to write."""
        try:
            written, errors = self._flush_all()
        except Exception as error:  # the writer thread must not die silently
            logger.exception("the ledger writer failed")
            errors = [(None, LedgerError(f"writing the ledgers failed: {error!r}"))]
        if not errors:
            if self._failing is not None:
                logger.info("ledger writes succeed again after %.0f s; %d records written",
                            now - self._failing_since, written)
                self._failing = self._failing_since = self._failing_ledger = None
            return True
        ledger, error = errors[0]
        if not isinstance(error, LedgerStorageError):
            self._failing_ledger = ledger
            self._give_up("the file cannot be used any more")  # damaged: no retry helps
            return False
        if self._failing is None or type(error) is not type(self._failing):
            logger.warning(
                "%s. The run goes on: %d finished blocks wait in memory and the writes are "
                "retried every %g s; the run stops if they still fail after %g s.",
                error, self.pending, self.flush_interval, self.storage_patience)
        if self._failing_since is None:
            self._failing_since = now
        self._failing, self._failing_ledger = error, ledger
        return False

    def _give_up(self, why: str) -> None:
        """Stop writing: forget the records that could not be written and keep, in
        :attr:`failure`, an error that says what happened and what the ledger holds."""
        error, ledger = self._failing, self._failing_ledger
        if error is None or not isinstance(error, LedgerStorageError):
            error = error or LedgerError("the ledgers could not be written")
        lost = sum(each.discard_pending() for each in list(self.ledgers.values()))
        recorded = ""
        if ledger is not None:
            try:
                total = ledger.geometry.get("num_blocks", "?")
                recorded = (f" The ledger {ledger.path} records {ledger.done_count():,} "
                            f"of the task's {total:,} blocks as done."
                            if isinstance(total, int) else "")
            except LedgerError:
                recorded = ""
        self.failure = type(error)(
            f"the run stopped because its ledger writes failed: {why}. {error}.{recorded} "
            f"{lost:,} finished blocks could not be recorded; they will run again.")
        logger.error("%s", self.failure)

    def finish(self, patience: float | None = None) -> None:
        """Stop the writer thread and write every pending record before returning.

        Retries failing writes for up to ``patience`` seconds (default
        ``final_patience``; 0: one attempt).

        Raises
        ------
        LedgerError
            :attr:`failure`, when the writer gave up during the run or the last writes
            still fail after ``patience`` seconds; its class says why
            (:class:`~luigi_daisy.errors.LedgerDiskFullError`, ...).
        """
        self._stop_writer()
        if self.failure is None:
            patience = self.final_patience if patience is None else patience
            started = time.monotonic()
            while not self._attempt(time.monotonic()) and self.failure is None:
                waited = time.monotonic() - started
                if waited >= patience:
                    self._give_up(f"the run ended and its last writes still failed after "
                                  f"{waited:.0f} s more")
                    break
                time.sleep(min(self.flush_interval, patience - waited))
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        """Flush and close every ledger (all of them, even if one fails); after a
        :attr:`failure`, close without writing."""
        self._stop_writer()
        errors = []
        for ledger in self.ledgers.values():
            if self.failure is not None:
                ledger.discard_pending()
            try:
                ledger.close()
            except LedgerError as error:
                errors.append(error)
        if errors:
            raise errors[0]
