"""Checks of run settings made before a run takes anything (locks, ledgers, sockets, jobs).

Each check raises :class:`~luigi_daisy.errors.ConfigError` with a message that names the
setting, the value given and what is allowed, so that a bad value is refused at once and
not as a low-level error (``gaierror``, ``FileExistsError``) once workers are starting.
"""

from __future__ import annotations

import errno
import math
import os
import socket
from pathlib import Path

from . import safe_files
from .errors import ConfigError, UnsafePathError
from .listening import bind_listening_sockets

#: smallest ``worker_death_timeout`` (seconds): a worker's watchdog looks no more often
MIN_WORKER_DEATH_TIMEOUT = 1.0


def check_seconds(value: object, key: str, minimum: float = 0.0,
                  strictly_above: bool = False) -> float:
    """``value`` as a finite number of seconds of at least ``minimum`` (above it when
    ``strictly_above``), or a :class:`ConfigError` naming ``key``."""
    try:
        seconds = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        seconds = math.nan
    too_small = seconds <= minimum if strictly_above else seconds < minimum
    if math.isnan(seconds) or math.isinf(seconds) or too_small:
        bound = (f"above {minimum:g}" if strictly_above else f"{minimum:g} or more")
        raise ConfigError(f"{key}={value!r}: give a number of seconds, {bound}")
    return seconds


def check_worker_death_timeout(value: object, key: str = "worker_death_timeout") -> float:
    """Refuse a ``worker_death_timeout`` that is not a number of seconds of at least
    :data:`MIN_WORKER_DEATH_TIMEOUT` (a worker cannot notice its run is gone sooner)."""
    return check_seconds(value, key, MIN_WORKER_DEATH_TIMEOUT)


def check_host(host: str | None, key: str = "host") -> None:
    """Refuse an interface to listen on that does not resolve to an address, or whose
    address is not one of this machine: binding the server's sockets to it
    (:func:`~luigi_daisy.listening.bind_listening_sockets`, on a port the system picks)
    fails with ``EADDRNOTAVAIL``. The probe binds locally and sends nothing.

    ``None`` or ``""`` (every interface) pass.
    """
    if host is None or host == "":
        return
    if not isinstance(host, str):
        raise ConfigError(f"{key}={host!r}: give the name or address of an interface of "
                          f"this machine, as a string")
    instead = ("give an interface of this machine to listen on: 127.0.0.1 (this machine "
               "only), 0.0.0.0 (every interface) or a name or address of this machine")
    try:
        for sock in bind_listening_sockets(host):  # what the server does, then let go
            sock.close()
    except (socket.gaierror, UnicodeError) as error:
        raise ConfigError(f"{key}={host!r} does not resolve to an address ({error}); "
                          f"{instead}") from None
    except OSError as error:
        if error.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(
                f"{key}={host!r}: {error.filename} is not an address of this machine, so "
                f"nothing can listen on it; {instead}") from None
        # not this check's business: the server reports it when it binds


def check_folder(folder: str | os.PathLike | None, key: str) -> None:
    """Refuse a folder setting whose path, or a parent of it, is an existing file (it
    could never be created). A folder that does not exist yet passes."""
    if folder is None:
        return
    try:
        path = Path(folder)
    except TypeError:
        raise ConfigError(f"{key}={folder!r}: give the path of a folder") from None
    if str(folder) == "":
        raise ConfigError(f"{key}={folder!r}: give the path of a folder, not an empty string")
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is" if candidate == path else f"is inside {str(candidate)!r}, which is"
                raise ConfigError(f"{key}={str(folder)!r} {where} a file, not a folder; "
                                  f"give the path of a folder (it is created when missing)")
            return


def check_folder_not_shared(folder: str | os.PathLike | None, key: str, what: str) -> None:
    """Refuse an existing folder setting that its group or others can write and that is
    not sticky (:func:`luigi_daisy.safe_files.check_folder`), creating nothing. A folder
    that does not exist yet passes: the run makes it writable by its owner only.
    ``what`` names the folder in the message ("ledger folder").
    """
    if folder is None or str(folder) == "":
        return
    path = Path(folder)
    if not path.is_dir():
        return  # missing (made safe when needed), or a file (check_folder says so)
    try:
        safe_files.check_folder(path, what, create=False)
    except UnsafePathError as error:
        raise ConfigError(f"{key}={str(folder)!r}: {error}") from None
