"""Where workers' logs go: daisy's ``daisy.logging`` API.

``run_blockwise`` and the local launcher write each worker's output to
``<basedir>/<task_id>/worker_<id>.out`` and ``.err`` (the task id made a safe folder
name by :func:`~luigi_daisy.context.safe_file_name`), with ``<basedir>`` taken from here
unless ``run_blockwise(log_dir=...)`` names another folder. ``set_log_basedir(None)``
writes no log files: workers print to the run's own stdout and stderr.

This module is ``luigi_daisy.logging``; inside the package, ``import logging`` (absolute
imports) still means the standard library's module.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .context import safe_file_name

#: the default folder, relative to the current directory when a run starts
DEFAULT_LOG_BASEDIR = Path("daisy_logs")

_log_basedir: Path | None = DEFAULT_LOG_BASEDIR


def set_log_basedir(path: str | os.PathLike | None) -> None:
    """Set the folder of the workers' logs; None: no log files, workers print to the
    run's stdout and stderr. The default is ``./daisy_logs``."""
    global _log_basedir
    _log_basedir = None if path is None else Path(path)


def get_log_basedir() -> Path | None:
    """The folder of the workers' logs (None: no log files)."""
    return _log_basedir


def get_worker_log_basename(worker_id: int, task_id: str | None = None) -> Path | None:
    """``<basedir>[/<task_id>]/worker_<worker_id>``, to which ``.out`` and ``.err`` are
    appended; None when there are no log files."""
    basename = _log_basedir
    if basename is None:
        return None
    if task_id is not None:
        basename = basename / safe_file_name(task_id)
    return basename / f"worker_{worker_id}"


def redirect_stdouterr(basename: str | os.PathLike | None, mode: str = "w") -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2 too, so output of
    C code and subprocesses follows) to ``<basename>.out`` and ``<basename>.err``.

    ``mode`` is ``"w"`` (start the files afresh) or ``"a"`` (append). Nothing happens
    when ``basename`` is None.
    """
    if basename is None:
        return
    if mode not in ("w", "a"):
        raise ValueError(f"redirect_stdouterr: mode must be 'w' or 'a', got {mode!r}")
    basename = Path(basename)
    basename.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if mode == "w" else os.O_APPEND)
    for suffix, descriptor_number in ((".out", 1), (".err", 2)):
        descriptor = os.open(f"{basename}{suffix}", flags, 0o644)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os.dup2(descriptor, descriptor_number)
        os.close(descriptor)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


__all__ = ["DEFAULT_LOG_BASEDIR", "get_log_basedir", "get_worker_log_basename",
           "redirect_stdouterr", "set_log_basedir"]
