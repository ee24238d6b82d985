"""One 64^3 chunk read and written through luigi_daisy's array layer, through zarr 3's
own synchronous API, and through the codec alone, in one process.

    python benchmarks/bench_arrays.py            # uint8, uint64 and float32 chunks
    python benchmarks/bench_arrays.py --repeat 400

Each figure is the median over ``--repeat`` calls of one operation on a warm file cache
(the same chunks again and again): wall microseconds, CPU microseconds of the process
(user + system, all threads, so zarr's event-loop thread counts) and minor page faults
per call. The data are the segmentation example's kinds: smoothed noise (float32), a
0/1 mask (uint8), block-local labels (uint64).

- ``Array[roi]`` / ``Array[roi] = ``: ``open_ds`` / ``prepare_ds`` arrays indexed by a
  chunk-aligned ``Roi`` (the path every block of a blockwise task takes);
- ``Array[roi+ctx]``: a read of the chunk plus 8 voxels of context on every side (the
  Gaussian stage's read: 27 chunks touched, 26 of them partly), with the chunks read in
  part already decoded in the process (as for a block whose neighbour ran before it on
  the same worker), and ``cold``: with none decoded;
- ``zarr[...]``: the same chunk through ``zarr.Array.__getitem__`` / ``__setitem__``;
- ``codec``: read the chunk's file and decode it with the array's own compressor, or
  encode and write a file; what any layer above it costs at the least;
- ``tensorstore``: the same chunk through tensorstore's zarr3 driver (read and write
  ``.result()``), when tensorstore is installed.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import zarr

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from luigi_daisy import Roi, datasets, open_ds, prepare_ds

CHUNK = 64


def sample_data(dtype: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    shape = (CHUNK,) * 3
    if dtype == "uint8":
        return (rng.random(shape) > 0.6).astype(np.uint8)
    if dtype == "uint64":
        labels = np.zeros(shape, dtype=np.uint64)
        labels[8:40, 8:40, 8:40] = 262144 * 7 + 1
        labels[44:60, 10:60, 20:30] = 262144 * 7 + 2
        return labels
    from scipy import ndimage
    return ndimage.gaussian_filter(rng.normal(100, 30, shape).astype(np.float32), 2.0)


def measure(operation, repeat: int) -> tuple[float, float, float]:
    """Median wall and CPU microseconds, and mean minor faults, per call."""
    operation()  # warm up: imports, caches, first page faults
    walls, cpus = [], []
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeat):
        cpu = time.process_time()
        wall = time.perf_counter()
        operation()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    return statistics.median(walls) * 1e6, statistics.median(cpus) * 1e6, faults / repeat


def codec_alone(array) -> tuple:
    """read(path) and write(path, data) with nothing but the file and the compressor."""
    import numcodecs
    metadata = array.metadata
    if getattr(metadata, "zarr_format", 3) == 2:
        compressor = metadata.compressor
    else:
        configs = [codec.to_dict() for codec in metadata.codecs]
        zstd = [c for c in configs if c["name"] == "zstd"]
        compressor = numcodecs.Zstd(level=zstd[0]["configuration"]["level"])

    def read(path, dtype, shape):
        with open(path, "rb") as file:
            return np.frombuffer(compressor.decode(file.read()), dtype=dtype).reshape(shape)

    def write(path, data):
        encoded = compressor.encode(np.ascontiguousarray(data))
        partial = f"{path}.partial"
        with open(partial, "wb") as file:
            file.write(encoded)
        os.replace(partial, path)

    return read, write


def run(dtype: str, folder: str, repeat: int) -> list[tuple[str, float, float, float]]:
    data = sample_data(dtype)
    size = 3 * CHUNK
    roi = Roi((CHUNK, CHUNK, CHUNK), (CHUNK,) * 3)
    path = os.path.join(folder, f"{dtype}.zarr")
    array = prepare_ds(path, Roi((0, 0, 0), (size,) * 3), (1, 1, 1), dtype,
                       chunk_shape=(CHUNK,) * 3, mode="w")
    array[Roi((0, 0, 0), (size,) * 3)] = np.tile(data, (3, 3, 3))
    reader = open_ds(path)
    plain = zarr.open_array(path, mode="r+")
    inner = (slice(CHUNK, 2 * CHUNK),) * 3
    chunk_file = os.path.join(path, plain.metadata.encode_chunk_key((1, 1, 1)))
    codec_read, codec_write = codec_alone(plain)
    context = roi.grow((8, 8, 8), (8, 8, 8))

    rows = []

    def add(name, operation):
        rows.append((name, *measure(operation, repeat)))

    add("read  Array[roi]", lambda: reader[roi])
    add("read  Array[roi+ctx]", lambda: reader[context])

    def cold_context_read():
        datasets._DECODED.__init__(datasets._DECODED.capacity_bytes)
        reader[context]

    add("read  Array[roi+ctx] cold", cold_context_read)
    add("read  zarr[...]", lambda: plain[inner])
    add("read  codec", lambda: codec_read(chunk_file, data.dtype, data.shape))
    add("write Array[roi] =", lambda: array.__setitem__(roi, data))
    add("write zarr[...] =", lambda: plain.__setitem__(inner, data))
    add("write codec", lambda: codec_write(chunk_file, data))
    tensorstore = _tensorstore()
    if tensorstore is not None:  # the well-kept alternative to zarr's own API, weighed
        view = tensorstore.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                               "path": path}}).result()[inner]
        add("read  tensorstore", lambda: view.read().result())
        add("write tensorstore", lambda: view.write(data).result())
    assert np.array_equal(reader[roi], data)
    return rows


def _tensorstore():
    """tensorstore if installed (``pip install tensorstore``), else None."""
    try:
        import tensorstore
    except ImportError:
        return None
    return tensorstore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--dtypes", default="uint8,uint64,float32")
    arguments = parser.parse_args()
    print(f"zarr {zarr.__version__}, numpy {np.__version__}, load average "
          f"{os.getloadavg()[0]:.2f}; medians of {arguments.repeat} calls on a "
          f"{CHUNK}^3 chunk (zarr 3 format, zstd level 0)")
    with tempfile.TemporaryDirectory() as folder:
        for dtype in arguments.dtypes.split(","):
            print(f"\n{dtype} ({CHUNK ** 3 * np.dtype(dtype).itemsize / 2 ** 20:.2f} MiB)"
                  f"{'':10} wall us    CPU us  faults/call")
            for name, wall, cpu, faults in run(dtype, folder, arguments.repeat):
                print(f"  {name:<24} {wall:>9.0f} {cpu:>9.0f} {faults:>9.1f}")


if __name__ == "__main__":
    main()
