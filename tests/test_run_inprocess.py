"""daisy's tutorial scenarios, run in the calling process with ``multiprocessing=False``.

Every test is written the way a daisy user writes a script: ``import luigi_daisy as
daisy``, ``daisy.Task(...)``, ``daisy.run_blockwise(...)``, numpy arrays for the data and
funlib ROI arithmetic to find a block's part of them. Randomness is seeded per block, so
every expected count is computed independently from the same seed logic.
"""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import luigi_daisy as daisy
from luigi_daisy import BlockStatus, Coordinate, Roi

FAILURE_RATE = 0.2


# ---------------------------------------------------------------------------- helpers
def roi_slices(roi: Roi, origin: Roi | None = None) -> tuple[slice, ...]:
    """numpy slices of ``roi`` inside an array whose first voxel is ``origin.begin``."""
    if origin is not None:
        roi = roi - Coordinate(origin.begin)
    return tuple(slice(begin, end) for begin, end in zip(roi.begin, roi.end))


def roi_key(roi: Roi) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A hashable stand-in for a ``Roi`` (funlib ROIs are not hashable)."""
    return tuple(int(b) for b in roi.begin), tuple(int(s) for s in roi.shape)


def unlucky(seed: str, key) -> bool:
    """Deterministic 20% coin: True for about one key in five, the same in every run."""
    return random.Random(f"{seed}:{key}").random() < FAILURE_RATE


def task_section(summary: str, task_id: str) -> str:
    """The part of the execution summary that describes one task."""
    match = re.search(rf"Task {re.escape(task_id)}:(.*?)(?=\n\s*Task \S+:|\Z)", summary,
                      re.DOTALL)
    assert match, f"no section for task {task_id!r} in the summary:\n{summary}"
    return match.group(1)


def summary_counts(summary: str, task_id: str) -> dict[str, int]:
    """Numbers the execution summary reports for one task."""
    section = task_section(summary, task_id)
    patterns = {
        "num_blocks": r"num blocks\s*:\s*(\d+)",
        "completed": r"completed\W*:\s*(\d+)",
        "skipped": r"skipped\s*(\d+)",
        "failed": r"failed\W*:\s*(\d+)",
        "orphaned": r"orphaned\W*:\s*(\d+)",
    }
    counts = {}
    for name, pattern in patterns.items():
        match = re.search(pattern, section)
        assert match, f"summary of task {task_id!r} has no {name!r} count:\n{section}"
        counts[name] = int(match.group(1))
    return counts


def valid_blocks(total_roi: Roi, read_roi: Roi, write_roi: Roi) -> list[tuple[Roi, Roi]]:
    """(read, write) ROIs of every block of a ``fit="valid"`` task, by brute force."""
    step = write_roi.shape
    context = write_roi.begin - read_roi.begin
    ranges = []
    for dim in range(total_roi.dims):
        begins = []
        begin = total_roi.begin[dim]
        while begin + read_roi.shape[dim] <= total_roi.end[dim]:
            begins.append(begin)
            begin += step[dim]
        ranges.append(begins)
    blocks = []
    for begin in np.array(np.meshgrid(*ranges, indexing="ij")).reshape(total_roi.dims, -1).T:
        read = Roi(tuple(int(b) for b in begin), read_roi.shape)
        write = Roi(read.begin + context, write_roi.shape)
        blocks.append((read, write))
    return blocks


# ------------------------------------------------------------ 100 one-voxel blocks
def test_hundred_one_voxel_blocks(capsys):
    processed = Counter()
    output = np.zeros(100, dtype=np.int64)
    total_roi = Roi((0,), (100,))

    def process_function(block):
        processed[roi_key(block.write_roi)] += 1
        output[roi_slices(block.write_roi, total_roi)] += block.write_roi.begin[0] + 1

    task = daisy.Task(
        "dummy",
        total_roi=total_roi,
        read_roi=Roi((0,), (1,)),
        write_roi=Roi((0,), (1,)),
        process_function=process_function,
        num_workers=5,
    )
    result = daisy.run_blockwise([task], multiprocessing=False)

    assert result
    assert set(result) == {"dummy"}
    state = result["dummy"]
    assert state.total_block_count == 100
    assert state.completed_count == 100
    assert state.skipped_count == 0
    assert state.failed_count == 0
    assert state.orphaned_count == 0
    assert processed == Counter({roi_key(Roi((x,), (1,))): 1 for x in range(100)})
    np.testing.assert_array_equal(output, np.arange(1, 101))

    summary = capsys.readouterr().out
    assert "Execution Summary" in summary
    assert summary_counts(summary, "dummy") == {
        "num_blocks": 100, "completed": 100, "skipped": 0, "failed": 0, "orphaned": 0}
    assert "all blocks processed successfully" in summary


# ---------------------------------------------------------- 20% random failures
def test_twenty_percent_random_failures_without_retries(capsys):
    expected_failed = {x for x in range(100) if unlucky("tutorial", x)}
    assert 0 < len(expected_failed) < 100  # the seed gives a meaningful mix

    attempts = Counter()
    output = np.zeros(100, dtype=bool)
    total_roi = Roi((0,), (100,))

    def process_function(block):
        x = block.write_roi.begin[0]
        attempts[x] += 1
        if unlucky("tutorial", x):
            raise RuntimeError(f"unlucky block at {x}")
        output[roi_slices(block.write_roi, total_roi)] = True

    task = daisy.Task(
        "random_failures",
        total_roi=total_roi,
        read_roi=Roi((0,), (1,)),
        write_roi=Roi((0,), (1,)),
        process_function=process_function,
        max_retries=0,
    )
    result = daisy.run_blockwise([task], multiprocessing=False)

    assert not result
    state = result["random_failures"]
    assert state.failed_count == len(expected_failed)
    assert state.completed_count == 100 - len(expected_failed)
    assert state.skipped_count == 0
    assert state.orphaned_count == 0
    # max_retries=0: every block, failing or not, is tried exactly once
    assert attempts == Counter({x: 1 for x in range(100)})
    assert set(np.flatnonzero(~output)) == expected_failed

    summary = capsys.readouterr().out
    assert "Execution Summary" in summary
    assert summary_counts(summary, "random_failures") == {
        "num_blocks": 100, "completed": 100 - len(expected_failed), "skipped": 0,
        "failed": len(expected_failed), "orphaned": 0}
    assert "all blocks processed successfully" not in summary


def test_failing_blocks_are_retried_up_to_max_retries():
    always_failing, flaky = 3, 5
    attempts = Counter()

    def process_function(block):
        x = block.write_roi.begin[0]
        attempts[x] += 1
        if x == always_failing:
            raise ValueError("this block never works")
        if x == flaky and attempts[x] <= 2:
            raise ValueError("this block works on its third attempt")

    task = daisy.Task(
        "retries",
        total_roi=Roi((0,), (10,)),
        read_roi=Roi((0,), (1,)),
        write_roi=Roi((0,), (1,)),
        process_function=process_function,
        max_retries=2,
    )
    result = daisy.run_blockwise([task], multiprocessing=False)

    assert not result
    assert result["retries"].failed_count == 1
    assert result["retries"].completed_count == 9
    expected_attempts = {x: 1 for x in range(10)}
    expected_attempts[always_failing] = 3  # first try plus max_retries
    expected_attempts[flaky] = 3
    assert attempts == Counter(expected_attempts)


def test_an_exception_fails_the_block_not_the_run(capsys):
    def process_function(block):
        raise KeyError("nothing works")

    task = daisy.Task(
        "broken",
        total_roi=Roi((0, 0), (4, 4)),
        read_roi=Roi((0, 0), (2, 2)),
        write_roi=Roi((0, 0), (2, 2)),
        process_function=process_function,
        max_retries=1,
    )
    result = daisy.run_blockwise([task], multiprocessing=False)  # must not raise

    assert not result
    assert result["broken"].failed_count == 4
    assert result["broken"].completed_count == 0
    summary = capsys.readouterr().out
    assert summary_counts(summary, "broken")["failed"] == 4


# ------------------------------------------------ check function: runs converge
def test_check_function_makes_repeated_runs_converge(capsys):
    total_roi = Roi((0,), (100,))
    done = np.zeros(100, dtype=bool)
    processed: list[int] = []
    run_number = 0

    def process_function(block):
        x = block.write_roi.begin[0]
        processed.append(x)
        if unlucky(f"run {run_number}", x):
            raise RuntimeError(f"block {x} failed in run {run_number}")
        done[roi_slices(block.write_roi, total_roi)] = True

    def check_function(block):
        return bool(done[roi_slices(block.write_roi, total_roi)].all())

    # the expected history, computed from the same coin without running anything
    expected_history = []
    remaining = set(range(100))
    while remaining:
        run = len(expected_history)
        failed = {x for x in remaining if unlucky(f"run {run}", x)}
        expected_history.append((set(remaining), failed))
        remaining = failed
        assert run < 20, "the seed does not converge; choose another"
    assert len(expected_history) >= 3  # the scenario really needs repeated runs

    for run_number, (to_process, to_fail) in enumerate(expected_history):
        processed.clear()
        task = daisy.Task(
            "converge",
            total_roi=total_roi,
            read_roi=Roi((0,), (1,)),
            write_roi=Roi((0,), (1,)),
            process_function=process_function,
            check_function=check_function,
            max_retries=0,
        )
        result = daisy.run_blockwise([task], multiprocessing=False)
        state = result["converge"]

        # only the blocks that were not done yet are processed, each once
        assert sorted(processed) == sorted(to_process)
        assert state.skipped_count == 100 - len(to_process)
        assert state.failed_count == len(to_fail)
        # completed includes skipped
        assert state.completed_count == 100 - len(to_fail)
        assert bool(result) == (not to_fail)
        summary = capsys.readouterr().out
        assert summary_counts(summary, "converge") == {
            "num_blocks": 100, "completed": 100 - len(to_fail),
            "skipped": 100 - len(to_process), "failed": len(to_fail), "orphaned": 0}
        assert ("all blocks processed successfully" in summary) == (not to_fail)

    assert done.all()

    # one more run finds everything done and processes nothing
    processed.clear()
    result = daisy.run_blockwise([task], multiprocessing=False)
    assert result
    assert processed == []
    assert result["converge"].skipped_count == 100
    assert result["converge"].completed_count == 100


def test_check_function_converges_with_context_and_conflicts():
    """Reference geometry with read/write conflicts: failures also hold back (orphan)
    their conflicting neighbours, and repeated runs still finish everything."""
    done = np.zeros(100, dtype=bool)
    processed: list[tuple[int, int]] = []
    run_number = 0

    def process_function(block):
        assert not done[roi_slices(block.write_roi)].all()
        processed.append(roi_key(block.write_roi))
        if unlucky(f"halo run {run_number}", block.write_roi.begin[0]):
            raise RuntimeError("unlucky")
        done[roi_slices(block.write_roi)] = True

    def check_function(block):
        return bool(done[roi_slices(block.write_roi)].all())

    all_blocks = {roi_key(Roi((5 * k + 2,), (5,))) for k in range(19)}
    for run_number in range(20):
        processed.clear()
        done_before = {key for key in all_blocks if done[roi_slices(Roi(*key))].all()}
        task = daisy.Task("conflicts", total_roi=REFERENCE_TOTAL, read_roi=REFERENCE_READ,
                          write_roi=REFERENCE_WRITE, process_function=process_function,
                          check_function=check_function, read_write_conflict=True,
                          max_retries=0)
        result = daisy.run_blockwise([task], multiprocessing=False)
        state = result["conflicts"]
        done_after = {key for key in all_blocks if done[roi_slices(Roi(*key))].all()}

        assert state.total_block_count == 19
        assert len(processed) == len(set(processed))
        assert not set(processed) & done_before
        # every block not done before was either processed or orphaned
        assert len(processed) + state.orphaned_count == 19 - len(done_before)
        assert state.skipped_count == len(done_before)
        assert state.completed_count == len(done_after)
        assert state.failed_count == len(set(processed) - done_after)
        assert state.failed_count + state.orphaned_count == 19 - len(done_after)
        # an orphan is a block held back by a conflicting neighbour that failed or was
        # itself orphaned (blocks k and k + 1 conflict: context 2, write shape 5)
        orphans = all_blocks - done_before - set(processed)
        assert len(orphans) == state.orphaned_count
        held_back = (set(processed) - done_after) | orphans
        for begin_shape in orphans:
            begin = begin_shape[0][0]
            assert any(((begin + delta,), (5,)) in held_back for delta in (-5, 5))
        if run_number == 0:
            # the first run fails blocks of both parities, so whichever of two
            # neighbours runs first, some failure holds back a neighbour
            assert state.orphaned_count > 0
        assert bool(result) == (len(done_after) == 19)
        if result:
            break
    else:
        pytest.fail("repeated runs did not converge")
    assert run_number >= 1
    assert done[2:97].all()


def test_pre_and_post_check_pair():
    total_roi = Roi((0,), (20,))
    output = np.zeros(20, dtype=np.int64)
    attempts = Counter()
    forgetful = {x for x in range(20) if unlucky("forget", x)}
    assert forgetful

    def process_function(block):
        x = block.write_roi.begin[0]
        attempts[x] += 1
        if x in forgetful:
            return  # returns without writing: only the post check notices
        output[roi_slices(block.write_roi, total_roi)] = 7

    def pre_check(block):
        return bool((output[roi_slices(block.write_roi, total_roi)] == 7).all())

    def post_check(block):
        return bool((output[roi_slices(block.write_roi, total_roi)] == 7).all())

    def make_task():
        return daisy.Task(
            "checked",
            total_roi=total_roi,
            read_roi=Roi((0,), (1,)),
            write_roi=Roi((0,), (1,)),
            process_function=process_function,
            check_function=(pre_check, post_check),
            max_retries=0,
        )

    result = daisy.run_blockwise([make_task()], multiprocessing=False)
    assert not result
    assert result["checked"].failed_count == len(forgetful)
    assert result["checked"].completed_count == 20 - len(forgetful)
    assert result["checked"].skipped_count == 0
    assert attempts == Counter({x: 1 for x in range(20)})

    # the second run: the pre check skips the written blocks, the post check accepts
    # the ones written now
    forgetful.clear()
    attempts.clear()
    result = daisy.run_blockwise([make_task()], multiprocessing=False)
    assert result
    failed_before = {x for x in range(20) if unlucky("forget", x)}
    assert set(attempts) == failed_before
    assert result["checked"].skipped_count == 20 - len(failed_before)
    assert result["checked"].completed_count == 20


def test_post_check_failure_is_retried():
    total_roi = Roi((0,), (10,))
    output = np.zeros(10, dtype=bool)
    attempts = Counter()

    def process_function(block):
        x = block.write_roi.begin[0]
        attempts[x] += 1
        if attempts[x] > 1 or x % 2:
            output[roi_slices(block.write_roi, total_roi)] = True

    def post_check(block):
        return bool(output[roi_slices(block.write_roi, total_roi)].all())

    task = daisy.Task(
        "retry_post",
        total_roi=total_roi,
        read_roi=Roi((0,), (1,)),
        write_roi=Roi((0,), (1,)),
        process_function=process_function,
        check_function=(None, post_check),
        max_retries=1,
    )
    result = daisy.run_blockwise([task], multiprocessing=False)
    assert result
    assert result["retry_post"].completed_count == 10
    assert result["retry_post"].skipped_count == 0
    assert attempts == Counter({x: 1 if x % 2 else 2 for x in range(10)})


# ------------------------------------------------------ valid / overhang / shrink
REFERENCE_TOTAL = Roi((0,), (100,))
REFERENCE_READ = Roi((0,), (9,))
REFERENCE_WRITE = Roi((2,), (5,))


def run_reference_geometry(fit: str):
    blocks = []

    def process_function(block):
        blocks.append((block.read_roi, block.write_roi))

    task = daisy.Task(
        f"fit_{fit}",
        total_roi=REFERENCE_TOTAL,
        read_roi=REFERENCE_READ,
        write_roi=REFERENCE_WRITE,
        process_function=process_function,
        fit=fit,
    )
    result = daisy.run_blockwise([task], multiprocessing=False)
    assert result
    blocks.sort(key=lambda rois: rois[1].begin[0])
    return result[f"fit_{fit}"], blocks


def test_fit_valid():
    state, blocks = run_reference_geometry("valid")
    assert state.total_block_count == 19
    assert len(blocks) == 19
    expected = [(Roi((5 * k,), (9,)), Roi((5 * k + 2,), (5,))) for k in range(19)]
    assert blocks == expected
    assert all(REFERENCE_TOTAL.contains(read) for read, _ in blocks)
    assert blocks[-1] == (Roi((90,), (9,)), Roi((92,), (5,)))


def test_fit_overhang():
    state, blocks = run_reference_geometry("overhang")
    assert state.total_block_count == 20
    assert len(blocks) == 20
    expected = [(Roi((5 * k,), (9,)), Roi((5 * k + 2,), (5,))) for k in range(20)]
    assert blocks == expected
    # the last block reaches past the total ROI
    assert blocks[-1] == (Roi((95,), (9,)), Roi((97,), (5,)))
    assert not REFERENCE_TOTAL.contains(blocks[-1][0])


def test_fit_shrink():
    state, blocks = run_reference_geometry("shrink")
    assert state.total_block_count == 20
    assert len(blocks) == 20
    assert blocks[:-1] == [(Roi((5 * k,), (9,)), Roi((5 * k + 2,), (5,))) for k in range(19)]
    assert blocks[-1] == (Roi((95,), (5,)), Roi((97,), (1,)))
    assert all(REFERENCE_TOTAL.contains(read) for read, _ in blocks)
    # shrink writes exactly the total ROI minus the context
    written = np.zeros(100, dtype=np.int64)
    for _, write in blocks:
        written[roi_slices(write)] += 1
    assert (written[2:98] == 1).all()
    assert written[:2].sum() == 0 and written[98:].sum() == 0


# --------------------------------------------------- 2D two-task chain with context
SHAPE = (36, 52)
CHAIN_TOTAL = Roi((0, 0), SHAPE)
A_BLOCK = Roi((0, 0), (6, 13))
B_READ = Roi((0, 0), (12, 12))
B_WRITE = Roi((2, 2), (8, 8))


def box_sum(array: np.ndarray, size: int) -> np.ndarray:
    """Sum over every ``size`` x ``size`` window (the 'valid' part only)."""
    return sliding_window_view(array, (size, size)).sum(axis=(-2, -1))


def make_chain(raw, a_out, b_out, log, a_fails=lambda block: False, b_conflict=True,
               a_retries=0):
    """Task A writes ``raw + 1``; task B writes the 5x5 box sum of A's output."""

    def increment(block):
        log.append(("A", block.read_roi, block.write_roi))
        if a_fails(block):
            raise RuntimeError(f"upstream block {block.block_id} fails")
        a_out[roi_slices(block.write_roi, CHAIN_TOTAL)] = (
            raw[roi_slices(block.read_roi, CHAIN_TOTAL)] + 1)

    def smooth(block):
        log.append(("B", block.read_roi, block.write_roi))
        data = a_out[roi_slices(block.read_roi, CHAIN_TOTAL)]
        # everything B reads must have been written by A already
        assert not np.isnan(data).any(), f"{block} read unwritten upstream data"
        b_out[roi_slices(block.write_roi, CHAIN_TOTAL)] = box_sum(data, 5)

    task_a = daisy.Task(
        "A",
        total_roi=CHAIN_TOTAL,
        read_roi=A_BLOCK,
        write_roi=A_BLOCK,
        process_function=increment,
        max_retries=a_retries,
    )
    task_b = daisy.Task(
        "B",
        total_roi=CHAIN_TOTAL,
        read_roi=B_READ,
        write_roi=B_WRITE,
        process_function=smooth,
        read_write_conflict=b_conflict,
        max_retries=0,
        upstream_tasks=[task_a],
    )
    return task_a, task_b


@pytest.mark.parametrize("passed", ["B", "A,B", "B,A"])
def test_two_task_chain_in_2d_with_context(capsys, passed):
    raw = np.random.default_rng(0).integers(0, 100, size=SHAPE).astype(np.float64)
    a_out = np.full(SHAPE, np.nan)
    b_out = np.full(SHAPE, np.nan)
    log = []
    task_a, task_b = make_chain(raw, a_out, b_out, log)

    # with only the downstream task passed, its upstream task is pulled in
    tasks = {"A": task_a, "B": task_b}
    result = daisy.run_blockwise([tasks[name] for name in passed.split(",")],
                                 multiprocessing=False)

    assert result
    assert set(result) == {"A", "B"}
    assert result["A"].total_block_count == (36 // 6) * (52 // 13)
    assert result["B"].total_block_count == 4 * 6
    assert result["A"].completed_count == 24
    assert result["B"].completed_count == 24

    np.testing.assert_array_equal(a_out, raw + 1)
    expected = np.full(SHAPE, np.nan)
    expected[2:34, 2:50] = box_sum(raw + 1, 5)
    np.testing.assert_array_equal(b_out, expected)

    # block-level dependencies: every B block ran after each A block it reads
    a_done = []
    for kind, read, write in log:
        if kind == "A":
            a_done.append(write)
        else:
            needed = [w for _, w in valid_blocks(CHAIN_TOTAL, A_BLOCK, A_BLOCK)
                      if w.intersects(read)]
            assert needed
            for write_a in needed:
                assert any(write_a == done for done in a_done), (
                    f"B block reading {read} ran before A block {write_a}")

    summary = capsys.readouterr().out
    assert summary_counts(summary, "A")["num_blocks"] == 24
    assert summary_counts(summary, "B") == {
        "num_blocks": 24, "completed": 24, "skipped": 0, "failed": 0, "orphaned": 0}
    assert summary.count("all blocks processed successfully") == 2


def test_chain_with_flaky_upstream_block_that_succeeds_on_retry():
    raw = np.random.default_rng(2).integers(0, 100, size=SHAPE).astype(np.float64)
    a_out = np.full(SHAPE, np.nan)
    b_out = np.full(SHAPE, np.nan)
    log = []
    flaky_point = Coordinate((20, 30))
    tries = Counter()

    def a_fails(block):
        if block.write_roi.contains(flaky_point):
            tries[block.block_id] += 1
            return tries[block.block_id] == 1  # fails once, then works
        return False

    task_a, task_b = make_chain(raw, a_out, b_out, log, a_fails=a_fails, a_retries=1)
    result = daisy.run_blockwise([task_b], multiprocessing=False)

    assert result
    assert list(tries.values()) == [2]
    assert result["A"].completed_count == 24 and result["A"].failed_count == 0
    assert result["B"].completed_count == 24 and result["B"].orphaned_count == 0
    np.testing.assert_array_equal(b_out[2:34, 2:50], box_sum(raw + 1, 5))


def test_skipped_upstream_blocks_release_downstream_blocks():
    raw = np.random.default_rng(3).integers(0, 100, size=SHAPE).astype(np.float64)
    a_out = raw + 1  # the upstream output exists already
    b_out = np.full(SHAPE, np.nan)
    log = []
    task_a, task_b = make_chain(raw, a_out, b_out, log)
    task_a = daisy.Task(
        "A",
        total_roi=CHAIN_TOTAL,
        read_roi=A_BLOCK,
        write_roi=A_BLOCK,
        process_function=task_a.process_function,
        check_function=lambda block: True,  # everything upstream is done
    )
    task_b = daisy.Task(
        "B",
        total_roi=CHAIN_TOTAL,
        read_roi=B_READ,
        write_roi=B_WRITE,
        process_function=task_b.process_function,
        upstream_tasks=[task_a],
    )
    result = daisy.run_blockwise([task_b], multiprocessing=False)

    assert result
    assert result["A"].skipped_count == 24
    assert result["A"].completed_count == 24
    assert result["B"].skipped_count == 0
    assert result["B"].completed_count == 24
    assert [kind for kind, _, _ in log] == ["B"] * 24
    np.testing.assert_array_equal(b_out[2:34, 2:50], box_sum(raw + 1, 5))


# ---------------------------------------------------------------------- orphaning
def test_failed_upstream_block_orphans_exactly_its_readers(capsys):
    raw = np.random.default_rng(1).integers(0, 100, size=SHAPE).astype(np.float64)
    a_out = np.full(SHAPE, np.nan)
    b_out = np.full(SHAPE, np.nan)
    log = []
    bad_points = [Coordinate((7, 20)), Coordinate((30, 45))]

    def a_fails(block):
        return any(block.write_roi.contains(point) for point in bad_points)

    task_a, task_b = make_chain(raw, a_out, b_out, log, a_fails=a_fails, b_conflict=False)
    result = daisy.run_blockwise([task_b], multiprocessing=False)

    failed_a = [write for _, write in valid_blocks(CHAIN_TOTAL, A_BLOCK, A_BLOCK)
                if any(write.contains(point) for point in bad_points)]
    assert len(failed_a) == 2
    b_blocks = valid_blocks(CHAIN_TOTAL, B_READ, B_WRITE)
    orphaned = {roi_key(write) for read, write in b_blocks
                if any(read.intersects(failed) for failed in failed_a)}
    assert 0 < len(orphaned) < len(b_blocks)

    assert not result
    assert result["A"].failed_count == 2
    assert result["A"].completed_count == 22
    assert result["A"].orphaned_count == 0
    assert result["B"].orphaned_count == len(orphaned)
    assert result["B"].failed_count == 0
    assert result["B"].completed_count == len(b_blocks) - len(orphaned)

    processed_b = {roi_key(write) for kind, _, write in log if kind == "B"}
    assert processed_b == {roi_key(write) for _, write in b_blocks} - orphaned
    # and the blocks that did run computed the right thing
    full = np.full(SHAPE, np.nan)
    full[2:34, 2:50] = box_sum(raw + 1, 5)
    for _, write in b_blocks:
        sl = roi_slices(write, CHAIN_TOTAL)
        if roi_key(write) in orphaned:
            assert np.isnan(b_out[sl]).all()
        else:
            np.testing.assert_array_equal(b_out[sl], full[sl])

    summary = capsys.readouterr().out
    assert summary_counts(summary, "A")["failed"] == 2
    assert summary_counts(summary, "B")["orphaned"] == len(orphaned)
    assert summary_counts(summary, "B")["failed"] == 0
    assert "all blocks processed successfully" not in summary


def test_orphaning_propagates_down_a_three_task_chain():
    raw = np.zeros(SHAPE)
    a_out = np.full(SHAPE, np.nan)
    b_out = np.full(SHAPE, np.nan)
    log = []
    bad_point = Coordinate((13, 27))

    task_a, task_b = make_chain(raw, a_out, b_out, log,
                                a_fails=lambda block: block.write_roi.contains(bad_point),
                                b_conflict=False)
    c_total = Roi((2, 2), (32, 48))
    c_read = Roi((0, 0), (8, 8))
    c_write = Roi((2, 2), (4, 4))
    processed_c = []

    def c_process(block):
        processed_c.append(block.write_roi)
        assert not np.isnan(b_out[roi_slices(block.read_roi, CHAIN_TOTAL)]).any()

    task_c = daisy.Task(
        "C",
        total_roi=c_total,
        read_roi=c_read,
        write_roi=c_write,
        process_function=c_process,
        read_write_conflict=False,
        upstream_tasks=[task_b],
    )
    result = daisy.run_blockwise([task_c], multiprocessing=False)

    failed_a = [write for _, write in valid_blocks(CHAIN_TOTAL, A_BLOCK, A_BLOCK)
                if write.contains(bad_point)]
    orphaned_b = [write for read, write in valid_blocks(CHAIN_TOTAL, B_READ, B_WRITE)
                  if any(read.intersects(failed) for failed in failed_a)]
    c_blocks = valid_blocks(c_total, c_read, c_write)
    orphaned_c = {roi_key(write) for read, write in c_blocks
                  if any(read.intersects(orphan) for orphan in orphaned_b)}
    assert len(failed_a) == 1 and orphaned_b and orphaned_c

    assert not result
    assert set(result) == {"A", "B", "C"}
    assert result["A"].failed_count == 1
    assert result["B"].orphaned_count == len(orphaned_b)
    assert result["C"].orphaned_count == len(orphaned_c)
    assert result["C"].failed_count == 0
    assert result["C"].completed_count == len(c_blocks) - len(orphaned_c)
    assert {roi_key(write) for write in processed_c} == (
        {roi_key(write) for _, write in c_blocks} - orphaned_c)


def test_rerunning_a_chain_with_check_functions_finishes_failed_and_orphaned_blocks():
    raw = np.random.default_rng(4).integers(0, 100, size=SHAPE).astype(np.float64)
    a_out = np.full(SHAPE, np.nan)
    b_out = np.full(SHAPE, np.nan)
    log = []
    bad_point = Coordinate((19, 3))
    first_run = True

    def a_fails(block):
        return first_run and block.write_roi.contains(bad_point)

    def written(array):
        def check(block):
            return not np.isnan(array[roi_slices(block.write_roi, CHAIN_TOTAL)]).any()
        return check

    chain_a, chain_b = make_chain(raw, a_out, b_out, log, a_fails=a_fails, b_conflict=False)

    def make_tasks():
        task_a = daisy.Task("A", total_roi=CHAIN_TOTAL, read_roi=A_BLOCK, write_roi=A_BLOCK,
                            process_function=chain_a.process_function,
                            check_function=written(a_out), max_retries=0)
        task_b = daisy.Task("B", total_roi=CHAIN_TOTAL, read_roi=B_READ, write_roi=B_WRITE,
                            process_function=chain_b.process_function,
                            check_function=written(b_out), read_write_conflict=False,
                            upstream_tasks=[task_a])
        return task_b

    failed_a = [write for _, write in valid_blocks(CHAIN_TOTAL, A_BLOCK, A_BLOCK)
                if write.contains(bad_point)]
    b_blocks = valid_blocks(CHAIN_TOTAL, B_READ, B_WRITE)
    orphaned = {roi_key(write) for read, write in b_blocks
                if any(read.intersects(failed) for failed in failed_a)}
    assert len(failed_a) == 1 and orphaned

    result = daisy.run_blockwise([make_tasks()], multiprocessing=False)
    assert not result
    assert result["A"].failed_count == 1
    assert result["B"].orphaned_count == len(orphaned)

    first_run = False
    log.clear()
    result = daisy.run_blockwise([make_tasks()], multiprocessing=False)
    assert result
    assert [roi_key(write) for kind, _, write in log if kind == "A"] == [
        roi_key(failed_a[0])]
    assert {roi_key(write) for kind, _, write in log if kind == "B"} == orphaned
    assert result["A"].skipped_count == 23
    assert result["B"].skipped_count == len(b_blocks) - len(orphaned)
    assert result["A"].completed_count == 24
    assert result["B"].completed_count == len(b_blocks)
    np.testing.assert_array_equal(a_out, raw + 1)
    np.testing.assert_array_equal(b_out[2:34, 2:50], box_sum(raw + 1, 5))


# ------------------------------------------------------------- result and API shape
def test_result_truthiness_and_return_states(capsys):
    def ok(block):
        pass

    def make(task_id, process_function):
        return daisy.Task(task_id, total_roi=Roi((0,), (10,)), read_roi=Roi((0,), (2,)),
                          write_roi=Roi((0,), (2,)), process_function=process_function,
                          max_retries=0)

    if daisy.run_blockwise([make("fine", ok)], multiprocessing=False):
        succeeded = True
    else:
        succeeded = False
    assert succeeded

    states = daisy.run_blockwise([make("fine", ok)], multiprocessing=False,
                                 return_states=True)
    assert states
    assert states["fine"].completed_count == 5
    assert states["fine"].failed_count == 0

    def half_broken(block):
        if block.write_roi.begin[0] >= 6:
            raise RuntimeError("broken")

    result = daisy.run_blockwise([make("a", half_broken), make("b", ok)],
                                 multiprocessing=False, return_states=True)
    assert not result
    assert result["a"].failed_count == 2
    assert result["a"].completed_count == 3
    assert result["b"].failed_count == 0
    assert result["b"].completed_count == 5
    summary = capsys.readouterr().out
    assert summary_counts(summary, "a")["failed"] == 2
    assert summary_counts(summary, "b")["failed"] == 0


def test_task_accepts_positional_and_daisy_keyword_arguments():
    calls = []
    attempts = Counter()

    def process_function(block):
        attempts[block.write_roi.begin[0]] += 1
        if block.write_roi.begin[0] == 97:
            raise RuntimeError("the overhanging block fails")

    def init_callback_fn(context):
        calls.append(context)

    # every argument positional, in daisy's order
    task = daisy.Task(
        "positional", REFERENCE_TOTAL, REFERENCE_READ, REFERENCE_WRITE, process_function,
        None, init_callback_fn, False, 2, 1, "overhang", None, None)
    assert task.task_id == "positional"
    result = daisy.run_blockwise(task, multiprocessing=False)
    assert result["positional"].total_block_count == 20  # fit="overhang"
    assert result["positional"].failed_count == 1
    assert attempts[97] == 2  # max_retries=1
    assert len(calls) == 1

    # name positional, the rest by keyword, including max_worker_restarts
    task = daisy.Task(
        "keywords",
        total_roi=REFERENCE_TOTAL,
        read_roi=REFERENCE_READ,
        write_roi=REFERENCE_WRITE,
        process_function=lambda block: None,
        check_function=None,
        init_callback_fn=None,
        read_write_conflict=True,
        num_workers=3,
        max_retries=2,
        fit="shrink",
        timeout=60,
        upstream_tasks=None,
        max_worker_restarts=4,
    )
    result = daisy.run_blockwise([task], multiprocessing=False)
    assert result
    assert result["keywords"].total_block_count == 20


def test_init_callback_called_once_per_task_with_a_context():
    events = []

    def init_a(context):
        events.append(("init", "A", context))

    def init_b(context):
        events.append(("init", "B", context))

    def process(block):
        events.append(("block", block.task_id, None))

    task_a = daisy.Task("A", total_roi=Roi((0, 0), (8, 8)), read_roi=Roi((0, 0), (4, 4)),
                        write_roi=Roi((0, 0), (4, 4)), process_function=process,
                        init_callback_fn=init_a)
    task_b = daisy.Task("B", total_roi=Roi((0, 0), (8, 8)), read_roi=Roi((0, 0), (4, 4)),
                        write_roi=Roi((0, 0), (2, 2)), process_function=process,
                        init_callback_fn=init_b, upstream_tasks=[task_a])
    result = daisy.run_blockwise([task_b], multiprocessing=False)
    assert result

    inits = [event for event in events if event[0] == "init"]
    assert sorted(task_id for _, task_id, _ in inits) == ["A", "B"]
    for _, task_id, context in inits:
        assert context is not None
        assert context["task_id"] == task_id
        first_block = next(i for i, event in enumerate(events)
                           if event[0] == "block" and event[1] == task_id)
        assert events.index(("init", task_id, context)) < first_block
    assert Counter(task_id for kind, task_id, _ in events if kind == "block") == {
        "A": 4, "B": 9}


def test_block_attributes():
    total_roi = Roi((10, 20), (30, 40))
    read_roi = Roi((0, 0), (10, 10))
    write_roi = Roi((3, 3), (4, 4))
    seen = []

    def process_function(block):
        assert isinstance(block, daisy.Block)
        assert isinstance(block.read_roi, Roi)
        assert isinstance(block.write_roi, Roi)
        assert block.status == BlockStatus.PROCESSING
        assert block.read_roi.contains(block.write_roi)
        assert block.read_roi.shape == read_roi.shape  # fit="valid"
        assert block.write_roi.shape == write_roi.shape
        assert block.write_roi.begin - block.read_roi.begin == Coordinate((3, 3))
        assert total_roi.contains(block.read_roi)
        seen.append(block)

    def run_once():
        seen.clear()
        task = daisy.Task("attrs", total_roi=total_roi, read_roi=read_roi,
                          write_roi=write_roi, process_function=process_function)
        result = daisy.run_blockwise([task], multiprocessing=False)
        assert result
        ids = {}
        for block in seen:
            task_id, index = block.block_id
            assert task_id == "attrs" == block.task_id
            assert isinstance(index, int)
            ids[roi_key(block.write_roi)] = block.block_id
        assert len(ids) == len(seen) == result["attrs"].total_block_count
        assert len(set(ids.values())) == len(ids)  # one id per block
        return ids

    expected = {roi_key(write) for _, write in valid_blocks(total_roi, read_roi, write_roi)}
    first = run_once()
    assert set(first) == expected
    second = run_once()
    assert second == first  # same write ROI -> same block id, run after run
