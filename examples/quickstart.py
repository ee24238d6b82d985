"""daisy's quick start, map and reduce over a zarr array, as a Luigi pipeline.

daisy's quick start squares the numbers ``0 .. n-1`` block by block into a zarr array,
then sums the squares in 16 parts. Here each step is a task::

    Numbers        (luigi.Task)     a.zarr: 0 .. n-1 (int64)
     -> Square     (BlockwiseTask)  b.zarr: a ** 2, blocks of ``block_size`` numbers
       -> PartialSums (BlockwiseTask) sums.zarr: the sum of each of ``parts`` slices of b,
                                      one element per block
         -> Total  (luigi.Task)     total.json: the sum of the partial sums

``Square -> PartialSums`` is a block-level dependency: a part is summed as soon as the
squares it reads are written. ``sums.zarr`` is an array over the same ROI as ``b.zarr``
with a voxel size of one part, so a PartialSums block writes exactly one element (one
chunk) with ``sums[block.write_roi] = ...``.

Run it from the repository root::

    luigi --module examples.quickstart Total --local-scheduler
    luigi --module examples.quickstart Total --size 409600 --workdir small --local-scheduler
"""

from __future__ import annotations

import fcntl
import json
import os

import luigi
import numpy as np

from luigi_daisy import BlockwiseTask, GeometryError, Roi, ZarrTarget, prepare_ds


class QuickstartParameters:
    """Parameters every task shares; ``shared()`` passes them on."""

    workdir = luigi.Parameter(default="quickstart_data", description="folder of the arrays")
    size = luigi.IntParameter(default=4096000, description="how many numbers")
    block_size = luigi.IntParameter(default=16384, description="numbers a Square block squares")
    parts = luigi.IntParameter(default=16, description="how many partial sums")
    num_workers = luigi.IntParameter(default=2, significant=False,
                                     description="worker processes of each blockwise task")

    def shared(self) -> dict:
        return {name: getattr(self, name)
                for name in ("workdir", "size", "block_size", "parts", "num_workers")}

    def roi(self) -> Roi:
        """The ROI of every array: the numbers 0 .. size-1."""
        for what, divisor in (("--block-size", self.block_size), ("--parts", self.parts)):
            if divisor <= 0 or self.size <= 0 or self.size % divisor:
                raise GeometryError(f"quickstart: --size {self.size} must be a positive "
                                    f"multiple of {what} {divisor}")
        return Roi((0,), (self.size,))

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)


def prepare_shared(path: str, *args, **kwargs):
    """``prepare_ds(path, ..., mode="a")`` under a file lock: the first worker creates the
    array, the others (starting at the same moment) open it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return prepare_ds(path, *args, mode="a", **kwargs)


class Numbers(QuickstartParameters, luigi.Task):
    """``a = 0 .. size-1``, written in one go (it is the input, not the work)."""

    def output(self):
        return ZarrTarget(self.path("a.zarr"))

    def run(self):
        partial = self.path(f"a.zarr.partial-{os.getpid()}")
        array = prepare_ds(partial, self.roi(), (1,), np.int64, mode="w",
                           chunk_shape=(self.block_size,))
        array[self.roi()] = np.arange(self.size, dtype=np.int64)
        os.replace(partial, self.output().path)


class Square(QuickstartParameters, BlockwiseTask):
    """The map: ``b = a ** 2``, block by block."""

    read_write_conflict = False

    def requires(self):
        return Numbers(**self.shared())

    def output(self):
        return {"blocks": self.ledger_target(), "array": ZarrTarget(self.path("b.zarr"))}

    def total_roi(self) -> Roi:
        return self.roi()

    def read_roi(self) -> Roi:
        return Roi((0,), (self.block_size,))

    def write_roi(self) -> Roi:
        return self.read_roi()

    def setup_worker(self) -> None:
        self.a = self.input().open("r")
        self.b = prepare_shared(self.path("b.zarr"), self.roi(), (1,), np.int64,
                                write_size=(self.block_size,))

    def process_block(self, block) -> None:
        self.b[block.write_roi] = self.a[block.read_roi] ** 2


class PartialSums(QuickstartParameters, BlockwiseTask):
    """The reduce: the sum of each ``size / parts`` slice of b, one element per block."""

    read_write_conflict = False

    def requires(self):
        return Square(**self.shared())

    def output(self):
        return {"blocks": self.ledger_target(), "array": ZarrTarget(self.path("sums.zarr"))}

    def part(self) -> int:
        self.roi()
        return self.size // self.parts

    def total_roi(self) -> Roi:
        return self.roi()

    def read_roi(self) -> Roi:
        return Roi((0,), (self.part(),))

    def write_roi(self) -> Roi:
        return self.read_roi()

    def setup_worker(self) -> None:
        self.b = self.input()["array"].open("r")
        # one element per part: the voxel size is a part's length
        self.sums = prepare_shared(self.path("sums.zarr"), self.roi(), (self.part(),),
                                   np.uint64, chunk_shape=(1,))

    def process_block(self, block) -> None:
        # squares below 2^63 and a part's sum below 2^64 (checked by Total's exact sum)
        self.sums[block.write_roi] = np.array([self.b[block.read_roi].sum(dtype=np.uint64)])


class Total(QuickstartParameters, luigi.Task):
    """The sum of the partial sums (as a Python integer: it may exceed 64 bits)."""

    def requires(self):
        return PartialSums(**self.shared())

    def output(self):
        return luigi.LocalTarget(self.path("total.json"))

    def run(self):
        partial_sums = [int(value) for value in self.input()["array"].open("r").to_ndarray()]
        result = {"size": self.size, "partial_sums": partial_sums, "total": sum(partial_sums)}
        with self.output().temporary_path() as path, open(path, "w") as file:
            json.dump(result, file, indent=2)
        print(f"\nsum of the squares of 0 .. {self.size - 1}: {result['total']}\n"
              f"partial sums ({self.parts}): {partial_sums}\n"
              f"arrays in {os.path.abspath(self.workdir)}: a.zarr, b.zarr, sums.zarr; "
              f"result in {self.output().path}\n")
