"""One small hierarchy of the errors luigi_daisy raises on purpose."""


class LuigiDaisyError(Exception):
    """Base class of every error raised by luigi_daisy."""


class GeometryError(LuigiDaisyError, ValueError):
    """A ROI, block shape or fit mode that cannot be tiled into blocks."""


class TaskDefinitionError(LuigiDaisyError, ValueError):
    """A task argument that is not geometry (ids, retries, upstream tasks) is invalid."""


class SchedulerError(LuigiDaisyError, RuntimeError):
    """The scheduler was asked for something its state does not allow."""


class ProtocolError(LuigiDaisyError):
    """A frame or message on the wire is malformed, oversized or not allowed here."""


class DatasetError(LuigiDaisyError, ValueError):
    """A zarr dataset that is missing, incompatible, misaligned or indexed out of bounds."""


class LedgerError(LuigiDaisyError):
    """A ledger that cannot be used: damaged, from another task, or another geometry."""


class LedgerDamagedError(LedgerError):
    """A ledger file whose content is damaged; only deleting it (or ``fresh=True``) gets
    its task going again."""


class LedgerStorageError(LedgerError):
    """A ledger that is intact but cannot be written because of where it is stored (a
    full disk, a read-only folder, an I/O error of the file system)."""


class LedgerDiskFullError(LedgerStorageError):
    """The file system holding a ledger is full."""


class LedgerReadOnlyError(LedgerStorageError):
    """A ledger's folder (or file) cannot be written: a read-only mount or permissions."""


class ContextError(LuigiDaisyError, ValueError):
    """A worker context that is missing or cannot be parsed."""


class ServerUnreachableError(LuigiDaisyError, ConnectionError):
    """The block server could not be reached or closed the connection."""


class RefusedByServerError(LuigiDaisyError, ConnectionError):
    """The block server refused this worker (wrong token, unknown task, old protocol)."""


class ConfigError(LuigiDaisyError, ValueError):
    """The ``[luigi_daisy]`` section holds a key or value this package does not know."""


class WorkerSetupError(LuigiDaisyError, RuntimeError):
    """A worker cannot process any block of its task (its setup failed); the task is
    stopped after this first failure instead of failing every block in turn."""


class BlockwiseRunError(LuigiDaisyError, RuntimeError):
    """Some blocks of a blockwise task failed; the message holds the execution summary."""


class ServerConfigError(LuigiDaisyError, ValueError):
    """A block server setting (``ServerLimits``) that is out of range."""


class UnserialisableFunctionError(TaskDefinitionError):
    """A task's process function cannot travel to a fresh worker process; the message
    names the object that could not be pickled and says what to do."""


class PayloadError(LuigiDaisyError):
    """A worker payload that cannot be read: truncated, damaged or readable by others."""


class LauncherError(LuigiDaisyError, RuntimeError):
    """Workers could not be submitted, queried or cancelled (or a resource is invalid)."""


class UnsafePathError(LuigiDaisyError):
    """A file or folder a run would write is a symbolic link, belongs to another user,
    or sits in a folder others can write (and that is not sticky); the message names it
    and says what to change."""


class CommandError(LuigiDaisyError, ValueError):
    """A ``luigi-daisy`` command was given something it cannot use (a path without
    records, a malformed ROI, an unknown task or block id); the message says what to
    change."""
