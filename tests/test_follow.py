"""Following a task another run processes: counters stay consistent, takeover resumes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import luigi_daisy as daisy
from luigi_daisy import BlockScheduler, BlockStatus, Roi
from luigi_daisy.context import Context


def counters_add_up(state: daisy.TaskState) -> bool:
    return (state.ready_count + state.processing_count + state.pending_count
            + state.completed_count + state.failed_count + state.orphaned_count
            == state.total_block_count) and state.pending_count >= 0 and state.ready_count >= 0


def chain(conflict: bool) -> daisy.Task:
    upstream = daisy.Task("a", Roi((0,), (40,)), Roi((0,), (4,)), Roi((1,), (2,)),
                          lambda block: None, read_write_conflict=conflict)
    return daisy.Task("b", Roi((0,), (40,)), Roi((0,), (2,)), Roi((0,), (2,)),
                      lambda block: None, upstream_tasks=[upstream])


@settings(max_examples=60, deadline=None)
@given(conflict=st.booleans(), data=st.data())
def test_blocks_finished_elsewhere_then_taken_over(conflict, data):
    scheduler = BlockScheduler([chain(conflict)])
    scheduler.follow("a")
    # the other run finishes blocks of "a" in an order it could have used
    other = BlockScheduler([chain(conflict)])
    finished_elsewhere = []
    stop_after = data.draw(st.integers(0, other.task_states["a"].total_block_count))
    while len(finished_elsewhere) < stop_after:
        block = other.acquire("a")
        other.release(block, BlockStatus.SUCCESS)
        finished_elsewhere.append(block.index)
        assert scheduler.complete_external("a", block.index)
        for state in scheduler.task_states.values():
            assert counters_add_up(state)
    # the same, then this run takes the task over and processes the rest
    scheduler = BlockScheduler([chain(conflict)])
    scheduler.follow("a")
    for index in finished_elsewhere:
        scheduler.complete_external("a", index)
    scheduler.take_over("a")
    processed = set()
    progressed = True
    while progressed:
        progressed = False
        for task_id in ("a", "b"):
            block = scheduler.acquire(task_id)
            if block is not None:
                progressed = True
                if task_id == "a":
                    assert block.index not in finished_elsewhere
                    processed.add(block.index)
                scheduler.release(block, BlockStatus.SUCCESS)
            for state in scheduler.task_states.values():
                assert counters_add_up(state)
    assert scheduler.is_done()
    assert len(processed) + len(finished_elsewhere) == scheduler.task_states["a"].total_block_count


def test_a_followed_task_finished_elsewhere_reads_as_done():
    scheduler = BlockScheduler([chain(False)])
    scheduler.follow("a")
    for index in range(scheduler.task_states["a"].total_block_count):
        scheduler.complete_external("a", index)
    state = scheduler.task_states["a"]
    assert state.is_done() and state.ready_count == 0 and state.pending_count == 0
    assert state.skipped_count == state.total_block_count


@pytest.mark.parametrize("values", [
    {"hostname": "::1", "port": "4242", "task_id": "a:b=c", "worker_id": "3"},
    {"hostname": "localhost", "port": "1", "task_id": "Smooth_raw_1f2e3d", "worker_id": "0"},
])
def test_contexts_travel_whatever_their_values(values):
    context = Context(values)
    assert Context.from_string(context.to_env()) == values
