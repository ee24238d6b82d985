"""Array[roi] reads and whole-chunk writes without zarr's event loop, bit for bit zarr's.

Blocks read and write whole chunks; ``Array`` does that in the calling thread with the
array's own codecs (luigi_daisy.datasets._ChunkFiles). These tests check that the chunk
files it writes are the files zarr writes (same keys, same bytes, fill-value chunks not
stored), that plain zarr and funlib.persistence read back what it wrote, and that it
really bypasses zarr's synchronous API (``zarr.core.sync.sync``, one event-loop round
trip per call) where it should and leaves the rest to zarr.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import zarr
import zarr.core.sync
from funlib.geometry import Roi

from luigi_daisy.datasets import open_ds, prepare_ds

DTYPES = ("uint8", "uint64", "float32")


def sample(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Data with long runs of the fill value, so that some chunks are empty."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 200, size=shape).astype(dtype)
    if np.dtype(dtype).kind == "f":
        values = values * np.float32(0.37) - np.float32(-0.0)
    values[tuple(slice(0, s // 2) for s in shape)] = 0  # whole empty chunks
    return values


def chunk_files(path) -> dict[str, bytes]:
    """Every chunk file of an array folder (metadata left out), by relative path."""
    found = {}
    for folder, _, names in os.walk(path):
        for name in names:
            if name in ("zarr.json", ".zarray", ".zattrs", ".zgroup"):
                continue
            full = os.path.join(folder, name)
            with open(full, "rb") as file:
                found[os.path.relpath(full, path)] = file.read()
    return found


@pytest.fixture
def sync_calls(monkeypatch):
    """How many times zarr's synchronous API entered its event loop."""
    calls = []
    real_sync = zarr.core.sync.sync

    def counting_sync(*args, **kwargs):
        calls.append(1)
        return real_sync(*args, **kwargs)

    # zarr's modules bound the name at import time
    for module_name in ("zarr.core.sync", "zarr.core.array"):
        module = __import__(module_name, fromlist=["sync"])
        monkeypatch.setattr(module, "sync", counting_sync)
    return calls


COMPRESSORS = {
    "default": {},
    "none": {"compressors": None},
    "blosc": {"compressors": [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]},
    "gzip+crc32c": {"compressors": [zarr.codecs.GzipCodec(level=1), zarr.codecs.Crc32cCodec()]},
}


@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
@pytest.mark.parametrize("zarr_format", [3, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_files_are_the_bytes_zarr_writes(tmp_path, dtype, zarr_format, compressor):
    if zarr_format == 2 and compressor == "gzip+crc32c":
        pytest.skip("zarr 2 has one compressor, no bytes-to-bytes chain")
    options = dict(COMPRESSORS[compressor])
    if zarr_format == 2 and compressor == "blosc":
        import numcodecs
        options = {"compressors": numcodecs.Blosc(cname="lz4", clevel=5, shuffle=1)}
    roi = Roi((0, 0, 0), (48, 32, 64))
    data = sample(dtype, (48, 32, 64), seed=1)
    ours = prepare_ds(tmp_path / "ours.zarr", roi, (1, 1, 1), dtype, chunk_shape=(16, 16, 32),
                      zarr_format=zarr_format, mode="w", **options)
    theirs = prepare_ds(tmp_path / "theirs.zarr", roi, (1, 1, 1), dtype,
                        chunk_shape=(16, 16, 32), zarr_format=zarr_format, mode="w", **options)
    ours[roi] = data
    theirs.data[...] = data  # plain zarr
    assert ours._chunk_files() is not None, "these arrays are meant to bypass zarr's loop"
    written = chunk_files(tmp_path / "ours.zarr")
    if compressor.startswith("gzip"):
        # gzip's header holds the second it was written (numcodecs passes no mtime):
        # zarr's own bytes differ from one second to the next, so compare the keys
        assert written.keys() == chunk_files(tmp_path / "theirs.zarr").keys()
    else:
        assert written == chunk_files(tmp_path / "theirs.zarr")
    # the empty eighth is not stored, as zarr does not store it
    assert 0 < len(written) < 3 * 2 * 2
    # zarr reads it back, and we read zarr's
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "ours.zarr", mode="r")[...], data)
    np.testing.assert_array_equal(open_ds(tmp_path / "theirs.zarr")[roi], data)


@pytest.mark.parametrize("dtype", DTYPES)
def test_aligned_and_unaligned_rois_read_back_through_zarr_and_funlib(tmp_path, dtype):
    funlib_persistence = pytest.importorskip("funlib.persistence")
    # world units: voxel size (2, 1, 4), an offset, and an array whose last chunks are
    # partial along y (40 = 16 + 16 + 8 voxels)
    total_roi = Roi((-32, 8, 64), (96, 40, 256))
    array = prepare_ds(tmp_path / "a.zarr", total_roi, (2, 1, 4), dtype,
                       chunk_shape=(16, 16, 32), fill_value=7, mode="w",
                       compressors=[zarr.codecs.BloscCodec(cname="zstd", clevel=3)])
    expected = np.full((48, 40, 64), 7, dtype=dtype)
    rng = np.random.default_rng(2)
    writes = [
        Roi((-32, 8, 64), (32, 16, 128)),     # whole chunks
        Roi((0, 24, 192), (64, 24, 128)),     # whole chunks plus the partial ones at the end
        Roi((-30, 10, 68), (20, 5, 44)),      # inside chunks, unaligned
        Roi((2, 20, 100), (40, 10, 80)),      # across chunk faces, unaligned
    ]
    for roi in writes:
        shape = tuple(int(s) // v for s, v in zip(roi.shape, (2, 1, 4)))
        values = sample(dtype, shape, seed=int(rng.integers(1000)))
        array[roi] = values
        begin = tuple((int(b) - int(o)) // v
                      for b, o, v in zip(roi.begin, total_roi.begin, (2, 1, 4)))
        expected[tuple(slice(b, b + s) for b, s in zip(begin, shape))] = values
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "a.zarr", mode="r")[...], expected)
    theirs = funlib_persistence.open_ds(str(tmp_path / "a.zarr"))
    np.testing.assert_array_equal(theirs[total_roi], expected)
    reader = open_ds(tmp_path / "a.zarr", fill_value=3)
    np.testing.assert_array_equal(reader[total_roi], expected)
    # an unaligned read reaching past the array: the array's fill value inside (never
    # written chunks), the reader's outside
    roi = Roi((-40, 0, 32), (40, 20, 80))
    got = reader[roi]
    want = np.full((20, 20, 20), 3, dtype=dtype)
    want[4:, 8:, 8:] = expected[:16, :12, :12]
    np.testing.assert_array_equal(got, want)
    assert got.flags.writeable and got.flags.c_contiguous


def test_chunk_files_of_arrays_in_groups_and_with_channels(tmp_path):
    funlib_persistence = pytest.importorskip("funlib.persistence")
    zarr.open_group(tmp_path / "volume.zarr", mode="w")
    roi = Roi((0, 0), (32, 64))
    array = prepare_ds(tmp_path / "volume.zarr" / "affs", roi, (2, 2), np.float32,
                       chunk_shape=(3, 8, 16), num_channels=3, mode="w")
    values = sample("float32", (3, 16, 32), seed=4)
    array[roi] = values
    assert chunk_files(tmp_path / "volume.zarr" / "affs")
    np.testing.assert_array_equal(
        zarr.open_array(tmp_path / "volume.zarr" / "affs", mode="r")[...], values)
    np.testing.assert_array_equal(
        funlib_persistence.open_ds(str(tmp_path / "volume.zarr" / "affs"))[roi], values)
    np.testing.assert_array_equal(open_ds(tmp_path / "volume.zarr" / "affs")[
        Roi((6, 12), (10, 30))], values[:, 3:8, 6:21])


def test_whole_chunks_bypass_the_event_loop_and_the_rest_uses_zarr(tmp_path, sync_calls):
    roi = Roi((0, 0, 0), (64, 64, 64))
    array = prepare_ds(tmp_path / "a.zarr", roi, (1, 1, 1), np.uint64,
                       chunk_shape=(32, 32, 32), mode="w")
    reader = open_ds(tmp_path / "a.zarr")
    block = Roi((32, 0, 32), (32, 32, 32))
    values = sample("uint64", (32, 32, 32), seed=5) + np.uint64(1)
    sync_calls.clear()
    array[block] = values                              # a block's write: whole chunks
    np.testing.assert_array_equal(reader[block], values)   # a block's read
    context = reader[block.grow((4, 4, 4), (4, 4, 4))]     # with context, past the edge
    assert context.shape == (40, 40, 40)
    np.testing.assert_array_equal(context[4:36, 4:36, 4:36], values)
    assert sync_calls == [], "a chunk-wise read or write went through zarr's event loop"
    # a partial chunk is zarr's: read, modify, write
    array[Roi((0, 0, 0), (8, 8, 8))] = np.ones((8, 8, 8), np.uint64)
    assert sync_calls
    # a value of another dtype is converted by zarr, as before
    sync_calls.clear()
    array[block] = values.astype(np.float64)
    assert sync_calls
    np.testing.assert_array_equal(reader[block], values)


def test_sharded_arrays_are_left_to_zarr(tmp_path, sync_calls):
    roi = Roi((0, 0), (64, 64))
    array = prepare_ds(tmp_path / "s.zarr", roi, (1, 1), np.uint8, chunk_shape=(16, 16),
                       shards=(32, 32), mode="w")
    values = sample("uint8", (32, 32), seed=6)
    sync_calls.clear()
    array[Roi((32, 32), (32, 32))] = values
    assert sync_calls
    np.testing.assert_array_equal(open_ds(tmp_path / "s.zarr")[Roi((32, 32), (32, 32))], values)
    np.testing.assert_array_equal(
        zarr.open_array(tmp_path / "s.zarr", mode="r")[32:, 32:], values)


def test_a_chunk_equal_to_the_fill_value_removes_the_stored_one(tmp_path):
    roi = Roi((0, 0), (32, 32))
    array = prepare_ds(tmp_path / "a.zarr", roi, (1, 1), np.float32, chunk_shape=(16, 16),
                       fill_value=np.nan, mode="w")
    array[roi] = np.ones((32, 32), np.float32)
    assert len(chunk_files(tmp_path / "a.zarr")) == 4
    array[Roi((0, 0), (16, 16))] = np.full((16, 16), np.nan, np.float32)
    assert len(chunk_files(tmp_path / "a.zarr")) == 3
    # -0.0 is not the fill value 0.0 (zarr compares bit patterns): stored
    zeros = prepare_ds(tmp_path / "z.zarr", roi, (1, 1), np.float32, chunk_shape=(16, 16),
                       mode="w")
    zeros[Roi((0, 0), (16, 16))] = np.full((16, 16), -0.0, np.float32)
    zeros[Roi((16, 16), (16, 16))] = np.zeros((16, 16), np.float32)
    assert len(chunk_files(tmp_path / "z.zarr")) == 1
    assert np.signbit(open_ds(tmp_path / "z.zarr")[Roi((0, 0), (16, 16))]).all()


def test_chunks_kept_decoded_are_read_again_once_their_file_changes(tmp_path):
    roi = Roi((0, 0, 0), (48, 48, 48))
    array = prepare_ds(tmp_path / "a.zarr", roi, (1, 1, 1), np.uint8, chunk_shape=(16, 16, 16),
                       mode="w")
    array[roi] = np.full((48, 48, 48), 1, np.uint8)
    reader = open_ds(tmp_path / "a.zarr")
    block = Roi((16, 16, 16), (16, 16, 16))
    with_context = block.grow((2, 2, 2), (2, 2, 2))
    assert (reader[with_context] == 1).all()   # its 26 neighbours' edges, kept decoded
    # rewritten by another process's zarr (a new file renamed into place) ...
    zarr.open_array(tmp_path / "a.zarr", mode="r+")[0:16, 16:32, 16:32] = 2
    # ... by this process's Array ...
    array[Roi((32, 16, 16), (16, 16, 16))] = np.full((16, 16, 16), 3, np.uint8)
    # ... in place, same size (a writer that does not rename)
    plain = zarr.open_array(tmp_path / "a.zarr", mode="r")
    chunk = tmp_path / "a.zarr" / plain.metadata.encode_chunk_key((1, 1, 0))
    other = prepare_ds(tmp_path / "b.zarr", roi, (1, 1, 1), np.uint8, chunk_shape=(16, 16, 16),
                       mode="w")
    other[Roi((0, 0, 0), (16, 16, 16))] = np.full((16, 16, 16), 4, np.uint8)
    replacement = (tmp_path / "b.zarr" / plain.metadata.encode_chunk_key((0, 0, 0))).read_bytes()
    assert len(replacement) == len(chunk.read_bytes())
    with open(chunk, "r+b") as file:
        file.write(replacement)
    os.utime(chunk, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    # ... and deleted (now the fill value)
    os.unlink(tmp_path / "a.zarr" / plain.metadata.encode_chunk_key((1, 2, 1)))
    got = reader[with_context]
    assert (got[0:2, 2:18, 2:18] == 2).all()
    assert (got[18:20, 2:18, 2:18] == 3).all()
    assert (got[2:18, 2:18, 0:2] == 4).all()
    assert (got[2:18, 18:20, 2:18] == 0).all()
    assert (got[2:18, 2:18, 18:20] == 1).all()


def test_a_neighbours_context_read_decodes_only_the_chunks_it_has_not_seen(tmp_path,
                                                                         monkeypatch):
    """Blocks read with context: 27 chunks each, 18 of them shared with the block before
    along x. Each chunk is decoded once, not once per block that touches it."""
    import numcodecs
    decoded = []
    real_decode = numcodecs.Zstd.decode

    def counting_decode(self, buf, out=None):
        decoded.append(1)
        return real_decode(self, buf, out)

    monkeypatch.setattr(numcodecs.Zstd, "decode", counting_decode)
    roi = Roi((0, 0, 0), (64, 64, 96))
    array = prepare_ds(tmp_path / "raw.zarr", roi, (1, 1, 1), np.uint8, chunk_shape=(16, 16, 16),
                       mode="w")
    values = sample("uint8", (64, 64, 96), seed=7) + 1
    array[roi] = values
    reader = open_ds(tmp_path / "raw.zarr")
    context = (4, 4, 4)
    for x in (16, 32, 48):
        block = Roi((16, 16, x), (16, 16, 16))
        decoded.clear()
        got = reader[block.grow(context, context)]
        np.testing.assert_array_equal(got, values[12:36, 12:36, x - 4:x + 20])
        if x == 16:
            assert len(decoded) == 27
        else:
            assert len(decoded) == 9, f"block at x={x} decoded {len(decoded)} chunks"


def test_an_array_pickled_before_its_first_use_reads_and_writes_where_it_lands(tmp_path):
    """An array in a process function's closure travels to the workers pickled, often
    before the run's process read or wrote it: there it takes the chunk-file path too
    (the marker of 'not looked at yet' is not this process's object any more)."""
    import pickle

    import cloudpickle

    roi = Roi((0, 0), (8, 8))
    array = prepare_ds(tmp_path / "travels.zarr", roi, voxel_size=(1, 1), dtype=np.uint8,
                       chunk_shape=(4, 4), mode="w")
    values = sample("uint8", (8, 8), 3)
    for dumps in (pickle.dumps, cloudpickle.dumps):
        landed = pickle.loads(dumps(array))
        landed[roi] = values
        assert np.array_equal(landed[roi], values)
        assert landed._chunk_files() is not None, "the chunk-file path, as before pickling"
    assert np.array_equal(open_ds(tmp_path / "travels.zarr").to_ndarray(roi), values)
