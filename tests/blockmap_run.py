"""A real run for the block map tests: ``python tests/blockmap_run.py FOLDER``.

Runs ``run_blockwise(..., tracking=True)`` with worker processes and prints the line
``live block map: URL``; ``python tests/blockmap_run.py FOLDER HOST [BLOCK_MAP_HOST]``
passes ``host`` (and ``block_map_host``) too. Gate files in FOLDER hold blocks back, so
a test sees known states and decides when blocks finish:

- ``smooth`` (3D grid 3 x 4 x 5, 2 workers): the block at (0, 1, 2) fails with
  :data:`FAILURE`; blocks with z >= 1 wait while ``FOLDER/hold_smooth`` exists.
- ``label`` (3D, same grid, upstream ``smooth``, 1 worker): its last block (2, 3, 4)
  waits while ``FOLDER/hold_end`` exists, so the run outlives everything else.
- ``tiles`` (2D grid 6 x 8, 1 worker): runs through.
- ``frames`` (4D grid 2 x 3 x 4 x 5, 1 worker): blocks with t >= 1 wait while
  ``FOLDER/hold_smooth`` exists.

The test removes the gate files; the run then ends (with one failed block and one
orphaned block of ``label``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import luigi_daisy as daisy
from luigi_daisy import Roi

FAILING_POSITION = (0, 1, 2)
FAILURE = "ValueError: synthetic failure of the smooth block at (0, 1, 2)"
GATE_POLL = 0.02  # seconds between two looks at a gate file, in the workers
SIDE = 10  # voxels per block along each axis


def wait_while(gate: Path) -> None:
    """Block this worker while ``gate`` exists."""
    while gate.exists():
        time.sleep(GATE_POLL)


def position(block) -> tuple[int, ...]:
    return tuple(int(begin) // SIDE for begin in block.write_roi.begin)


def task(task_id: str, grid_shape: tuple[int, ...], process, **options) -> daisy.Task:
    """A task of ``grid_shape`` blocks of ``SIDE`` voxels per axis, no context."""
    dims = len(grid_shape)
    block = Roi((0,) * dims, (SIDE,) * dims)
    total = Roi((0,) * dims, tuple(SIDE * n for n in grid_shape))
    return daisy.Task(task_id, total, block, block, process, read_write_conflict=False,
                      max_retries=0, **options)


def main(folder: Path, *hosts: str) -> None:
    hold_smooth, hold_end = folder / "hold_smooth", folder / "hold_end"

    def smooth(block) -> None:
        where = position(block)
        if where == FAILING_POSITION:
            raise ValueError("synthetic failure of the smooth block at (0, 1, 2)")
        if where[0] >= 1:
            wait_while(hold_smooth)

    def label(block) -> None:
        if position(block) == (2, 3, 4):
            wait_while(hold_end)

    def tiles(block) -> None:
        pass

    def frames(block) -> None:
        if position(block)[0] >= 1:
            wait_while(hold_smooth)

    smooth_task = task("smooth", (3, 4, 5), smooth, num_workers=2)
    label_task = task("label", (3, 4, 5), label, upstream_tasks=[smooth_task])
    tiles_task = task("tiles", (6, 8), tiles)
    frames_task = task("frames", (2, 3, 4, 5), frames)
    # prefetch=0: a block in hand would wait behind a gated block, and the tests want
    # every block that is not gated done while the gates stand
    options = dict(zip(("host", "block_map_host"), hosts))
    # total_workers: every task gets the workers it asks for, so that gated blocks of
    # one task never hold the workers another task's blocks wait for
    daisy.run_blockwise([label_task, tiles_task, frames_task], progress=False,
                        log_dir=folder / "logs", tracking=True, prefetch=0,
                        total_workers=5, **options)


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
