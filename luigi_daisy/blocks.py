"""Blocks, their status, and the tiling of a total ROI into a grid of blocks.

A task's blocks form a regular grid: block ``position`` ``(k_0, ..., k_{d-1})`` writes
``write_roi`` shifted by ``k * write_shape`` from the first block, whose read ROI begins at
the total ROI's begin. Everything here works on integer tuples; funlib ``Roi`` objects are
built only when a user reads ``block.read_roi`` or ``block.write_roi``, and then cached.

A block's ``index`` is its row-major position in the *overhang* grid of the total ROI (the
largest of the three fit modes' grids), so the same write ROI has the same index whatever
the fit mode, in every run and every process.
"""

from __future__ import annotations

import enum
import math
from typing import Any

from funlib.geometry import Coordinate, Roi

from .errors import GeometryError

FIT_MODES = ("valid", "overhang", "shrink")


class BlockStatus(enum.IntEnum):
    """Life cycle of a block, with daisy's names and values."""

    CREATED = 0
    PROCESSING = 1
    SUCCESS = 2
    FAILED = 3


def _as_int_tuple(values: Any) -> tuple[int, ...]:
    return tuple(int(value) for value in values)


class BlockGrid:
    """The grid of blocks that tiles ``total_roi`` with blocks shaped like ``read_roi``.

    Parameters
    ----------
    total_roi:
        The region the task may read from.
    read_roi, write_roi:
        Templates of one block: only their shapes and their relative offset (the
        context) matter. ``write_roi`` must lie inside ``read_roi``.
    fit:
        ``"valid"`` keeps blocks whose read ROI lies inside ``total_roi``;
        ``"overhang"`` keeps every block whose write ROI begins inside the total write
        ROI; ``"shrink"`` is ``"overhang"`` with boundary blocks cropped to the total ROI.
    name:
        Used in error messages to say which task is at fault.
    """

    __slots__ = (
        "name", "fit", "dims", "total_roi", "read_template", "write_template",
        "total_begin", "total_end", "read_shape", "write_shape", "context_low",
        "context_high", "write_begin", "total_write_end", "grid_shape", "id_grid_shape",
        "id_strides", "num_blocks", "crop",
    )

    def __init__(self, total_roi: Roi, read_roi: Roi, write_roi: Roi, fit: str = "valid",
                 name: str = "task") -> None:
        self.name = name
        for argument, roi in (("total_roi", total_roi), ("read_roi", read_roi),
                              ("write_roi", write_roi)):
            if not isinstance(roi, Roi):
                raise GeometryError(
                    f"{name}: {argument} must be a funlib.geometry Roi, got {roi!r}")
            if roi.unbounded:
                raise GeometryError(f"{name}: {argument} {roi} is unbounded; give it a finite shape")
        dims = total_roi.dims
        if read_roi.dims != dims or write_roi.dims != dims:
            raise GeometryError(
                f"{name}: total_roi, read_roi and write_roi must have the same number of "
                f"dimensions, got {total_roi.dims}, {read_roi.dims} and {write_roi.dims}")
        for argument, roi in (("total_roi", total_roi), ("read_roi", read_roi),
                              ("write_roi", write_roi)):
            if any(extent <= 0 for extent in roi.shape):
                raise GeometryError(
                    f"{name}: {argument} {roi} has an empty or negative shape; every "
                    f"extent must be positive")
        if not read_roi.contains(write_roi):
            raise GeometryError(
                f"{name}: write_roi {write_roi} must lie inside read_roi {read_roi}; "
                f"grow read_roi by the context the block needs around its write ROI")
        if fit not in FIT_MODES:
            raise GeometryError(
                f"{name}: unknown fit mode {fit!r}; use one of {', '.join(FIT_MODES)}")
        if any(t < r for t, r in zip(total_roi.shape, read_roi.shape)):
            raise GeometryError(
                f"{name}: total_roi {total_roi} is smaller than one block (read_roi shape "
                f"{read_roi.shape}); enlarge total_roi or use a smaller block")

        self.fit = fit
        self.dims = dims
        self.total_roi = total_roi
        self.read_template = read_roi
        self.write_template = write_roi
        self.total_begin = _as_int_tuple(total_roi.begin)
        self.total_end = _as_int_tuple(total_roi.end)
        self.read_shape = _as_int_tuple(read_roi.shape)
        self.write_shape = _as_int_tuple(write_roi.shape)
        self.context_low = _as_int_tuple(write_roi.begin - read_roi.begin)
        self.context_high = _as_int_tuple(read_roi.end - write_roi.end)
        self.write_begin = tuple(b + c for b, c in zip(self.total_begin, self.context_low))
        self.total_write_end = tuple(e - c for e, c in zip(self.total_end, self.context_high))

        # overhang: blocks whose write ROI begins inside the total write ROI
        self.id_grid_shape = tuple(
            -(-(end - begin) // step)
            for begin, end, step in zip(self.write_begin, self.total_write_end, self.write_shape))
        if fit == "valid":
            self.grid_shape = tuple(
                (total - read) // step + 1
                for total, read, step in zip(total_roi.shape, self.read_shape, self.write_shape))
        else:
            self.grid_shape = self.id_grid_shape
        self.crop = fit == "shrink"
        strides = []
        stride = 1
        for extent in reversed(self.id_grid_shape):
            strides.append(stride)
            stride *= extent
        self.id_strides = tuple(reversed(strides))
        self.num_blocks = math.prod(self.grid_shape)

    # ------------------------------------------------------------------ indices
    def index_of(self, position: tuple[int, ...]) -> int:
        """Row-major index of a grid position (the stable block index)."""
        return sum(k * stride for k, stride in zip(position, self.id_strides))

    def position_of(self, index: int) -> tuple[int, ...]:
        """Grid position of a block index."""
        position = []
        for stride in self.id_strides:
            k, index = divmod(index, stride)
            position.append(k)
        return tuple(position)

    def contains_position(self, position: tuple[int, ...]) -> bool:
        """Whether a grid position is a block of this task (depends on the fit)."""
        return all(0 <= k < n for k, n in zip(position, self.grid_shape))

    # ------------------------------------------------------------------ bounds
    def write_interval(self, dim: int, k: int) -> tuple[int, int]:
        """Half-open write interval of grid index ``k`` along ``dim`` (cropped if shrink)."""
        begin = self.write_begin[dim] + k * self.write_shape[dim]
        end = begin + self.write_shape[dim]
        if self.crop and end > self.total_write_end[dim]:
            end = self.total_write_end[dim]
        return begin, end

    def read_interval(self, dim: int, k: int) -> tuple[int, int]:
        """Half-open read interval of grid index ``k`` along ``dim`` (cropped if shrink)."""
        begin = self.total_begin[dim] + k * self.write_shape[dim]
        end = begin + self.read_shape[dim]
        if self.crop and end > self.total_end[dim]:
            end = self.total_end[dim]
        return begin, end

    def bounds_of(self, index: int) -> tuple[tuple[int, ...], tuple[int, ...],
                                              tuple[int, ...], tuple[int, ...]]:
        """``(read_begin, read_shape, write_begin, write_shape)`` of a block, as tuples."""
        read_begin, read_shape, write_begin, write_shape = [], [], [], []
        for dim, k in enumerate(self.position_of(index)):
            begin, end = self.read_interval(dim, k)
            read_begin.append(begin)
            read_shape.append(end - begin)
            begin, end = self.write_interval(dim, k)
            write_begin.append(begin)
            write_shape.append(end - begin)
        return tuple(read_begin), tuple(read_shape), tuple(write_begin), tuple(write_shape)

    def rois_of(self, index: int) -> tuple[Roi, Roi]:
        """``(read_roi, write_roi)`` of the block with this index."""
        read_begin, read_shape, write_begin, write_shape = self.bounds_of(index)
        return Roi(read_begin, read_shape), Roi(write_begin, write_shape)

    @property
    def total_write_roi(self) -> Roi:
        """The region written by the blocks of the overhang grid."""
        return Roi(self.write_begin,
                   tuple(e - b for b, e in zip(self.write_begin, self.total_write_end)))

    def describe(self) -> dict:
        """Plain-data description, used to compare geometries across runs."""
        return {
            "total_roi": [list(self.total_begin), list(_as_int_tuple(self.total_roi.shape))],
            "read_roi": [list(_as_int_tuple(self.read_template.begin)), list(self.read_shape)],
            "write_roi": [list(_as_int_tuple(self.write_template.begin)), list(self.write_shape)],
            "fit": self.fit,
            "num_blocks": self.num_blocks,
        }

    def __reduce__(self):
        return (BlockGrid, (self.total_roi, self.read_template, self.write_template, self.fit,
                            self.name))


class Block:
    """One unit of work: a read ROI, a write ROI, an id and a status.

    ``Block(total_roi, read_roi, write_roi)`` builds a stand-alone block as in daisy;
    blocks handed out by a scheduler are made by :func:`new_block` and compute their ROIs
    only when asked.

    Attributes
    ----------
    task_id:
        The id of the task the block belongs to.
    index:
        Stable integer index of the block inside its task.
    status:
        A :class:`BlockStatus`; a process function may set it to ``FAILED``.
    error:
        Text of the error that failed the block, if any.
    """

    __slots__ = ("task_id", "index", "status", "error", "_grid", "_rois")

    def __init__(self, total_roi: Roi, read_roi: Roi, write_roi: Roi,
                 block_id: int | None = None, task_id: str | None = None) -> None:
        grid = BlockGrid(total_roi, read_roi, write_roi, fit="overhang",
                         name=task_id or "block")
        if block_id is None:
            position = tuple(
                (begin - first) // step for begin, first, step in
                zip(_as_int_tuple(write_roi.begin), grid.write_begin, grid.write_shape))
            block_id = grid.index_of(position)
        self.task_id = task_id
        self.index = int(block_id)
        self.status = BlockStatus.CREATED
        self.error = None
        self._grid = None
        self._rois = (read_roi, write_roi)

    @property
    def block_id(self) -> tuple[str | None, int]:
        """``(task_id, index)``, as in daisy."""
        return (self.task_id, self.index)

    @property
    def read_roi(self) -> Roi:
        """The region this block may read."""
        if self._rois is None:
            self._rois = self._grid.rois_of(self.index)
        return self._rois[0]

    @property
    def write_roi(self) -> Roi:
        """The region this block writes."""
        if self._rois is None:
            self._rois = self._grid.rois_of(self.index)
        return self._rois[1]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Block):
            return self.task_id == other.task_id and self.index == other.index
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.task_id, self.index))

    def __repr__(self) -> str:
        return (f"Block(task_id={self.task_id!r}, index={self.index}, "
                f"read_roi={self.read_roi}, write_roi={self.write_roi}, "
                f"status={self.status.name})")

    def __getstate__(self):
        return (self.task_id, self.index, self.status, self.error, self.read_roi,
                self.write_roi)

    def __setstate__(self, state) -> None:
        self.task_id, self.index, self.status, self.error, read_roi, write_roi = state
        self._rois = (read_roi, write_roi)
        self._grid = None


class BlockBitmap:
    """A set of block indices stored as one byte per block of the index grid.

    Holds the blocks finished before a run (from a ledger) or by another run: 10 MB for
    10^7 blocks, where a Python set of them would take most of a gigabyte.

    Parameters
    ----------
    size:
        Number of indices (the overhang grid's block count).
    """

    __slots__ = ("_bytes", "_count")

    def __init__(self, size: int) -> None:
        self._bytes = bytearray(size)
        self._count = 0

    @classmethod
    def from_indices(cls, size: int, indices) -> BlockBitmap:
        """A bitmap of ``indices`` (a numpy integer array, each in ``range(size)``)."""
        import numpy as np  # only resumed runs need it
        bitmap = cls(size)
        view = np.frombuffer(bitmap._bytes, dtype=np.uint8)
        view[indices] = 1
        bitmap._count = int(view.sum(dtype=np.int64))
        return bitmap

    def __contains__(self, index: int) -> bool:
        return self._bytes[index] == 1

    def add(self, index: int) -> None:
        """Add one index."""
        if not self._bytes[index]:
            self._bytes[index] = 1
            self._count += 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        import numpy as np
        return iter(np.flatnonzero(np.frombuffer(self._bytes, dtype=np.uint8)).tolist())

    def indices(self):
        """The indices, as a sorted numpy array."""
        import numpy as np
        return np.flatnonzero(np.frombuffer(self._bytes, dtype=np.uint8))


_allocate_block = Block.__new__


def new_block(task_id: str, index: int, grid: BlockGrid) -> Block:
    """A block of ``grid`` whose ROIs are computed on first access (the hot path)."""
    block = _allocate_block(Block)
    block.task_id = task_id
    block.index = index
    block.status = BlockStatus.PROCESSING
    block.error = None
    block._grid = grid
    block._rois = None
    return block


def block_from_rois(task_id: str, index: int, read_roi: Roi, write_roi: Roi,
                    status: BlockStatus = BlockStatus.PROCESSING) -> Block:
    """A block whose ROIs are already known (for example, received off the wire)."""
    block = _allocate_block(Block)
    block.task_id = task_id
    block.index = index
    block.status = status
    block.error = None
    block._grid = None
    block._rois = (read_roi, write_roi)
    return block


__all__ = ["Block", "BlockBitmap", "BlockGrid", "BlockStatus", "Coordinate", "FIT_MODES", "Roi",
           "block_from_rois", "new_block"]


def uncovered_strips(grid: BlockGrid) -> list[tuple[int, int, int]]:
    """Where a ``fit="valid"`` grid leaves the total write ROI unwritten.

    Returns ``(axis, begin, end)`` per axis whose blocks stop short of the end of the
    total write ROI: the world-unit strip ``[begin, end)`` along ``axis`` is written by
    no block (``fit="overhang"`` or ``"shrink"`` would cover it). Empty for other fits.
    """
    if grid.fit != "valid":
        return []
    strips = []
    for axis, (first, step, count, end) in enumerate(zip(
            grid.write_begin, grid.write_shape, grid.grid_shape, grid.total_write_end)):
        covered = first + count * step
        if covered < end:
            strips.append((axis, covered, end))
    return strips


def daisy_block_id(grid: BlockGrid, index: int) -> int:
    """The id daisy gives the block at ``index`` of ``grid`` (``block.block_id[1]``).

    Everything that shows block ids to users (``luigi-daisy status --failed``) goes
    through here.
    """
    return index
