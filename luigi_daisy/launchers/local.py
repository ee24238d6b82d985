"""Local launcher: workers are forked processes of the running script.

Forking lets process functions defined in ``__main__``, lambdas and closures reach the
workers without pickling. Each worker writes ``<log_dir>/<task_id>/worker_<id>.out`` and
``.err``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from ..context import DAISY_ENV_VARIABLE, ENV_VARIABLE, Context, safe_file_name
from ..logging import get_log_basedir

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass
class WorkerProcess:
    """One started worker."""

    task_id: str
    worker_id: int
    process: multiprocessing.process.BaseProcess
    stdout_path: Path | None
    stderr_path: Path | None

    @property
    def pid(self) -> int | None:
        """Process id."""
        return self.process.pid

    def exit_code(self) -> int | None:
        """None while running, else the exit code (negative: killed by that signal)."""
        return self.process.exitcode

    def kill(self) -> None:
        """Stop the worker and whatever it started (SIGKILL to its process group)."""
        if self.process.exitcode is None and self.process.pid is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def join(self, timeout: float) -> bool:
        """Wait for the worker to exit; True if it did."""
        self.process.join(timeout)
        return self.process.exitcode is not None


def _redirect_output(stdout_path: Path, stderr_path: Path) -> None:
    """Point file descriptors 1 and 2, and ``sys.stdout`` / ``sys.stderr``, at the logs.

    Works whatever the parent had made of ``sys.stdout`` (a ``StringIO`` under pytest's
    capture or ``contextlib.redirect_stdout`` has no file descriptor).
    """
    for path, descriptor_number in ((stdout_path, 1), (stderr_path, 2)):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(descriptor, descriptor_number)
        os.close(descriptor)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives with the process
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this worker when the run's process dies (Linux), so a crashed
    run leaves no worker behind holding its blocks, sockets or file locks."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker_main(process_function, context: Context, stdout_path: Path,
                 stderr_path: Path, parent_pid: int) -> None:
    exit_code = 1
    try:
        # its own process group: a timeout kills the worker and any subprocess it started
        os.setpgid(0, 0)
        _die_with_parent(parent_pid)
        from ..worker import run_worker
        if stdout_path is not None:
            _redirect_output(stdout_path, stderr_path)
        encoded = context.to_env()
        os.environ[ENV_VARIABLE] = encoded
        os.environ[DAISY_ENV_VARIABLE] = encoded
        exit_code = run_worker(process_function, context)
    except BaseException:  # noqa: BLE001 - whatever ends the worker goes to its log
        message = (f"worker {context.get('worker_id')} of task {context.get('task_id')!r} "
                   f"stopped:\n{traceback.format_exc()}")
        if stderr_path is None:
            sys.stderr.write(message)
        else:
            with open(stderr_path, "a") as log:
                log.write(message)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(exit_code)


class LocalLauncher:
    """Starts workers as forked processes on this machine.

    Parameters
    ----------
    log_dir:
        Folder for the workers' ``.out`` and ``.err`` files; None (the default): the
        folder of :mod:`luigi_daisy.logging` at this moment, where None means no files
        (workers print to this process's stdout and stderr).
    """

    def __init__(self, log_dir: str | os.PathLike | None = None) -> None:
        if log_dir is None:
            log_dir = get_log_basedir()
        self.log_dir = None if log_dir is None else Path(log_dir)
        self._context = multiprocessing.get_context("fork")

    def log_paths(self, task_id: str, worker_id: int) -> tuple[Path | None, Path | None]:
        """``(stdout, stderr)`` files of a worker (None, None without log files)."""
        if self.log_dir is None:
            return None, None
        folder = self.log_dir / safe_file_name(task_id)
        return folder / f"worker_{worker_id}.out", folder / f"worker_{worker_id}.err"

    def start(self, process_function, context: Context) -> WorkerProcess:
        """Start one worker for ``context['task_id']``."""
        task_id = context["task_id"]
        worker_id = int(context["worker_id"])
        stdout_path, stderr_path = self.log_paths(task_id, worker_id)
        if stdout_path is not None:
            stdout_path.parent.mkdir(parents=True, exist_ok=True)
        context.to_env()  # a context that cannot travel fails here, not in the worker
        process = self._context.Process(
            target=_worker_main,
            args=(process_function, context, stdout_path, stderr_path, os.getpid()),
            name=f"luigi_daisy-{task_id}-worker-{worker_id}", daemon=False)
        process.start()
        return WorkerProcess(task_id, worker_id, process, stdout_path, stderr_path)
