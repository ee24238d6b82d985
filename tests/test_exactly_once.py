"""Exactly once, with hands and batches: real runs whose workers die in the middle of
blocks, with every prefetch (the default included).

Each attempt of a block leaves a ``start`` file before the function's work and an
``end`` file when the work returned, so "never run again" and "never charged unless it
was running" are read from the file system: a block whose function returned has one
``end`` and, unless it was the block its worker died in, one ``start``.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

import luigi_daisy as daisy
from luigi_daisy import Roi

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("no_stray_processes")]

#: the default prefetch (None: not passed), none, one, and the most a worker may keep
PREFETCHES = [None, 0, 1, 8]


def mark(folder: Path, what: str, number: int) -> None:
    """Leave ``folder/<what>-<number>.<unique>``: one file per event, from any process."""
    (folder / f"{what}-{number}.{uuid.uuid4().hex}").touch()


def counts(folder: Path, what: str) -> Counter:
    return Counter(int(path.name.split(".")[0].split("-")[1])
                   for path in folder.glob(f"{what}-*"))


def attempt(folder: Path, number: int) -> int:
    """Record an attempt of block ``number`` and return which attempt it is (1, 2...)."""
    mark(folder, "start", number)
    return counts(folder, "start")[number]


def line_task(task_id: str, num_blocks: int, process_function, **options) -> daisy.Task:
    options.setdefault("read_write_conflict", False)
    return daisy.Task(task_id, total_roi=Roi((0,), (num_blocks,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)), process_function=process_function, **options)


def run(task: daisy.Task, tmp_path: Path, prefetch: int | None) -> daisy.RunResult:
    options = {} if prefetch is None else {"prefetch": prefetch}
    return daisy.run_blockwise([task], progress=False, log_dir=tmp_path / "logs", **options)


@pytest.mark.parametrize("prefetch", PREFETCHES)
@pytest.mark.parametrize("death", ["sigkill on block 5", "os._exit on block 7"])
def test_a_worker_dying_in_a_block_costs_that_block_and_nothing_else(tmp_path, death,
                                                                      prefetch):
    """The issue's case: 20 short blocks, 2 workers; the worker processing the chosen
    block dies the first time. Every block that finished before is never run again."""
    records = tmp_path / "records"
    records.mkdir()
    chosen = 5 if death.startswith("sigkill") else 7

    def process(block):
        number = block.block_id[1]
        if attempt(records, number) == 1 and number == chosen:
            if death.startswith("sigkill"):
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(1)
        time.sleep(0.003)
        mark(records, "end", number)

    result = run(line_task("dying", 20, process, num_workers=2, max_retries=0), tmp_path,
                 prefetch)
    assert result, result["dying"]
    assert counts(records, "end") == Counter(range(20)), "each block finished exactly once"
    starts = counts(records, "start")
    assert starts == Counter({**Counter(range(20)), chosen: 2}), (
        f"only block {chosen} runs twice; started: {sorted(starts.items())}")
    assert result["dying"].failed_count == 0
    # (worker_failure_count is not asserted: when the other worker finishes the task
    # before the run looks at the dead one, its exit is not counted as a failure)


@pytest.mark.parametrize("prefetch", [None, 8])
def test_only_the_faulty_blocks_fail_however_their_workers_end(tmp_path, prefetch):
    """60 blocks; four end their worker every time (``os._exit``, SIGKILL, and two hang
    past the timeout), with ``max_retries=2``: those four fail for good after three
    attempts each, the hung ones reclaimed three times each, and the other 56 run once."""
    records = tmp_path / "records"
    records.mkdir()
    exits, kills, hangs = {7}, {19}, {31, 43}
    faulty = exits | kills | hangs

    def process(block):
        number = block.block_id[1]
        attempt(records, number)
        if number in exits:
            os._exit(3)
        if number in kills:
            os.kill(os.getpid(), signal.SIGKILL)
        if number in hangs:
            time.sleep(600)
        time.sleep(0.002)
        mark(records, "end", number)

    task = line_task("faulty", 60, process, num_workers=2, max_retries=2, timeout=2.0,
                     max_worker_restarts=40)
    result = run(task, tmp_path, prefetch)
    state = result["faulty"]
    assert sorted(state.failed_blocks) == sorted(faulty), state.failed_blocks
    assert (state.completed_count, state.failed_count, state.orphaned_count) == (56, 4, 0)
    assert state.timeout_reclaim_count == 3 * len(hangs)
    starts = counts(records, "start")
    assert {number: starts[number] for number in faulty} == dict.fromkeys(faulty, 3)
    healthy = set(range(60)) - faulty
    assert {number: starts[number] for number in healthy} == dict.fromkeys(healthy, 1), (
        "a healthy block was run again")
    assert counts(records, "end") == Counter(healthy)


@pytest.mark.parametrize("prefetch", PREFETCHES)
def test_blocks_finished_before_a_worker_exits_are_not_run_again(tmp_path, prefetch):
    """One worker finishes blocks 0 to 29 (short ones travel in batches) and exits in
    block 30; its replacement starts at block 30, not earlier."""
    records = tmp_path / "records"
    records.mkdir()

    def process(block):
        number = block.block_id[1]
        if attempt(records, number) == 1 and number == 30:
            os._exit(1)
        mark(records, "end", number)

    result = run(line_task("exits", 40, process, num_workers=1), tmp_path, prefetch)
    assert result, result["exits"]
    assert counts(records, "end") == Counter(range(40))
    assert counts(records, "start") == Counter({**Counter(range(40)), 30: 2})
