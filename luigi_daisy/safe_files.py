"""Files a run writes in folders that other users may share.

A ledger or log folder on shared storage may be writable by a group; there the kernel's
protection of symbolic links (``fs.protected_symlinks``) does not apply, so a link
planted under a name the run is about to write would redirect the write to whatever it
points at. Every file the package writes goes through this module:

- a folder the user names (``ledger_dir``, ``log_dir``) must not be writable by group
  or others unless it is sticky (``chmod +t``: then no one can remove or rename another
  user's files in it), or its group is the owner's private group (named like the owner,
  the owner's primary group, no other members: Debian and Ubuntu give users such a group
  and umask 002, so folders made with the default mode are 0775) — :func:`check_folder`;
- a folder the run makes inside it (a task's log folder, ``.payloads-<uid>``) must be a
  real folder of this user; write permission of group and others on it is removed
  (earlier versions made these folders with the default mode) — :func:`own_subfolder`;
- files are opened with ``O_NOFOLLOW`` and must be regular files of this user
  (:func:`open_own`), and a file replaced as a whole is written to a fresh temporary
  file (``mkstemp``: ``O_EXCL``, mode 0600) and renamed over it
  (:func:`replace_file`).
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import stat
import tempfile
from pathlib import Path

from .errors import UnsafePathError

logger = logging.getLogger(__name__)

#: what to do about a folder others can write
_FOLDER_ADVICE = ("chmod go-w {folder}, or make it sticky (chmod +t {folder}) so that no "
                  "one can replace another user's files in it")


def _private_group(status: os.stat_result) -> bool:
    """Whether the file's group is its owner's private group: named like the owner, the
    owner's primary group, and no other user listed as a member."""
    try:
        owner = pwd.getpwuid(status.st_uid)
        group = grp.getgrgid(status.st_gid)
    except KeyError:
        return False
    return (group.gr_name == owner.pw_name and group.gr_gid == owner.pw_gid
            and all(member == owner.pw_name for member in group.gr_mem))


def _shared(status: os.stat_result) -> bool:
    """Whether others than the owner could plant files in a folder of this status."""
    if status.st_mode & stat.S_ISVTX:
        return False
    if status.st_mode & 0o002:
        return True
    return bool(status.st_mode & 0o020) and not _private_group(status)


def _refuse_shared(folder: Path, status: os.stat_result, what: str) -> None:
    if _shared(status):
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
    """Make ``folder`` (whose parent is checked already) with ``mode`` if missing and
    check that it is a real folder (not a link) of this user. If others than this user
    could write in it (a folder an earlier version made under umask 002, say), their
    write permission is removed: the folder is the run's own.

    Raises
    ------
    UnsafePathError
        It is a symbolic link, not a folder, or belongs to another user.
    """
    folder = Path(folder)
    try:
        os.mkdir(folder, mode)
    except FileExistsError:
        pass
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                             | os.O_CLOEXEC)
    except OSError as error:
        # O_DIRECTORY | O_NOFOLLOW on a link to a folder gives ENOTDIR, not ELOOP
        if error.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(folder):
            raise UnsafePathError(
                f"{what} {folder} is a symbolic link (to {os.readlink(folder)!r}); this "
                f"run writes only into a folder of its own there: remove the link "
                f"(rm {folder})") from None
        if error.errno == errno.ENOTDIR:
            raise UnsafePathError(
                f"{what} {folder} is not a folder: remove it (rm {folder})") from None
        raise
    try:
        status = os.fstat(descriptor)
        if status.st_uid != os.getuid():
            raise UnsafePathError(
                f"{what} {folder} belongs to user id {status.st_uid}, not to this user "
                f"({os.getuid()}); remove it, or choose another folder")
        if _shared(status):
            os.fchmod(descriptor, status.st_mode & 0o7777 & ~0o022)
            logger.debug("%s %s was writable by %s (mode %o): removed that permission",
                         what, folder, _who(status.st_mode), status.st_mode & 0o7777)
    finally:
        os.close(descriptor)
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
    with ``O_EXCL``) and rename it over ``path`` (a rename replaces a link, never writes
    through it).

    The file keeps ``mkstemp``'s mode 0600, readable by its owner only: the files
    written this way (a Luigi task's outcome) may hold error text, and honouring the
    user's umask instead would mean reading it, which only ``os.umask`` can do, by
    changing it for every thread of the process for a moment."""
    path = Path(path)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
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
