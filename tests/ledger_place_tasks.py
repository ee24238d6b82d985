"""Blockwise tasks for the tests of where records live and of the ``luigi-daisy`` handles
(``test_ledger_place``, ``test_cli_handles``): a chain of the segmentation's shape on a
2D volume of 3 x 3 blocks of 10 x 10.

``Raw`` writes ``raw.zarr``; ``Smooth`` reads it with 2 of context and writes
``smooth.zarr``; ``Pieces`` reads that and writes one file per block into the folder
``pieces/`` (its declared output, like the segmentation's ``merges/``); ``Collect`` reads
its block's piece (a missing file fails the block) and writes ``collect.zarr``.
``Loose`` declares no output but its ledger. Every processed block appends
``family block_id pid`` to ``calls.txt``; a file ``fail_<family>_<block_id>`` fails that
block (its error says ``block <id> of <family> is broken``), after printing
``stdout of <family> block <id>``; while a file ``hold_<family>`` exists, the other
blocks of that family wait (up to 120 s) before they finish.
"""

from __future__ import annotations

import fcntl
import os
import time

import luigi
import numpy as np

from luigi_daisy import BlockwiseTask, Coordinate, Roi, ZarrTarget, prepare_ds

SIZE = 30
BLOCK = 10
CONTEXT = 2


class Chain(BlockwiseTask):
    """What the stages share: the folder, the 2D grid, the call log and failures."""

    folder = luigi.Parameter()
    block_seconds = luigi.FloatParameter(default=0.0, significant=False)
    read_write_conflict = False

    array_name: str | None = None

    def output(self):
        if self.array_name is None:
            return {"blocks": self.ledger_target()}
        return {"blocks": self.ledger_target(),
                "array": ZarrTarget(os.path.join(self.folder, self.array_name))}

    def total_roi(self):
        return Roi((0, 0), (SIZE, SIZE))

    def read_roi(self):
        return Roi((0, 0), (BLOCK, BLOCK))

    def write_roi(self):
        return Roi((0, 0), (BLOCK, BLOCK))

    def prepare(self):
        path = self.output()["array"].path
        with open(f"{path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return prepare_ds(path, Roi((0, 0), (SIZE, SIZE)), Coordinate(1, 1), np.float32,
                              chunk_shape=(BLOCK, BLOCK), mode="a")

    def setup_worker(self):
        self.out = self.prepare() if self.array_name else None

    def compute(self, block):
        raise NotImplementedError

    def process_block(self, block):
        family = self.get_task_family()
        number = block.block_id[1]
        print(f"stdout of {family} block {number}", flush=True)
        if os.path.exists(os.path.join(self.folder, f"fail_{family}_{number}")):
            raise ValueError(f"block {number} of {family} is broken")
        time.sleep(self.block_seconds)
        hold = os.path.join(self.folder, f"hold_{family}")
        deadline = time.monotonic() + 120
        while os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.compute(block)
        descriptor = os.open(os.path.join(self.folder, "calls.txt"),
                             os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(descriptor, f"{family} {number} {os.getpid()}\n".encode())
        finally:
            os.close(descriptor)


class Raw(Chain):
    array_name = "raw.zarr"

    def compute(self, block):
        self.out[block.write_roi] = np.full(block.write_roi.shape, block.block_id[1] + 1,
                                            dtype=np.float32)


class Smooth(Chain):
    array_name = "smooth.zarr"

    def requires(self):
        return Raw(folder=self.folder)

    def total_roi(self):
        return Roi((-CONTEXT, -CONTEXT), (SIZE + 2 * CONTEXT, SIZE + 2 * CONTEXT))

    def read_roi(self):
        return Roi((-CONTEXT, -CONTEXT), (BLOCK + 2 * CONTEXT, BLOCK + 2 * CONTEXT))

    def setup_worker(self):
        super().setup_worker()
        self.raw = self.input()["array"].open("r", fill_value=0)

    def compute(self, block):
        data = self.raw[block.read_roi]
        self.out[block.write_roi] = 2 * data[CONTEXT:-CONTEXT, CONTEXT:-CONTEXT]


class Pieces(Chain):
    def requires(self):
        return Smooth(folder=self.folder)

    def output(self):
        return {"blocks": self.ledger_target(),
                "pieces": luigi.LocalTarget(os.path.join(self.folder, "pieces"))}

    def setup_worker(self):
        os.makedirs(os.path.join(self.folder, "pieces"), exist_ok=True)
        self.smooth = self.input()["array"].open("r")

    def compute(self, block):
        total = float(np.sum(self.smooth[block.write_roi]))
        np.save(os.path.join(self.folder, "pieces", f"{block.block_id[1]}.npy"),
                np.array([total]))


class Collect(Chain):
    array_name = "collect.zarr"

    def requires(self):
        return Pieces(folder=self.folder)

    def compute(self, block):
        piece = np.load(os.path.join(self.folder, "pieces", f"{block.block_id[1]}.npy"))
        self.out[block.write_roi] = np.full(block.write_roi.shape, piece[0], np.float32)


class Loose(Chain):
    """Declares no output but its ledger: the record goes to ``ledger_dir``."""

    def compute(self, block):
        pass
