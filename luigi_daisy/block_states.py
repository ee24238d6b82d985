"""The state of each block for the live block map: codes, coarsening and encoding.

The scheduler keeps one byte per block of a task (see ``BlockScheduler(block_map=True)``)
and updates it in O(1) on every event; this module turns a 2D plane of those bytes into
what the page draws. numpy is imported only when a plane is asked for; no I/O.
"""

from __future__ import annotations

#: a block whose dependencies have not all finished (or that nothing has touched yet)
WAITING = 0
#: a block that may be handed out now
READY = 1
#: a block held by a worker (prefetched blocks included)
PROCESSING = 2
#: a block that succeeded, in this run or an earlier one
DONE = 3
#: a block that failed for good
FAILED = 4
#: a block that depends on a failed block and will not run
ORPHANED = 5

#: state names in code order (code ``i`` is ``STATE_NAMES[i]``)
STATE_NAMES = ("waiting", "ready", "processing", "done", "failed", "orphaned")

#: which state a coarse cell shows when its blocks differ: the highest rank
RANK_OF_STATE = (1, 2, 3, 0, 5, 4)


def coarsen(plane, step: int):
    """Summarise ``step`` x ``step`` blocks of a 2D state plane in one cell.

    A cell shows the most pressing state among its blocks, in the order failed,
    orphaned, processing, ready, waiting, done: it is done when all its blocks are.
    """
    import numpy as np

    if step == 1:
        return plane
    rank_of_state = np.array(RANK_OF_STATE, dtype=np.uint8)
    state_of_rank = np.argsort(rank_of_state).astype(np.uint8)
    rows, columns = plane.shape
    coarse_rows, coarse_columns = -(-rows // step), -(-columns // step)
    ranks = np.zeros((coarse_rows * step, coarse_columns * step), dtype=np.uint8)
    ranks[:rows, :columns] = rank_of_state[plane]  # padding ranks as done: never shown
    ranks = ranks.reshape(coarse_rows, step, coarse_columns, step).max(axis=(1, 3))
    return state_of_rank[ranks]


def state_counts(plane) -> dict[str, int]:
    """How many blocks of a plane (a numpy array of state codes) are in each state."""
    import numpy as np

    counts = np.bincount(plane.ravel(), minlength=len(STATE_NAMES))
    return {name: int(count) for name, count in zip(STATE_NAMES, counts)}


def encode_cells(cells) -> str:
    """A plane of state codes (a numpy array) as one digit per cell, row-major."""
    import numpy as np

    return (cells.astype(np.uint8) + ord("0")).tobytes().decode("ascii")
