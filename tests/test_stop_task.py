"""An error every block of a task would repeat stops the task after its first block.

The scheduler part (``BlockScheduler.stop`` and ``release(..., fatal=True)``) is tested
without I/O; the worker part with ``run_blockwise``, a real block server and real worker
processes whose process function raises ``WorkerSetupError`` (what a ``BlockwiseTask``
worker raises when ``setup_worker`` fails).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

import luigi_daisy as daisy
from luigi_daisy import BlockStatus, Roi, WorkerSetupError
from luigi_daisy.scheduler import BlockScheduler, ReleaseOutcome

pytestmark = pytest.mark.timeout(120)


def chain(blocks: int = 8, process_function=None, **options) -> tuple[daisy.Task, daisy.Task]:
    """``first -> second``, 1D, ``blocks`` blocks of 10, no read/write conflicts."""
    first = daisy.Task("first", total_roi=Roi((0,), (10 * blocks,)), read_roi=Roi((0,), (10,)),
                       write_roi=Roi((0,), (10,)), process_function=process_function,
                       read_write_conflict=False, **options)
    second = daisy.Task("second", total_roi=Roi((0,), (10 * blocks,)),
                        read_roi=Roi((0,), (10,)), write_roi=Roi((0,), (10,)),
                        process_function=process_function, read_write_conflict=False,
                        upstream_tasks=[first], **options)
    return first, second


def invariant(state) -> None:
    assert (state.ready_count + state.processing_count + state.pending_count
            + state.completed_count + state.failed_count + state.orphaned_count
            == state.total_block_count)
    assert min(state.ready_count, state.processing_count, state.pending_count) >= 0


# --------------------------------------------------------------------------- sans-I/O
def test_blocks_failed_for_good_are_keyed_by_daisy_s_number_on_every_path():
    """A 2D grid, where a block's internal index and daisy's number differ: a fatal
    failure and a failure after the retries are both listed under daisy's number."""
    task = daisy.Task("grid", total_roi=Roi((0, 0), (30, 30)), read_roi=Roi((0, 0), (10, 10)),
                      write_roi=Roi((0, 0), (10, 10)), process_function=lambda block: None,
                      read_write_conflict=False, max_retries=0)
    scheduler = BlockScheduler([task])
    blocks = [scheduler.acquire("grid") for _ in range(9)]
    retried, fatal = blocks[5], blocks[7]
    assert retried.index != retried.block_id[1] and fatal.index != fatal.block_id[1]
    retried.error, fatal.error = "failed", "no model"
    assert scheduler.release(retried, BlockStatus.FAILED) is ReleaseOutcome.FAILED
    assert scheduler.release(fatal, BlockStatus.FAILED, fatal=True) is ReleaseOutcome.FAILED
    assert scheduler.task_states["grid"].failed_blocks == {
        retried.block_id[1]: "failed", fatal.block_id[1]: "no model"}


def test_a_fatal_release_fails_one_block_and_stops_the_task_and_its_downstream():
    first, second = chain(process_function=lambda block: None, max_retries=3)
    scheduler = BlockScheduler([second])
    finished = scheduler.acquire("first")
    in_flight_ok = scheduler.acquire("first")
    in_flight_failing = scheduler.acquire("first")
    fatal = scheduler.acquire("first")
    assert scheduler.release(finished, BlockStatus.SUCCESS) is ReleaseOutcome.COMPLETED
    downstream = scheduler.acquire("second")  # reads the finished block: ready
    assert downstream is not None and downstream.index == finished.index

    fatal.error = "Traceback ...\nRuntimeError: no model"
    assert scheduler.release(fatal, BlockStatus.FAILED, fatal=True) is ReleaseOutcome.FAILED
    first_state, second_state = scheduler.task_states["first"], scheduler.task_states["second"]
    assert first_state.failed_count == 1 and first_state.failed_blocks == {
        fatal.block_id[1]: fatal.error}
    assert first_state.stop_reason == fatal.error
    assert "upstream task 'first' was stopped" in second_state.stop_reason
    assert scheduler.acquire("first") is None and scheduler.acquire("second") is None
    for state in (first_state, second_state):
        invariant(state)
        assert not state.is_done()  # blocks are still in flight

    # blocks in flight come back: success completes, failure is orphaned (no retry)
    assert scheduler.release(in_flight_ok, BlockStatus.SUCCESS) is ReleaseOutcome.COMPLETED
    assert scheduler.release(in_flight_failing, BlockStatus.FAILED) is ReleaseOutcome.ORPHANED
    assert scheduler.release(downstream, BlockStatus.SUCCESS) is ReleaseOutcome.COMPLETED
    assert scheduler.acquire("second") is None  # the new upstream block releases nothing
    for state in (first_state, second_state):
        invariant(state)
        assert state.is_done() and not state.succeeded
    assert (first_state.completed_count, first_state.failed_count,
            first_state.orphaned_count) == (2, 1, 5)
    assert (second_state.completed_count, second_state.failed_count,
            second_state.orphaned_count) == (1, 0, 7)
    assert scheduler.is_done()


def test_blocks_finished_elsewhere_do_not_count_after_a_stop():
    first, _ = chain(process_function=lambda block: None)
    scheduler = BlockScheduler([first])
    block = scheduler.acquire("first")
    block.error = "fatal"
    scheduler.release(block, BlockStatus.FAILED, fatal=True)
    assert not scheduler.complete_external("first", 5)
    invariant(scheduler.task_states["first"])


# --------------------------------------------------------------------------- workers
def cannot_set_up(block):
    raise WorkerSetupError("the model file is missing")


def test_a_worker_that_cannot_work_stops_its_task_at_once(tmp_path, capsys,
                                                          no_stray_processes):
    first, second = chain(blocks=32, process_function=cannot_set_up, num_workers=3,
                          max_retries=2)
    result = daisy.run_blockwise([second], progress=False, log_dir=tmp_path / "logs",
                                 ledger_dir=tmp_path / "ledgers")
    assert not result
    state = result["first"]
    assert state.failed_count == 1
    assert state.failed_count + state.orphaned_count == 32
    assert state.worker_restart_count == 0  # nobody replaced the workers
    assert "WorkerSetupError: the model file is missing" in state.stop_reason
    assert result["second"].orphaned_count == 32
    summary = capsys.readouterr().out
    assert "stopped after its first failure" in summary
    assert summary.count("WorkerSetupError: the model file is missing") == 2  # reason, block
    assert "some blocks failed" not in summary.split("Task second:")[0]
    # one pool serves both tasks: its first workers only (no replacements)
    worker_logs = list((tmp_path / "logs" / "pool").glob("worker_*.err"))
    assert 1 <= len(worker_logs) <= len(os.sched_getaffinity(0)), worker_logs
    assert sorted(path.parent.name for path in (tmp_path / "logs").rglob("worker_*.err")) \
        == ["pool"] * len(worker_logs)


def test_in_process_runs_stop_a_task_the_same_way(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = chain(blocks=8, process_function=cannot_set_up, max_retries=2)
    result = daisy.run_blockwise([second], multiprocessing=False, progress=False)
    assert (result["first"].failed_count, result["first"].orphaned_count) == (1, 7)
    assert result["second"].orphaned_count == 8
    assert "stopped after its first failure" in capsys.readouterr().out


def test_a_task_stopped_in_one_run_is_tried_again_in_the_next(tmp_path, no_stray_processes):
    marker = tmp_path / "broken"
    marker.touch()

    def maybe_broken(block, marker=marker, calls=tmp_path / "calls"):
        if marker.exists():
            raise WorkerSetupError("broken setup")
        calls.mkdir(exist_ok=True)
        (calls / uuid.uuid4().hex).write_text(str(block.index))

    first, second = chain(blocks=6, process_function=maybe_broken)
    options = {"progress": False, "log_dir": tmp_path / "logs",
               "ledger_dir": tmp_path / "ledgers"}
    assert not daisy.run_blockwise([second], **options)
    marker.unlink()
    first, second = chain(blocks=6, process_function=maybe_broken)
    assert daisy.run_blockwise([second], **options)
    assert len(list(Path(tmp_path / "calls").iterdir())) == 12
