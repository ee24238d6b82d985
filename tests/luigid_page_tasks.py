"""A Luigi task for ``test_luigid_pages.py``: a blockwise task of 2 x 2 blocks, one of
which fails with markup in its error (as a file name or metadata from the data can
carry) and one of which waits while ``FOLDER/hold`` exists, so the task stays RUNNING
in luigid while a browser looks at it."""

from __future__ import annotations

import time
from pathlib import Path

import luigi

from luigi_daisy import Roi
from luigi_daisy.luigi import BlockwiseTask

#: markup that would run as a script where it is put into a page unescaped
PAYLOAD = '<img src=x onerror="window.luigiDaisyInjected=1">'
#: the failing block's error line
FAILURE = f"ValueError: bad metadata in {PAYLOAD}"
GATE_POLL = 0.02  # seconds between two looks at the gate file


class Hostile(BlockwiseTask):
    """2 x 2 blocks: the one at (0, 0) fails with :data:`FAILURE`, the one at (10, 10)
    waits while ``folder/hold`` exists."""

    folder = luigi.Parameter()

    def total_roi(self) -> Roi:
        return Roi((0, 0), (20, 20))

    def read_roi(self) -> Roi:
        return Roi((0, 0), (10, 10))

    def write_roi(self) -> Roi:
        return Roi((0, 0), (10, 10))

    def process_block(self, block) -> None:
        begin = tuple(int(value) for value in block.write_roi.begin)
        if begin == (0, 0):
            raise ValueError(FAILURE.removeprefix("ValueError: "))
        if begin == (10, 10):
            while (Path(self.folder) / "hold").exists():
                time.sleep(GATE_POLL)
