"""The ledger: a durable record of the finished blocks of one task, kept with its data.

A record is a folder, ``D/T.ledger`` for task ``T`` in folder ``D`` (or
``D/<prefix>@<hash>.ledger`` when ``T`` is not a plain file name,
:func:`~luigi_daisy.context.safe_file_name`), of whole files that are only ever
replaced by rename: a small JSON manifest (format, task id, geometry, origin, done and
failed counts, the file and generation of each chunk), the done set as zlib-compressed
bitmap chunks of the block grid (at most one bit per block; runs of done blocks
compress to almost nothing) and the failed blocks with their errors in a sparse JSON
file. One writer (the block server) commits: the changed chunks under new names, then
the manifest, each written to a temporary name, fsynced and renamed into place, the
folder fsynced. Readers on any host (``complete()``, runs that follow the task,
``luigi-daisy status``) read the manifest and then the files it names, and so see one
commit whole; they take no lock, and there is no shared memory, no mmap and no SQLite
WAL, which is what NFS, Lustre and GPFS need. ``complete()`` reads the manifest only.

The writer writes from a thread of its own (:class:`LedgerSet`), in batches of one
commit each, so that a slow or full file system never stalls the hand-out of blocks. It
remembers the task's geometry and refuses to resume a task whose geometry changed. When
the file system fails the writes (full, read-only, an I/O error) the records wait in
memory and the writes are retried; each kind of failure has its own error class
(:mod:`luigi_daisy.errors`) and message, and only a damaged record is met with the
advice to delete it.

Ledgers of earlier versions were SQLite files (``D/T.ledger.sqlite``, format 3): a
writer converts one on its first open (one warning names it; nothing done is lost), a
reader reads it as it is.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .blocks import PackedBlocks
from .context import safe_file_name
from .errors import (
    LedgerDamagedError,
    LedgerDiskFullError,
    LedgerError,
    LedgerReadOnlyError,
    LedgerStorageError,
    UnsafePathError,
)
from .safe_files import check_folder, open_own, own_subfolder, refuse_links

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import numpy as np

#: 4: a record folder of whole files (manifest, bitmap chunks). 3 was an SQLite file,
#: converted on its first open by a writer.
FORMAT_VERSION = 4
#: the SQLite format that is read and converted
LEGACY_FORMAT_VERSION = 3
#: what the block indices of a record are, recorded in every manifest
BLOCK_KEY = "row-major index in the overhang grid of the task's write ROIs"
#: the name of a record folder ends so
SUFFIX = ".ledger"
#: the name of an SQLite ledger of an earlier version ends so
LEGACY_SUFFIX = ".ledger.sqlite"
MANIFEST = "manifest.json"
#: blocks per bitmap chunk: 128 KiB of bits, about 950 chunks for 10^9 blocks. A flush
#: rewrites (and compresses) each chunk it touches: small chunks keep a run's flushes of
#: a thousand blocks cheap; the manifest lists every chunk (about 35 bytes each)
CHUNK_BLOCKS = 1 << 20
CHUNK_BYTES = CHUNK_BLOCKS // 8
#: zlib level of the chunks: 1 compresses runs of done blocks as well as higher ones
ZLIB_LEVEL = 1
#: files being written start so (removed at the next writer's open when left behind)
TEMPORARY = ".tmp-"
#: times a reader reads the manifest again when a file it names vanished meanwhile
READ_ATTEMPTS = 20
#: seconds a superseded chunk is kept for readers that read the manifest naming it
OLD_FILES_GRACE = 10.0
#: how to get past a ledger that cannot be used
AFRESH = ("delete the ledger (rm -r it: a record is a folder), or start afresh "
          "(run_blockwise(..., fresh=True)) to process every block of the task again")

#: seconds a run keeps serving while its ledger writes fail (full disk, read-only
#: folder, I/O errors) before it stops; the finished blocks wait in memory meanwhile
STORAGE_PATIENCE = 600.0
#: seconds the end of a run keeps retrying the last writes of a failing file system
FINAL_PATIENCE = 60.0



#: where a task's ledger folder is chosen, for messages that ask for another
ELSEWHERE = ("give the task another ledger folder (run_blockwise(ledger_dir=...), "
             "Task(ledger=...), ledger_dir in [luigi_daisy])")


def _is_folder(path: Path) -> bool | None:
    """True for a folder, False for anything else, None where nothing is (or it cannot
    be looked at): one ``stat``, so that a folder made between two looks is never
    taken for a file."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return None


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


# ----------------------------------------------------------------- file names
def ledger_path(folder: str | os.PathLike, task_id: str) -> Path:
    """The record of ``task_id`` inside ``folder``: a folder named
    ``<name>.ledger`` (the name from :func:`~luigi_daisy.context.safe_file_name`)."""
    return Path(folder) / f"{safe_file_name(task_id)}{SUFFIX}"


def legacy_path(path: str | os.PathLike) -> Path:
    """The SQLite file (format 3) an earlier version kept where ``path`` (a record
    folder, :func:`ledger_path`) is now: the same name with ``.sqlite`` appended."""
    path = Path(path)
    return path.with_name(path.name + ".sqlite")


def _record_of(path: Path) -> Path:
    """The record folder of ``path``, which may name a record or an SQLite file."""
    if path.name.endswith(LEGACY_SUFFIX):
        return path.with_name(path.name[:-len(".sqlite")])
    return path


def old_ledger_path(folder: str | os.PathLike, task_id: str) -> Path | None:
    """Where versions before hashed file names kept the (SQLite) ledger of
    ``task_id``, when that is not the SQLite file beside :func:`ledger_path` (only ids
    that are not plain file names moved)."""
    name = re.sub(r"[^A-Za-z0-9_.=+-]", "_", task_id)
    path = Path(folder) / f"{'_' + name if name.startswith('.') else name}{LEGACY_SUFFIX}"
    return None if path == legacy_path(ledger_path(folder, task_id)) else path


def is_ledger(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ledger record: a record folder holding a manifest, or an
    SQLite file of an earlier version (``*.ledger.sqlite``)."""
    path = Path(path)
    try:
        if path.name.endswith(LEGACY_SUFFIX):
            return path.is_file()
        return path.name.endswith(SUFFIX) and (path / MANIFEST).is_file()
    except OSError:
        return False


def find_ledgers(path: str | os.PathLike) -> list[Path]:
    """The ledger records in folder ``path`` (or ``[path]`` when it is a record), sorted.

    Every ``*.ledger`` entry is listed, a damaged one too (reading it then says what is
    wrong); an SQLite file of an earlier version is listed when no record stands beside
    it (a writer converts it on its first open)."""
    path = Path(path)
    if is_ledger(path) or not path.is_dir():
        return [path] if is_ledger(path) else []
    found = [child for child in path.iterdir()
             if child.name.endswith(SUFFIX) or is_ledger(child)]
    names = {child.name for child in found}
    return sorted(child for child in found
                  if not (child.name.endswith(LEGACY_SUFFIX)
                          and _record_of(child).name in names))


def _of_another_task(path: Path, task_id: str, owner: str | None) -> str:
    """The message for ledger ``path`` of task ``task_id`` that records ``owner``."""
    if owner is None:
        return (f"ledger {path} of task {task_id!r} records no task id: it was not "
                f"written by luigi_daisy, or is damaged; {AFRESH}")
    owners_path = ledger_path(path.parent, owner)
    if path.name.endswith(LEGACY_SUFFIX):
        owners_path = legacy_path(owners_path)
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
    record = ledger_path(folder, task_id)
    new = legacy_path(record)
    try:
        if old is None or record.exists() or new.exists() or not old.is_file():
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


# ------------------------------------------------------------ errors of the disk
def storage_error(path: Path, task_id: str, error: OSError,
                  action: str = "read or written") -> LedgerError:
    """The ``LedgerError`` that says what an ``OSError`` on ledger ``path`` means.

    A full file system (:class:`~luigi_daisy.errors.LedgerDiskFullError`), a folder or
    file that cannot be written (:class:`~luigi_daisy.errors.LedgerReadOnlyError`: a
    read-only mount or permissions), or another error of the file system
    (:class:`~luigi_daisy.errors.LedgerStorageError`). Damage is found by the reader
    (:class:`~luigi_daisy.errors.LedgerDamagedError`), never guessed from an errno.
    """
    where = f"ledger {path} of task {task_id!r}"
    keep = ("the ledger is not damaged: keep it (the blocks it records are skipped when "
            "the task runs again)" if _exists(path / MANIFEST) else "nothing was recorded yet")
    code = error.errno
    problem = folder_problem(path / MANIFEST, error, "ledger", task_id)
    if problem is not None:
        return type(problem)(f"{problem}; {keep}")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return LedgerReadOnlyError(
            f"{where} cannot be {action}: it is read-only ({error}). Make it and its "
            f"folder {path.parent} writable, or {ELSEWHERE}; {keep}")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return LedgerDiskFullError(
            f"{where} cannot be {action}: the file system holding {path.parent} is full "
            f"({error}). Free space there, or {ELSEWHERE} on another file system; {keep}")
    return LedgerStorageError(
        f"{where} cannot be {action} ({error}): the file system holding {path.parent} "
        f"reported an error. Check that file system (a network mount, a disk); the error "
        f"does not say that the ledger is damaged: keep it")


def _check_format(path: Path, found: object) -> None:
    """Refuse a record of another format, saying what it is and how to get past it."""
    if found == FORMAT_VERSION:
        return
    raise LedgerError(
        f"ledger {path} has format {found!r}, this version reads {FORMAT_VERSION} (and "
        f"converts SQLite files of format {LEGACY_FORMAT_VERSION}); {AFRESH}")


# ---------------------------------------------------------- files of a record
def _fsync_folder(folder: Path) -> None:
    """Make the names in ``folder`` (a rename, a new file) durable."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class _RenamedNotDurable(OSError):
    """The manifest was renamed into place, and making the rename durable failed (an
    ``OSError`` with the failure's errno, so that callers that only report it can)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.errno, error.strerror, error.filename)
        self.error = error


def _write_whole(folder: Path, name: str, data: bytes) -> None:
    """Write ``folder/name`` whole: into a new temporary file beside it (``O_EXCL``,
    no link followed), fsynced, then renamed into place; a reader on any host sees the
    old file or the new one, never a part. The caller fsyncs the folder."""
    temporary = folder / f"{TEMPORARY}{name}.{os.getpid()}.{secrets.token_hex(4)}"
    descriptor = open_own(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "ledger file")
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, folder / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _read_file(path: Path) -> bytes:
    """The bytes of ``path``, not following a link."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with os.fdopen(descriptor, "rb", closefd=False) as stream:
            return stream.read()
    finally:
        os.close(descriptor)


def _chunk_name(chunk: int, generation: int) -> str:
    return f"done-{chunk}-{generation}.zz"


def _failed_name(generation: int) -> str:
    return f"failed-{generation}.json"


def _popcount(packed: np.ndarray) -> int:
    """How many bits of ``packed`` (uint8) are set."""
    import numpy as np
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return int(np.bitwise_count(packed).sum(dtype=np.int64))
    return int(np.unpackbits(packed).sum(dtype=np.int64))


def _set_bits(packed: np.ndarray, local: np.ndarray, value: int) -> np.ndarray:
    """Set (``value`` 1) or clear the bits ``local`` (sorted, within the chunk) of a
    chunk's ``packed`` bits, in place where few (a run's flush: no 8 MB of unpacked
    bits for a thousand blocks), through unpacked bits where many; returns the bits."""
    import numpy as np
    if local.size * 64 < CHUNK_BLOCKS:
        masks = (0x80 >> (local & 7)).astype(np.uint8)
        if value:
            np.bitwise_or.at(packed, local >> 3, masks)
        else:
            np.bitwise_and.at(packed, local >> 3, ~masks)
        return packed
    bits = np.unpackbits(packed)
    bits[local] = value
    return np.packbits(bits)


@dataclass
class _State:
    """One consistent state of a record: what its manifest says, and the chunks read."""

    manifest: dict
    #: chunk number -> (generation, done count, crc32 of the file)
    files: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    #: chunk number -> packed bitmap (numpy uint8, ``CHUNK_BYTES``)
    chunks: dict[int, Any] = field(default_factory=dict)
    failed: dict[int, str | None] = field(default_factory=dict)

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])


class DoneView:
    """What a follower has seen of a record's done blocks (see :meth:`Ledger.done_since`):
    per chunk, the generation and the bitmap it had then."""

    __slots__ = ("generation", "chunks")

    def __init__(self) -> None:
        self.generation = -1
        self.chunks: dict[int, tuple[int, Any]] = {}


class Ledger:
    """Finished blocks of one task: a record folder of whole files replaced by rename.

    The record ``<name>.ledger/`` holds ``manifest.json`` (format, task id, geometry,
    origin, done and failed counts, and which file holds each chunk, with its
    generation and checksum), the done set as zlib-compressed bitmap chunks of
    ``CHUNK_BLOCKS`` blocks (``done-<chunk>-<generation>.zz``; at most one bit per
    block, runs of done blocks compress to almost nothing) and the failed blocks with
    their errors (``failed-<generation>.json``). A commit writes the changed files
    under new names, then the manifest (each written to a temporary name, fsynced,
    renamed into place, the folder fsynced): readers on any host read the manifest,
    then the files it names, and see one commit whole. No SQLite, no shared memory, no
    lock a reader takes.

    Parameters
    ----------
    path:
        The record folder (:func:`ledger_path`); created when missing. An SQLite file
        of an earlier version beside it (``<path>.sqlite``), or given as ``path``, is
        converted by a writer on its first open and read as it is by a reader.
    task_id:
        The task the ledger belongs to; a record of another task is refused.
    geometry:
        Plain-data description of the task's blocks (total, read and write ROI, fit,
        number of blocks). A record written for another geometry is refused.
    fresh:
        Forget what the record holds and start afresh.
    read_only:
        Only read the record, which another process writes (to follow its progress).
    origin:
        Plain JSON data that says how to rebuild the task; stored when given, kept
        when None (:attr:`origin`).
    """

    def __init__(self, path: str | os.PathLike, task_id: str, geometry: dict,
                 fresh: bool = False, read_only: bool = False,
                 origin: dict | None = None) -> None:
        given = Path(path)
        self.path = _record_of(given)
        self.legacy_path = legacy_path(self.path)
        self.task_id = task_id
        self.geometry = geometry
        self.read_only = read_only
        self._expected_geometry = json.dumps(geometry, sort_keys=True)
        self._pending_done: list[int] = []
        self._pending_arrays: list[Any] = []
        #: blocks in the pending arrays
        self._pending_in_arrays = 0
        self._pending_failed: dict[int, str | None] = {}
        #: guards the pending records: the loop appends, the writer thread takes them
        self._pending_lock = threading.Lock()
        #: guards the state and the files: one commit or read at a time
        self._state_lock = threading.RLock()
        self._state: _State | None = None
        self._closed = False
        #: an SQLite file of an earlier version, read as it is (read-only openers)
        self._legacy: Any = None
        #: superseded files and when they were superseded, removed after a delay
        self._superseded: list[tuple[float, str]] = []
        self._origin = origin
        try:
            if read_only:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            else:
                check_folder(self.path.parent, "ledger folder")
                refuse_links(self.path, "ledger")
                refuse_links(self.legacy_path, "ledger", ("-wal", "-shm", "-journal"))
        except OSError as error:
            raise (folder_problem(self.path, error, "ledger", task_id)
                   or LedgerStorageError(
                       f"the ledger folder {self.path.parent} of task {task_id!r} cannot "
                       f"be created ({error}); {ELSEWHERE}")) from None
        if read_only:
            self._open_reader(given)
        else:
            self._open_writer(fresh)

    # ------------------------------------------------------------------ opening
    def _open_reader(self, given: Path) -> None:
        if not _exists(self.path / MANIFEST) and (
                given.name.endswith(LEGACY_SUFFIX) or _exists(self.legacy_path)):
            self._open_legacy_reader()
            return
        folder = _is_folder(self.path)
        if folder is None:
            raise LedgerError(f"no ledger of task {self.task_id!r} at {self.path}")
        if not folder:
            raise self._damaged("it is a file, not a record folder")
        self._state = self._read_state(None)
        if self._state is None:
            raise LedgerError(f"ledger {self.path} of task {self.task_id!r} is not "
                              f"created completely yet (it has no manifest)")
        self._origin = self._state.manifest.get("origin")

    def _open_legacy_reader(self) -> None:
        from . import _sqlite_ledger
        try:
            self._legacy = _sqlite_ledger.Ledger(self.legacy_path, self.task_id,
                                                 self.geometry, read_only=True)
        except LedgerError as error:
            raise type(error)(str(error).replace("ledger ", "SQLite ledger ", 1)) from None
        self._legacy_seq = 0

    def _open_writer(self, fresh: bool) -> None:
        try:
            # a record started afresh continues the numbering of the one it replaces: a
            # reader that stays open (a follower) compares generations only
            self._previous_generation = self._peek_generation()
            if fresh:
                self._remove_record()
            if _is_folder(self.path) is False:
                raise self._damaged("it is a file, not a record folder")
            own_subfolder(self.path, "ledger")
            state = self._read_state(None)
            if state is None and _exists(self.legacy_path):
                state = self._convert()
            elif state is not None and _exists(self.legacy_path):
                # converted, then stopped before the SQLite file was removed
                self._remove_legacy()
            if state is None:
                state = _State({"generation": self._first_generation(), "done": 0,
                                "failed": 0, "chunks": [], "failed_file": None,
                                "origin": self._origin})
                self._state = state
                self._write_manifest(state, state.files, None)
            else:
                self._state = state
                if self._origin is not None and self._origin != state.manifest.get("origin"):
                    # a new generation: readers that peek at it read the new origin
                    state.manifest = dict(state.manifest, generation=state.generation + 1)
                    self._write_manifest(state, state.files,
                                         state.manifest.get("failed_file"))
                self._origin = state.manifest.get("origin")
            self._probe()
            self._remove_strays()
        except OSError as error:
            raise storage_error(self.path, self.task_id, error, "opened for writing") from None

    def _first_generation(self) -> int:
        """The first generation of a new record: after the generation of the record it
        replaces, and the milliseconds of the clock (a record deleted with its output
        left nothing to read), so that a reader never takes the new record's state for
        one it has seen of the old."""
        previous = getattr(self, "_previous_generation", None)
        return max(time.time_ns() // 1_000_000, -1 if previous is None else previous + 1)

    def _probe(self) -> None:
        """Fail at open, not at the first commit, where the record cannot be written
        (a read-only mount, a folder of another mode)."""
        probe = self.path / f"{TEMPORARY}probe.{os.getpid()}.{secrets.token_hex(4)}"
        os.close(open_own(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "ledger file"))
        os.unlink(probe)

    def _remove_record(self) -> None:
        """Delete the record and an SQLite file beside it (``fresh``)."""
        self._remove_legacy()
        if self.path.is_symlink() or self.path.is_file():
            self.path.unlink()
        elif self.path.is_dir():
            shutil.rmtree(self.path)

    def _remove_legacy(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.legacy_path}{suffix}")

    def _remove_strays(self) -> None:
        """Remove what a killed writer left: temporary files, and files no manifest
        names (a commit that stopped before its manifest)."""
        state = self._require_state()
        named = {MANIFEST, *(_chunk_name(chunk, generation)
                             for chunk, (generation, _, _) in state.files.items())}
        failed_file = state.manifest.get("failed_file")
        if failed_file:
            named.add(_failed_name(failed_file[0]))
        for name in os.listdir(self.path):
            if name not in named and (name.startswith(TEMPORARY) or name.startswith(
                    ("done-", "failed-"))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path / name)

    def _convert(self) -> _State:
        """Read the SQLite file of an earlier version, write it as this record (all of
        it, before the SQLite file is removed: nothing done is lost), say so once."""
        import numpy as np

        from . import _sqlite_ledger
        started = time.monotonic()
        with _sqlite_ledger.Ledger(self.legacy_path, self.task_id, self.geometry) as old:
            done = old.done_indices()
            with old._guarded():
                failed = dict(old._connection.execute("SELECT block, error FROM failed"))
        state = _State({"generation": self._first_generation(), "done": 0, "failed": 0,
                        "chunks": [], "failed_file": None, "origin": self._origin})
        self._state = state
        self._commit_arrays([np.asarray(done, dtype=np.int64)], failed, [])
        self._remove_legacy()
        _fsync_folder(self.path.parent)
        logger.warning(
            "converted the SQLite ledger %s (format %d) of task %r to the record %s: %d "
            "done and %d failed blocks kept, in %.1f s; the SQLite file is removed",
            self.legacy_path, LEGACY_FORMAT_VERSION, self.task_id, self.path, done.size,
            len(failed), time.monotonic() - started)
        return self._require_state()

    def _damaged(self, why: str) -> LedgerDamagedError:
        return LedgerDamagedError(
            f"ledger {self.path} of task {self.task_id!r} is damaged ({why}); {AFRESH}")

    # ------------------------------------------------------------------ reading
    def _read_manifest(self) -> dict | None:
        """The manifest, checked (task, format, geometry); None when there is none."""
        try:
            data = _read_file(self.path / MANIFEST)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UnsafePathError(
                    f"ledger file {self.path / MANIFEST} is a symbolic link; this run reads "
                    f"and writes no file through a link: remove it "
                    f"(rm {self.path / MANIFEST})") from None
            raise
        try:
            manifest = json.loads(data)
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as error:
            raise self._damaged(f"its manifest is not readable JSON: {error}") from None
        if manifest.get("task_id") != self.task_id:
            raise LedgerError(_of_another_task(self.path, self.task_id,
                                               manifest.get("task_id")))
        _check_format(self.path, manifest.get("format"))
        found = json.dumps(manifest.get("geometry"), sort_keys=True)
        if found != self._expected_geometry:
            raise LedgerError(
                f"ledger {self.path} of task {self.task_id!r} was written for geometry "
                f"{found}, but the task now has {self._expected_geometry}; its finished "
                f"blocks do not match the new blocks. Restore the old geometry, or {AFRESH}")
        try:
            for entry in manifest["chunks"]:
                chunk, generation, count, crc = (int(value) for value in entry)
                if chunk < 0 or not 0 <= count <= CHUNK_BLOCKS:
                    raise ValueError(f"chunk entry {entry}")
            int(manifest["generation"])
            int(manifest["done"])
            int(manifest["failed"])
            if int(manifest.get("chunk_blocks", 0)) != CHUNK_BLOCKS:
                raise ValueError(f"chunks of {manifest.get('chunk_blocks')} blocks")
        except (KeyError, TypeError, ValueError) as error:
            raise self._damaged(f"its manifest lacks or garbles {error}") from None
        return manifest

    def _read_state(self, previous: _State | None) -> _State | None:
        """One consistent state: the manifest, then the files it names (reusing those
        of ``previous`` that did not change). A file that vanished meanwhile (a newer
        commit replaced it) sends the read back to the manifest, a bounded number of
        times."""
        missing_under: int | None = None
        for _ in range(READ_ATTEMPTS):
            manifest = self._read_manifest()
            if manifest is None:
                return None
            if previous is not None and manifest["generation"] == previous.generation:
                return previous
            try:
                return self._read_files(manifest, previous)
            except (FileNotFoundError, _Stale) as error:
                # the writer's own manifest, or the same one twice: nothing replaced it
                if not self.read_only or missing_under == manifest["generation"]:
                    name = Path(getattr(error, "filename", None) or "a file").name
                    raise self._damaged(f"{name}, which its manifest names, is "
                                        f"missing") from None
                missing_under = manifest["generation"]
                continue
        raise LedgerStorageError(
            f"ledger {self.path} of task {self.task_id!r} changed under every one of "
            f"{READ_ATTEMPTS} reads (its files vanished between the manifest and the "
            f"read); check the file system holding it, or read it again")

    def _read_files(self, manifest: dict, previous: _State | None) -> _State:
        import numpy as np
        state = _State(manifest)
        for entry in manifest["chunks"]:
            chunk, generation, count, crc = (int(value) for value in entry)
            state.files[chunk] = (generation, count, crc)
            if previous is not None and previous.files.get(chunk) == (generation, count, crc):
                state.chunks[chunk] = previous.chunks[chunk]
                continue
            data = self._read_named(_chunk_name(chunk, generation))
            if zlib.crc32(data) != crc:
                raise self._damaged(f"chunk file {_chunk_name(chunk, generation)} does "
                                    f"not match its checksum")
            try:
                bits = np.frombuffer(zlib.decompress(data), dtype=np.uint8)
            except zlib.error as error:
                raise self._damaged(f"chunk file {_chunk_name(chunk, generation)}: "
                                    f"{error}") from None
            if bits.size != CHUNK_BYTES or _popcount(bits) != count:
                raise self._damaged(f"chunk file {_chunk_name(chunk, generation)} holds "
                                    f"another number of blocks than its manifest says")
            state.chunks[chunk] = bits
        if sum(count for _, count, _ in state.files.values()) != int(manifest["done"]):
            raise self._damaged("its done count does not match its chunks")
        failed_file = manifest.get("failed_file")
        if failed_file:
            previous_file = previous.manifest.get("failed_file") if previous else None
            if previous is not None and previous_file == failed_file:
                state.failed = previous.failed
            else:
                generation, crc = (int(value) for value in failed_file)
                data = self._read_named(_failed_name(generation))
                if zlib.crc32(data) != crc:
                    raise self._damaged(f"{_failed_name(generation)} does not match its "
                                        f"checksum")
                try:
                    state.failed = {int(index): error
                                    for index, error in json.loads(data).items()}
                except (ValueError, AttributeError) as error:
                    raise self._damaged(f"{_failed_name(generation)}: {error}") from None
        if len(state.failed) != int(manifest["failed"]):
            raise self._damaged("its failed count does not match its failures file")
        return state

    def _read_named(self, name: str) -> bytes:
        try:
            return _read_file(self.path / name)
        except OSError as error:
            if error.errno == errno.ESTALE:  # removed on the server (NFS): read again
                raise _Stale(str(self.path / name)) from None
            raise

    def _require_state(self) -> _State:
        if self._closed:
            raise LedgerError(f"ledger {self.path} of task {self.task_id!r} is closed")
        assert self._state is not None
        return self._state

    def _current(self) -> _State:
        """The newest state: a reader looks at the manifest again (one small read when
        nothing changed); a writer's own state is the newest."""
        with self._state_lock:
            state = self._require_state()
            if self.read_only:
                if self._peek_generation() == state.generation:
                    return state  # nothing committed since: one read of a few bytes
                try:
                    fresh = self._read_state(state)
                except OSError as error:
                    raise storage_error(self.path, self.task_id, error, "read") from None
                if fresh is None:
                    raise LedgerError(f"the manifest of ledger {self.path} vanished")
                self._state = state = fresh
            return state

    def _peek_generation(self) -> int | None:
        """The generation at the head of the manifest (written first, so that a reader
        learns whether anything changed from a few bytes, whatever the task's size);
        None when it cannot be read so."""
        try:
            descriptor = os.open(self.path / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW
                                 | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            head = os.read(descriptor, 64)
        except OSError:
            return None
        finally:
            os.close(descriptor)
        found = _HEAD.match(head)
        return int(found.group(1)) if found else None

    @property
    def origin(self) -> dict | None:
        """How to rebuild the task (plain JSON data), as recorded; None if never given."""
        if self._legacy is not None:
            return None
        return self._current().manifest.get("origin")

    def done_count(self) -> int:
        """How many blocks are recorded as done (from the manifest: no chunk is read)."""
        if self._legacy is not None:
            return self._legacy_call("done_count")
        if self.read_only:
            manifest = self._manifest_now()
            return int(manifest["done"])
        return int(self._require_state().manifest["done"])

    def _manifest_now(self) -> dict:
        with self._state_lock:
            self._require_state()
            try:
                manifest = self._read_manifest()
            except OSError as error:
                raise storage_error(self.path, self.task_id, error, "read") from None
        if manifest is None:
            raise LedgerError(f"the manifest of ledger {self.path} vanished")
        return manifest

    def failed_count(self) -> int:
        """How many blocks failed for good in the last run that recorded them."""
        if self._legacy is not None:
            return self._legacy_call("failed_count")
        if self.read_only:
            return int(self._manifest_now()["failed"])
        return int(self._require_state().manifest["failed"])

    def failed_blocks(self) -> list[tuple[int, str | None]]:
        """Index and error text of each failed block, by index."""
        if self._legacy is not None:
            with self._legacy._guarded():
                return self._legacy._connection.execute(
                    "SELECT block, error FROM failed ORDER BY block").fetchall()
        return sorted(self._current().failed.items())

    def done_indices(self) -> np.ndarray:
        """Indices of the done blocks, sorted (int64)."""
        import numpy as np
        if self._legacy is not None:
            return self._legacy_call("done_indices")
        state = self._current()
        parts = [np.flatnonzero(np.unpackbits(state.chunks[chunk])) + chunk * CHUNK_BLOCKS
                 for chunk in sorted(state.chunks)]
        return (np.concatenate(parts).astype(np.int64) if parts
                else np.zeros(0, dtype=np.int64))

    def done_packed(self) -> PackedBlocks:
        """The done blocks as packed bits (:class:`~luigi_daisy.blocks.PackedBlocks`),
        without an index per block: what a scheduler resuming 10^9 blocks takes."""
        if self._legacy is not None:
            return PackedBlocks.from_indices(self._legacy_call("done_indices"))
        state = self._current()
        chunks = {chunk * CHUNK_BLOCKS: bits for chunk, bits in state.chunks.items()}
        return PackedBlocks(chunks, int(state.manifest["done"]), CHUNK_BLOCKS)

    def done_since(self, view: DoneView | None) -> tuple[DoneView, np.ndarray]:
        """Blocks recorded as done since ``view`` (None: since nothing), and the view
        to pass next time.

        Lets another run follow this task's progress: when nothing changed it costs one
        read of the manifest (a reader) and a comparison of generations; a changed chunk
        is compared bit by bit with the one seen. A block made not done again
        (:meth:`forget_done`) is not reported."""
        import numpy as np
        view = view if view is not None else DoneView()
        if self._legacy is not None and not self._leave_legacy():
            self._legacy_seq, blocks = self._legacy.done_since(self._legacy_seq)
            return view, np.asarray(blocks, dtype=np.int64)
        state = self._current()
        if state.generation == view.generation:
            return view, np.zeros(0, dtype=np.int64)
        found = []
        for chunk, (generation, _, _) in state.files.items():
            seen = view.chunks.get(chunk)
            if seen is not None and seen[0] == generation:
                continue
            bits = state.chunks[chunk]
            new = bits if seen is None else bits & ~seen[1]
            found.append(np.flatnonzero(np.unpackbits(new)) + chunk * CHUNK_BLOCKS)
            view.chunks[chunk] = (generation, bits)
        view.generation = state.generation
        if not found:
            return view, np.zeros(0, dtype=np.int64)
        return view, np.sort(np.concatenate(found)).astype(np.int64)

    def is_complete(self, total_blocks: int) -> bool:
        """Whether every one of ``total_blocks`` blocks is done (the manifest's count)."""
        return self.done_count() >= total_blocks

    def _leave_legacy(self) -> bool:
        """Whether a writer converted the SQLite file this reader reads meanwhile: then
        read the record from now on (the SQLite file is gone or going)."""
        if not _exists(self.path / MANIFEST):
            return False
        with self._state_lock:
            state = self._read_state(None)
            if state is None:
                return False
            self._legacy.close()
            self._legacy, self._state = None, state
        return True

    def _legacy_call(self, name: str) -> Any:
        if self._closed:
            raise LedgerError(f"ledger {self.path} of task {self.task_id!r} is closed")
        return getattr(self._legacy, name)()

    # ------------------------------------------------------------------ writing
    def record_done(self, index: int) -> None:
        """Remember a finished block; written at the next :meth:`flush`.

        Cheap and never touches the file: safe to call from the server's loop while
        another thread flushes."""
        with self._pending_lock:
            self._pending_done.append(index)

    def record_done_many(self, indices: Iterable[int] | np.ndarray) -> None:
        """Remember many finished blocks at once (pending until :meth:`flush`, like
        :meth:`record_done`)."""
        import numpy as np
        array = np.array(indices if isinstance(indices, np.ndarray) else list(indices),
                         dtype=np.int64).ravel()
        with self._pending_lock:
            self._pending_arrays.append(array)
            self._pending_in_arrays += array.size

    def record_failed(self, index: int, error: str | None) -> None:
        """Remember a block that failed for good; written at the next :meth:`flush`."""
        with self._pending_lock:
            self._pending_failed[index] = error

    @property
    def pending(self) -> int:
        """Records not yet written (counted, not walked: asked after every record)."""
        return len(self._pending_done) + self._pending_in_arrays + len(self._pending_failed)

    def _take_pending(self) -> tuple[list[int], list[Any], dict[int, str | None]]:
        with self._pending_lock:
            taken = self._pending_done, self._pending_arrays, self._pending_failed
            self._pending_done, self._pending_arrays, self._pending_failed = [], [], {}
            self._pending_in_arrays = 0
        return taken

    def discard_pending(self) -> int:
        """Forget the records not yet written (their blocks will run again); return how
        many. For a run that stops because its ledger cannot be written."""
        singles, arrays, failed = self._take_pending()
        return len(singles) + sum(array.size for array in arrays) + len(failed)

    def flush(self) -> int:
        """Write the pending records in one commit; return how many.

        Callable from any thread (one flush at a time). When the commit fails the
        record is unchanged and the records stay pending for the next flush.

        Raises
        ------
        LedgerError
            Of the class that says what happened (see :func:`storage_error`).
        """
        with self._state_lock:
            singles, arrays, failed = self._take_pending()
            if not singles and not arrays and not failed:
                return 0
            count = len(singles) + sum(array.size for array in arrays)
            try:
                if self.read_only:
                    raise LedgerError(
                        f"ledger {self.path} was opened read-only; it cannot record")
                self._commit([*singles, *arrays], failed)
            except BaseException:
                # not written: back in front of the records that came in meanwhile
                with self._pending_lock:
                    self._pending_done[:0] = singles
                    self._pending_arrays[:0] = arrays
                    self._pending_in_arrays += sum(array.size for array in arrays)
                    failed.update(self._pending_failed)
                    self._pending_failed = failed
                raise
        return count + len(failed)

    def _commit(self, done: list, failed: dict[int, str | None]) -> None:
        """One commit that records ``done`` (ints and arrays) and ``failed`` blocks."""
        import numpy as np
        singles = [item for item in done if not isinstance(item, np.ndarray)]
        arrays = [item for item in done if isinstance(item, np.ndarray)]
        if singles:
            arrays.append(np.array(singles, dtype=np.int64))
        self._commit_arrays(arrays, failed, [])

    def forget_done(self, indices: Iterable[int]) -> int:
        """Mark blocks not done (and forget their failures), durably: pending records
        are written first, then one commit. Returns how many of them were done."""
        import numpy as np
        array = np.array(indices if isinstance(indices, np.ndarray) else list(indices),
                         dtype=np.int64).ravel()
        with self._state_lock:
            self.flush()
            if self.read_only:
                raise LedgerError(f"ledger {self.path} was opened read-only; it cannot "
                                  f"forget blocks")
            state = self._require_state()
            before = int(state.manifest["done"])
            self._commit_arrays([], {}, [array])
            return before - int(self._require_state().manifest["done"])

    def forget_failures(self, indices: Iterable[int] | None = None) -> None:
        """Drop failure records (all of them when ``indices`` is None), durably."""
        with self._state_lock:
            self.flush()
            state = self._require_state()
            drop = set(state.failed) if indices is None else set(indices) & set(state.failed)
            if drop:
                self._commit_arrays([], {}, [], drop_failed=drop)

    def _commit_arrays(self, done: list, failed: dict[int, str | None], forget: list,
                       drop_failed: set[int] | None = None) -> None:
        """Write one commit: blocks done, failed, forgotten (not done, not failed)."""
        import numpy as np
        with self._state_lock:
            state = self._require_state()
            indices = np.concatenate(done) if done else np.zeros(0, dtype=np.int64)
            forgotten = np.concatenate(forget) if forget else np.zeros(0, dtype=np.int64)
            for array in (indices, forgotten):
                if array.size and array.min() < 0:
                    raise LedgerError(
                        f"block index {int(array.min())} given to ledger {self.path} of "
                        f"task {self.task_id!r} is negative; indices are row-major "
                        f"positions in the task's block grid")
            chunks = dict(state.chunks)
            files = dict(state.files)
            #: chunk -> its packed bits after this commit
            changed: dict[int, Any] = {}
            for array, value in ((indices, 1), (forgotten, 0)):
                if not array.size:
                    continue
                order = array if bool((array[1:] >= array[:-1]).all()) else np.sort(array)
                numbers = order // CHUNK_BLOCKS
                bounds = np.flatnonzero(np.diff(numbers)) + 1
                for part in np.split(order, bounds):
                    chunk = int(part[0] // CHUNK_BLOCKS)
                    packed = changed.get(chunk)
                    if packed is None:
                        old = chunks.get(chunk)
                        if old is None and value == 0:
                            continue
                        packed = (old.copy() if old is not None
                                  else np.zeros(CHUNK_BYTES, dtype=np.uint8))
                    changed[chunk] = _set_bits(packed, part - chunk * CHUNK_BLOCKS, value)
            failed_now = state.failed
            failed_changed = False
            gone = [indices, forgotten]
            if drop_failed:
                gone.append(np.fromiter(drop_failed, dtype=np.int64, count=len(drop_failed)))
            if failed_now and any(array.size for array in gone):
                keys = np.fromiter(failed_now, dtype=np.int64, count=len(failed_now))
                hit = keys[np.isin(keys, np.concatenate(gone))]
                if hit.size:
                    failed_now = dict(failed_now)
                    for index in hit.tolist():
                        del failed_now[index]
                    failed_changed = True
            if failed:
                failed_now = {**failed_now, **failed}
                failed_changed = True
            for chunk, packed in list(changed.items()):
                old = chunks.get(chunk)
                if np.array_equal(packed, old) if old is not None else not packed.any():
                    del changed[chunk]  # (blocks recorded twice, forgotten ones not done)
            if not changed and not failed_changed:
                return
            generation = state.generation + 1
            written: list[str] = []
            superseded: list[str] = []
            try:
                for chunk, packed in changed.items():
                    count = _popcount(packed)
                    previous = files.get(chunk)
                    if previous is not None:
                        superseded.append(_chunk_name(chunk, previous[0]))
                    if count == 0:
                        chunks.pop(chunk, None)
                        files.pop(chunk, None)
                        continue
                    data = zlib.compress(packed.tobytes(), ZLIB_LEVEL)
                    name = _chunk_name(chunk, generation)
                    _write_whole(self.path, name, data)
                    written.append(name)
                    chunks[chunk] = packed
                    files[chunk] = (generation, count, zlib.crc32(data))
                failed_file = state.manifest.get("failed_file")
                if failed_changed:
                    if failed_file:
                        superseded.append(_failed_name(int(failed_file[0])))
                    failed_file = None
                    if failed_now:
                        data = json.dumps({str(index): error for index, error
                                           in sorted(failed_now.items())}).encode()
                        name = _failed_name(generation)
                        _write_whole(self.path, name, data)
                        written.append(name)
                        failed_file = [generation, zlib.crc32(data)]
                new = _State(dict(state.manifest), files, chunks,
                             failed_now if failed_changed else state.failed)
                new.manifest["generation"] = generation
                self._write_manifest(new, files, failed_file)
            except _RenamedNotDurable as failure:
                # the manifest in place names the new files: they stay, the commit is
                # made; only its durability is in doubt, and the next commit retries it
                self._state = new
                self._superseded.extend((time.monotonic(), name) for name in superseded)
                raise storage_error(self.path, self.task_id, failure.error,
                                    "written") from None
            except OSError as error:
                for name in written:
                    with contextlib.suppress(OSError):
                        os.unlink(self.path / name)
                raise storage_error(self.path, self.task_id, error, "written") from None
            self._state = new
            now = time.monotonic()
            self._superseded.extend((now, name) for name in superseded)
            self._remove_superseded(now - OLD_FILES_GRACE)

    def _write_manifest(self, state: _State, files: dict[int, tuple[int, int, int]],
                        failed_file: list | None) -> None:
        """Write ``state``'s manifest (after fsyncing the folder, so the files it names
        are there for any reader), and make the rename durable."""
        manifest = {  # format and generation first: readers peek at them (_HEAD)
            "format": FORMAT_VERSION, "generation": state.generation,
            "done": sum(count for _, count, _ in files.values()),
            "failed": len(state.failed), "task_id": self.task_id, "block_key": BLOCK_KEY,
            "geometry": self.geometry,
            "origin": self._origin if self._origin is not None
            else state.manifest.get("origin"),
            "chunk_blocks": CHUNK_BLOCKS,
            "chunks": [[chunk, *files[chunk]] for chunk in sorted(files)],
            "failed_file": failed_file,
        }
        _fsync_folder(self.path)
        _write_whole(self.path, MANIFEST, json.dumps(manifest).encode())
        state.manifest = manifest
        try:
            _fsync_folder(self.path)
        except OSError as error:
            raise _RenamedNotDurable(error) from error

    def _remove_superseded(self, before: float) -> None:
        """Remove files superseded before ``before`` (monotonic seconds): a reader that
        read the manifest naming them has had ``OLD_FILES_GRACE`` seconds to read them,
        and one that still misses one reads the manifest again."""
        keep = []
        for when, name in self._superseded:
            if when <= before:
                with contextlib.suppress(OSError):
                    os.unlink(self.path / name)
            else:
                keep.append((when, name))
        self._superseded = keep

    def close(self) -> None:
        """Flush and close the record (a reader: let go of it)."""
        with self._state_lock:
            if self._closed:
                return
            try:
                if self._legacy is not None:
                    self._legacy.close()
                elif not self.read_only:
                    self.flush()
                    self._remove_superseded(float("inf"))
            finally:
                self._closed = True

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


#: the head of a manifest: format first, generation second (see ``_write_manifest``)
_HEAD = re.compile(rb'\{"format": %d, "generation": (\d+),' % FORMAT_VERSION)


class _Stale(Exception):
    """A file named by the manifest was removed on the server meanwhile (ESTALE)."""

    @property
    def filename(self) -> str:
        return str(self.args[0])


def read_ledger_summary(path: str | os.PathLike) -> dict:
    """Task id, geometry, origin and counts of a ledger record, without knowing its task.

    One read of the manifest (no chunk), so ``BlockwiseTask.complete()`` can afford it.
    An SQLite file of an earlier version (given, or beside a ``path`` that has no record
    yet) is read as it is, without converting it.
    """
    path = Path(path)
    record = _record_of(path)
    if not (record / MANIFEST).is_file():
        legacy = path if path.name.endswith(LEGACY_SUFFIX) else legacy_path(record)
        if legacy.is_file():
            from . import _sqlite_ledger
            summary = _sqlite_ledger.read_ledger_summary(legacy)
            summary["origin"] = None
            return summary
        if record.is_dir():
            raise LedgerError(f"ledger {record} has no manifest yet (being created, or "
                              f"not a ledger)")
        raise LedgerError(f"no ledger at {path}")
    try:
        manifest = json.loads(_read_file(record / MANIFEST))
        task_id, geometry = manifest["task_id"], manifest["geometry"]
        done, failed = int(manifest["done"]), int(manifest["failed"])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise LedgerError(f"ledger {record} has no readable manifest ({error!r})") from None
    _check_format(record, manifest.get("format"))
    if not isinstance(geometry, dict) or not isinstance(task_id, str):
        raise LedgerError(f"ledger {record} has no task id or geometry recorded")
    return {"path": str(record), "task_id": task_id, "geometry": geometry,
            "done": done, "failed": failed, "total": geometry.get("num_blocks"),
            "origin": manifest.get("origin")}


def read_failed_blocks(path: str | os.PathLike) -> list[tuple[int, str | None]]:
    """``(index, error)`` of every block a record (or SQLite file) holds as failed,
    without knowing its task."""
    summary = read_ledger_summary(path)
    path = Path(path)
    with Ledger(path if path.name.endswith(LEGACY_SUFFIX) else summary["path"],
                summary["task_id"], summary["geometry"], read_only=True) as ledger:
        return ledger.failed_blocks()

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

    def done_blocks(self) -> dict[str, PackedBlocks]:
        """Per task, the blocks recorded as done, as packed bits (no index per block)."""
        return {task_id: ledger.done_packed() for task_id, ledger in self.ledgers.items()}

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
