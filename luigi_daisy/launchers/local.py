"""Local launcher: workers are processes on this machine.

By default (``start_method="spawn"``) each worker is a fresh Python process,
``python -m luigi_daisy.worker --payload-fd N``, that reads its payload from a pipe.
With ``start_method="fork"`` workers are forks of the running process, as in daisy 1.x.
Either way a worker runs in its own process group (a kill ends whatever it started), dies
with the run, and writes ``<log_dir>/<task_id>/worker_<id>.out`` and ``.err``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from ..errors import TaskDefinitionError, UnsafePathError
from ..logging import get_log_basedir
from ..payload import WorkerPayload
from ..safe_files import check_log_folders, open_log
from .base import Launcher, WorkerHandle, WorkerSpec

logger = logging.getLogger(__name__)

START_METHODS = ("spawn", "fork")

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class SpawnedWorker(WorkerHandle):
    """A worker started as a fresh process."""

    def __init__(self, spec: WorkerSpec, process: subprocess.Popen) -> None:
        self.task_id = spec.task_id
        self.worker_id = spec.worker_id
        self.stdout_path = spec.stdout_path
        self.stderr_path = spec.stderr_path
        self.process = process

    @property
    def pid(self) -> int:
        """Process id."""
        return self.process.pid

    def exit_code(self) -> int | None:
        """None while running, else the exit code (negative: killed by that signal)."""
        return self.process.poll()

    def kill(self) -> None:
        """SIGKILL to the worker's process group."""
        if self.process.poll() is None:
            _kill_group(self.process.pid)

    def wait(self, timeout: float) -> bool:
        """Wait for the worker to exit; True if it did."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def describe(self) -> str:
        """``"pid 1234"``."""
        return f"pid {self.process.pid}"


class ForkedWorker(WorkerHandle):
    """A worker forked from the running process."""

    def __init__(self, spec: WorkerSpec, process: multiprocessing.process.BaseProcess) -> None:
        self.task_id = spec.task_id
        self.worker_id = spec.worker_id
        self.stdout_path = spec.stdout_path
        self.stderr_path = spec.stderr_path
        self.process = process

    @property
    def pid(self) -> int | None:
        """Process id."""
        return self.process.pid

    def exit_code(self) -> int | None:
        """None while running, else the exit code (negative: killed by that signal)."""
        return self.process.exitcode

    def kill(self) -> None:
        """SIGKILL to the worker's process group."""
        if self.process.exitcode is None and self.process.pid is not None:
            _kill_group(self.process.pid)

    def wait(self, timeout: float) -> bool:
        """Wait for the worker to exit; True if it did."""
        self.process.join(timeout)
        return self.process.exitcode is not None

    def describe(self) -> str:
        """``"pid 1234"``."""
        return f"pid {self.process.pid}"


def _redirect_output(stdout_path: Path | None, stderr_path: Path | None) -> None:
    """Point file descriptors 1 and 2, and ``sys.stdout`` / ``sys.stderr``, at the logs.

    Works whatever the parent had made of ``sys.stdout`` (a ``StringIO`` under pytest's
    capture or ``contextlib.redirect_stdout`` has no file descriptor).
    """
    if stdout_path is None:  # no log files: keep the run's own stdout and stderr
        return
    for path, descriptor_number in ((stdout_path, 1), (stderr_path, 2)):
        descriptor = open_log(path)
        os.dup2(descriptor, descriptor_number)
        os.close(descriptor)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


def _forked_worker_main(spec: WorkerSpec, parent_pid: int) -> None:
    exit_code = 1
    try:
        # the run's sockets (listener, other workers' connections) are not this worker's
        for descriptor in spec.private_fds:
            try:
                os.close(descriptor)
            except OSError:
                pass
        # its own process group: a timeout kills the worker and any subprocess it started
        os.setpgid(0, 0)
        from ..context import Context
        from ..worker import configure_worker_logging, die_with_parent, run_worker
        die_with_parent(parent_pid)
        _redirect_output(spec.stdout_path, spec.stderr_path)
        configure_worker_logging()
        os.environ.update(spec.environment)
        context = Context.from_env()
        exit_code = run_worker(spec.payload.target.process_function(), context)
    except BaseException:  # noqa: BLE001 - whatever ends the worker goes to its log
        message = (f"worker {spec.worker_id} of task {spec.task_id!r} stopped:\n"
                   f"{traceback.format_exc()}")
        if spec.stderr_path is None:
            sys.stderr.write(message)
        else:
            try:
                with os.fdopen(open_log(spec.stderr_path), "a") as log:
                    log.write(message)
            except (OSError, UnsafePathError):
                sys.stderr.write(message)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(exit_code)


def _write_all(descriptor: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            written = os.write(descriptor, view)
            view = view[written:]
    except BrokenPipeError:
        pass  # the child died before reading; its exit code tells the run
    finally:
        os.close(descriptor)


class LocalLauncher(Launcher):
    """Starts workers as processes on this machine.

    Parameters
    ----------
    log_dir:
        Folder for the workers' ``.out`` and ``.err`` files; None (the default): the
        folder of :mod:`luigi_daisy.logging` at this moment, where None means no files
        (workers print to this process's stdout and stderr).
    start_method:
        ``"spawn"`` (default): every worker is a fresh Python process that receives the
        process function pickled with cloudpickle. ``"fork"``: workers are forks of this
        process, as in daisy 1.x; objects reach them by inheritance, unpickled. The
        hazard of fork: a process that has started threads (dask, zarr 3's event loop,
        a CUDA context, a thread pool) hands its forks locks that threads held at the
        fork and that no one in the fork will ever release, so a worker can hang on its
        first read with no error.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None,
                 start_method: str = "spawn") -> None:
        if start_method not in START_METHODS:
            raise TaskDefinitionError(
                f"start_method must be one of {', '.join(map(repr, START_METHODS))}, got "
                f"{start_method!r}")
        if log_dir is None:
            log_dir = get_log_basedir()
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.start_method = start_method
        self.workers: list[SpawnedWorker | ForkedWorker] = []
        self._serialised: dict[int, tuple[WorkerPayload, bytes, list[int]]] = {}
        self._fork_context = multiprocessing.get_context("fork")
        self._checked_folders: set[Path] = set()

    def prepare(self, payload: WorkerPayload) -> None:
        """Serialise ``payload`` once for all its workers (spawn); nothing for fork."""
        if self.start_method == "spawn":
            self._bytes_for_child(payload)

    def _bytes_for_child(self, payload: WorkerPayload) -> tuple[bytes, list[int]]:
        known = self._serialised.get(id(payload))
        if known is None or known[0] is not payload:
            data, fds = payload.to_bytes_for_child()
            known = self._serialised[id(payload)] = (payload, data, fds)
        return known[1], known[2]

    def start(self, spec: WorkerSpec) -> WorkerHandle:
        """Start one worker.

        Raises
        ------
        UnsafePathError
            The log folder is open to others (and not sticky), or a log file is a
            symbolic link or another user's file.
        """
        if spec.stdout_path is not None:
            check_log_folders(spec.stdout_path.parent, self._checked_folders)
        if self.start_method == "fork":
            if spec.stdout_path is not None:
                # created here, where a planted link is refused with an error: the
                # child appends to these files (a spawned child gets them opened)
                for path in (spec.stdout_path, spec.stderr_path):
                    os.close(open_log(path))
            worker = self._fork(spec)
        else:
            worker = self._spawn(spec)
        self.workers.append(worker)
        return worker

    def _spawn(self, spec: WorkerSpec) -> SpawnedWorker:
        data, inherited = self._bytes_for_child(spec.payload)
        read_end, write_end = os.pipe()
        try:
            # a payload that fits the pipe is written without waiting for the child
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, min(max(len(data), 1 << 16), 1 << 20))
        except OSError:
            pass
        from ..worker import PARENT_PID_VARIABLE
        environment = dict(os.environ)
        environment.update(spec.environment)
        environment[PARENT_PID_VARIABLE] = str(os.getpid())
        try:
            with contextlib.ExitStack() as files:
                stdout = stderr = None  # no log files: the run's own stdout and stderr
                if spec.stdout_path is not None:
                    stdout = files.enter_context(os.fdopen(open_log(spec.stdout_path), "ab"))
                    stderr = files.enter_context(os.fdopen(open_log(spec.stderr_path), "ab"))
                process = subprocess.Popen(
                    [*self.worker_command(), "--payload-fd", str(read_end)],
                    stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=environment,
                    pass_fds=(read_end, *inherited), close_fds=True, process_group=0)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        try:
            pipe_size = fcntl.fcntl(write_end, getattr(fcntl, "F_GETPIPE_SZ", 1032))
        except OSError:
            pipe_size = 1 << 16
        if len(data) <= pipe_size:
            _write_all(write_end, data)
        else:
            threading.Thread(target=_write_all, args=(write_end, data), daemon=True,
                             name=f"luigi_daisy-payload-{spec.worker_id}").start()
        return SpawnedWorker(spec, process)

    def _fork(self, spec: WorkerSpec) -> ForkedWorker:
        process = self._fork_context.Process(
            target=_forked_worker_main, args=(spec, os.getpid()), name=spec.job_name,
            daemon=False)
        process.start()
        return ForkedWorker(spec, process)

    def poll(self) -> None:
        """Reap workers that exited (their exit codes are read live)."""
        for worker in self.workers:
            worker.exit_code()

    def stop_all(self, timeout: float) -> list[str]:
        """SIGKILL every running worker's process group and wait up to ``timeout``."""
        for worker in self.workers:
            worker.kill()
        deadline = time.monotonic() + timeout
        alive = []
        for worker in self.workers:
            if not worker.wait(max(0.0, deadline - time.monotonic())):
                alive.append(f"worker {worker.worker_id} of {worker.task_id!r} "
                             f"({worker.describe()})")
        self.workers = [worker for worker in self.workers if worker.exit_code() is None]
        return alive
