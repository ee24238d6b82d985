"""The scheduler's block map (``BlockScheduler(block_map=True)``), without any I/O.

A random driver acquires and releases blocks (some fail, some are retried) on random
1D to 4D geometries, alone or chained; at every step the map, read plane by plane with
``block_plane``, must agree block for block with what the driver holds, finished and
saw fail, and its counts with the scheduler's counters. "Ready" is checked by its
meaning: draining ``acquire`` hands out exactly the blocks the map shows ready.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from luigi_daisy import BlockStatus, Roi, SchedulerError, Task
from luigi_daisy.block_states import (
    DONE,
    FAILED,
    ORPHANED,
    PROCESSING,
    READY,
    STATE_NAMES,
    WAITING,
    coarsen,
    encode_cells,
    state_counts,
)
from luigi_daisy.scheduler import BlockScheduler

pytestmark = pytest.mark.timeout(120)


def _nothing(block):
    return None


def full_map(scheduler: BlockScheduler, task_id: str) -> dict[int, int]:
    """Block index -> state code, read plane by plane."""
    grid = scheduler.tasks[task_id].grid
    leading_shape = grid.grid_shape[:-2] if grid.dims > 2 else ()
    states = {}
    for leading in itertools.product(*(range(n) for n in leading_shape)):
        plane = scheduler.block_plane(task_id, leading)
        for (row, column), code in np.ndenumerate(plane):
            position = (column,) if grid.dims == 1 else (*leading, row, column)
            states[grid.index_of(position)] = int(code)
    assert len(states) == grid.num_blocks
    return states


def random_tasks(rng: random.Random) -> list[Task]:
    dims = rng.randint(1, 4)
    write = tuple(rng.randint(2, 4) for _ in range(dims))
    context = tuple(rng.choice((0, 0, 1, 3)) for _ in range(dims))
    blocks = tuple(rng.randint(2, 5 if dims < 4 else 3) for _ in range(dims))
    total = Roi((0,) * dims, tuple(w * b + 2 * c for w, b, c in zip(write, blocks, context)))
    read_roi = Roi((0,) * dims, tuple(w + 2 * c for w, c in zip(write, context)))
    write_roi = Roi(context, write)
    options = dict(read_write_conflict=rng.random() < 0.6, max_retries=rng.choice((0, 1)),
                   fit=rng.choice(("valid", "overhang", "shrink")))
    first = Task("first", total, read_roi, write_roi, _nothing, **options)
    if rng.random() < 0.5:
        return [first]
    second = Task("second", total, read_roi, write_roi, _nothing, upstream_tasks=[first],
                  **options)
    return [first, second]


def check(scheduler: BlockScheduler, held: dict, done: dict[str, set]) -> None:
    for task_id, state in scheduler.task_states.items():
        states = full_map(scheduler, task_id)
        by_state = {code: {index for index, value in states.items() if value == code}
                    for code in range(len(STATE_NAMES))}
        assert by_state[PROCESSING] == {index for (task, index) in held if task == task_id}
        assert by_state[DONE] == done[task_id]
        grid = scheduler.tasks[task_id].grid
        assert by_state[FAILED] == {grid.index_of_number(number) for number in state.failed_blocks}
        assert len(by_state[ORPHANED]) == state.orphaned_count
        assert len(by_state[READY]) + len(by_state[WAITING]) == (state.ready_count
                                                                  + state.pending_count)
        if not scheduler.tasks[task_id].upstream_tasks:
            assert len(by_state[READY]) == state.ready_count


def drain_and_compare(scheduler: BlockScheduler, held: dict) -> None:
    """Acquire every block that can be had: exactly those the map shows ready."""
    ready = {(task_id, index) for task_id in scheduler.tasks
             for index, code in full_map(scheduler, task_id).items() if code == READY}
    handed_out = set()
    for task_id in scheduler.tasks:
        while (block := scheduler.acquire(task_id)) is not None:
            handed_out.add((task_id, block.index))
            held[(task_id, block.index)] = block
    assert handed_out == ready


@pytest.mark.parametrize("seed", range(40))
def test_the_block_map_follows_every_event_block_for_block(seed):
    rng = random.Random(seed)
    tasks = random_tasks(rng)
    scheduler = BlockScheduler(tasks, block_map=True)
    held: dict[tuple[str, int], object] = {}
    done = {task.task_id: set() for task in tasks}
    failing = {(task.task_id, index) for task in tasks for index in range(10_000)
               if rng.random() < 0.08}
    check(scheduler, held, done)
    for step in itertools.count():
        assert step < 10_000
        if rng.random() < 0.1:
            drain_and_compare(scheduler, held)
        elif rng.random() < 0.5:
            task_id = rng.choice(list(scheduler.tasks))
            block = scheduler.acquire(task_id)
            if block is not None:
                held[(task_id, block.index)] = block
        if held and rng.random() < 0.6:
            key = rng.choice(sorted(held))
            block = held.pop(key)
            status = BlockStatus.FAILED if key in failing else BlockStatus.SUCCESS
            scheduler.release(block, status)
            if status == BlockStatus.SUCCESS:
                done[key[0]].add(key[1])
        check(scheduler, held, done)
        if scheduler.is_done() and not held:
            break
    for task_id, state in scheduler.task_states.items():
        counts = state_counts(np.array(list(full_map(scheduler, task_id).values()),
                                       dtype=np.uint8))
        assert counts["done"] == state.completed_count
        assert counts["failed"] == state.failed_count
        assert counts["orphaned"] == state.orphaned_count
        assert counts["ready"] == counts["waiting"] == counts["processing"] == 0


def grid_tasks(shape: tuple[int, ...], conflict: bool = False, upstream=None,
               task_id: str = "task") -> Task:
    dims = len(shape)
    block = Roi((0,) * dims, (1,) * dims)
    return Task(task_id, Roi((0,) * dims, shape), block, block, _nothing,
                read_write_conflict=conflict, upstream_tasks=upstream or [])


def test_blocks_done_in_an_earlier_run_show_done_and_their_dependents_ready():
    first = grid_tasks((3, 4), task_id="first")
    second = grid_tasks((3, 4), upstream=[first], task_id="second")
    scheduler = BlockScheduler([second], done_blocks={"first": [0, 1, 5]}, block_map=True)
    D, R, W = DONE, READY, WAITING
    assert scheduler.block_plane("first").tolist() == [[D, D, R, R], [R, D, R, R],
                                                       [R, R, R, R]]
    assert scheduler.block_plane("second").tolist() == [[R, R, W, W], [W, R, W, W],
                                                        [W, W, W, W]]


def test_blocks_finished_by_a_followed_run_show_done_and_release_their_dependents():
    first = grid_tasks((1, 3), task_id="first")
    second = grid_tasks((1, 3), upstream=[first], task_id="second")
    scheduler = BlockScheduler([second], block_map=True)
    scheduler.follow("first")
    scheduler.complete_external("first", 1)
    assert scheduler.block_plane("first").tolist() == [[READY, DONE, READY]]
    assert scheduler.block_plane("second").tolist() == [[WAITING, READY, WAITING]]


def test_a_retried_block_is_ready_again_and_a_block_failed_for_good_orphans_downstream():
    first = grid_tasks((1, 2), task_id="first")
    first.max_retries = 1
    second = grid_tasks((1, 2), upstream=[first], task_id="second")
    scheduler = BlockScheduler([second], block_map=True)
    block = scheduler.acquire("first")
    assert scheduler.block_plane("first").tolist() == [[PROCESSING, READY]]
    scheduler.release(block, BlockStatus.FAILED)
    assert scheduler.block_plane("first").tolist() == [[READY, READY]]
    block = scheduler.acquire("first")
    assert block.index == 0  # the retry comes before the untouched root
    scheduler.release(block, BlockStatus.FAILED)
    assert scheduler.block_plane("second").tolist() == [[ORPHANED, WAITING]]
    block = scheduler.acquire("first")
    scheduler.release(block, BlockStatus.SUCCESS)
    assert scheduler.block_plane("first").tolist() == [[FAILED, DONE]]
    assert scheduler.block_plane("second").tolist() == [[ORPHANED, READY]]


def test_a_scheduler_without_the_map_or_a_plane_outside_the_grid_is_refused():
    task = grid_tasks((2, 3, 4))
    with pytest.raises(SchedulerError, match="block_map=True"):
        BlockScheduler([task]).block_plane("task", (0,))
    scheduler = BlockScheduler([task], block_map=True)
    with pytest.raises(SchedulerError, match=r"shape \(2, 3, 4\); give one coordinate"):
        scheduler.block_plane("task", (2,))
    with pytest.raises(SchedulerError, match="first 1 axes"):
        scheduler.block_plane("task", ())
    with pytest.raises(SchedulerError, match="unknown task_id 'other'"):
        scheduler.block_plane("other", (0,))


def test_a_coarse_cell_shows_the_most_pressing_state_of_its_blocks():
    plane = np.array([[DONE, DONE, WAITING, DONE, ORPHANED],
                      [DONE, DONE, PROCESSING, FAILED, READY],
                      [DONE, DONE, READY, DONE, DONE]], dtype=np.uint8)
    assert coarsen(plane, 2).tolist() == [[DONE, FAILED, ORPHANED], [DONE, READY, DONE]]
    assert coarsen(plane, 3).tolist() == [[PROCESSING, FAILED]]
    assert coarsen(plane, 1) is plane
    assert encode_cells(coarsen(plane, 2)) == "".join(
        str(code) for code in (DONE, FAILED, ORPHANED, DONE, READY, DONE))
    assert state_counts(plane) == {"waiting": 1, "ready": 2, "processing": 1, "done": 9,
                                   "failed": 1, "orphaned": 1}
