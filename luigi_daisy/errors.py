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
