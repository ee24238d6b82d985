"""The state of each block for the live block map: codes, coarsening and encoding.

The scheduler keeps one byte per block of a task (see ``BlockScheduler(block_map=True)``)
and updates it in O(1) on every event; this module turns a 2D plane of those bytes into
what the page draws. numpy is imported only when a plane is asked for; no I/O.
"""

from __future__ import annotations

# The codes rise with how pressing a state is, so a coarse cell shows the largest code
# among its blocks.

#: a block that succeeded, in this run or an earlier one
DONE = 0
#: a block whose dependencies have not all finished (or that nothing has touched yet)
WAITING = 1
#: a block that may be handed out now
READY = 2
#: a block held by a worker (prefetched blocks included)
PROCESSING = 3
#: a block that depends on a failed block and will not run
ORPHANED = 4
#: a block that failed for good
FAILED = 5

#: state names in code order (code ``i`` is ``STATE_NAMES[i]``)
STATE_NAMES = ("done", "waiting", "ready", "processing", "orphaned", "failed")


def coarsen(plane, step: int):
    """Summarise ``step`` x ``step`` blocks of a 2D plane of state codes in one cell.

    A cell shows the most pressing state among its blocks, in the order failed,
    orphaned, processing, ready, waiting, done: it is done when all its blocks are.
    """
    import numpy as np

    if step == 1:
        return plane
    rows, columns = plane.shape
    coarse_rows, coarse_columns = -(-rows // step), -(-columns // step)
    if (rows, columns) != (coarse_rows * step, coarse_columns * step):
        padded = np.full((coarse_rows * step, coarse_columns * step), DONE, dtype=np.uint8)
        padded[:rows, :columns] = plane  # padding counts as done: it never wins a cell
        plane = padded
    # two reductions over contiguous axes are several times faster than one over (1, 3)
    by_rows = plane.reshape(coarse_rows, step, coarse_columns * step).max(axis=1)
    return by_rows.reshape(coarse_rows, coarse_columns, step).max(axis=2)


def state_counts(plane) -> dict[str, int]:
    """How many blocks of a plane (a numpy array of state codes) are in each state."""
    import numpy as np

    return {name: int(np.count_nonzero(plane == code)) for code, name in enumerate(STATE_NAMES)}


def encode_cells(cells) -> str:
    """A plane of state codes (a numpy array) as one digit per cell, row-major."""
    import numpy as np

    return (cells.astype(np.uint8) + ord("0")).tobytes().decode("ascii")
