"""A 3D two-stage blockwise pipeline in Luigi: smooth a volume, then threshold it.

::

    Raw            (luigi.Task)         a 3D volume of blurry blobs and noise, raw.zarr
     -> Smooth     (BlockwiseTask)      box filter, reads SMOOTH_CONTEXT voxels of context
       -> Threshold(BlockwiseTask)      foreground where the 3x3x3 maximum of the smoothed
                                        volume exceeds ``level`` (THRESHOLD_CONTEXT voxel)
         -> Report (luigi.Task)         foreground fraction of the mask, as JSON
    AllReports     (luigi.WrapperTask)  a Report per level: a diamond on Smooth

``Raw -> Smooth`` and ``Threshold -> Report`` are ordinary Luigi edges: Smooth starts once
the raw volume exists, a Report once its mask is complete. ``Smooth -> Threshold`` is an
edge between two blockwise tasks: with ``pipelining`` on (the default), a Threshold block
starts as soon as the Smooth blocks it reads are written, in one pipelined run.

Run it from the repository root, after ``pip install -e .`` (which makes ``examples``
importable)::

    luigi --module examples.pipeline AllReports --local-scheduler --workers 2
    luigi --module examples.pipeline Report --level 0.6 --size 96 --local-scheduler

or with ``PYTHONPATH=examples`` and ``--module pipeline``. Settings go in ``luigi.cfg``
(point ``LUIGI_CONFIG_PATH`` at it)::

    [luigi_daisy]
    # worker processes per blockwise task
    num_workers = 2
    # records of finished blocks of tasks that declare no output of their own (each
    # task here keeps its record inside the array it writes: <array>/.luigi_daisy/)
    ledger_dir = ledgers

    [Smooth]
    # slow every block down, to watch the run in luigid
    block_seconds = 0.2
    # one line per processed block
    events_file = events.log

Several ``luigi`` commands may run the pipeline at once (Luigi refuses a second copy of
the same command unless it is given ``--no-lock``): each block is processed by one of
them, the others wait for it through its ledger.

Every array is a zarr array in ``workdir`` (default ``pipeline_data``), in world units
with a voxel size of ``VOXEL_SIZE``; a block writes exactly one chunk, so concurrent
blocks never write the same chunk.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time

import luigi
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from luigi_daisy import BlockwiseTask, Coordinate, Roi, ZarrTarget, prepare_ds

#: world size of one voxel (z, y, x)
VOXEL_SIZE = Coordinate(4, 2, 2)
#: voxels of context Smooth reads on every side of a block (the box filter's radius)
SMOOTH_CONTEXT = 2
#: voxels of context Threshold reads on every side of a block (the maximum's radius)
THRESHOLD_CONTEXT = 1
#: value of the smoothed volume outside its ROI, as Threshold reads it
OUTSIDE = 0.0


# --------------------------------------------------------------------------- the filters
def smooth(data: np.ndarray, context: int = SMOOTH_CONTEXT) -> np.ndarray:
    """Mean over a ``(2 * context + 1)^3`` box: the output is ``context`` voxels smaller
    than ``data`` on every side (only voxels whose whole box is inside ``data``)."""
    window = (2 * context + 1,) * data.ndim
    return sliding_window_view(data, window).mean(axis=(-3, -2, -1)).astype(np.float32)


def threshold(data: np.ndarray, level: float,
              context: int = THRESHOLD_CONTEXT) -> np.ndarray:
    """1 where the maximum over a ``(2 * context + 1)^3`` box exceeds ``level``, else 0;
    ``context`` voxels smaller than ``data`` on every side."""
    window = (2 * context + 1,) * data.ndim
    return (sliding_window_view(data, window).max(axis=(-3, -2, -1)) > level).astype(np.uint8)


def raw_volume(size: int, seed: int) -> np.ndarray:
    """The raw data: blurry blobs plus noise, ``size + 2 * SMOOTH_CONTEXT`` voxels a side."""
    shape = (size + 2 * SMOOTH_CONTEXT,) * 3
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    volume = np.zeros(shape, dtype=np.float32)
    for _ in range(6):
        center = rng.uniform(0, shape[0], size=3).reshape(3, 1, 1, 1)
        sigma = rng.uniform(size / 12, size / 6)
        volume += np.exp(-((grid - center) ** 2).sum(axis=0) / (2 * sigma ** 2))
    volume += rng.normal(0.0, 0.3, size=shape).astype(np.float32)
    return volume


def whole_volume(raw: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """``(smoothed, mask)`` computed on the whole volume at once (to check the blocks)."""
    smoothed = smooth(raw)
    padded = np.pad(smoothed, THRESHOLD_CONTEXT, constant_values=OUTSIDE)
    return smoothed, threshold(padded, level)


# --------------------------------------------------------------------------- parameters
class VolumeParameters:
    """Parameters every task of the pipeline shares; ``volume()`` passes them on."""

    workdir = luigi.Parameter(default="pipeline_data", description="folder of the arrays")
    size = luigi.IntParameter(default=48, description="voxels a side of the output volume")
    block_size = luigi.IntParameter(default=16,
                                    description="voxels a side of a block; divides size")
    seed = luigi.IntParameter(default=0, description="seed of the raw data")

    def volume(self) -> dict:
        """The shared parameters, to build the tasks this one requires."""
        return {"workdir": self.workdir, "size": self.size, "block_size": self.block_size,
                "seed": self.seed}

    def output_roi(self) -> Roi:
        """World ROI of the smoothed volume and of the masks."""
        if self.size % self.block_size:
            raise ValueError(f"size {self.size} is not a multiple of block_size "
                             f"{self.block_size}")
        return Roi((0, 0, 0), VOXEL_SIZE * self.size)

    def path(self, name: str) -> str:
        """Path of an array of the pipeline."""
        return os.path.join(self.workdir, name)


def prepare_output(path: str, roi: Roi, dtype, write_size: Coordinate):
    """Create the array at ``path`` (or open the existing one) with one chunk per block.

    Worker processes of this run and of other runs may call it at the same moment; the
    file lock makes one of them create the array and the others open it.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return prepare_ds(path, roi, VOXEL_SIZE, dtype, write_size=write_size, mode="a")


class PipelineStage(VolumeParameters, BlockwiseTask):
    """What both blockwise stages share: the output array and the per-block events."""

    # A stage reads one array and writes another, so neighbouring blocks never read what
    # the other writes and need not wait for each other (set it per task family, e.g.
    # ``[Smooth] read_write_conflict = true``).
    read_write_conflict = luigi.BoolParameter(
        default=False, significant=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="whether blocks that read each other's output may not run together")
    block_seconds = luigi.FloatParameter(
        default=0.0, significant=False,
        description="seconds every block sleeps (to watch a run)")
    events_file = luigi.OptionalParameter(
        default=None, significant=False,
        description="append a line '<family> <task_id> <block> <start> <end> <pid>' per "
                    "processed block to this file")

    def array_name(self) -> str:
        """File name of the array the task writes."""
        raise NotImplementedError

    def output(self):
        """The ledger (which blocks are done) and the array the blocks write."""
        return {"blocks": self.ledger_target(),
                "array": ZarrTarget(self.path(self.array_name()))}

    def record(self, block, started: float) -> None:
        """Append one line about a processed block to ``events_file`` (if set)."""
        if not self.events_file:
            return
        line = (f"{self.get_task_family()} {self.task_id} {block.index} {started:.6f} "
                f"{time.time():.6f} {os.getpid()}\n")
        descriptor = os.open(self.events_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(descriptor, line.encode())
        finally:
            os.close(descriptor)


# --------------------------------------------------------------------------- the tasks
class Raw(VolumeParameters, luigi.Task):
    """Writes the raw volume: the output ROI plus SMOOTH_CONTEXT voxels on every side."""

    def output(self):
        return ZarrTarget(self.path("raw.zarr"))

    def run(self):
        context = VOXEL_SIZE * SMOOTH_CONTEXT
        roi = self.output_roi().grow(context, context)
        path = self.output().path
        # write elsewhere and rename, so that the array appears whole or not at all
        partial = f"{path}.partial-{os.getpid()}"
        array = prepare_ds(partial, roi, VOXEL_SIZE, np.float32, mode="w",
                           chunk_shape=(self.block_size,) * 3)
        array[roi] = raw_volume(self.size, self.seed)
        try:
            os.rename(partial, path)
        except OSError:
            if not self.output().exists():
                raise
            shutil.rmtree(partial)  # another run wrote the same volume meanwhile


class Smooth(PipelineStage):
    """Box filter of the raw volume, block by block with SMOOTH_CONTEXT voxels of context."""

    def requires(self):
        return Raw(**self.volume())

    def array_name(self) -> str:
        return "smoothed.zarr"

    def total_roi(self) -> Roi:
        context = VOXEL_SIZE * SMOOTH_CONTEXT
        return self.output_roi().grow(context, context)

    def read_roi(self) -> Roi:
        return Roi((0, 0, 0), VOXEL_SIZE * (self.block_size + 2 * SMOOTH_CONTEXT))

    def write_roi(self) -> Roi:
        return Roi(VOXEL_SIZE * SMOOTH_CONTEXT, VOXEL_SIZE * self.block_size)

    def setup_worker(self) -> None:
        self.raw = self.input().open("r")
        self.smoothed = prepare_output(self.path(self.array_name()), self.output_roi(),
                                       np.float32, VOXEL_SIZE * self.block_size)

    def process_block(self, block) -> None:
        started = time.time()
        time.sleep(self.block_seconds)
        self.smoothed[block.write_roi] = smooth(self.raw[block.read_roi])
        self.record(block, started)


class Threshold(PipelineStage):
    """Foreground where the 3x3x3 maximum of the smoothed volume exceeds ``level``."""

    level = luigi.FloatParameter(default=0.5, description="threshold of the smoothed values")

    def requires(self):
        return Smooth(**self.volume())

    def array_name(self) -> str:
        return f"mask_{self.level:g}.zarr"

    def total_roi(self) -> Roi:
        context = VOXEL_SIZE * THRESHOLD_CONTEXT
        return self.output_roi().grow(context, context)

    def read_roi(self) -> Roi:
        return Roi((0, 0, 0), VOXEL_SIZE * (self.block_size + 2 * THRESHOLD_CONTEXT))

    def write_roi(self) -> Roi:
        return Roi(VOXEL_SIZE * THRESHOLD_CONTEXT, VOXEL_SIZE * self.block_size)

    def setup_worker(self) -> None:
        # reads outside the smoothed volume (at the border) return OUTSIDE
        self.smoothed = self.input()["array"].open("r", fill_value=OUTSIDE)
        self.mask = prepare_output(self.path(self.array_name()), self.output_roi(),
                                   np.uint8, VOXEL_SIZE * self.block_size)

    def process_block(self, block) -> None:
        started = time.time()
        time.sleep(self.block_seconds)
        self.mask[block.write_roi] = threshold(self.smoothed[block.read_roi], self.level)
        self.record(block, started)


class Report(VolumeParameters, luigi.Task):
    """The foreground fraction of a mask, as JSON (an ordinary task after a blockwise one)."""

    level = luigi.FloatParameter(default=0.5, description="threshold of the mask")

    def requires(self):
        return Threshold(level=self.level, **self.volume())

    def output(self):
        return luigi.LocalTarget(self.path(f"report_{self.level:g}.json"))

    def run(self):
        mask = self.input()["array"].open("r")
        data = mask.to_ndarray()
        report = {"level": self.level, "voxels": int(data.size),
                  "foreground": int(data.sum()), "foreground_fraction": float(data.mean())}
        # write elsewhere and rename: the report appears whole, and a run of another
        # `luigi` command that wrote the same report meanwhile is simply replaced
        path = self.output().path
        partial = f"{path}.partial-{os.getpid()}"
        with open(partial, "w") as file:
            json.dump(report, file)
        os.replace(partial, path)


class AllReports(VolumeParameters, luigi.WrapperTask):
    """A Report per level; the Thresholds all read the one Smooth (a diamond)."""

    levels = luigi.ListParameter(default=[0.5, 0.7], description="thresholds, as JSON")

    def requires(self):
        return [Report(level=level, **self.volume()) for level in self.levels]
