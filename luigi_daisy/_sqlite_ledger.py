"""The previous version's ledger (format 3, an SQLite file), kept to read and convert
such files (:mod:`luigi_daisy.ledger`) and to compare with in ``benchmarks/bench_ledger.py``.

Only the block server wrote it, in batches of one transaction each. It remembers the
task's geometry and refuses to resume a task whose geometry changed. ``complete()`` is a
single query. The file for task ``T`` in folder ``D`` is ``D/T.ledger.sqlite``, or
``D/<prefix>@<hash>.ledger.sqlite`` when ``T`` is not a plain file name
(:func:`~luigi_daisy.context.safe_file_name`).

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
import sqlite3
import threading
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
