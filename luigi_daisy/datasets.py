"""ROI-indexed zarr arrays: ``open_ds``, ``prepare_ds``, chunk alignment checks.

A dataset is a zarr array whose attributes carry the metadata funlib.persistence 0.7
writes, so a dataset written here opens there and the other way round::

    {"axis_names": ["c^", "z", "y", "x"],   # one per array dimension
     "units": ["nm", "nm", "nm"],           # one per spatial dimension
     "voxel_size": [40, 4, 4],              # world units per voxel, spatial dimensions
     "offset": [0, -400, 800],              # world position of voxel 0, spatial dimensions
     "types": ["channel", "space", "space", "space"]}   # one per array dimension

Dimensions whose type is ``"space"`` or ``"time"`` are spatial: a ``Roi`` in world units
indexes them, and every other (channel) dimension is carried through whole. Datasets
written by funlib.persistence before 0.5 (and daisy 1 scripts) stored the voxel size as
``resolution``; that name is read too.

Blockwise tasks write blocks concurrently. Two blocks that write into one zarr chunk at
the same time race (each rewrites the whole chunk), so :func:`check_write_alignment`
refuses a write ROI that is not a whole number of chunks or whose blocks do not begin on
chunk boundaries, and says which chunk shape would fit.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import os
import sys
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr
import zarr.errors
from funlib.geometry import Coordinate, Roi

from .errors import DatasetError

__all__ = [
    "Array", "check_write_alignment", "open_ds", "prepare_ds",
]

#: Axis types that a ``Roi`` indexes (funlib.persistence's convention).
SPATIAL_TYPES = ("space", "time")
#: The attribute names funlib.persistence 0.7 writes, in the order it writes them.
METADATA_KEYS = ("axis_names", "units", "voxel_size", "offset", "types")

_OPEN_MODES = ("r", "r+", "a")
_PREPARE_MODES = ("r", "r+", "a", "w", "w-")


# --------------------------------------------------------------------------- helpers
def _path_string(path: Any) -> str:
    return os.fspath(path) if isinstance(path, os.PathLike) else str(path)


def _int_tuple(values: Any, what: str, where: str) -> tuple[int, ...]:
    """``values`` as a tuple of ints; integral floats (``4.0``) are accepted."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | np.ndarray):
        raise DatasetError(f"{where}: {what} must be a sequence of integers, got {values!r}")
    result = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer
                                                     | np.floating):
            raise DatasetError(
                f"{where}: {what} must be a sequence of integers, got {list(values)!r}")
        if int(value) != value:
            raise DatasetError(
                f"{where}: {what} must hold whole numbers, got {list(values)!r}")
        result.append(int(value))
    return tuple(result)


def _str_list(values: Any, what: str, where: str) -> list[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise DatasetError(f"{where}: {what} must be a sequence of strings, got {values!r}")
    if not all(isinstance(value, str) for value in values):
        raise DatasetError(f"{where}: {what} must be a sequence of strings, got {values!r}")
    return list(values)


def _interleave(spatial: Sequence, channel: Sequence, types: Sequence[str]) -> tuple:
    """Merge per-spatial-dimension and per-channel-dimension values in axis order."""
    spatial_values = iter(spatial)
    channel_values = iter(channel)
    return tuple(next(spatial_values) if axis_type in SPATIAL_TYPES else next(channel_values)
                 for axis_type in types)


def _default_axis_names(types: Sequence[str]) -> list[str]:
    """funlib.persistence's default names: ``d0, d1, ...`` spatial, ``c0^, ...`` channel."""
    names = []
    spatial_index = channel_index = 0
    for axis_type in types:
        if axis_type in SPATIAL_TYPES:
            names.append(f"d{spatial_index}")
            spatial_index += 1
        else:
            names.append(f"c{channel_index}^")
            channel_index += 1
    return names


def _parse_metadata(shape: Sequence[int], attrs: Mapping[str, Any], where: str) -> dict:
    """Metadata of an array of ``shape`` from its attributes, the way funlib.persistence
    0.7 parses them: missing values fall back to voxel size 1, offset 0, empty units and
    default axis names; ``types`` falls back to the axis names (a trailing ``^`` marks a
    channel) and then to channels first, spatial dimensions last."""
    dims = len(shape)
    offset = attrs.get("offset")
    voxel_size = attrs.get("voxel_size")
    if voxel_size is None:
        voxel_size = attrs.get("resolution")
    axis_names = attrs.get("axis_names")
    units = attrs.get("units")
    types = attrs.get("types")

    if offset is not None:
        offset = _int_tuple(offset, "offset", where)
    if voxel_size is not None:
        voxel_size = _int_tuple(voxel_size, "voxel_size", where)
    if axis_names is not None:
        axis_names = _str_list(axis_names, "axis_names", where)
    if units is not None:
        units = _str_list(units, "units", where)
    if types is not None:
        types = _str_list(types, "types", where)
    elif axis_names is not None:
        types = ["channel" if name.endswith("^") else "space" for name in axis_names]

    spatial_counts = set()
    if types is not None:
        if len(types) != dims:
            raise DatasetError(
                f"{where}: types {types} name {len(types)} dimensions but the array has "
                f"{dims} (shape {tuple(shape)})")
        spatial_axes = [axis for axis, axis_type in enumerate(types)
                        if axis_type in SPATIAL_TYPES]
        spatial_counts.add(len(spatial_axes))

        def strip(values, what):
            # funlib accepts per-spatial-dimension values or one per array dimension
            if values is None or len(values) == len(spatial_axes):
                return values
            if len(values) == len(types):
                return type(values)(values[axis] for axis in spatial_axes)
            raise DatasetError(
                f"{where}: {what} {list(values)} fits neither the {len(spatial_axes)} "
                f"spatial dimensions nor all {len(types)} dimensions of types {types}")

        offset = strip(offset, "offset")
        voxel_size = strip(voxel_size, "voxel_size")
        units = strip(units, "units")
    for values in (offset, voxel_size, units):
        if values is not None:
            spatial_counts.add(len(values))
    if len(spatial_counts) > 1:
        raise DatasetError(
            f"{where}: the number of spatial dimensions is ambiguous: offset {offset}, "
            f"voxel_size {voxel_size}, units {units}, types {types}")
    spatial_dims = spatial_counts.pop() if spatial_counts else dims
    if spatial_dims > dims:
        raise DatasetError(
            f"{where}: the metadata describes {spatial_dims} spatial dimensions but the "
            f"array has only {dims} (shape {tuple(shape)})")
    channel_dims = dims - spatial_dims
    if types is None:
        types = ["channel"] * channel_dims + ["space"] * spatial_dims
    if axis_names is None:
        axis_names = _default_axis_names(types)
    if len(axis_names) != dims:
        raise DatasetError(
            f"{where}: axis_names {axis_names} name {len(axis_names)} dimensions but the "
            f"array has {dims} (shape {tuple(shape)})")
    if voxel_size is None:
        voxel_size = (1,) * spatial_dims
    if any(extent <= 0 for extent in voxel_size):
        raise DatasetError(f"{where}: voxel_size {voxel_size} must be positive")
    return {
        "axis_names": list(axis_names),
        "units": list(units) if units is not None else [""] * spatial_dims,
        "voxel_size": Coordinate(voxel_size),
        "offset": Coordinate(offset) if offset is not None else Coordinate((0,) * spatial_dims),
        "types": list(types),
    }


class _NoArrayError(DatasetError):
    """Nothing at all at a path (as opposed to a group or a broken array)."""


def _open_zarr_array(path: str, mode: str) -> zarr.Array:
    """The zarr array at ``path``, or a DatasetError that says what is there instead."""
    try:
        return zarr.open_array(store=path, mode=mode)
    except zarr.errors.NodeTypeValidationError:
        try:
            members = sorted(zarr.open_group(store=path, mode="r").array_keys())
        except (OSError, ValueError):  # the hint is best effort; the error is the point
            members = []
        hint = (f"; it holds the arrays {', '.join(members)}: open e.g. "
                f"{path.rstrip('/')}/{members[0]}" if members else "")
        raise DatasetError(f"{path} is a zarr group, not an array{hint}") from None
    except FileNotFoundError:
        raise _NoArrayError(f"no zarr array at {path}") from None


# --------------------------------------------------------------------------- chunk I/O
class _ChunkFiles:
    """The chunk files of one zarr array in a local folder: any box read, whole chunks
    written, in the calling thread.

    zarr 3's synchronous API runs every call through its own event-loop thread and every
    chunk's (de)compression through ``asyncio.to_thread``: about 0.7 ms per chunk read and
    1.5 ms per chunk write on top of the codec, and a context switch or two per chunk
    (benchmarks/bench_arrays.py). A block reads and writes whole chunks, so this does what
    zarr would do for such chunks, with zarr's own metadata and codecs: the chunk's key
    from ``encode_chunk_key``, the file under the store's root, zarr's missing-chunk fill
    value, zarr's rule for chunks equal to the fill value (deleted, unless
    ``write_empty_chunks``), and a write through a temporary file renamed into place.
    The bytes on disk are the ones zarr writes. Only arrays whose chunks are stored one
    per file in a :class:`zarr.storage.LocalStore`, with a regular chunk grid and no
    array-to-array codecs, filters or sharding, are handled; :meth:`for_array` answers
    ``None`` for any other and callers use zarr.
    """

    def __init__(self, data: zarr.Array) -> None:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.codec_pipeline import fill_value_or_default

        async_array = data._async_array
        metadata = async_array.metadata
        self.chunks = tuple(int(c) for c in data.chunks)
        self.shape = tuple(int(s) for s in data.shape)
        self.dtype = np.dtype(data.dtype)
        self.prototype = default_buffer_prototype()
        self.spec = metadata.get_chunk_spec((0,) * len(self.shape), async_array.config,
                                            self.prototype)
        self.fill_value = fill_value_or_default(self.spec)
        self.write_empty_chunks = bool(async_array.config.write_empty_chunks)
        self.encode_chunk_key = metadata.encode_chunk_key
        prefix = data.path.strip("/")
        self.root = os.path.join(str(data.store.root), prefix) if prefix else str(data.store.root)
        self.order = "C"
        pipeline = async_array.codec_pipeline
        # a numcodecs codec that decodes straight into a caller's buffer, if that is all
        self.compressor: Any = None
        self.codecs: tuple = ()
        if metadata.zarr_format == 2:
            self.order = self.spec.order
            self.compressor = metadata.compressor
            self.codecs = None  # type: ignore[assignment]
        else:
            self.array_bytes = pipeline.array_bytes_codec
            self.codecs = tuple(pipeline.bytes_bytes_codecs)
            if len(self.codecs) == 1 and type(self.codecs[0]).__name__ in ("ZstdCodec",
                                                                           "BloscCodec"):
                codec = self.codecs[0]
                self.compressor = (codec._zstd_codec if type(codec).__name__ == "ZstdCodec"
                                   else codec._blosc_codec)

    @classmethod
    def for_array(cls, data: zarr.Array) -> _ChunkFiles | None:
        """The chunk files of ``data``, or None where zarr must do the work."""
        from zarr.codecs import BytesCodec
        from zarr.core.chunk_grids import RegularChunkGrid
        from zarr.storage import LocalStore

        try:
            metadata = data.metadata
            if not isinstance(data.store, LocalStore) or getattr(data, "shards", None):
                return None
            dtype = np.dtype(data.dtype)
            if dtype.hasobject or not dtype.isnative or dtype.kind in "USV":
                return None
            pipeline = data._async_array.codec_pipeline
            if metadata.zarr_format == 2:
                if metadata.filters or metadata.order not in ("C", "F"):
                    return None
            else:
                if not isinstance(metadata.chunk_grid, RegularChunkGrid):
                    return None
                if pipeline.array_array_codecs:
                    return None
                codec = pipeline.array_bytes_codec
                if not isinstance(codec, BytesCodec) or (
                        codec.endian is not None and dtype.itemsize > 1
                        and codec.endian.value != sys.byteorder):
                    return None
                if not all(hasattr(c, "_decode_sync") and hasattr(c, "_encode_sync")
                           for c in pipeline.bytes_bytes_codecs):
                    return None
            return cls(data)
        except (AttributeError, ImportError, TypeError):  # a zarr whose internals moved
            return None

    # ------------------------------------------------------------------ codecs
    def _decode_into(self, encoded: bytes, target: np.ndarray) -> None:
        """Decode one whole chunk's bytes into ``target`` (the chunk's shape)."""
        if self.compressor is not None and self.order == "C" and target.flags.c_contiguous:
            self.compressor.decode(encoded, out=target)
            return
        if self.codecs is None:  # zarr 2 format, filters refused above
            decoded = self.compressor.decode(encoded) if self.compressor else encoded
            target[...] = np.frombuffer(decoded, dtype=self.dtype).reshape(
                self.chunks, order=self.order)
            return
        buffer = self.prototype.buffer.from_bytes(encoded)
        for codec in reversed(self.codecs):
            buffer = codec._decode_sync(buffer, self.spec)
        target[...] = self.array_bytes._decode_sync(buffer, self.spec).as_numpy_array()

    def _encode(self, chunk: np.ndarray) -> Any:
        """One whole chunk (C-contiguous, the array's dtype) as the bytes zarr stores."""
        if self.codecs is None:
            chunk = chunk.astype(self.dtype, order=self.order, copy=False)
            return self.compressor.encode(chunk) if self.compressor else chunk.tobytes(
                order="A")
        if self.compressor is not None:  # the bytes codec's output: the raw bytes
            return self.compressor.encode(chunk.reshape(-1).view(np.uint8))
        buffer = self.array_bytes._encode_sync(
            self.prototype.nd_buffer.from_numpy_array(chunk), self.spec)
        for codec in self.codecs:
            buffer = codec._encode_sync(buffer, self.spec)
        return buffer.as_buffer_like()

    def _is_fill(self, chunk: np.ndarray) -> bool:
        """zarr's own test for a chunk it does not store."""
        if chunk.dtype.kind in "biu":  # exact without NaNs or signed zeros, and no temporary
            lowest = chunk.min()
            return bool(lowest == chunk.max() and lowest == self.fill_value)
        nd_buffer = self.prototype.nd_buffer
        first = chunk.reshape(-1)[:1]
        if not nd_buffer.from_numpy_array(first).all_equal(self.fill_value):
            return False  # the usual answer, without comparing the whole chunk
        return nd_buffer.from_numpy_array(chunk).all_equal(self.fill_value)

    def _path(self, coords: tuple[int, ...]) -> str:
        return os.path.join(self.root, self.encode_chunk_key(coords))

    # ------------------------------------------------------------------ boxes
    def _chunk_boxes(self, low: Sequence[int], high: Sequence[int]):
        """(chunk coordinates, chunk begin, begin, end) of every chunk the voxel box
        ``[low, high)`` touches, box corners clipped to that chunk."""
        ranges = [range(lo // c, (hi - 1) // c + 1) for lo, hi, c in zip(low, high, self.chunks)]
        for coords in itertools.product(*ranges):
            chunk_begin = tuple(k * c for k, c in zip(coords, self.chunks))
            begin = tuple(max(lo, b) for lo, b in zip(low, chunk_begin))
            end = tuple(min(hi, b + c) for hi, b, c in zip(high, chunk_begin, self.chunks))
            yield coords, chunk_begin, begin, end

    def read(self, low: Sequence[int], high: Sequence[int], out: np.ndarray,
             out_low: Sequence[int]) -> None:
        """Read the voxel box ``[low, high)`` of the array (inside it) into ``out``, whose
        index ``out_low`` is voxel ``low``.

        A read of several chunks (a block with its context) keeps them decoded: the
        blocks around it read most of them again. A read of one whole chunk decodes it
        straight into ``out``."""
        several = any((hi - 1) // c > lo // c for lo, hi, c in zip(low, high, self.chunks))
        for coords, chunk_begin, begin, end in self._chunk_boxes(low, high):
            target = out[tuple(slice(b - lo + o, e - lo + o)
                               for b, e, lo, o in zip(begin, end, low, out_low))]
            direct = not several and tuple(e - b for b, e in zip(begin, end)) == self.chunks
            path = self._path(coords)
            try:
                # one stat when the chunk is kept decoded; the version kept is the one
                # of the bytes read (a file replaced between stat and open is read again
                # next time)
                decoded = None if direct else _DECODED.get(path, _file_version(os.stat(path)))
                if decoded is None:
                    with open(path, "rb") as file:
                        version = _file_version(os.fstat(file.fileno()))
                        encoded = file.read()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                target[...] = self.fill_value
                continue
            if decoded is None and direct:
                self._decode_into(encoded, target)
                continue
            if decoded is None:
                decoded = np.empty(self.chunks, dtype=self.dtype)
                self._decode_into(encoded, decoded)
                _DECODED.put(path, version, decoded)
            target[...] = decoded[tuple(slice(b - c, e - c)
                                        for b, e, c in zip(begin, end, chunk_begin))]

    def covers_whole_chunks(self, low: Sequence[int], high: Sequence[int]) -> bool:
        """Whether ``[low, high)`` is made of whole chunks, none of them past the array's
        end (zarr pads those; it writes them itself)."""
        return all(lo % c == 0 and hi % c == 0 and hi <= s
                   for lo, hi, c, s in zip(low, high, self.chunks, self.shape))

    def write(self, low: Sequence[int], high: Sequence[int], value: np.ndarray) -> None:
        """Write ``value`` (the box's shape, the array's dtype) into the whole chunks of
        ``[low, high)``."""
        for coords, _, begin, end in self._chunk_boxes(low, high):
            chunk = value[tuple(slice(b - lo, e - lo) for b, e, lo in zip(begin, end, low))]
            chunk = np.ascontiguousarray(chunk)
            path = self._path(coords)
            if not self.write_empty_chunks and self._is_fill(chunk):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            encoded = self._encode(chunk)
            partial = f"{path}.{uuid.uuid4().hex}.partial"
            try:
                file = open(partial, "wb")
            except FileNotFoundError:
                os.makedirs(os.path.dirname(partial), exist_ok=True)
                file = open(partial, "wb")
            try:
                with file:
                    file.write(encoded)
                os.replace(partial, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(partial)
                raise


def _file_version(status: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a chunk file is replaced (a new inode) or rewritten."""
    return (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)


class _DecodedChunks:
    """Decoded chunks of this process, least recently used dropped first, each checked
    against its file's inode, modification time and size before it is used."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._lock = threading.Lock()  # process functions may read from threads
        self._chunks: collections.OrderedDict[str, tuple[tuple, np.ndarray]] = (
            collections.OrderedDict())

    def get(self, path: str, version: tuple) -> np.ndarray | None:
        with self._lock:
            found = self._chunks.get(path)
            if found is None:
                return None
            if found[0] != version:
                self._drop(path)
                return None
            self._chunks.move_to_end(path)
            return found[1]

    def put(self, path: str, version: tuple, chunk: np.ndarray) -> None:
        if chunk.nbytes > self.capacity_bytes:
            return
        chunk.flags.writeable = False
        with self._lock:
            if path in self._chunks:
                self._drop(path)
            self._chunks[path] = (version, chunk)
            self.used_bytes += chunk.nbytes
            while self.used_bytes > self.capacity_bytes:
                self._drop(next(iter(self._chunks)))

    def _drop(self, path: str) -> None:
        _, chunk = self._chunks.pop(path)
        self.used_bytes -= chunk.nbytes


#: chunks that reads used in part, kept decoded (64 MiB a process: the raw chunks around
#: a few rows of blocks)
_DECODED = _DecodedChunks(64 * 2 ** 20)

_NOT_LOOKED = object()


# --------------------------------------------------------------------------- Array
class Array:
    """A zarr array indexed by ``Roi`` in world units.

    Parameters
    ----------
    data:
        The zarr array.
    offset, voxel_size:
        World position of voxel 0 and world size of one voxel, spatial dimensions only
        (defaults: 0 and 1).
    axis_names, units, types:
        funlib.persistence metadata; ``types`` (``"space"``, ``"time"`` or
        ``"channel"``, one per array dimension) says which dimensions are spatial.
    fill_value:
        Value of the voxels that a read outside the array returns.
    path:
        Where the array lives, used in error messages.

    Attributes
    ----------
    data:
        The zarr array.
    fill_value:
        Value of voxels read outside the array (default 0); settable.
    """

    def __init__(self, data: zarr.Array, offset: Sequence[int] | None = None,
                 voxel_size: Sequence[int] | None = None,
                 axis_names: Sequence[str] | None = None,
                 units: Sequence[str] | None = None,
                 types: Sequence[str] | None = None,
                 fill_value: Any = 0, path: str | os.PathLike | None = None) -> None:
        self.data = data
        self.path = _path_string(path) if path is not None else None
        metadata = _parse_metadata(
            data.shape,
            {"offset": offset, "voxel_size": voxel_size, "axis_names": axis_names,
             "units": units, "types": types},
            self._name)
        self._voxel_size: Coordinate = metadata["voxel_size"]
        self._offset: Coordinate = metadata["offset"]
        self._axis_names: list[str] = metadata["axis_names"]
        self._units: list[str] = metadata["units"]
        self._types: list[str] = metadata["types"]
        self._spatial_axes = tuple(axis for axis, axis_type in enumerate(self._types)
                                   if axis_type in SPATIAL_TYPES)
        self._channel_axes = tuple(axis for axis, axis_type in enumerate(self._types)
                                   if axis_type not in SPATIAL_TYPES)
        self._spatial_shape = tuple(data.shape[axis] for axis in self._spatial_axes)
        self.fill_value = fill_value
        self._chunk_files_found: Any = _NOT_LOOKED

    def __getstate__(self) -> dict:
        # what this process found of the chunk files is looked at again where the array
        # is unpickled (a worker): the marker for "not looked" is this process's object
        state = dict(self.__dict__)
        state.pop("_chunk_files_found", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._chunk_files_found = _NOT_LOOKED

    def _chunk_files(self) -> _ChunkFiles | None:
        if self._chunk_files_found is _NOT_LOOKED:
            self._chunk_files_found = _ChunkFiles.for_array(self.data)
        return self._chunk_files_found

    # ------------------------------------------------------------------ metadata
    @property
    def _name(self) -> str:
        return f"dataset {self.path}" if self.path is not None else "array"

    @property
    def voxel_size(self) -> Coordinate:
        """World size of one voxel (spatial dimensions)."""
        return self._voxel_size

    @property
    def offset(self) -> Coordinate:
        """World position of the array's first voxel (spatial dimensions)."""
        return self._offset

    @property
    def roi(self) -> Roi:
        """The region the array covers, in world units."""
        return Roi(self._offset, Coordinate(self._spatial_shape) * self._voxel_size)

    @property
    def axis_names(self) -> list[str]:
        """One name per array dimension."""
        return list(self._axis_names)

    @property
    def units(self) -> list[str]:
        """One unit per spatial dimension."""
        return list(self._units)

    @property
    def types(self) -> list[str]:
        """``"space"``, ``"time"`` or ``"channel"``, one per array dimension."""
        return list(self._types)

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of the voxels."""
        return np.dtype(self.data.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape in voxels, every dimension (channel dimensions included)."""
        return tuple(self.data.shape)

    @property
    def dims(self) -> int:
        """Number of array dimensions."""
        return len(self.data.shape)

    @property
    def spatial_dims(self) -> int:
        """Number of spatial dimensions (the dimensions a ``Roi`` indexes)."""
        return len(self._spatial_axes)

    @property
    def channel_dims(self) -> int:
        """Number of non-spatial dimensions."""
        return len(self._channel_axes)

    @property
    def channel_shape(self) -> tuple[int, ...]:
        """Extents of the non-spatial dimensions."""
        return tuple(self.data.shape[axis] for axis in self._channel_axes)

    @property
    def chunk_shape(self) -> Coordinate:
        """zarr chunk shape in voxels, every dimension."""
        return Coordinate(self.data.chunks)

    @property
    def write_chunk_shape(self) -> Coordinate:
        """The unit zarr stores whole, every dimension: the shard shape of a sharded
        array, else the chunk shape. Concurrent writes must not share one."""
        shards = getattr(self.data, "shards", None)
        return Coordinate(shards if shards is not None else self.data.chunks)

    @property
    def attrs(self):
        """The zarr array's attributes (the metadata and anything else stored there)."""
        return self.data.attrs

    def __repr__(self) -> str:
        where = f"{self.path!r}, " if self.path is not None else ""
        return (f"Array({where}roi={self.roi}, voxel_size={self._voxel_size}, "
                f"shape={self.shape}, dtype={self.dtype}, axis_names={self._axis_names})")

    # ------------------------------------------------------------------ indexing
    def _voxel_box(self, roi: Any, what: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(begin, shape)`` in voxels relative to the array's first voxel."""
        if not isinstance(roi, Roi):
            raise DatasetError(f"{self._name}: {what} must be a funlib.geometry Roi, got {roi!r}")
        if roi.dims != self.spatial_dims:
            raise DatasetError(
                f"{self._name}: {what} {roi} has {roi.dims} dimensions but the array has "
                f"{self.spatial_dims} spatial dimensions ({self._axis_names})")
        if roi.unbounded:
            raise DatasetError(f"{self._name}: {what} {roi} is unbounded")
        begin, shape = [], []
        aligned = True
        for roi_begin, roi_shape, offset, voxel in zip(roi.begin, roi.shape, self._offset,
                                                      self._voxel_size):
            if roi_shape < 0:
                raise DatasetError(f"{self._name}: {what} {roi} has a negative shape")
            relative_begin, begin_rest = divmod(roi_begin - offset, voxel)
            voxels, shape_rest = divmod(roi_shape, voxel)
            aligned = aligned and begin_rest == 0 and shape_rest == 0
            begin.append(int(relative_begin))
            shape.append(int(voxels))
        if not aligned:
            raise DatasetError(
                f"{self._name}: {what} {roi} is not aligned to the voxel grid (voxel size "
                f"{self._voxel_size}, offset {self._offset}): its begin minus the offset and "
                f"its shape must be multiples of the voxel size")
        return tuple(begin), tuple(shape)

    def _index(self, spatial_slices: Sequence[slice]) -> tuple[slice, ...]:
        return _interleave(spatial_slices, [slice(None)] * self.channel_dims, self._types)

    def to_ndarray(self, roi: Roi | None = None, fill_value: Any = None) -> np.ndarray:
        """Read ``roi`` (world units, voxel-aligned; default: the whole array) into a
        numpy array.

        The part of ``roi`` outside the array is ``fill_value`` (default: the array's
        ``fill_value``). Channel dimensions are returned whole, in their axis position.
        """
        if roi is None:
            roi = self.roi
        begin, shape = self._voxel_box(roi, "read ROI")
        if fill_value is None:
            fill_value = self.fill_value
        out_shape = _interleave(shape, self.channel_shape, self._types)
        try:
            np.full((), fill_value, dtype=self.dtype)
        except (OverflowError, ValueError, TypeError) as error:
            raise DatasetError(
                f"{self._name}: fill value {fill_value!r} does not fit dtype {self.dtype}: "
                f"{error}") from None
        source, target = [], []
        for roi_begin, roi_shape, extent in zip(begin, shape, self._spatial_shape):
            low = max(roi_begin, 0)
            high = min(roi_begin + roi_shape, extent)
            if low >= high:  # nothing of the array inside roi
                return np.full(out_shape, fill_value, dtype=self.dtype)
            source.append(slice(low, high))
            target.append(slice(low - roi_begin, high - roi_begin))
        inside = all(s.start == 0 and s.stop == extent for s, extent in zip(target, shape))
        files = self._chunk_files()
        if files is None:
            out = np.full(out_shape, fill_value, dtype=self.dtype)
            out[self._index(target)] = self.data[self._index(source)]
            return out
        # every voxel of an ROI inside the array is written below: no need to fill first
        out = (np.empty(out_shape, dtype=self.dtype) if inside
               else np.full(out_shape, fill_value, dtype=self.dtype))
        low, high = self._full_box(source)
        files.read(low, high, out, self._full_box(target)[0])
        return out

    def _full_box(self, spatial: Sequence[slice]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(low, high)`` in every dimension: spatial slices, channels whole."""
        channels = [slice(0, extent) for extent in self.channel_shape]
        box = _interleave(spatial, channels, self._types)
        return tuple(s.start for s in box), tuple(s.stop for s in box)

    def __getitem__(self, key: Any) -> Any:
        """``array[roi]``: the data in a world-unit ``Roi`` (see :meth:`to_ndarray`);
        ``array[coordinate]``: the voxel (all channels) at a world ``Coordinate``;
        anything else indexes the zarr array in voxels."""
        if isinstance(key, Roi):
            return self.to_ndarray(key)
        if isinstance(key, Coordinate):
            if not self.roi.contains(key):
                raise DatasetError(
                    f"{self._name}: coordinate {key} is outside the array's ROI {self.roi}")
            voxel = [int(c - o) // v for c, o, v in zip(key, self._offset, self._voxel_size)]
            return self.data[_interleave(voxel, [slice(None)] * self.channel_dims,
                                         self._types)]
        return self.data[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        """``array[roi] = value`` writes a world-unit ``Roi`` that lies inside the array;
        ``value`` is an array of the ROI's shape (channel dimensions included) or
        anything that broadcasts to it. Any other key indexes the zarr array in voxels."""
        if getattr(self.data, "read_only", False):
            raise DatasetError(
                f"{self._name} was opened read-only; open it with mode 'r+' or 'a' to write")
        if not isinstance(key, Roi):
            self.data[key] = value
            return
        begin, shape = self._voxel_box(key, "write ROI")
        if not self.roi.contains(key):
            raise DatasetError(
                f"{self._name}: write ROI {key} is not inside the array's ROI {self.roi}; "
                f"intersect it with the array's ROI first (roi.intersect(array.roi))")
        expected = _interleave(shape, self.channel_shape, self._types)
        value = np.asarray(value)
        try:
            broadcast = np.broadcast_shapes(value.shape, expected)
        except ValueError:
            broadcast = None
        if broadcast != expected:
            raise DatasetError(
                f"{self._name}: a value of shape {value.shape} does not fit write ROI {key}, "
                f"which has shape {expected} in voxels")
        spatial = [slice(b, b + s) for b, s in zip(begin, shape)]
        files = self._chunk_files()
        if files is not None and value.dtype == self.dtype:
            low, high = self._full_box(spatial)
            if files.covers_whole_chunks(low, high):
                files.write(low, high, np.broadcast_to(value, expected))
                return
        self.data[self._index(spatial)] = value


# --------------------------------------------------------------------------- open / prepare
def open_ds(path: str | os.PathLike, mode: str = "r", fill_value: Any = 0) -> Array:
    """Open the zarr array at ``path`` with its funlib.persistence metadata.

    Parameters
    ----------
    path:
        The zarr array (e.g. ``"volume.zarr/raw"``).
    mode:
        ``"r"`` (read only, default), ``"r+"`` or ``"a"`` (read and write). Use
        :func:`prepare_ds` to create an array.
    fill_value:
        What reads outside the array return.

    Raises
    ------
    DatasetError
        When there is no array at ``path``, or its metadata does not fit its shape.
    """
    path = _path_string(path)
    if mode not in _OPEN_MODES:
        raise DatasetError(
            f"open_ds({path!r}): mode {mode!r} is not one of {', '.join(_OPEN_MODES)}; "
            f"use prepare_ds to create or overwrite an array")
    data = _open_zarr_array(path, "r" if mode == "r" else "r+")
    metadata = _parse_metadata(data.shape, data.attrs, f"dataset {path}")
    return Array(data, fill_value=fill_value, path=path, **metadata)


def prepare_ds(
    path: str | os.PathLike,
    total_roi: Roi,
    voxel_size: Sequence[int],
    dtype: Any = np.float32,
    write_size: Sequence[int] | None = None,
    chunk_shape: Sequence[int] | None = None,
    num_channels: int | Sequence[int] | None = None,
    axis_names: Sequence[str] | None = None,
    units: Sequence[str] | None = None,
    types: Sequence[str] | None = None,
    mode: str = "a",
    fill_value: Any = 0,
    zarr_format: int = 3,
    custom_metadata: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Array:
    """Create (or reuse) a zarr array covering ``total_roi`` and return it.

    Parameters
    ----------
    path:
        Where the array goes (e.g. ``"volume.zarr/labels"``).
    total_roi:
        Region the array covers, in world units; its begin and shape must be multiples
        of ``voxel_size``.
    voxel_size:
        World size of one voxel, one value per spatial dimension.
    dtype:
        The voxels' dtype.
    write_size:
        World shape of one chunk (usually a task's write ROI shape); a multiple of
        ``voxel_size``. Sets the chunk shape to ``write_size / voxel_size``.
    chunk_shape:
        Chunk shape in voxels, for the spatial dimensions or for every dimension.
        Without ``write_size`` and ``chunk_shape`` zarr picks one.
    num_channels:
        Extent of one leading channel dimension, or a sequence of extents for several.
    axis_names, units, types:
        funlib.persistence metadata (defaults: ``d0, d1, ...`` and ``c0^, ...``, empty
        units, channels first). ``types`` may place channel dimensions between spatial
        ones.
    mode:
        ``"a"`` (default) creates the array or reuses a compatible existing one; ``"w"``
        overwrites whatever is at ``path``; ``"w-"`` fails if something is there;
        ``"r"`` / ``"r+"`` only open an existing compatible array.
    fill_value:
        zarr's value for chunks never written, and what reads outside the array return.
    zarr_format:
        3 (default) or 2.
    custom_metadata:
        More attributes to store next to the metadata.
    **kwargs:
        Passed to ``zarr.create_array`` (e.g. ``compressors``, ``shards``).

    Raises
    ------
    DatasetError
        For a misaligned ROI, inconsistent arguments, or an existing array whose ROI,
        voxel size, dtype, chunks or metadata differ (unless ``mode="w"``).
    """
    path = _path_string(path)
    where = f"prepare_ds({path!r})"
    if mode not in _PREPARE_MODES:
        raise DatasetError(f"{where}: mode {mode!r} is not one of {', '.join(_PREPARE_MODES)}")

    # ---- geometry
    voxel_size = _int_tuple(voxel_size, "voxel_size", where)
    if any(extent <= 0 for extent in voxel_size):
        raise DatasetError(f"{where}: voxel_size {voxel_size} must be positive")
    if not isinstance(total_roi, Roi):
        raise DatasetError(f"{where}: total_roi must be a funlib.geometry Roi, got {total_roi!r}")
    if total_roi.dims != len(voxel_size):
        raise DatasetError(
            f"{where}: total_roi {total_roi} has {total_roi.dims} dimensions but voxel_size "
            f"{voxel_size} has {len(voxel_size)}")
    if total_roi.unbounded or any(extent <= 0 for extent in total_roi.shape):
        raise DatasetError(f"{where}: total_roi {total_roi} must have a positive, finite shape")
    if any(int(b) % v or int(s) % v
           for b, s, v in zip(total_roi.begin, total_roi.shape, voxel_size)):
        raise DatasetError(
            f"{where}: total_roi {total_roi} is not aligned to voxel size "
            f"{Coordinate(voxel_size)}: its begin and shape must be multiples of it; e.g. "
            f"total_roi.snap_to_grid({Coordinate(voxel_size)}, mode='grow')")
    spatial_dims = len(voxel_size)
    offset = tuple(int(b) for b in total_roi.begin)
    spatial_shape = tuple(int(s) // v for s, v in zip(total_roi.shape, voxel_size))

    # ---- channels, types, names, units
    if num_channels is None:
        channel_shape: tuple[int, ...] = ()
    elif isinstance(num_channels, int | np.integer):
        channel_shape = (int(num_channels),)
    else:
        channel_shape = _int_tuple(num_channels, "num_channels", where)
    if any(extent <= 0 for extent in channel_shape):
        raise DatasetError(f"{where}: num_channels {num_channels} must be positive")
    dims = spatial_dims + len(channel_shape)
    types_chosen = types is not None or axis_names is not None
    if types is not None:
        types = _str_list(types, "types", where)
    elif axis_names is not None:
        types = ["channel" if str(name).endswith("^") else "space" for name in axis_names]
    else:
        types = ["channel"] * len(channel_shape) + ["space"] * spatial_dims
    if (len(types) != dims
            or sum(axis_type in SPATIAL_TYPES for axis_type in types) != spatial_dims):
        raise DatasetError(
            f"{where}: types {types} (given, or read from axis_names, where a trailing '^' "
            f"marks a channel) must name {spatial_dims} spatial dimensions ('space' or "
            f"'time') and {len(channel_shape)} channel dimensions (num_channels="
            f"{num_channels})")
    if axis_names is not None:
        axis_names = _str_list(axis_names, "axis_names", where)
        if len(axis_names) != dims:
            raise DatasetError(
                f"{where}: axis_names {axis_names} must name all {dims} dimensions")
    if units is not None:
        units = _str_list(units, "units", where)
        if len(units) == dims and dims != spatial_dims:
            units = [unit for unit, axis_type in zip(units, types) if axis_type in SPATIAL_TYPES]
        if len(units) != spatial_dims:
            raise DatasetError(
                f"{where}: units {units} must give one unit per spatial dimension "
                f"({spatial_dims})")
    shape = _interleave(spatial_shape, channel_shape, types)

    # ---- chunks
    spatial_chunks = None
    if write_size is not None:
        write_size = _int_tuple(write_size, "write_size", where)
        if len(write_size) != spatial_dims or any(
                w <= 0 or w % v for w, v in zip(write_size, voxel_size)):
            raise DatasetError(
                f"{where}: write_size {Coordinate(write_size)} must be a positive multiple "
                f"of voxel_size {Coordinate(voxel_size)} in each of the {spatial_dims} "
                f"spatial dimensions")
        spatial_chunks = tuple(w // v for w, v in zip(write_size, voxel_size))
    full_chunks = None
    if chunk_shape is not None:
        chunk_shape = _int_tuple(chunk_shape, "chunk_shape", where)
        if any(extent <= 0 for extent in chunk_shape):
            raise DatasetError(f"{where}: chunk_shape {chunk_shape} must be positive")
        if len(chunk_shape) == dims:
            full_chunks = chunk_shape
            given_spatial = tuple(c for c, t in zip(chunk_shape, types) if t in SPATIAL_TYPES)
        elif len(chunk_shape) == spatial_dims:
            given_spatial = chunk_shape
        else:
            raise DatasetError(
                f"{where}: chunk_shape {chunk_shape} must have {spatial_dims} (spatial) or "
                f"{dims} (all) dimensions")
        if spatial_chunks is not None and given_spatial != spatial_chunks:
            raise DatasetError(
                f"{where}: write_size {Coordinate(write_size)} means chunks of "
                f"{spatial_chunks} voxels, but chunk_shape is {chunk_shape}; give one of them")
        spatial_chunks = given_spatial
    if full_chunks is None and spatial_chunks is not None:
        full_chunks = _interleave(spatial_chunks, channel_shape, types)

    metadata = {
        "axis_names": axis_names if axis_names is not None else _default_axis_names(types),
        "units": units if units is not None else [""] * spatial_dims,
        "voxel_size": list(voxel_size),
        "offset": list(offset),
        "types": list(types),
    }
    attributes = dict(metadata)
    if custom_metadata:
        clashes = sorted(set(custom_metadata) & set(METADATA_KEYS))
        if clashes:
            raise DatasetError(
                f"{where}: custom_metadata may not set {', '.join(clashes)}; pass them as "
                f"arguments")
        attributes.update(custom_metadata)
    dtype = np.dtype(dtype)

    # ---- an existing array
    existing = None
    if mode != "w":
        try:
            existing = _open_zarr_array(path, "r")
        except _NoArrayError:
            pass
    if existing is not None:
        if mode == "w-":
            raise DatasetError(f"{where}: an array already exists there (mode 'w-')")
        found = _parse_metadata(existing.shape, existing.attrs, f"dataset {path}")
        found_spatial_shape = tuple(extent for extent, axis_type in
                                    zip(existing.shape, found["types"])
                                    if axis_type in SPATIAL_TYPES)
        differences = []
        if tuple(found["voxel_size"]) != voxel_size:
            differences.append(
                f"voxel size {found['voxel_size']} (asked {Coordinate(voxel_size)})")
        if len(found_spatial_shape) == spatial_dims == len(found["offset"]):
            existing_roi = Roi(found["offset"],
                               Coordinate(found_spatial_shape) * found["voxel_size"])
            if existing_roi != total_roi:
                differences.append(f"ROI {existing_roi} (asked {total_roi})")
        if tuple(existing.shape) != shape:
            differences.append(f"shape {tuple(existing.shape)} voxels (asked {shape})")
        if np.dtype(existing.dtype) != dtype:
            differences.append(f"dtype {np.dtype(existing.dtype)} (asked {dtype})")
        if full_chunks is not None and tuple(existing.chunks) != tuple(full_chunks):
            differences.append(
                f"chunk shape {tuple(existing.chunks)} voxels (asked {tuple(full_chunks)})")
        # names, units and types are compared only where the caller chose them
        chosen = {"axis_names": axis_names, "units": units,
                  "types": types if types_chosen else None}
        for key, given in chosen.items():
            if given is not None and list(found[key]) != list(given):
                differences.append(f"{key} {found[key]} (asked {list(given)})")
        if differences:
            raise DatasetError(
                f"{where}: an existing array there differs: {'; '.join(differences)}. "
                f"Pass mode='w' to overwrite it, or choose another path")
        data = existing if mode == "r" else _open_zarr_array(path, "r+")
        if mode != "r":
            missing = {key: value for key, value in attributes.items()
                       if key not in data.attrs}
            if missing:
                data.attrs.update(missing)
        return Array(data, fill_value=fill_value, path=path, **found)
    if mode in ("r", "r+"):
        raise DatasetError(f"{where}: no zarr array there to open with mode {mode!r}")

    # ---- create
    try:
        data = zarr.create_array(
            store=path,
            shape=shape,
            dtype=dtype,
            chunks=tuple(full_chunks) if full_chunks is not None else "auto",
            fill_value=fill_value,
            zarr_format=zarr_format,
            attributes=attributes,
            overwrite=(mode == "w"),
            **kwargs,
        )
    except zarr.errors.ContainsArrayError:
        if mode != "a":
            raise
        # another process (say, a worker's setup_worker next to ours) created it since we
        # looked: reuse it if it is compatible, as if it had been there before
        return prepare_ds(path, total_roi, voxel_size, dtype, write_size, chunk_shape,
                          num_channels, axis_names, units, types, mode="a",
                          fill_value=fill_value, zarr_format=zarr_format,
                          custom_metadata=custom_metadata, **kwargs)
    return Array(data, fill_value=fill_value, path=path,
                 **{key: metadata[key] for key in METADATA_KEYS})



# --------------------------------------------------------------------------- alignment
def check_write_alignment(array: Array, write_roi: Roi, total_write_roi: Roi | None = None,
                          task_name: str = "task") -> None:
    """Refuse a block write ROI under which concurrent blocks would write one chunk.

    Blocks write ``write_roi``-shaped regions on a grid that begins at
    ``total_write_roi.begin`` (or at ``write_roi.begin`` when ``total_write_roi`` is not
    given). No two blocks share a chunk (the shard, for a sharded array) when the write
    shape is a whole number of chunks and the grid begins on a chunk boundary, counted
    from the array's offset. A dimension along which ``total_write_roi`` holds a single
    block is exempt: no other block writes there.

    Raises
    ------
    DatasetError
        Naming the task, the dataset, what does not align, and the chunk shape that
        would fit.
    """
    name = array.path if array.path is not None else "the output array"
    prefix = f"{task_name}: write ROI {write_roi} into {name}"
    for what, roi in (("write_roi", write_roi), ("total_write_roi", total_write_roi)):
        if roi is not None and (not isinstance(roi, Roi) or roi.unbounded):
            raise DatasetError(f"{task_name}: {what} must be a bounded Roi, got {roi!r}")
    if write_roi.dims != array.spatial_dims or (
            total_write_roi is not None and total_write_roi.dims != array.spatial_dims):
        raise DatasetError(
            f"{prefix}: the write ROI has {write_roi.dims} dimensions but the array has "
            f"{array.spatial_dims} spatial dimensions")
    origin = total_write_roi.begin if total_write_roi is not None else write_roi.begin
    voxel_size = array.voxel_size
    if any(int(s) % v or int(o - a) % v
           for s, o, a, v in zip(write_roi.shape, origin, array.offset, voxel_size)):
        raise DatasetError(
            f"{prefix}: the write ROI's shape and the blocks' begin ({Coordinate(origin)}) "
            f"minus the array's offset {array.offset} must be multiples of its voxel size "
            f"{voxel_size}")
    write_voxels = [int(s) // v for s, v in zip(write_roi.shape, voxel_size)]
    origin_voxels = [int(o - a) // v for o, a, v in zip(origin, array.offset, voxel_size)]
    full_chunks = tuple(array.write_chunk_shape)
    spatial_axes = [axis for axis, t in enumerate(array.types) if t in SPATIAL_TYPES]
    chunks = [full_chunks[axis] for axis in spatial_axes]
    single_block = [
        total_write_roi is not None and int(total) <= int(shape)
        for total, shape in zip(
            total_write_roi.shape if total_write_roi is not None else write_roi.shape,
            write_roi.shape)]

    problems = []
    fitting = []
    for d, (write, begin, chunk, single) in enumerate(
            zip(write_voxels, origin_voxels, chunks, single_block)):
        axis_name = array.axis_names[spatial_axes[d]]
        if single:
            fitting.append(chunk)
            continue
        if write % chunk:
            problems.append(f"along {axis_name} the write shape, {write} voxels, is not a "
                            f"multiple of the chunk's {chunk}")
        if begin % chunk:
            problems.append(f"along {axis_name} blocks begin at voxel {begin} (+ k * {write}) "
                            f"from the array's offset, not on a chunk boundary (a multiple "
                            f"of {chunk})")
        fitting.append(math.gcd(write, begin))
    if not problems:
        return
    fitting_full = list(full_chunks)
    for axis, extent in zip(spatial_axes, fitting):
        fitting_full[axis] = extent
    sharded = getattr(array.data, "shards", None) is not None
    unit = "shard" if sharded else "chunk"
    chunk_world = Coordinate(chunks) * voxel_size
    raise DatasetError(
        f"{prefix} does not align with its {unit}s of {full_chunks} voxels "
        f"({chunk_world} in world units): {'; '.join(problems)}. Blocks writing into one "
        f"{unit} at the same time would race. A {unit} shape that fits is "
        f"{tuple(fitting_full)} voxels (prepare_ds(..., chunk_shape={tuple(fitting_full)}), "
        f"or any divisor of it); or use a write ROI whose shape is a multiple of "
        f"{chunk_world} with blocks beginning at the array's offset {array.offset} plus a "
        f"multiple of {chunk_world}")


# --------------------------------------------------------------------------- Luigi target
