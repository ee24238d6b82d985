"""The user's handle on a run: ``luigi-daisy status``, ``reset``, ``skip`` and
``rerun-block`` (issue 20, part 4).

Every test runs the chain of ``ledger_place_tasks`` (Raw -> Smooth -> Pieces -> Collect,
3 x 3 blocks of 10 x 10) with the real ``luigi`` command, then the real ``luigi-daisy``
command (``python -m luigi_daisy.cli``, a subprocess) on its output folder, and runs the
chain again; ``calls.txt`` counts the blocks each run processed, by family and block id.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from funlib.geometry import Roi
from test_luigi_layer import luigi_env, run_luigi, start_luigi, stop_group, write_config

from luigi_daisy.blocks import BlockGrid, daisy_block_id
from luigi_daisy.ledger import find_ledgers, read_ledger_summary

pytestmark = pytest.mark.timeout(240)

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import ledger_place_tasks  # noqa: E402
from ledger_place_tasks import BLOCK, CONTEXT, SIZE  # noqa: E402

FAMILIES = ["Raw", "Smooth", "Pieces", "Collect"]
WAIT = 60.0


# --------------------------------------------------------------------------- helpers
def chain_args(task: str = "Collect", *extra: str) -> list[str]:
    return ["--module", "ledger_place_tasks", task, "--folder", "out", "--local-scheduler",
            "--retcode-task-failed", "3", "--retcode-missing-data", "4",
            "--retcode-unhandled-exception", "5", "--retcode-scheduling-error", "6", *extra]


def setup_run(tmp_path: Path) -> None:
    write_config(tmp_path, {"luigi_daisy": {"ledger_dir": "ledgers", "log_dir": "logs"}})
    (tmp_path / "out").mkdir()


def run_chain(tmp_path: Path, log_name: str, expect: int = 0) -> str:
    returncode, output = run_luigi(tmp_path, chain_args(), log_name, extra_path=TESTS)
    assert returncode == expect, output[-4000:]
    return output


def calls(tmp_path: Path) -> collections.Counter:
    """``(family, block id) -> times processed`` since the last :func:`forget_calls`."""
    path = tmp_path / "out" / "calls.txt"
    if not path.exists():
        return collections.Counter()
    return collections.Counter((line.split()[0], int(line.split()[1]))
                               for line in path.read_text().splitlines())


def forget_calls(tmp_path: Path) -> None:
    (tmp_path / "out" / "calls.txt").unlink(missing_ok=True)


def cli(tmp_path: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luigi_daisy.cli", *args], cwd=tmp_path,
                          env=luigi_env(tmp_path, TESTS), capture_output=True, text=True,
                          input=stdin, timeout=WAIT)


def task_id(tmp_path: Path, family: str) -> str:
    ids = [read_ledger_summary(path)["task_id"] for path in all_records(tmp_path)]
    (found,) = [each for each in ids if each.startswith(f"{family}_")]
    return found


def all_records(tmp_path: Path) -> list[Path]:
    out = tmp_path / "out"
    return [record for folder in (out / ".luigi_daisy", *(
        out / f"{name}.zarr" / ".luigi_daisy" for name in ("raw", "smooth", "collect")))
        for record in find_ledgers(folder)]


def grid_of(family: str) -> BlockGrid:
    task = getattr(ledger_place_tasks, family)(folder="out")
    return BlockGrid(task.total_roi(), task.read_roi(), task.write_roi(), task.fit)


def ids_meeting(family: str, roi: Roi, read: bool) -> set[int]:
    """Daisy ids of the blocks of ``family`` whose read (write) ROI meets ``roi``,
    found by asking every block (not by the command's arithmetic)."""
    grid = grid_of(family)
    return {daisy_block_id(grid, index) for index in range(grid.id_strides[0] * grid.grid_shape[0])
            if grid.contains_position(grid.position_of(index))
            and grid.rois_of(index)[0 if read else 1].intersects(roi)}


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("luigi-daisy: error: "), result.stderr
    return lines[0]


# --------------------------------------------------------------------------- reset
def test_reset_marks_a_region_not_done_and_the_next_run_recomputes_exactly_it(tmp_path):
    setup_run(tmp_path)
    run_chain(tmp_path, "first.log")
    forget_calls(tmp_path)
    smooth = task_id(tmp_path, "Smooth")

    result = cli(tmp_path, "reset", "out", "--roi", "[0:10, 0:10]", "--task", smooth)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"reset 1 blocks of task {smooth}"
    run_chain(tmp_path, "after-reset.log")
    assert calls(tmp_path) == {("Smooth", 0): 1}

    # a region that straddles blocks: every block whose write ROI it meets
    forget_calls(tmp_path)
    roi = Roi((5, 15), (10, 10))
    result = cli(tmp_path, "reset", "out", "--roi", "[5:15, 15:25]", "--task", smooth)
    expected = ids_meeting("Smooth", roi, read=False)
    assert len(expected) == 4
    assert result.stdout.strip() == f"reset 4 blocks of task {smooth}", result.stderr
    run_chain(tmp_path, "after-second-reset.log")
    assert calls(tmp_path) == {("Smooth", number): 1 for number in expected}


def test_reset_downstream_recomputes_the_blocks_that_read_the_reset_ones(tmp_path):
    setup_run(tmp_path)
    run_chain(tmp_path, "first.log")
    forget_calls(tmp_path)
    raw = task_id(tmp_path, "Raw")

    result = cli(tmp_path, "reset", "out", "--roi", "[0:10, 0:10]", "--task", raw,
                 "--downstream")
    assert result.returncode == 0, result.stderr
    # Raw's block 0 writes [0:10, 0:10]; Smooth's blocks read 2 more on each side, so
    # four of them read it; Pieces and Collect read exactly what they write
    raw_ids = ids_meeting("Raw", Roi((0, 0), (10, 10)), read=False)
    smooth_ids = ids_meeting("Smooth", Roi((0, 0), (10, 10)), read=True)
    covered = Roi((0, 0), (20, 20))
    pieces_ids = ids_meeting("Pieces", covered, read=True)
    collect_ids = ids_meeting("Collect", covered, read=True)
    assert (len(raw_ids), len(smooth_ids), len(pieces_ids), len(collect_ids)) == (1, 4, 4, 4)
    for family, ids in (("Raw", raw_ids), ("Smooth", smooth_ids), ("Pieces", pieces_ids),
                        ("Collect", collect_ids)):
        assert f"reset {len(ids)} blocks of task {task_id(tmp_path, family)}" in result.stdout
    run_chain(tmp_path, "after-reset.log")
    expected = {(family, number): 1 for family, ids in (
        ("Raw", raw_ids), ("Smooth", smooth_ids), ("Pieces", pieces_ids),
        ("Collect", collect_ids)) for number in ids}
    assert calls(tmp_path) == expected
    assert CONTEXT == 2 and SIZE == 3 * BLOCK  # what the counts above assume


# --------------------------------------------------------------------------- skip
def test_skip_records_a_region_done_and_the_run_never_runs_it(tmp_path):
    """A block that fails every time (a region outside the tissue) is skipped; the next
    run finishes without running it."""
    setup_run(tmp_path)
    raw_grid = grid_of("Raw")
    corner = daisy_block_id(raw_grid, raw_grid.index_of((2, 2)))
    (tmp_path / "out" / f"fail_Raw_{corner}").touch()
    run_chain(tmp_path, "first.log", expect=3)
    raw = task_id(tmp_path, "Raw")
    assert read_ledger_summary(all_records(tmp_path)[[
        read_ledger_summary(path)["task_id"] for path in all_records(tmp_path)].index(raw)])[
        "failed"] == 1

    result = cli(tmp_path, "skip", "out", "--roi", "[20:30, 20:30]", "--task", raw)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"recorded 1 blocks of task {raw} as done"), result.stdout
    again = cli(tmp_path, "skip", "out", "--roi", "[20:30, 20:30]", "--task", raw)
    assert again.stdout.startswith(f"recorded 0 blocks of task {raw}"), again.stdout

    forget_calls(tmp_path)
    run_chain(tmp_path, "after-skip.log")
    assert not [key for key in calls(tmp_path) if key[0] == "Raw"], calls(tmp_path)
    status = cli(tmp_path, "status", "out")
    assert status.returncode == 0 and "INCOMPLETE" not in status.stdout, status.stdout


# --------------------------------------------------------------------------- status
def test_status_shows_failed_blocks_with_their_log_while_a_run_writes_the_record(tmp_path):
    """A run (another process) holds Collect's other blocks while block 0 has failed:
    ``status`` reads the record the run is writing and shows the failure, the last line
    of its error and the worker log that holds the traceback."""
    setup_run(tmp_path)
    # no retry: the failure is final at once, while the other blocks are held
    write_config(tmp_path, {"luigi_daisy": {"ledger_dir": "ledgers", "log_dir": "logs"},
                            "Collect": {"max_retries": 0}})
    (tmp_path / "out" / "fail_Collect_0").touch()
    (tmp_path / "out" / "hold_Collect").touch()
    process = start_luigi(tmp_path, chain_args(), "held.log", extra_path=TESTS)
    try:
        deadline = time.monotonic() + WAIT
        shown = None
        while time.monotonic() < deadline and process.poll() is None:
            result = cli(tmp_path, "status", "out")
            if "block 0 " in result.stdout and "Collect" in result.stdout:
                shown = result
                break
            time.sleep(0.2)
        assert shown is not None, (tmp_path / "held.log").read_text()[-3000:]
        assert process.poll() is None  # the run was writing while status read it
        assert shown.returncode == 1, shown.stderr  # Collect is incomplete
        line = re.search(r"block 0 \(write roi [^)]*\)[^:]*: (.*)\n\s+log: (\S+)", shown.stdout)
        assert line, shown.stdout
        assert line.group(1) == "ValueError: block 0 of Collect is broken"
        log = Path(line.group(2))
        assert log.is_absolute() and log.is_file()
        text = log.read_text()
        assert "Traceback" in text and "block 0 of Collect is broken" in text
    finally:
        (tmp_path / "out" / "hold_Collect").unlink(missing_ok=True)
    try:
        assert process.wait(timeout=WAIT) == 3
    finally:
        stop_group(process)


# --------------------------------------------------------------------------- rerun-block
def test_rerun_block_runs_a_failed_block_here_and_records_it(tmp_path):
    setup_run(tmp_path)
    (tmp_path / "out" / "fail_Collect_4").touch()
    run_chain(tmp_path, "first.log", expect=3)
    collect = task_id(tmp_path, "Collect")

    # still broken: its output and traceback on the terminal, exit 1, record unchanged
    result = cli(tmp_path, "rerun-block", "out", "4", "--task", collect)
    assert result.returncode == 1
    assert "stdout of Collect block 4" in result.stdout
    assert "Traceback" in result.stderr
    assert "ValueError: block 4 of Collect is broken" in result.stderr
    status = cli(tmp_path, "status", "out/collect.zarr")
    assert "8 done, 1 failed" in status.stdout, status.stdout

    # --pdb stops where it failed
    result = cli(tmp_path, "rerun-block", "out", "4", "--task", collect, "--pdb",
                 stdin="p number\nq\n")
    assert result.returncode == 1
    assert "(Pdb) 4" in result.stdout, result.stdout

    # fixed: it runs in this process, is recorded as done, its failure forgotten
    (tmp_path / "out" / "fail_Collect_4").unlink()
    forget_calls(tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "luigi_daisy.cli", "rerun-block",
                                "out", "4", "--task", collect], cwd=tmp_path,
                               env=luigi_env(tmp_path, TESTS), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=WAIT)
    assert process.returncode == 0, stderr
    assert "stdout of Collect block 4" in stdout
    assert f"block 4 of task {collect} succeeded; recorded as done" in stdout
    assert [line.split() for line in (tmp_path / "out" / "calls.txt").read_text()
            .splitlines()] == [["Collect", "4", str(process.pid)]]
    status = cli(tmp_path, "status", "out/collect.zarr")
    assert status.returncode == 0 and "9 done, 0 failed" in status.stdout, status.stdout
    forget_calls(tmp_path)
    run_chain(tmp_path, "after.log")
    assert calls(tmp_path) == {}


# --------------------------------------------------------------------------- user errors
def test_user_errors_are_one_line_with_what_to_change(tmp_path):
    setup_run(tmp_path)
    run_chain(tmp_path, "first.log")
    raw = task_id(tmp_path, "Raw")
    record = next(path for path in all_records(tmp_path)
                  if read_ledger_summary(path)["task_id"] == raw)

    several = one_line_error(cli(tmp_path, "reset", "out", "--roi", "[0:10, 0:10]"))
    assert "holds 4 records; choose one with --task" in several
    assert all(task_id(tmp_path, family) in several for family in FAMILIES)
    for roi in ("0:10, 0:10", "[0:10; 0:10]", "[10:0, 0:10]", "[a:b, 0:10]", "[]"):
        error = one_line_error(cli(tmp_path, "reset", "out", "--roi", roi, "--task", raw))
        assert "'[0:512, 0:256, 0:512]'" in error, error
    error = one_line_error(cli(tmp_path, "skip", "out", "--roi", "[0:10]", "--task", raw))
    assert "1 dimensions, but task" in error and "has 2" in error
    error = one_line_error(cli(tmp_path, "reset", "out", "--roi", "[0:10, 0:10]", "--task",
                               "Nope_1"))
    assert "no record of task Nope_1" in error and raw in error
    error = one_line_error(cli(tmp_path, "rerun-block", str(record), "999"))
    assert "999 is not a block id of task" in error
    error = one_line_error(cli(tmp_path, "rerun-block", str(record), "seven"))
    assert "seven is not a block id" in error
    error = one_line_error(cli(tmp_path, "reset", str(record), "--roi", "[0:10, 0:10]",
                               "--downstream"))
    assert "--downstream needs the folder" in error
    error = one_line_error(cli(tmp_path, "status", "nowhere"))
    assert "no record of done blocks" in error
    error = one_line_error(cli(tmp_path, "reset", "out", "--task", raw, "--roi",
                               "[0:10, 0:10] (10, 20)"))
    assert "does not match the slices" in error
    assert os.path.exists(record)
    # funlib's way of printing a Roi (as status shows write ROIs) is read too
    result = cli(tmp_path, "reset", "out", "--task", raw, "--roi", "[0:10, 0:10] (10, 10)")
    assert result.returncode == 0 and result.stdout.strip() == f"reset 1 blocks of task {raw}"


def test_reset_downstream_follows_a_daisy_style_chain(tmp_path, monkeypatch):
    """``run_blockwise`` records which tasks each task reads too: ``reset --downstream``
    on its ledger folder reaches the task downstream, and the next run processes
    exactly the blocks reset (counted per block id)."""
    import luigi_daisy as daisy

    monkeypatch.chdir(tmp_path)
    processed: collections.Counter = collections.Counter()

    def tasks():
        up = daisy.Task("up", total_roi=Roi((0,), (100,)), read_roi=Roi((0,), (10,)),
                        write_roi=Roi((0,), (10,)),
                        process_function=lambda block: processed.update(
                            [("up", block.block_id[1])]), read_write_conflict=False)
        down = daisy.Task("down", total_roi=Roi((-5,), (110,)), read_roi=Roi((-5,), (20,)),
                          write_roi=Roi((0,), (10,)), upstream_tasks=[up],
                          process_function=lambda block: processed.update(
                              [("down", block.block_id[1])]), read_write_conflict=False)
        return [up, down]

    assert daisy.run_blockwise(tasks(), ledger_dir="ledgers", multiprocessing=False,
                               progress=False)
    assert sum(processed.values()) == 20
    result = cli(tmp_path, "reset", "ledgers", "--task", "up", "--roi", "[30:40]",
                 "--downstream")
    assert result.returncode == 0, result.stderr
    # up's block [30:40]; down's blocks read [k*10-5, k*10+15): k = 2, 3 and 4 read it
    grid = BlockGrid(Roi((-5,), (110,)), Roi((-5,), (20,)), Roi((0,), (10,)))
    expected_down = {daisy_block_id(grid, index) for index in range(grid.num_blocks)
                     if grid.rois_of(index)[0].intersects(Roi((30,), (10,)))}
    assert len(expected_down) == 3
    assert result.stdout.splitlines() == ["reset 1 blocks of task up",
                                          "reset 3 blocks of task down"]
    processed.clear()
    assert daisy.run_blockwise(tasks(), ledger_dir="ledgers", multiprocessing=False,
                               progress=False)
    up_grid = BlockGrid(Roi((0,), (100,)), Roi((0,), (10,)), Roi((0,), (10,)))
    assert processed == {("up", daisy_block_id(up_grid, 3)): 1,
                         **{("down", number): 1 for number in expected_down}}
