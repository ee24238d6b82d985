"""Files a run writes in folders that other users may share.

A ledger or log folder on shared storage may be writable by a group; there the kernel's
protection of symbolic links (``fs.protected_symlinks``) does not apply, so a link
planted under a name the run is about to write would redirect the write to whatever it
points at. Every file the package writes goes through this module:

- a folder the user names (``ledger_dir``, ``log_dir``) must not be writable by group
  or others unless it is sticky (``chmod +t``: then no one can remove or rename another
  user's files in it) — :func:`check_folder`;
- a folder the run makes inside it (a task's log folder, ``.payloads``) must be a real
  folder of this user — :func:`own_subfolder`;
- files are opened with ``O_NOFOLLOW`` and must be regular files of this user
  (:func:`open_own`), and a file replaced as a whole is written to a fresh temporary
  file (``mkstemp``: ``O_EXCL``, mode 0600) and renamed over it
  (:func:`replace_file`).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from .errors import UnsafePathError

#: what to do about a folder others can write
_FOLDER_ADVICE = ("chmod go-w {folder}, or make it sticky (chmod +t {folder}) so that no "
                  "one can replace another user's files in it")


def _refuse_shared(folder: Path, status: os.stat_result, what: str) -> None:
    if status.st_mode & 0o022 and not status.st_mode & stat.S_ISVTX:
        raise UnsafePathError(
            f"{what} {folder} is writable by {_who(status.st_mode)} and not sticky (mode "
            f"{status.st_mode & 0o7777:o}): any of them could plant a symbolic link under "
            f"a name this run writes and redirect its writes. "
            + _FOLDER_ADVICE.format(folder=folder))


def _who(mode: int) -> str:
    if mode & 0o020 and mode & 0o002:
        return "its group and others"
    return "its group" if mode & 0o020 else "others"


def check_folder(folder: str | os.PathLike, what: str, create: bool = True) -> Path:
    """Make ``folder`` if missing (``create``) and refuse it if group or others can
    write it and it is not sticky. ``what`` names it in messages ("ledger folder").

    Raises
    ------
    UnsafePathError
        The folder is open to others, or not a folder; the message says what to change.
    """
    folder = Path(folder)
    if create:
        # a folder made here is writable by its owner only, whatever the umask
        folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    status = folder.stat()
    if not stat.S_ISDIR(status.st_mode):
        raise UnsafePathError(f"{what} {folder} is not a folder")
    _refuse_shared(folder, status, what)
    return folder


def own_subfolder(folder: str | os.PathLike, what: str, mode: int = 0o755) -> Path:
    """Make ``folder`` (whose parent is checked already) if missing and check that it is
    a real folder (not a link) of this user that no one else can write.

    Raises
    ------
    UnsafePathError
        It is a symbolic link, belongs to another user or is open to others.
    """
    folder = Path(folder)
    try:
        os.mkdir(folder, mode)
    except FileExistsError:
        pass
    status = os.lstat(folder)
    if stat.S_ISLNK(status.st_mode):
        raise UnsafePathError(
            f"{what} {folder} is a symbolic link (to {os.readlink(folder)!r}); this run "
            f"writes only into a folder of its own there: remove the link (rm {folder})")
    if not stat.S_ISDIR(status.st_mode):
        raise UnsafePathError(f"{what} {folder} is not a folder: remove it (rm {folder})")
    if status.st_uid != os.getuid():
        raise UnsafePathError(
            f"{what} {folder} belongs to user id {status.st_uid}, not to this user "
            f"({os.getuid()}); remove it, or choose another folder")
    _refuse_shared(folder, status, what)
    return folder


def check_log_folders(task_folder: Path, checked: set[Path]) -> None:
    """Check a task's log folder (``<log_dir>/<task>``) and ``log_dir`` once per
    launcher (``checked`` remembers): ``log_dir`` must not be open to others unless
    sticky, the task's folder must be a real folder of this user."""
    if task_folder in checked:
        return
    check_folder(task_folder.parent, "log folder")
    own_subfolder(task_folder, "task log folder")
    checked.add(task_folder)


def open_own(path: str | os.PathLike, flags: int, what: str, mode: int = 0o644) -> int:
    """``os.open(path, flags | O_NOFOLLOW | O_CLOEXEC, mode)``, refusing a symbolic
    link and a file that is not a regular file of this user. Returns the descriptor.

    Raises
    ------
    UnsafePathError
        ``path`` is a symbolic link, or not a regular file of this user.
    FileNotFoundError
        ``path`` does not exist and ``flags`` has no ``O_CREAT``.
    """
    try:
        descriptor = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafePathError(
                f"{what} {path} is a symbolic link (to {os.readlink(path)!r}); this run "
                f"writes no file through a link: remove it (rm {path})") from None
        raise
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or status.st_uid != os.getuid():
        os.close(descriptor)
        kind = "not a regular file" if not stat.S_ISREG(status.st_mode) else \
            f"a file of user id {status.st_uid}, not of this user ({os.getuid()})"
        raise UnsafePathError(f"{what} {path} is {kind}: remove it (rm {path})")
    return descriptor


def open_log(path: str | os.PathLike, what: str = "worker log") -> int:
    """Open a log file for appending (created with mode 0644), never through a link."""
    return open_own(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, what)


def read_own(path: str | os.PathLike, what: str) -> bytes | None:
    """The content of a regular file of this user, or None when it does not exist.

    Raises
    ------
    UnsafePathError
        ``path`` is a link or another user's file.
    """
    try:
        descriptor = open_own(path, os.O_RDONLY, what)
    except FileNotFoundError:
        return None
    with os.fdopen(descriptor, "rb") as stream:
        return stream.read()


def replace_file(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a new temporary file beside ``path`` (``mkstemp``: created
    with ``O_EXCL``, mode 0600, permissions then set to 0644) and rename it over
    ``path`` (a rename replaces a link, never writes through it)."""
    path = Path(path)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            os.fchmod(stream.fileno(), 0o644)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def refuse_links(path: str | os.PathLike, what: str, suffixes: tuple[str, ...] = ()) -> None:
    """Refuse ``path`` (and ``path + suffix`` for each suffix) when it is a symbolic
    link or another user's file; missing files are fine. For files another library
    opens (SQLite opens the ledger and its ``-wal`` and ``-shm`` files itself).

    Raises
    ------
    UnsafePathError
        Naming the file and saying to remove it.
    """
    for candidate in (Path(path), *(Path(f"{path}{suffix}") for suffix in suffixes)):
        try:
            status = os.lstat(candidate)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(status.st_mode):
            raise UnsafePathError(
                f"{what} {candidate} is a symbolic link (to {os.readlink(candidate)!r}); "
                f"this run writes no file through a link: remove it (rm {candidate})")
        if status.st_uid != os.getuid():
            raise UnsafePathError(
                f"{what} {candidate} belongs to user id {status.st_uid}, not to this user "
                f"({os.getuid()}): remove it, or choose another folder")
