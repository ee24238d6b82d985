"""A volumetric segmentation in Luigi: find every object of a 3D volume, block by block.

Run it from the repository root (after ``pip install -e '.[examples]'``)::

    luigi --module examples.segmentation Segmentation --local-scheduler
    luigi --module examples.segmentation Segmentation --size 64 --block-size 16 \\
        --workdir small_segmentation --local-scheduler

At the end it prints where the arrays are, how many objects it found, how long each
stage took and how to look at the result, and writes ``segmentation.png`` (a slice
through the raw, smoothed and labelled volumes side by side). Run it again and Luigi
finds everything done: nothing is recomputed.

The stages (every blockwise one writes a zarr array through ``prepare_ds``)::

    SyntheticVolume  (BlockwiseTask)  raw.zarr: blobs of several sizes, long tubes that
                                      cross many blocks, noise (uint8)
     -> GaussianSmooth (BlockwiseTask) smoothed.zarr: Gaussian filter, read with context
       -> ForegroundMask (BlockwiseTask) mask.zarr: smoothed > level
         -> BlockFragments (BlockwiseTask) fragments.zarr: connected components of each
                                           block on its own, ids unique by block id
           -> FaceMerges   (BlockwiseTask) merges/: pairs of fragments that touch across
                                           the block's upper faces, one file per block
             -> MergeTable (luigi.Task)    objects.npz: union-find over every pair, one
                                           object id (1..N) per fragment
               -> Relabel  (BlockwiseTask) labels.zarr: fragment ids -> object ids
                 -> Segmentation (luigi.Task) summary.json, segmentation.png, the report

Every edge between two blockwise stages is a block-level dependency: a GaussianSmooth
block starts once the raw blocks it reads are written, a FaceMerges block once its own
fragments and those of its three upper neighbours exist, and so on. The five stages up
to FaceMerges run as one pipelined run.

Why a two-pass merge and not read/write conflicts
-------------------------------------------------
daisy's tutorial relabels in place with ``read_write_conflict=True``: a block reads its
neighbours' labels and rewrites its own so that objects crossing a face agree. That is
right for a neighbourhood-local answer, but whether two fragments are one object is not
local: a tube that crosses ten blocks joins fragments through a chain of faces, and a
block that finished before the last link of the chain was seen cannot be told to change
its ids again. So the merge is done in two passes: ``FaceMerges`` only records, per
block, which fragment ids touch across its faces (it reads fragments and writes its own
record, so no block conflicts with another: ``read_write_conflict`` is off everywhere);
``MergeTable`` resolves all pairs at once (a union-find, here
``scipy.sparse.csgraph.connected_components``); ``Relabel`` then maps every fragment
to its object, each block independently. The one global step is a plain Luigi task
between two blockwise ones: it needs every block's record, so it is the one place where
the pipeline waits for a whole stage.

Ids
---
``BlockFragments`` numbers the components of a block ``1..n`` and adds
``block.block_id[1] * max_objects_per_block``, where ``max_objects_per_block`` is the
number of voxels of a block (a block cannot hold more components). Block ids need not
be dense (daisy numbers blocks by the Cantor number of their grid position): fragment
ids are uint64 and are only looked up, never used as an index, and an id that would not
fit uint64 is refused. ``MergeTable`` numbers the objects ``1..N`` in the order of their
smallest fragment id.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import luigi
import numpy as np

from luigi_daisy import BlockwiseTask, Coordinate, GeometryError, Roi, ZarrTarget, prepare_ds

#: world size of one voxel (z, y, x)
VOXEL_SIZE = Coordinate(1, 1, 1)
#: the Gaussian filter's support, in sigmas (scipy's ``truncate``)
TRUNCATE = 4.0
#: mean raw intensity of the background and of the objects, and the noise's spread
BACKGROUND, FOREGROUND, NOISE = 40.0, 170.0, 30.0
#: what the Gaussian filter reads outside the volume: the background's mean intensity
OUTSIDE = int(BACKGROUND)
#: relative radii (of a block's edge) of the small, medium and large blobs, and how often each
BLOB_RADII = (0.15, 0.3, 0.6)
BLOB_WEIGHTS = (0.5, 0.35, 0.15)
#: blobs per block of volume
BLOBS_PER_BLOCK = 1.2
#: uint64 fragment ids: the largest id a block may use
MAX_FRAGMENT_ID = np.iinfo(np.uint64).max


# --------------------------------------------------------------------------- the volume
def blob_catalogue(size: int, block_size: int, seed: int) -> dict[str, np.ndarray]:
    """The objects of the synthetic volume, drawn once from ``seed``.

    Axis-aligned ellipsoids of three sizes (``centers``, ``radii``: one row each) and
    tubes (segments ``starts`` -> ``ends`` of radius ``tube_radii``) that run through the
    whole volume, so that objects cross block faces, touch and join.
    """
    rng = np.random.default_rng(seed)
    blocks = (size / block_size) ** 3
    count = max(4, round(BLOBS_PER_BLOCK * blocks))
    base = block_size * np.asarray(BLOB_RADII)[rng.choice(len(BLOB_RADII), size=count,
                                                          p=BLOB_WEIGHTS)]
    radii = np.maximum(base[:, None] * rng.uniform(0.6, 1.4, size=(count, 3)), 1.5)
    centers = rng.uniform(0, size, size=(count, 3))
    tubes = max(2, size // block_size)
    starts = rng.uniform(0, size, size=(tubes, 3))
    ends = rng.uniform(0, size, size=(tubes, 3))
    tube_radii = np.full(tubes, max(1.5, 0.1 * block_size))
    return {"centers": centers, "radii": radii, "starts": starts, "ends": ends,
            "tube_radii": tube_radii}


def render(catalogue: dict[str, np.ndarray], begin: tuple[int, ...], shape: tuple[int, ...],
           seed: int) -> np.ndarray:
    """The raw voxels of the box ``[begin, begin + shape)`` (uint8): objects plus noise.

    The noise of a box depends only on ``seed`` and ``begin``, so a block renders the
    same in every run and worker.
    """
    begin_array, end_array = np.asarray(begin), np.asarray(begin) + np.asarray(shape)
    inside = np.zeros(shape, dtype=bool)
    # voxel centres of the box, as broadcastable axes
    axes = [np.arange(b, b + s, dtype=np.float64) + 0.5 for b, s in zip(begin, shape)]

    centers, radii = catalogue["centers"], catalogue["radii"]
    touching = np.all((centers + radii > begin_array) & (centers - radii < end_array), axis=1)
    for center, radius in zip(centers[touching], radii[touching]):
        low = np.maximum(np.floor(center - radius).astype(int), begin_array) - begin_array
        high = np.minimum(np.ceil(center + radius).astype(int), end_array) - begin_array
        window = tuple(slice(lo, hi) for lo, hi in zip(low, high))
        z, y, x = (axis[lo:hi] for axis, lo, hi in zip(axes, low, high))
        distance = (((z - center[0]) / radius[0]) ** 2)[:, None, None] \
            + (((y - center[1]) / radius[1]) ** 2)[None, :, None] \
            + (((x - center[2]) / radius[2]) ** 2)[None, None, :]
        inside[window] |= distance <= 1.0

    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    for start, end, radius in zip(catalogue["starts"], catalogue["ends"],
                                  catalogue["tube_radii"]):
        low_corner = np.minimum(start, end) - radius
        high_corner = np.maximum(start, end) + radius
        if np.any(high_corner <= begin_array) or np.any(low_corner >= end_array):
            continue
        direction = end - start
        along = np.clip(((grid - start) @ direction) / (direction @ direction), 0.0, 1.0)
        closest = start + along[..., None] * direction
        inside |= ((grid - closest) ** 2).sum(axis=-1) <= radius ** 2

    rng = np.random.default_rng([seed, *(int(b) for b in begin)])
    values = np.where(inside, FOREGROUND, BACKGROUND) + rng.normal(0.0, NOISE, size=shape)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def smooth(data: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian filter (float32); ``OUTSIDE`` beyond the edges of ``data``."""
    from scipy import ndimage
    return ndimage.gaussian_filter(data.astype(np.float32), sigma, mode="constant",
                                   cval=float(OUTSIDE), truncate=TRUNCATE)


def smooth_inside(data: np.ndarray, sigma: float, context: int) -> np.ndarray:
    """``smooth(data, sigma)`` without its outer ``context`` voxels, bit for bit, with
    less work: the filter is separable, so after each axis's pass only the voxels the
    remaining passes (and the result) use are kept; the first pass reads ``data`` as it
    is (scipy converts every line to float64 either way)."""
    from scipy import ndimage
    for axis in range(data.ndim):
        filtered = np.empty(data.shape, dtype=np.float32)
        ndimage.gaussian_filter1d(data, sigma, axis, output=filtered, mode="constant",
                                  cval=float(OUTSIDE), truncate=TRUNCATE)
        inner = [slice(None)] * data.ndim
        inner[axis] = slice(context, data.shape[axis] - context)
        data = filtered[tuple(inner)]
    return data


def context_of(sigma: float) -> int:
    """Voxels of context the Gaussian filter reads on each side (its radius)."""
    return int(TRUNCATE * float(sigma) + 0.5)


def whole_volume_labels(raw: np.ndarray, sigma: float, level: float) -> tuple[np.ndarray, int]:
    """The segmentation of ``raw`` in one piece: smooth, threshold and
    ``scipy.ndimage.label`` (face connectivity), the reference the blockwise run must
    match object for object."""
    from scipy import ndimage
    context = context_of(sigma)
    padded = np.pad(raw, context, constant_values=OUTSIDE)
    smoothed = smooth(padded, sigma)[(slice(context, padded.shape[0] - context),) * raw.ndim]
    return ndimage.label(smoothed > level)


# --------------------------------------------------------------------------- parameters
class SegmentationParameters:
    """Parameters every task of the segmentation shares; ``shared()`` passes them on."""

    workdir = luigi.Parameter(default="segmentation_data",
                              description="folder of the arrays, records and pictures")
    size = luigi.IntParameter(default=512, description="voxels a side of the volume")
    block_size = luigi.IntParameter(default=64,
                                    description="voxels a side of a block; divides size")
    seed = luigi.IntParameter(default=0, description="seed of the synthetic volume")
    sigma = luigi.FloatParameter(default=2.0, description="sigma of the Gaussian, in voxels")
    level = luigi.FloatParameter(default=105.0,
                                 description="foreground where the smoothed volume exceeds it")
    # the example's own parameter (passed to every stage), so that a first run uses two
    # cores; it replaces the [luigi_daisy] num_workers default for these tasks
    num_workers = luigi.IntParameter(default=2, significant=False,
                                     description="worker processes of each blockwise stage")
    block_seconds = luigi.FloatParameter(
        default=0.0, significant=False,
        description="seconds every block sleeps (to watch a run, or to interrupt one)")

    def shared(self) -> dict:
        """The shared parameters, to build the tasks this one requires."""
        return {name: getattr(self, name) for name in
                ("workdir", "size", "block_size", "seed", "sigma", "level", "num_workers",
                 "block_seconds")}

    def volume_roi(self) -> Roi:
        """World ROI of every array of the segmentation."""
        if self.size <= 0 or self.block_size <= 0 or self.size % self.block_size:
            raise GeometryError(
                f"segmentation: --size {self.size} must be a positive multiple of "
                f"--block-size {self.block_size}; pick a size like "
                f"{max(1, round(self.size / max(self.block_size, 1))) * max(self.block_size, 1)}")
        return Roi((0, 0, 0), VOXEL_SIZE * self.size)

    def block_roi(self) -> Roi:
        """One block, at the origin."""
        return Roi((0, 0, 0), VOXEL_SIZE * self.block_size)

    def path(self, name: str) -> str:
        """Path of a file or array of the segmentation."""
        return os.path.join(self.workdir, name)

    def position(self, block) -> tuple[int, ...]:
        """Grid position of a block (from its write ROI), the same under any block ids."""
        return tuple(int(b) // (v * self.block_size)
                     for b, v in zip(block.write_roi.begin, VOXEL_SIZE))


def prepare_output(path: str, roi: Roi, dtype, write_size: Coordinate):
    """Create the array at ``path`` (or open the existing one) with one chunk per block.

    Workers of every stage call it when they start; the file lock makes one of them
    create the array and the others open it.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return prepare_ds(path, roi, VOXEL_SIZE, dtype, write_size=write_size, mode="a")


def write_atomically(path: str, write) -> None:
    """Call ``write(file)`` on a temporary file and rename it to ``path``: readers see
    the whole file or none (a worker killed mid-write leaves no half file)."""
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "wb") as file:
        write(file)
    os.replace(partial, path)


class Stage(SegmentationParameters, BlockwiseTask):
    """What the blockwise stages share: one output array, no read/write conflicts (a
    stage never reads what it writes), and a record of how long each block took."""

    read_write_conflict = False

    #: file name of the array the stage writes (None: the stage writes no array)
    array_name: str | None = None

    def output(self):
        """The ledger (which blocks are done), and the array the blocks write."""
        if self.array_name is None:
            return {"blocks": self.ledger_target()}
        return {"blocks": self.ledger_target(), "array": ZarrTarget(self.path(self.array_name))}

    def total_roi(self) -> Roi:
        return self.volume_roi()

    def read_roi(self) -> Roi:
        return self.block_roi()

    def write_roi(self) -> Roi:
        return self.block_roi()

    def compute(self, block) -> None:
        """Process one block."""
        raise NotImplementedError

    def process_block(self, block) -> None:
        started = time.time()
        if self.block_seconds:
            time.sleep(self.block_seconds)
        self.compute(block)
        # one append per block to the worker's own file, opened once
        os.write(self.timings, f"{self.family} {started:.6f} {time.time():.6f}\n".encode())

    def setup_worker(self) -> None:
        os.makedirs(self.path("timings"), exist_ok=True)
        self.family = self.get_task_family()
        self.timings = os.open(self.path(f"timings/{os.getpid()}.log"),
                               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


# --------------------------------------------------------------------------- the stages
class SyntheticVolume(Stage):
    """The raw volume: blobs, tubes and noise, rendered block by block."""

    array_name = "raw.zarr"

    def setup_worker(self) -> None:
        super().setup_worker()
        self.catalogue = blob_catalogue(self.size, self.block_size, self.seed)
        self.raw = prepare_output(self.path(self.array_name), self.volume_roi(), np.uint8,
                                  self.block_roi().shape)

    def compute(self, block) -> None:
        begin = tuple(int(b) // v for b, v in zip(block.write_roi.begin, VOXEL_SIZE))
        shape = tuple(int(s) // v for s, v in zip(block.write_roi.shape, VOXEL_SIZE))
        self.raw[block.write_roi] = render(self.catalogue, begin, shape, self.seed)


class GaussianSmooth(Stage):
    """Gaussian smoothing; a block reads ``context_of(sigma)`` voxels around it
    (``OUTSIDE`` beyond the volume)."""

    array_name = "smoothed.zarr"

    def requires(self):
        return SyntheticVolume(**self.shared())

    def context(self) -> Coordinate:
        return VOXEL_SIZE * context_of(self.sigma)

    def total_roi(self) -> Roi:
        return self.volume_roi().grow(self.context(), self.context())

    def read_roi(self) -> Roi:
        return self.block_roi().grow(self.context(), self.context())

    def setup_worker(self) -> None:
        super().setup_worker()
        self.raw = self.input()["array"].open("r", fill_value=OUTSIDE)
        self.smoothed = prepare_output(self.path(self.array_name), self.volume_roi(),
                                       np.float32, self.block_roi().shape)

    def compute(self, block) -> None:
        self.smoothed[block.write_roi] = smooth_inside(self.raw[block.read_roi], self.sigma,
                                                       context_of(self.sigma))


class ForegroundMask(Stage):
    """1 where the smoothed volume exceeds ``level``."""

    array_name = "mask.zarr"

    def requires(self):
        return GaussianSmooth(**self.shared())

    def setup_worker(self) -> None:
        super().setup_worker()
        self.smoothed = self.input()["array"].open("r")
        self.mask = prepare_output(self.path(self.array_name), self.volume_roi(), np.uint8,
                                   self.block_roi().shape)

    def compute(self, block) -> None:
        # a bool array is stored as 0/1 bytes: its uint8 view is the mask, without a copy
        self.mask[block.write_roi] = (self.smoothed[block.write_roi] > self.level).view(np.uint8)


class BlockFragments(Stage):
    """Connected components of each block on its own (face connectivity), with ids
    ``block.block_id[1] * max_objects_per_block + 1 ..``."""

    array_name = "fragments.zarr"

    def requires(self):
        return ForegroundMask(**self.shared())

    @property
    def max_objects_per_block(self) -> int:
        """A block of n voxels holds at most n components."""
        return self.block_size ** 3

    def setup_worker(self) -> None:
        super().setup_worker()
        self.mask = self.input()["array"].open("r")
        self.fragments = prepare_output(self.path(self.array_name), self.volume_roi(),
                                        np.uint64, self.block_roi().shape)

    def compute(self, block) -> None:
        from scipy import ndimage
        mask = self.mask[block.write_roi]
        fragments = np.empty(mask.shape, dtype=np.uint64)  # labelled in place, no copy
        count = ndimage.label(mask, output=fragments)
        first = int(block.block_id[1]) * self.max_objects_per_block
        if first + count > MAX_FRAGMENT_ID:
            raise GeometryError(
                f"{self.task_id}: block {block.block_id[1]} would use fragment ids up to "
                f"{first + count}, beyond uint64; use fewer, larger blocks")
        np.add(fragments, np.uint64(first), out=fragments, where=fragments > 0)
        self.fragments[block.write_roi] = fragments


class FaceMerges(Stage):
    """Record which fragments touch across the block's three upper faces.

    A block reads its fragments plus one voxel layer of its upper neighbours (zero past
    the volume's end) and writes ``merges/<z>_<y>_<x>.npz``: its own fragment ids and
    the pairs ``(own id, neighbour id)`` of face-adjacent foreground voxels.
    """

    def requires(self):
        return BlockFragments(**self.shared())

    def total_roi(self) -> Roi:
        return self.volume_roi().grow(VOXEL_SIZE * 0, VOXEL_SIZE)

    def read_roi(self) -> Roi:
        return self.block_roi().grow(VOXEL_SIZE * 0, VOXEL_SIZE)

    def output(self):
        """The ledger, and the folder of the blocks' files: declaring it keeps the
        record next to it, and a run that finds it deleted computes it again."""
        return {"blocks": self.ledger_target(), "merges": luigi.LocalTarget(self.path("merges"))}

    def setup_worker(self) -> None:
        super().setup_worker()
        os.makedirs(self.path("merges"), exist_ok=True)
        self.fragments = self.input()["array"].open("r", fill_value=0)

    def compute(self, block) -> None:
        own = self.fragments[block.write_roi]
        pairs = []
        for axis in range(3):
            # the neighbour's first voxel layer: its chunk only, not the edge and corner
            # chunks a read of the grown ROI would decode too
            begin, shape = list(block.write_roi.begin), list(block.write_roi.shape)
            begin[axis] += shape[axis]
            shape[axis] = VOXEL_SIZE[axis]
            beyond = self.fragments[Roi(begin, shape)]
            last = [slice(None)] * 3
            last[axis] = slice(-1, None)
            a, b = own[tuple(last)].reshape(-1), beyond.reshape(-1)
            touching = (a > 0) & (b > 0)
            pairs.append(unique_pairs(a[touching], b[touching]))
        # each face pairs with another neighbour, whose ids are its own: no duplicates
        pairs = np.concatenate(pairs)
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
        ids = present_ids(own)
        name = "_".join(str(k) for k in self.position(block))
        write_atomically(self.path(f"merges/{name}.npz"),
                         lambda file: np.savez(file, ids=ids, pairs=pairs))


def unique_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The distinct pairs ``(a[i], b[i])``, as rows.

    ``np.unique(..., axis=0)`` sorts the rows as opaque records; here each column is
    made dense first (a face holds few distinct ids) and the pairs become one integer.
    """
    if not a.size:
        return np.empty((0, 2), dtype=np.result_type(a, b))
    a_values, a_index = np.unique(a, return_inverse=True)
    b_values, b_index = np.unique(b, return_inverse=True)
    keys = np.unique(a_index.astype(np.int64) * len(b_values) + b_index)
    return np.stack([a_values[keys // len(b_values)], b_values[keys % len(b_values)]], axis=1)


def present_ids(fragments: np.ndarray) -> np.ndarray:
    """The distinct non-zero ids of one block's fragments, sorted.

    A block's ids lie within the voxel count of each other (``BlockFragments``), so they
    are counted in a table that long instead of sorting every voxel.
    """
    foreground = fragments[fragments > 0]
    if not foreground.size:
        return np.empty(0, dtype=fragments.dtype)
    lowest, highest = foreground.min(), foreground.max()
    if int(highest - lowest) > fragments.size:  # not one block's numbering: sort
        return np.unique(foreground)
    counts = np.bincount((foreground - lowest).astype(np.intp))
    return (np.flatnonzero(counts).astype(fragments.dtype) + lowest).astype(fragments.dtype)


class MergeTable(SegmentationParameters, luigi.Task):
    """Resolve every recorded pair at once: one object id, 1..N, per fragment."""

    def requires(self):
        return FaceMerges(**self.shared())

    def output(self):
        return luigi.LocalTarget(self.path("objects.npz"))

    def run(self):
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
        started = time.time()
        self.volume_roi()
        blocks = self.size // self.block_size
        ids, pairs = [], []
        for position in np.ndindex(blocks, blocks, blocks):
            path = self.path(f"merges/{'_'.join(map(str, position))}.npz")
            with np.load(path) as record:
                ids.append(record["ids"])
                pairs.append(record["pairs"].reshape(-1, 2))
        fragment_ids = np.unique(np.concatenate(ids)).astype(np.uint64)
        pairs = np.concatenate(pairs).astype(np.uint64)
        nodes = np.searchsorted(fragment_ids, pairs)
        if pairs.size and not np.array_equal(fragment_ids[np.minimum(nodes, len(fragment_ids) - 1)],
                                             pairs):
            raise RuntimeError(f"{self.task_id}: a merge record names a fragment that no "
                               f"block recorded; rerun with a fresh --workdir")
        count = len(fragment_ids)
        graph = coo_matrix((np.ones(len(nodes), dtype=np.int8), (nodes[:, 0], nodes[:, 1])),
                           shape=(count, count))
        objects, components = connected_components(graph, directed=False)
        object_ids = components.astype(np.uint64) + np.uint64(1)
        write_atomically(self.output().path,
                         lambda file: np.savez(file, fragment_ids=fragment_ids,
                                               object_ids=object_ids))
        os.makedirs(self.path("timings"), exist_ok=True)
        with open(self.path(f"timings/{os.getpid()}.log"), "a") as file:
            file.write(f"{self.get_task_family()} {started:.6f} {time.time():.6f}\n")


class Relabel(Stage):
    """Every fragment id replaced by the id of its object."""

    array_name = "labels.zarr"

    def requires(self):
        return {"fragments": BlockFragments(**self.shared()),
                "objects": MergeTable(**self.shared())}

    def setup_worker(self) -> None:
        super().setup_worker()
        self.fragments = self.input()["fragments"]["array"].open("r")
        with np.load(self.input()["objects"].path) as table:
            self.fragment_ids = table["fragment_ids"]
            self.object_ids = table["object_ids"]
        self.labels = prepare_output(self.path(self.array_name), self.volume_roi(), np.uint64,
                                     self.block_roi().shape)

    def compute(self, block) -> None:
        fragments = self.fragments[block.write_roi]
        labels = np.zeros_like(fragments)
        foreground = fragments > 0
        if foreground.any():
            labels[foreground] = self.object_ids[
                np.searchsorted(self.fragment_ids, fragments[foreground])]
        self.labels[block.write_roi] = labels


# --------------------------------------------------------------------------- the report
STAGES = ("SyntheticVolume", "GaussianSmooth", "ForegroundMask", "BlockFragments",
          "FaceMerges", "MergeTable", "Relabel")


def stage_times(folder: str) -> dict[str, dict]:
    """Per stage: blocks timed, their summed seconds, and first start to last end."""
    times: dict[str, list[tuple[float, float]]] = {}
    for log in sorted(Path(folder).glob("*.log")):
        for line in log.read_text().splitlines():
            family, start, end = line.split()
            times.setdefault(family, []).append((float(start), float(end)))
    report = {}
    for family in STAGES:
        spans = times.get(family, [])
        if spans:
            report[family] = {
                "blocks": len(spans), "busy_seconds": sum(e - s for s, e in spans),
                "wall_seconds": max(e for _, e in spans) - min(s for s, _ in spans)}
    return report


def label_colours(labels: np.ndarray) -> np.ndarray:
    """An RGB picture of a label slice: a stable colour per id, black background."""
    ids = labels.astype(np.uint64)
    channels = [((ids * np.uint64(multiplier)) >> np.uint64(7)) % np.uint64(180) + np.uint64(60)
                for multiplier in (2654435761, 40503, 97531)]
    picture = np.stack(channels, axis=-1).astype(np.uint8)
    picture[labels == 0] = 0
    return picture


def write_picture(path: str, raw: np.ndarray, smoothed: np.ndarray, labels: np.ndarray) -> None:
    """raw | smoothed | labels, one slice each, side by side, as a PNG."""
    from PIL import Image

    def gray(image: np.ndarray) -> np.ndarray:
        return np.repeat(np.clip(image, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)

    gap = np.full((raw.shape[0], 4, 3), 255, dtype=np.uint8)
    picture = np.concatenate([gray(raw), gap, gray(smoothed), gap, label_colours(labels)], axis=1)
    scale = max(1, 256 // raw.shape[0])
    image = Image.fromarray(picture).resize((picture.shape[1] * scale, picture.shape[0] * scale),
                                            Image.NEAREST)
    write_atomically(path, lambda file: image.save(file, format="PNG"))


class Segmentation(SegmentationParameters, luigi.Task):
    """The whole segmentation; prints where its output is and what it found."""

    def requires(self):
        return Relabel(**self.shared())

    def output(self):
        return luigi.LocalTarget(self.path("summary.json"))

    def run(self):
        from luigi_daisy import open_ds
        with np.load(self.path("objects.npz")) as table:
            objects = int(table["object_ids"].max(initial=0))
            fragments = len(table["fragment_ids"])
        middle = self.size // 2
        roi = Roi((middle, 0, 0), (1, self.size, self.size)) * VOXEL_SIZE
        slices = {name: open_ds(self.path(f"{name}.zarr")).to_ndarray(roi)[0]
                  for name in ("raw", "smoothed", "labels")}
        picture = self.path("segmentation.png")
        write_picture(picture, slices["raw"], slices["smoothed"], slices["labels"])
        times = stage_times(self.path("timings"))
        summary = {"objects": objects, "fragments": fragments, "size": self.size,
                   "block_size": self.block_size, "labels": self.path("labels.zarr"),
                   "picture": picture, "stages": times}
        write_atomically(self.output().path,
                         lambda file: file.write(json.dumps(summary, indent=2).encode()))
        print(format_report(summary, self.workdir, middle))


def format_report(summary: dict, workdir: str, middle: int) -> str:
    """What a user wants to know at the end of a run."""
    blocks = (summary["size"] // summary["block_size"]) ** 3
    lines = ["", f"Segmentation of a {summary['size']}^3 volume in {blocks} blocks of "
                 f"{summary['block_size']}^3 voxels:",
             f"  {summary['objects']} objects (from {summary['fragments']} fragments "
             f"found block by block)", "",
             "  stage            blocks   wall s   busy s"]
    for family, figures in summary["stages"].items():
        lines.append(f"  {family:<16} {figures['blocks']:>6} {figures['wall_seconds']:>8.1f} "
                     f"{figures['busy_seconds']:>8.1f}")
    lines += [
        "  (wall: first block's start to last block's end, stages overlap; busy: the",
        "  blocks' summed time; both count earlier interrupted runs too)", "",
        f"Output in {os.path.abspath(workdir)}:",
        "  raw.zarr, smoothed.zarr, mask.zarr, fragments.zarr, labels.zarr (zarr arrays)",
        f"  {summary['picture']}: raw | smoothed | labels at z = {middle}",
        "Look at it:",
        f"  {summary['picture']} in any image viewer (xdg-open, open, a browser)",
        "  python -c \"from luigi_daisy import open_ds; "
        f"labels = open_ds('{summary['labels']}').to_ndarray(); "
        "print(labels.shape, labels.max())\"",
        "", ""]
    return "\n".join(lines)


__all__ = ["BlockFragments", "FaceMerges", "ForegroundMask", "GaussianSmooth", "MergeTable",
           "Relabel", "Segmentation", "SyntheticVolume", "blob_catalogue", "render",
           "whole_volume_labels"]
