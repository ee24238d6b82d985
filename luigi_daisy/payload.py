"""What a worker process runs, and how it travels to a fresh process.

A :class:`WorkerPayload` holds a *target* (an object whose ``process_function()`` gives
the function the worker runs: a daisy-style function, or a Luigi ``BlockwiseTask``
rebuilt from its family and parameters) plus the parent's ``sys.path`` and working
directory, so that functions pickled by reference import in the child as they did in
the parent (what multiprocessing's spawn preparation data does).

It is serialised in two frames: the first (plain pickle) holds ``sys.path`` and the
working directory and is applied before the second (cloudpickle) is loaded. It reaches
the worker through a pipe of a local child (``--payload-fd N``) or, for cluster jobs, a
file only its owner can read, named by ``LUIGI_DAISY_PAYLOAD_FILE``; never on a command
line. A cluster job's context (with the run's token) comes in a file of its own, named
by ``LUIGI_DAISY_CONTEXT_FILE``, which the worker deletes once read: a job's environment
is kept in the batch system's records, which other users may query (``qsub -V``).

Workers never delete the payload file: one file serves every worker of a task, the
replacements started later and a job the batch system starts again (a requeue). The run
removes it when it ends; a run killed outright leaves it to a later run of the same user
with the same log folder, which removes it once that run is clearly gone
(:class:`RunFiles`, :func:`remove_stale_files`).

For a local child the target is pickled while multiprocessing's *spawning popen* is set,
so objects multiprocessing lets travel to its own spawn children (shared-memory arenas of
``multiprocessing.Array``, named semaphores) travel here too: their file descriptors are
passed to the child. A lock made in multiprocessing's ``fork`` context (the default on
Linux before Python 3.14) has no name another process could open; it is moved onto a
named semaphore before pickling (see :func:`_rehome_fork_semlock`).
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import pickle
import re
import stat
import struct
import sys
import types
from collections import ChainMap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from .errors import PayloadError, UnserialisableFunctionError
from .safe_files import check_folder, own_subfolder

if TYPE_CHECKING:
    from pathlib import Path

logger = logging.getLogger(__name__)

#: environment variable naming the payload file of a cluster job
PAYLOAD_FILE_VARIABLE = "LUIGI_DAISY_PAYLOAD_FILE"
#: environment variable naming the context file of a cluster job (its token: a job's
#: environment may be shown to other users, e.g. by ``qstat -f`` after ``qsub -V``)
CONTEXT_FILE_VARIABLE = "LUIGI_DAISY_CONTEXT_FILE"

_LENGTH = struct.Struct("<Q")
_MAX_FRAME = 1 << 34


class Target(Protocol):
    """What a worker runs: ``process_function()`` returns ``f(block)`` or a worker loop
    without arguments. ``describe()`` names it in errors."""

    def process_function(self) -> Callable[..., Any]:
        """The function the worker runs (built in the worker)."""

    def describe(self) -> str:
        """A short name for messages."""


@dataclass
class FunctionTarget:
    """A daisy-style process function, carried by value (cloudpickle)."""

    function: Callable[..., Any]

    def process_function(self) -> Callable[..., Any]:
        """The function itself."""
        return self.function

    def describe(self) -> str:
        """The function's qualified name."""
        return _name_of(self.function)


@dataclass
class PoolTarget:
    """What the workers of a pool run: the targets of every task the pool serves.

    A pool worker builds a task's process function the first time it gets a block of
    that task (a ``BlockwiseTask``'s ``setup_worker`` runs then) and keeps it.
    """

    targets: dict[str, Any]

    def process_function(self) -> PoolFunction:
        """The per-block function that sends each block to its task's function."""
        return PoolFunction(self.targets)

    def describe(self) -> str:
        """The tasks of the pool."""
        return f"a pool of workers for {', '.join(map(repr, self.targets))}"


class PoolFunction:
    """A pool worker's process function: each block goes to the process function of its
    own task, built (and so set up) the first time this worker meets the task.

    A task whose function cannot be built (its module does not import, its setup
    fails) raises :class:`~luigi_daisy.errors.WorkerSetupError` for every block of it:
    the worker reports once that it cannot work on that task, and goes on serving the
    others.
    """

    #: the worker loop goes on after a WorkerSetupError (see luigi_daisy.worker)
    serves_several_tasks = True

    def __init__(self, targets: dict[str, Any]) -> None:
        self.targets = targets
        self.functions: dict[str, Callable[..., Any]] = {}
        self.setup_failures: dict[str, str] = {}

    def __call__(self, block: Any) -> None:
        task_id = block.task_id
        function = self.functions.get(task_id)
        if function is None:
            function = self._build(task_id)
        function(block)

    def _build(self, task_id: str) -> Callable[..., Any]:
        from .errors import WorkerSetupError

        failure = self.setup_failures.get(task_id)
        if failure is None:
            target = self.targets.get(task_id)
            if target is None:
                failure = (f"this worker's pool serves {', '.join(map(repr, self.targets))}, "
                           f"not {task_id!r}")
            else:
                try:
                    function = self.functions[task_id] = target.process_function()
                    return function
                except Exception:  # noqa: BLE001 - whatever stops the task goes to its log
                    import traceback
                    failure = traceback.format_exc()
            self.setup_failures[task_id] = failure
        raise WorkerSetupError(f"{task_id} cannot process any block in this worker:\n"
                               f"{failure}")


@dataclass
class WorkerPayload:
    """What one task's workers run, and what they need to import it.

    Parameters
    ----------
    target:
        A :class:`FunctionTarget` or another object with ``process_function()`` and
        ``describe()`` (the Luigi layer's ``BlockwiseTaskTarget``).
    task_id:
        The task, for messages.
    sys_path, cwd:
        The parent's import path and working directory (default: this process's).
    """

    target: Any
    task_id: str = ""
    sys_path: list[str] = field(default_factory=lambda: list(sys.path))
    cwd: str = field(default_factory=os.getcwd)

    def to_bytes(self) -> bytes:
        """Serialise for a file (no file descriptors can travel with it).

        Raises
        ------
        UnserialisableFunctionError
            Naming the object that cannot be pickled and what to do about it.
        """
        return self._serialise(None)

    def to_bytes_for_child(self) -> tuple[bytes, list[int]]:
        """Serialise for a local child; return the bytes and the file descriptors the
        child must inherit (shared memory of ``multiprocessing.Array`` and the like)."""
        spawning = _SpawningChild()
        return self._serialise(spawning), spawning.fds

    def _serialise(self, spawning: _SpawningChild | None) -> bytes:
        header = pickle.dumps({"sys_path": self.sys_path, "cwd": self.cwd,
                               "task_id": self.task_id})
        try:
            body = _dumps(self.target, spawning)
        except Exception as error:
            raise UnserialisableFunctionError(
                _unserialisable_message(self, error, spawning)) from error
        return _LENGTH.pack(len(header)) + header + _LENGTH.pack(len(body)) + body


# ---------------------------------------------------------------------- pickling
class _SpawningChild:
    """Stands in for multiprocessing's spawning popen while a payload is pickled:
    records the descriptors the child must inherit (passed with the same numbers)."""

    def __init__(self) -> None:
        from multiprocessing.popen_spawn_posix import _DupFd
        self.DupFd = _DupFd
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        """Keep ``fd`` open in the child under the same number."""
        if fd not in self.fds:
            self.fds.append(fd)
        return fd


def _dumps(target: Any, spawning: _SpawningChild | None) -> bytes:
    from multiprocessing import context, reduction, synchronize

    import cloudpickle

    class PayloadPickler(cloudpickle.Pickler):
        def __init__(self, file: BinaryIO) -> None:
            # the C pickler reads dispatch_table once, in __init__
            self.dispatch_table = ChainMap(reduction.ForkingPickler._extra_reducers,
                                           cloudpickle.Pickler.dispatch_table)
            super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)

        def reducer_override(self, obj: Any) -> Any:
            if (spawning is not None and isinstance(obj, synchronize.SemLock)
                    and getattr(obj, "_is_fork_ctx", False)):
                _rehome_fork_semlock(obj)
            return super().reducer_override(obj)

    buffer = io.BytesIO()
    if spawning is None:
        PayloadPickler(buffer).dump(target)
        return buffer.getvalue()
    previous = context.get_spawning_popen()
    context.set_spawning_popen(spawning)
    try:
        PayloadPickler(buffer).dump(target)
    finally:
        context.set_spawning_popen(previous)
    return buffer.getvalue()


def _rehome_fork_semlock(lock: Any) -> None:
    """Move a lock of multiprocessing's fork context onto a named semaphore.

    A fork-context ``SemLock`` is unlinked at creation, so only forks can share it; a
    spawned child opens a semaphore by name. The lock keeps its Python object (closures
    and ``multiprocessing.Array`` wrappers hold that) and gets a named semaphore of the
    same kind and current value. Processes forked from it *before* this call keep the old
    semaphore. A lock held right now cannot move: its holder would release the old one.
    """
    import _multiprocessing
    from multiprocessing import synchronize, util
    from multiprocessing.resource_tracker import register

    old = lock._semlock
    if old._count() > 0 or (old.kind == synchronize.RECURSIVE_MUTEX and old._is_zero()):
        raise PayloadError(
            f"a {type(lock).__name__} of multiprocessing's fork context is held right "
            f"now, so it cannot be handed to a fresh worker process")
    value = old._get_value()
    if old.kind == synchronize.SEMAPHORE and old.maxvalue == 1 and value == 0:
        raise PayloadError(
            f"a {type(lock).__name__} of multiprocessing's fork context is held right "
            f"now, so it cannot be handed to a fresh worker process")
    for _ in range(100):
        try:
            new = _multiprocessing.SemLock(old.kind, value, old.maxvalue,
                                           synchronize.SemLock._make_name(), False)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError("cannot find a name for a semaphore")
    register(new.name, "semaphore")
    util.Finalize(lock, synchronize.SemLock._cleanup, (new.name,), exitpriority=0)
    lock._semlock = new
    lock._is_fork_ctx = False
    lock._make_methods()


# ---------------------------------------------------------------------- errors
def _name_of(obj: Any) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if name is None:
        return f"a {type(obj).__module__}.{type(obj).__qualname__} object"
    module = getattr(obj, "__module__", None)
    return f"{module}.{name}" if module else name


def _references(obj: Any) -> list[tuple[str, Any]]:
    """What a function (or callable object) carries with it: ``(description, value)``."""
    found: list[tuple[str, Any]] = []
    if isinstance(obj, types.MethodType):
        found.append((f"the object {_name_of(obj)} is bound to", obj.__self__))
        obj = obj.__func__
    if isinstance(obj, types.FunctionType):
        code = obj.__code__
        for name, cell in zip(code.co_freevars, obj.__closure__ or ()):
            try:
                found.append((f"the closure variable {name!r} of {_name_of(obj)}",
                              cell.cell_contents))
            except ValueError:
                continue
        names = set(code.co_names)
        for constant in code.co_consts:
            if isinstance(constant, types.CodeType):
                names.update(constant.co_names)
        for name in sorted(names):
            if name in obj.__globals__:
                value = obj.__globals__[name]
                if not isinstance(value, types.ModuleType):
                    found.append((f"the global {name!r} used by {_name_of(obj)}", value))
        for index, default in enumerate(obj.__defaults__ or ()):
            found.append((f"default argument {index} of {_name_of(obj)}", default))
    else:
        for name, value in getattr(obj, "__dict__", {}).items():
            found.append((f"the attribute {name!r} of {_name_of(obj)}", value))
    return found


def _culprit(obj: Any, spawning: _SpawningChild | None, depth: int = 0
             ) -> tuple[str, Any, Exception] | None:
    """The innermost reference of ``obj`` that cannot be pickled, if one can be named."""
    if depth > 3:
        return None
    for description, value in _references(obj):
        try:
            _dumps(value, spawning)
        except Exception as error:  # noqa: BLE001
            deeper = _culprit(value, spawning, depth + 1)
            return deeper if deeper is not None else (description, value, error)
    return None


def _unserialisable_message(payload: WorkerPayload, error: Exception,
                            spawning: _SpawningChild | None) -> str:
    target = payload.target
    function = target.function if isinstance(target, FunctionTarget) else target
    culprit = _culprit(function, spawning)
    where = f"task {payload.task_id!r}: " if payload.task_id else ""
    if culprit is not None:
        description, value, inner = culprit
        what = (f"{description} (a {type(value).__module__}.{type(value).__qualname__}) "
                f"cannot travel to a fresh worker process: {inner}")
    else:
        what = f"{target.describe()} cannot travel to a fresh worker process: {error}"
    return (f"{where}{what}. Workers are fresh processes that receive the process "
            f"function pickled (cloudpickle). Make the object importable (define it at "
            f"module level), or create it in the worker (inside the process function, "
            f"or a BlockwiseTask's setup_worker), or run with start_method='fork' "
            f"(workers forked from this process; see run_blockwise for its hazards).")


# ---------------------------------------------------------------------- reading
def _read_exactly(stream: BinaryIO, count: int) -> bytes:
    chunks = []
    while count:
        chunk = stream.read(count)
        if not chunk:
            raise PayloadError("the worker payload ended early (truncated)")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def _read_frame(stream: BinaryIO) -> bytes:
    (length,) = _LENGTH.unpack(_read_exactly(stream, _LENGTH.size))
    if length > _MAX_FRAME:
        raise PayloadError(f"the worker payload announces a frame of {length} bytes")
    return _read_exactly(stream, length)


def read_payload(stream: BinaryIO) -> WorkerPayload:
    """Read a payload; restore the parent's ``sys.path`` (and working directory, when
    it exists here) before the target is unpickled."""
    header = pickle.loads(_read_frame(stream))
    body = _read_frame(stream)
    for entry in reversed(header["sys_path"]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if header["cwd"] and os.path.isdir(header["cwd"]):
        os.chdir(header["cwd"])
    target = pickle.loads(body)
    return WorkerPayload(target, header["task_id"], header["sys_path"], header["cwd"])


def read_payload_from_fd(fd: int) -> WorkerPayload:
    """Read a payload from a pipe (a local child's ``--payload-fd``) and close it."""
    with os.fdopen(fd, "rb") as stream:
        return read_payload(stream)


def read_payload_file(path: str | os.PathLike) -> WorkerPayload:
    """Read a payload file; refuse one that others could read or write.

    Raises
    ------
    PayloadError
        The file is missing, not owned by this user, or open to group or others.
    """
    with _open_private(path, "payload") as stream:
        return read_payload(stream)


def _open_private(path: str | os.PathLike, what: str, if_missing: str = "") -> BinaryIO:
    """Open the worker's ``what`` file for reading, never through a link, refusing one
    that is not this user's or that others could read (mode 0600 expected).

    Raises
    ------
    PayloadError
        The file cannot be opened (``if_missing`` follows the error), or is open to
        others.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as error:
        raise PayloadError(
            f"cannot open the worker {what} file {path}: {error}{if_missing}") from None
    stream = os.fdopen(descriptor, "rb")
    status = os.fstat(descriptor)
    if status.st_uid != os.getuid() or status.st_mode & 0o077:
        stream.close()
        raise PayloadError(
            f"refusing the worker {what} file {path}: it must belong to this user "
            f"and be readable by no one else (mode 0600), found uid {status.st_uid} "
            f"and mode {status.st_mode & 0o777:o}")
    return stream


def private_folder(folder: str | os.PathLike) -> Path:
    """Make ``folder`` (``<log_dir>/.payloads-<uid>``, see :func:`payload_folder`) with
    mode 0700 if missing; check its parent like every log folder and refuse it unless it
    is a real folder of this user (write permission for group or others is removed).

    Raises
    ------
    UnsafePathError
        The log folder is open to others, or ``folder`` is a link or another user's.
    """
    from pathlib import Path

    folder = Path(folder)
    check_folder(folder.parent, "log folder")
    own_subfolder(folder, "payload folder", mode=0o700)
    return folder


def payload_folder(log_dir: str | os.PathLike) -> Path:
    """This user's folder of payload and context files in ``log_dir``:
    ``<log_dir>/.payloads-<uid>``. One per user, so that users sharing a sticky log
    folder never meet in it: a ``.payloads-*`` folder of another uid is simply someone
    else's."""
    from pathlib import Path

    return Path(log_dir).absolute() / f".payloads-{os.getuid()}"


def write_private_file(folder: str | os.PathLike, prefix: str, data: bytes,
                       suffix: str = ".pickle") -> Path:
    """Write ``data`` to a new file in ``folder`` (checked by :func:`private_folder`)
    that only its owner can read (``mkstemp``: ``O_EXCL``, mode 0600); return its
    path."""
    import tempfile
    from pathlib import Path

    folder = private_folder(folder)
    descriptor, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view):]
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    finally:
        os.close(descriptor)
    return Path(name)


#: seconds between two refreshes of a live run's lock file (its mtime)
LOCK_REFRESH_INTERVAL = 300.0
#: seconds without a refresh after which a run whose lock is free counts as gone; far
#: longer than :data:`LOCK_REFRESH_INTERVAL`, so that a live run whose lock another host
#: cannot see (locks kept per client: BeeGFS by default, NFS with ``local_lock``,
#: Lustre ``localflock``) is never taken for a dead one
STALE_AFTER = 3600.0
#: ``flock`` errors that mean "this file system does not lock" (Lustre ``noflock``, some
#: FUSE and NFS mounts): files are then never taken for stale ones
_NO_LOCKS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})
#: a run's files are ``<run id>.<kind>...``; others are not this module's to remove
_RUN_FILE = re.compile(r"^(run-[0-9a-f]{16})\.")
_said_no_locks = False


def _locks_unsupported(error: OSError, folder: object) -> bool:
    """True (and said once) when ``error`` of ``flock`` means the file system does not
    lock."""
    global _said_no_locks
    if error.errno not in _NO_LOCKS:
        return False
    if not _said_no_locks:
        _said_no_locks = True
        logger.info("the file system of %s does not support flock (%s): payload files "
                    "of runs killed outright are not removed there; remove old files "
                    "in it by hand", folder, os.strerror(error.errno or 0))
    return True


class RunFiles:
    """The payload and context files of one run, in this user's payload folder.

    The run holds one ``flock`` on ``<run id>.lock`` for its life (one descriptor,
    however many jobs it submits) and names its files ``<run id>.<kind>-*``. The OS
    lets go of the lock however the run ends (a SIGKILL included; on NFS once the dead
    host's lease ends), and the run refreshes the lock file's mtime every
    :data:`LOCK_REFRESH_INTERVAL` seconds (:meth:`refresh`): a later run removes a
    run's files when its lock is free *and* its lock file was not refreshed for
    :data:`STALE_AFTER` seconds (:func:`remove_stale_files`). Where the file system
    does not lock, nothing is removed as stale and nothing fails.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        import threading
        from pathlib import Path

        self.folder = Path(folder)
        self.run_id: str | None = None
        self._descriptor: int | None = None
        # refresh() runs on another thread than close(): never utime a closed descriptor
        self._lock = threading.Lock()

    def _open(self) -> str:
        """Check the folder, remove the files of runs that are gone, create and lock
        this run's lock file; return the run id."""
        import secrets

        if self.run_id is not None:
            return self.run_id
        private_folder(self.folder)
        for path in remove_stale_files(self.folder):
            logger.info("removed %s, left behind by a run that is gone", path)
        run_id = f"run-{secrets.token_hex(8)}"
        descriptor = os.open(self.folder / f"{run_id}.lock",
                             os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
        try:
            # blocking: another run's remove_stale_files may hold it for a moment
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError as error:
            if not _locks_unsupported(error, self.folder):
                os.close(descriptor)
                raise
        self.run_id, self._descriptor = run_id, descriptor
        return run_id

    def write(self, kind: str, data: bytes, suffix: str) -> Path:
        """A new file ``<run id>.<kind>-XXXX<suffix>`` holding ``data``, mode 0600; the
        first call of a run removes the files of runs that are gone."""
        run_id = self._open()
        return write_private_file(self.folder, f"{run_id}.{kind}-", data, suffix)

    def refresh(self) -> None:
        """Set the lock file's mtime to now: the run is alive (for runs on hosts that
        cannot see its lock). Call it every :data:`LOCK_REFRESH_INTERVAL` seconds, off
        the event loop (it touches a file, maybe on a slow file system)."""
        with self._lock:
            if self._descriptor is None:
                return
            try:
                os.utime(self._descriptor)
            except OSError as error:
                logger.warning("cannot refresh the lock file of run %s in %s: %s",
                               self.run_id, self.folder, error)

    def close(self) -> None:
        """Remove this run's files, then its lock file, and let go of the lock."""
        with self._lock:
            if self._descriptor is None:
                return
            _remove_run(self.folder, self.run_id or "")
            os.close(self._descriptor)
            self.run_id = self._descriptor = None


def _remove_run(folder: Path, run_id: str, names: list[str] | None = None) -> list[Path]:
    """Remove ``<run id>.*`` files in ``folder``, the lock file last."""
    removed = []
    for name in sorted(os.listdir(folder) if names is None else names,
                       key=lambda name: name.endswith(".lock")):
        if name.startswith(f"{run_id}."):
            path = folder / name
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


def remove_stale_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the files of runs that are gone from a payload folder; return them.

    A run's files (see :class:`RunFiles`) are stale when its lock can be taken and its
    lock file was not refreshed for :data:`STALE_AFTER` seconds; files of a run whose
    lock file is missing, when they are that old themselves. Nothing is removed where
    ``flock`` is not supported; files not named like a run's are left alone.
    """
    import time
    from pathlib import Path

    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    runs: dict[str, list[str]] = {}
    for name in names:
        match = _RUN_FILE.match(name)
        if match:
            runs.setdefault(match.group(1), []).append(name)
    removed: list[Path] = []
    now = time.time()
    for run_id, files in runs.items():
        if f"{run_id}.lock" not in files:
            old = []
            for name in files:
                try:
                    status = os.lstat(folder / name)
                except FileNotFoundError:
                    continue
                if status.st_uid == os.getuid() and stat.S_ISREG(status.st_mode) \
                        and now - status.st_mtime > STALE_AFTER:
                    old.append(name)
            removed += _remove_run(folder, run_id, old)
            continue
        try:
            descriptor = os.open(folder / f"{run_id}.lock",
                                 os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            status = os.fstat(descriptor)
            if status.st_uid != os.getuid() or not stat.S_ISREG(status.st_mode):
                continue
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if _locks_unsupported(error, folder):
                    return removed  # no lock tells a live run from a dead one here
                continue  # its run is alive
            if now - status.st_mtime <= STALE_AFTER:
                continue  # refreshed lately: alive on a host whose locks are its own
            removed += _remove_run(folder, run_id, files)
        finally:
            os.close(descriptor)
    return removed


def write_payload_file(payload: WorkerPayload, folder: str | os.PathLike) -> Path:
    """Write ``payload`` to a new file in ``folder`` that only its owner can read.

    ``folder`` is created with mode 0700 if missing and must not be open to others; the
    file is created with ``O_EXCL`` and mode 0600. Returns the file's path (for
    ``LUIGI_DAISY_PAYLOAD_FILE``).
    """
    return write_private_file(folder, "payload-", payload.to_bytes())


def read_context_file(path: str | os.PathLike) -> str:
    """Read a worker's context file (``LUIGI_DAISY_CONTEXT_FILE``) and delete it: it
    serves one job, and the token it holds is best not left on disk.

    Raises
    ------
    PayloadError
        The file is missing, a link, not this user's or readable by others.
    """
    with _open_private(path, "context", ". Each job reads its own once; a job the "
                       "batch system started again (a requeue) finds it gone and ends, "
                       "and the run starts a replacement") as stream:
        text = stream.read().decode()
    os.unlink(path)
    return text
