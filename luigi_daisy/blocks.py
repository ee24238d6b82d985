"""Blocks, their status, and the tiling of a total ROI into a grid of blocks.

A task's blocks form a regular grid: block ``position`` ``(k_0, ..., k_{d-1})`` writes
``write_roi`` shifted by ``k * write_shape`` from the first block, whose read ROI begins at
the total ROI's begin. Everything here works on integer tuples; funlib ``Roi`` objects are
built only when a user reads ``block.read_roi`` or ``block.write_roi``, and then cached.

A block's ``index`` is its row-major position in the *overhang* grid of the total ROI (the
largest of the three fit modes' grids), so the same write ROI has the same index whatever
the fit mode, in every run and every process. It is internal (scheduler, ledger, wire).

What users see is ``block.block_id == (task_id, number)``, where ``number`` is daisy's: the
Cantor number (:func:`cantor_number`) of the block's write ROI position in the grid of write
ROIs counted from the total ROI's begin, ``(write_begin - total_begin) // write_shape``.
Because that count starts at the total ROI's begin, the context counts: the first block of
a task with context ``c`` along an axis sits at ``c // write_shape`` there, not at 0.
"""

from __future__ import annotations

import enum
import math
from typing import Any

from funlib.geometry import Coordinate, Roi

from .errors import GeometryError

FIT_MODES = ("valid", "overhang", "shrink")
#: most blocks a task may have (in its overhang grid): a block's index is a 64-bit
#: integer in the ledger (SQLite's INTEGER) and on the wire to the workers
MAX_BLOCKS = 2**63
#: bound of daisy's block numbers (Cantor numbers), the wire's (``protocol._NUMBER_MAX``)
MAX_BLOCK_NUMBER = 2**128


class BlockStatus(enum.IntEnum):
    """Life cycle of a block, with daisy's names and values."""

    CREATED = 0
    PROCESSING = 1
    SUCCESS = 2
    FAILED = 3


def cantor_number(position: tuple[int, ...]) -> int:
    """daisy's block number of a grid position: the Cantor number of ``position``.

    For ``position = (k_0, ..., k_{n-1})`` with non-negative entries this is
    ``k_0 + sum over d = 2..n of C(s_d + d - 1, d)``, ``s_d = k_0 + ... + k_{d-1}``: the
    recursion of ``funlib.math.cantor_number`` (daisy 1.x), in exact integers.
    """
    number = position[0]
    total = number
    for dims in range(2, len(position) + 1):
        total += position[dims - 1]
        if dims == 2:
            number += total * (total + 1) // 2
        elif dims == 3:
            number += total * (total + 1) * (total + 2) // 6
        else:
            number += math.comb(total + dims - 1, dims)
    return number


def position_of_cantor_number(number: int, dims: int) -> tuple[int, ...]:
    """The grid position whose :func:`cantor_number` is ``number`` (its inverse)."""
    if dims == 1:
        return (number,)
    # the largest coordinate sum s with C(s + dims - 1, dims) <= number
    low, high = 0, 1
    while math.comb(high + dims - 1, dims) <= number:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if math.comb(middle + dims - 1, dims) <= number:
            low = middle
        else:
            high = middle
    head = position_of_cantor_number(number - math.comb(low + dims - 1, dims), dims - 1)
    return head + (low - sum(head),)


def _number_function(strides: tuple[int, ...], shifts: tuple[int, ...]):
    """``index -> cantor_number(position_of(index) + shifts)``, unrolled for 1 to 3
    dimensions (the server computes one for every block it hands out)."""
    if len(strides) == 1:
        (shift,) = shifts
        return lambda index: index + shift
    if len(strides) == 2:
        stride0 = strides[0]
        shift0, shift1 = shifts

        def number_of_2d(index: int) -> int:
            k0, k1 = divmod(index, stride0)
            k0 += shift0
            total = k0 + k1 + shift1
            return k0 + total * (total + 1) // 2
        return number_of_2d
    if len(strides) == 3:
        stride0, stride1, _ = strides
        shift0, shift1, shift2 = shifts

        def number_of_3d(index: int) -> int:
            k0, rest = divmod(index, stride0)
            k1, k2 = divmod(rest, stride1)
            k0 += shift0
            total2 = k0 + k1 + shift1
            total3 = total2 + k2 + shift2
            return (k0 + total2 * (total2 + 1) // 2
                    + total3 * (total3 + 1) * (total3 + 2) // 6)
        return number_of_3d

    def number_of(index: int) -> int:
        position = []
        for stride, shift in zip(strides, shifts):
            k, index = divmod(index, stride)
            position.append(k + shift)
        return cantor_number(position)
    return number_of


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
        "id_strides", "num_blocks", "crop", "number_shift", "number_of",
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
                raise GeometryError(
                    f"{name}: {argument} {roi} is unbounded; give it a finite shape")
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
        # daisy counts write positions from the total ROI's begin, so the context shifts them
        self.number_shift = tuple(c // w for c, w in zip(self.context_low, self.write_shape))
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
        self._check_size(name)
        self.crop = fit == "shrink"
        strides = []
        stride = 1
        for extent in reversed(self.id_grid_shape):
            strides.append(stride)
            stride *= extent
        self.id_strides = tuple(reversed(strides))
        #: ``number_of(index)``: daisy's block number (``block_id[1]``) of a block index
        self.number_of = _number_function(self.id_strides, self.number_shift)
        self.num_blocks = math.prod(self.grid_shape)

    def _check_size(self, name: str) -> None:
        """Refuse a grid whose block indices or numbers the ledger and the wire cannot
        hold, before anything counts or lists its blocks."""
        shape = self.id_grid_shape
        count = math.prod(shape)
        grid = (f"total_roi {self.total_roi} tiled by write ROIs of shape "
                f"{self.write_template.shape} gives a grid of "
                f"{' x '.join(str(extent) for extent in shape)} = {count:,} blocks "
                f"(about {count:.1e})")
        if count > MAX_BLOCKS:
            raise GeometryError(
                f"{name}: {grid}; a task may have at most 2^63 (about {MAX_BLOCKS:.1e}) "
                f"blocks, because a block's index is a 64-bit integer in the ledger and on "
                f"the wire to the workers. Use larger write ROIs (and read ROIs), or split "
                f"total_roi into several tasks")
        last = cantor_number(tuple(extent - 1 + shift
                                   for extent, shift in zip(shape, self.number_shift)))
        if last >= MAX_BLOCK_NUMBER:
            raise GeometryError(
                f"{name}: {grid}; its last block's number (daisy's block id, the Cantor "
                f"number of its position) is about {last:.1e}, more than the 2^128 block "
                f"ids can reach on the wire to the workers. Use larger write ROIs (and "
                f"read ROIs), or split total_roi into several tasks")

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

    def index_of_number(self, number: int) -> int:
        """Block index of daisy's block number ``number`` (inverse of ``number_of``)."""
        position = position_of_cantor_number(number, self.dims)
        return self.index_of(tuple(k - shift for k, shift in zip(position, self.number_shift)))

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
    and their number only when asked.

    Attributes
    ----------
    task_id:
        The id of the task the block belongs to.
    block_id:
        ``(task_id, number)``, daisy's id: ``number`` is the Cantor number of the block's
        position in the grid of write ROIs counted from the total ROI's begin.
        Equality and hashing follow it.
    index:
        Internal integer index of the block inside its task (row-major in the grid; used
        by the scheduler, the ledger and the wire, never shown to users).
    status:
        A :class:`BlockStatus`; a process function may set it to ``FAILED``.
    error:
        Text of the error that failed the block, if any.
    """

    __slots__ = ("task_id", "index", "status", "error", "_grid", "_rois", "_number")

    def __init__(self, total_roi: Roi, read_roi: Roi, write_roi: Roi,
                 block_id: int | None = None, task_id: str | None = None) -> None:
        grid = BlockGrid(total_roi, read_roi, write_roi, fit="overhang",
                         name=task_id or "block")
        write_begin = _as_int_tuple(write_roi.begin)
        position = tuple(
            (begin - first) // step for begin, first, step in
            zip(write_begin, grid.write_begin, grid.write_shape))
        if block_id is None:
            # daisy's formula, literally: the write ROI's own shape divides the offset
            block_id = cantor_number(tuple(
                (begin - total) // step for begin, total, step in
                zip(write_begin, grid.total_begin, grid.write_shape)))
        self.task_id = task_id
        self.index = grid.index_of(position)
        self._number = int(block_id)
        self.status = BlockStatus.CREATED
        self.error: str | None = None
        self._grid = None
        self._rois = (read_roi, write_roi)

    @property
    def block_id(self) -> tuple[str | None, int]:
        """``(task_id, number)`` with daisy's block number."""
        number = self._number
        if number is None:
            number = self._number = self._grid.number_of(self.index)
        return (self.task_id, number)

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
            return self.block_id == other.block_id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.block_id)

    def __repr__(self) -> str:
        return (f"Block(block_id={self.block_id!r}, read_roi={self.read_roi}, "
                f"write_roi={self.write_roi}, status={self.status.name})")

    def __getstate__(self):
        return (self.task_id, self.index, self.block_id[1], self.status, self.error,
                self.read_roi, self.write_roi)

    def __setstate__(self, state) -> None:
        (self.task_id, self.index, self._number, self.status, self.error, read_roi,
         write_roi) = state
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


class PackedBlocks:
    """A set of block indices as packed bits (1 bit per block, numpy's big-endian bit
    order), in chunks: what a ledger hands a scheduler that resumes, without one
    integer per done block (a 99% done 10^9-block task would need 8 GB of them).

    Parameters
    ----------
    chunks:
        ``first index -> packed bits`` (numpy ``uint8`` of ``chunk_blocks // 8``).
    count:
        How many bits are set.
    chunk_blocks:
        Indices per chunk (a multiple of 8).
    """

    __slots__ = ("chunks", "count", "chunk_blocks")

    def __init__(self, chunks: dict, count: int, chunk_blocks: int) -> None:
        self.chunks = chunks
        self.count = count
        self.chunk_blocks = chunk_blocks

    @classmethod
    def from_indices(cls, indices, chunk_blocks: int = 1 << 23) -> PackedBlocks:
        """The packed set of ``indices`` (non-negative integers)."""
        import numpy as np
        array = np.unique(np.asarray(indices, dtype=np.int64))
        chunks = {}
        for first in np.unique(array // chunk_blocks * chunk_blocks).tolist():
            bits = np.zeros(chunk_blocks, dtype=np.uint8)
            part = array[(array >= first) & (array < first + chunk_blocks)]
            bits[part - first] = 1
            chunks[first] = np.packbits(bits)
        return cls(chunks, int(array.size), chunk_blocks)

    def __len__(self) -> int:
        return self.count

    def indices(self):
        """The indices, as a sorted numpy ``int64`` array."""
        import numpy as np
        parts = [np.flatnonzero(np.unpackbits(self.chunks[first])) + first
                 for first in sorted(self.chunks)]
        return (np.concatenate(parts).astype(np.int64) if parts
                else np.zeros(0, dtype=np.int64))

    def __iter__(self):
        return iter(self.indices().tolist())

    def into_bitmap(self, size: int) -> BlockBitmap | None:
        """A :class:`BlockBitmap` of ``size`` indices holding the set, unpacked chunk by
        chunk into its bytes; None when an index is ``size`` or more."""
        import numpy as np
        bitmap = BlockBitmap(size)
        view = np.frombuffer(bitmap._bytes, dtype=np.uint8)
        for first, packed in self.chunks.items():
            bits = np.unpackbits(packed)
            end = min(first + self.chunk_blocks, size)
            if end <= first or bits[end - first:].any():
                return None
            view[first:end] = bits[:end - first]
        bitmap._count = self.count
        return bitmap


_allocate_block = Block.__new__


def new_block(task_id: str, index: int, grid: BlockGrid) -> Block:
    """A block of ``grid`` whose ROIs are computed on first access (the hot path)."""
    block = _allocate_block(Block)
    block.task_id = task_id
    block.index = index
    block.status = BlockStatus.CREATED
    block.error = None
    block._grid = grid
    block._rois = None
    block._number = None
    return block


def block_from_rois(task_id: str, index: int, number: int, read_roi: Roi, write_roi: Roi,
                    status: BlockStatus = BlockStatus.CREATED) -> Block:
    """A block whose ROIs and daisy number are already known (received off the wire)."""
    block = _allocate_block(Block)
    block.task_id = task_id
    block.index = index
    block.status = status
    block.error = None
    block._grid = None
    block._rois = (read_roi, write_roi)
    block._number = number
    return block


__all__ = ["Block", "BlockBitmap", "BlockGrid", "BlockStatus", "Coordinate", "FIT_MODES",
           "PackedBlocks", "Roi", "block_from_rois", "cantor_number", "new_block"]


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
    return grid.number_of(index)
