"""Crash and resume: SIGKILL the whole run at random points, rerun until it succeeds.

A driver script (written to ``tmp_path``) runs a 3D task of 6x6x6 blocks of 8^3 voxels
with ``run_blockwise(..., multiprocessing=True, ledger_dir=...)`` and 2 workers per task.
Every block writes a deterministic function of its voxel coordinates into a zarr array
(one chunk per block) and then appends one line ``<task> <block index> <pid>`` to a
side-effect file opened with ``O_APPEND``: one line per processing of a block. A small
per-block sleep makes the kills land mid-run.

The test starts the driver in a session of its own, waits (polling the side-effect file,
with a deadline) for a random amount of progress, and kills the process group (the block
server and every worker) with SIGKILL. Before each restart it reads the ledger's done
set from its files directly and checks that

* every block recorded as done has a side-effect line (no block is recorded as done
  before its process function returned);

and at the end, after the run finally reports success, that

* no block recorded as done before a kill was processed again after it;
* the final run reports as skipped exactly the blocks the ledger held;
* the arrays equal those of an uninterrupted run (and the expected values).

The chain variant runs ``a -> b``: ``b`` reads ``a``'s array with 8 voxels of context
and writes its own array; it is killed while both tasks are in flight.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr
from ledger_files import record_done, record_done_count

from luigi_daisy.ledger import ledger_path

pytestmark = pytest.mark.timeout(180)

SIDE = 6            # blocks along each axis
BLOCK = 8           # voxels of a block along each axis
SHAPE = (SIDE * BLOCK,) * 3
PROGRESS_DEADLINE = 40.0   # seconds to wait for the progress a kill waits for
RUN_DEADLINE = 90.0        # seconds a run to completion may take

DRIVER = textwrap.dedent('''
    """Crash-test driver: one 3D task (or a chain of two) writing zarr arrays."""
    import os
    import sys
    import time
    from pathlib import Path

    import numpy as np
    import zarr

    import luigi_daisy as daisy
    from luigi_daisy import Roi

    MODE, WORK, LEDGER = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    SLEEP = {"a": float(sys.argv[4]), "b": float(sys.argv[5])}
    SIDE, BLOCK = 6, 8
    SHAPE = (SIDE * BLOCK,) * 3
    _arrays = {}


    def a_values(begin, shape):
        z, y, x = (np.indices(shape) + np.asarray(begin).reshape(3, 1, 1, 1)).astype(np.int64)
        return ((z * 2311 + y * 113 + x * 7 + z * y * x) % 65521).astype(np.int32)


    def array(name):
        key = (os.getpid(), name)
        if key not in _arrays:
            _arrays[key] = zarr.open_array(WORK / f"{name}.zarr", mode="r+")
        return _arrays[key]


    def slices(begin, end):
        return tuple(slice(max(b, 0), min(e, n)) for b, e, n in zip(begin, end, SHAPE))


    def side_effect(task_id, block):
        descriptor = os.open(WORK / "lines", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(descriptor, f"{task_id} {block.index} {os.getpid()}\\n".encode())
        finally:
            os.close(descriptor)


    def process_a(block):
        write = block.write_roi
        time.sleep(SLEEP["a"] / 2)
        array("a")[slices(write.begin, write.end)] = a_values(tuple(write.begin),
                                                              tuple(write.shape))
        time.sleep(SLEEP["a"] / 2)
        side_effect("a", block)


    def process_b(block):
        read, write = block.read_roi, block.write_roi
        time.sleep(SLEEP["b"] / 2)
        source = array("a")
        context_sum = int(source[slices(read.begin, read.end)].astype(np.int64).sum())
        own = source[slices(write.begin, write.end)].astype(np.int64)
        array("b")[slices(write.begin, write.end)] = (2 * own + context_sum) % 1000003
        time.sleep(SLEEP["b"] / 2)
        side_effect("b", block)


    def main():
        zarr.open_array(WORK / "a.zarr", mode="a", shape=SHAPE, chunks=(BLOCK,) * 3,
                        dtype="int32", fill_value=0)
        if MODE == "single":
            # 4 voxels of context and read/write conflicts: resuming walks the conflict graph
            a = daisy.Task("a", total_roi=Roi((-4,) * 3, (SHAPE[0] + 8,) * 3),
                           read_roi=Roi((-4,) * 3, (BLOCK + 8,) * 3),
                           write_roi=Roi((0,) * 3, (BLOCK,) * 3),
                           process_function=process_a, read_write_conflict=True,
                           num_workers=2)
            tasks = [a]
        else:
            zarr.open_array(WORK / "b.zarr", mode="a", shape=SHAPE, chunks=(BLOCK,) * 3,
                            dtype="int64", fill_value=0)
            a = daisy.Task("a", total_roi=Roi((0,) * 3, SHAPE),
                           read_roi=Roi((0,) * 3, (BLOCK,) * 3),
                           write_roi=Roi((0,) * 3, (BLOCK,) * 3),
                           process_function=process_a, read_write_conflict=False,
                           num_workers=2)
            b = daisy.Task("b", total_roi=Roi((-BLOCK,) * 3, (SHAPE[0] + 2 * BLOCK,) * 3),
                           read_roi=Roi((-BLOCK,) * 3, (3 * BLOCK,) * 3),
                           write_roi=Roi((0,) * 3, (BLOCK,) * 3),
                           process_function=process_b, read_write_conflict=False,
                           upstream_tasks=[a], num_workers=2)
            tasks = [b]
        options = {"multiprocessing": True, "progress": False, "log_dir": WORK / "logs"}
        if LEDGER != "-":
            options["ledger_dir"] = LEDGER
        result = daisy.run_blockwise(tasks, **options)
        sys.stdout.flush()
        sys.exit(0 if result else 1)


    if __name__ == "__main__":
        main()
''')


# ---------------------------------------------------------------------------- expected
def expected_a() -> np.ndarray:
    z, y, x = np.indices(SHAPE).astype(np.int64)
    return ((z * 2311 + y * 113 + x * 7 + z * y * x) % 65521).astype(np.int32)


def expected_b(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.int64)
    b = np.zeros(SHAPE, dtype=np.int64)
    for position in np.ndindex(SIDE, SIDE, SIDE):
        write = tuple(slice(p * BLOCK, (p + 1) * BLOCK) for p in position)
        read = tuple(slice(max(p * BLOCK - BLOCK, 0), min((p + 2) * BLOCK, SHAPE[0]))
                     for p in position)
        b[write] = (2 * a[write] + a[read].sum()) % 1000003
    return b


# ---------------------------------------------------------------------------- helpers
class Driver:
    """Starts the driver script in a session of its own and kills its process group."""

    def __init__(self, tmp_path: Path, name: str, mode: str, ledger: bool,
                 sleep_a: float, sleep_b: float = 0.0) -> None:
        self.script = tmp_path / "driver.py"
        if not self.script.exists():
            self.script.write_text(DRIVER)
        self.work = tmp_path / name
        self.work.mkdir()
        self.ledgers = self.work / "ledgers"
        self.mode = mode
        self.ledger = ledger
        self.sleeps = (sleep_a, sleep_b)
        self.runs = 0
        self.process: subprocess.Popen | None = None
        self.output: Path | None = None

    def start(self) -> subprocess.Popen:
        self.runs += 1
        self.output = self.work / f"run{self.runs}.out"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.output, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, str(self.script), self.mode, str(self.work),
                 str(self.ledgers) if self.ledger else "-", str(self.sleeps[0]),
                 str(self.sleeps[1])],
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=self.work, env=env)
        return self.process

    def kill(self) -> None:
        """SIGKILL the whole process group and wait until none of it runs any more."""
        process = self.process
        assert process is not None
        group = process.pid  # start_new_session: the driver leads its own group
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while live_members(group):
            assert time.monotonic() < deadline, f"group {group} survived SIGKILL"
            time.sleep(0.01)

    def run_to_end(self) -> int:
        """Start the driver and wait for it to exit; return its exit code."""
        process = self.start()
        try:
            return process.wait(timeout=RUN_DEADLINE)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the run did not finish in {RUN_DEADLINE} s:\n"
                                 f"{self.output.read_text()[-3000:]}") from None

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()
        elif self.process is not None:
            for pid in live_members(self.process.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def lines(self) -> list[tuple[str, int]]:
        """``(task_id, block index)`` of every processing recorded so far."""
        path = self.work / "lines"
        if not path.exists():
            return []
        lines = []
        for line in path.read_text().splitlines():
            task_id, index, _ = line.split()
            lines.append((task_id, int(index)))
        return lines

    def ledger_done(self, task_ids) -> dict[str, set[int]]:
        """The done set of each task's ledger, read from its files directly."""
        return {task_id: read_done(ledger_path(self.ledgers, task_id)) for task_id in task_ids}

    def skipped(self, task_id: str) -> int:
        text = self.output.read_text()
        section = re.search(rf"Task {task_id}:(.*?)(?=\n\s*Task \S+:|\Z)", text, re.DOTALL)
        assert section, text[-3000:]
        return int(re.search(r"skipped\s*(\d+)", section.group(1)).group(1))


def live_members(group: int) -> list[int]:
    """Processes of process group ``group`` that are not zombies."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                stat = file.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == group and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def read_done(path: Path) -> set[int]:
    """Done blocks of a ledger record; empty if the run was killed before creating it."""
    return record_done(path)


def done_count(path: Path) -> int:
    """How many blocks a (possibly live) ledger holds; 0 while it is being created."""
    return record_done_count(path)


def wait_for(condition, driver: Driver, what: str) -> bool:
    """Poll ``condition()`` until true (True) or the driver exits (False); with a deadline."""
    deadline = time.monotonic() + PROGRESS_DEADLINE
    while not condition():
        if driver.process.poll() is not None:
            return False
        if time.monotonic() > deadline:
            driver.kill()
            raise AssertionError(f"no progress ({what}) in {PROGRESS_DEADLINE} s:\n"
                                 f"{driver.output.read_text()[-3000:]}")
        time.sleep(0.005)
    return True


def status_of(ledgers: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luigi_daisy.cli", "status", str(ledgers)],
                          capture_output=True, text=True, timeout=60, check=False)


def check_recorded_blocks_finished(driver: Driver, done: dict[str, set[int]]) -> None:
    """Every block the ledger calls done has a side-effect line."""
    finished = Counter(driver.lines())
    for task_id, indices in done.items():
        unfinished = sorted(index for index in indices if not finished[(task_id, index)])
        assert not unfinished, (
            f"task {task_id}: blocks {unfinished[:10]} are recorded as done but their "
            f"process function never returned")


def check_no_rework(driver: Driver, snapshots: list[tuple[int, dict[str, set[int]]]]) -> None:
    """No block recorded as done before a kill was processed after it."""
    lines = driver.lines()
    for kill, (line_count, done) in enumerate(snapshots, 1):
        again = [(task_id, index) for task_id, index in lines[line_count:]
                 if index in done.get(task_id, ())]
        assert not again, (f"blocks recorded as done before kill {kill} were processed again "
                           f"after it: {again[:10]}")


def reference_run(tmp_path: Path, mode: str, sleep_a: float, sleep_b: float,
                  task_ids) -> tuple[Driver, dict[str, set[int]]]:
    """An uninterrupted run without a ledger; returns it and every block index per task."""
    driver = Driver(tmp_path, "reference", mode, ledger=False, sleep_a=sleep_a,
                    sleep_b=sleep_b)
    try:
        assert driver.run_to_end() == 0, driver.output.read_text()[-3000:]
    finally:
        driver.cleanup()
    lines = driver.lines()
    counts = Counter(lines)
    assert set(counts.values()) == {1}, "an uninterrupted run processes each block once"
    blocks = {task_id: {index for tid, index in lines if tid == task_id} for task_id in task_ids}
    assert all(len(indices) == SIDE**3 for indices in blocks.values()), blocks
    assert not (driver.work / "ledgers").exists(), "no ledger without ledger_dir"
    return driver, blocks


def finish(driver: Driver, task_ids, all_blocks: dict[str, set[int]],
           snapshots: list[tuple[int, dict[str, set[int]]]]) -> None:
    """Rerun until the driver reports success; check the ledger and the rework rules."""
    for attempt in range(3):
        before = driver.ledger_done(task_ids)
        line_count = len(driver.lines())
        code = driver.run_to_end()
        for task_id in task_ids:
            assert driver.skipped(task_id) == len(before[task_id]), (
                f"task {task_id}: the ledger held {len(before[task_id])} done blocks, the "
                f"summary reports {driver.skipped(task_id)} skipped")
        if code == 0:
            snapshots.append((line_count, before))
            break
    else:
        raise AssertionError(f"no successful run in 3 attempts:\n"
                             f"{driver.output.read_text()[-3000:]}")
    done = driver.ledger_done(task_ids)
    assert done == all_blocks, "after success every block is recorded as done"
    check_recorded_blocks_finished(driver, done)
    check_no_rework(driver, snapshots)
    processed = {task_id: {index for tid, index in driver.lines() if tid == task_id}
                 for task_id in task_ids}
    assert processed == all_blocks
    status = status_of(driver.ledgers)
    assert status.returncode == 0, status


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("seed", [11])
def test_single_task_survives_sigkill_of_the_whole_run(tmp_path, seed):
    rng = random.Random(seed)
    sleep = 0.02
    reference, all_blocks = reference_run(tmp_path, "single", sleep, 0.0, ["a"])
    reference_a = zarr.open_array(reference.work / "a.zarr", mode="r")[:]
    np.testing.assert_array_equal(reference_a, expected_a())

    driver = Driver(tmp_path, "crashed", "single", ledger=True, sleep_a=sleep)
    snapshots: list[tuple[int, dict[str, set[int]]]] = []
    kills = 0
    try:
        # ("lines", low, high): kill after that many new side-effect lines, wherever the
        # ledger stands; ("ledger", low, high): first wait until the ledger recorded more
        # blocks than at the last kill (a batch was flushed), then as many new lines
        plan = [("lines", 1, 5), ("ledger", 1, 40), ("lines", 10, 60), ("ledger", 5, 60),
                ("lines", 5, 40)]
        path = ledger_path(driver.ledgers, "a")
        for kind, low, high in plan:
            recorded = done_count(path)
            driver.start()
            if kind == "ledger" and not wait_for(lambda: done_count(path) > recorded,
                                                 driver, "a ledger flush"):
                break
            target = len(driver.lines()) + rng.randint(low, high)
            if not wait_for(lambda: len(driver.lines()) >= target, driver, f"{target} lines"):
                break  # finished before the kill point: nothing left to kill
            driver.kill()
            kills += 1
            done = driver.ledger_done(["a"])
            check_recorded_blocks_finished(driver, done)
            if snapshots:
                assert done["a"] >= snapshots[-1][1]["a"], "the ledger lost done blocks"
            snapshots.append((len(driver.lines()), done))
            print(f"kill {kills} ({kind}): {len(driver.lines())} lines, {len(done['a'])} "
                  f"done in the ledger")
            status = status_of(driver.ledgers)
            if done["a"]:
                assert status.returncode == 1, status
                assert f"{len(done['a'])} done" in status.stdout, status.stdout
        assert kills >= 3, f"only {kills} kills landed mid-run"
        assert any(done["a"] for _, done in snapshots[1:]), "no kill came after a flush"
        finish(driver, ["a"], all_blocks, snapshots)
    finally:
        driver.cleanup()

    lines = Counter(driver.lines())
    assert sum(lines.values()) >= SIDE**3
    crashed_a = zarr.open_array(driver.work / "a.zarr", mode="r")[:]
    np.testing.assert_array_equal(crashed_a, reference_a)


@pytest.mark.parametrize("seed", [5])
def test_chain_survives_sigkill_while_both_tasks_are_in_flight(tmp_path, seed):
    rng = random.Random(seed)
    sleep_a, sleep_b = 0.04, 0.01
    reference, all_blocks = reference_run(tmp_path, "chain", sleep_a, sleep_b, ["a", "b"])
    reference_a = zarr.open_array(reference.work / "a.zarr", mode="r")[:]
    reference_b = zarr.open_array(reference.work / "b.zarr", mode="r")[:]
    np.testing.assert_array_equal(reference_a, expected_a())
    np.testing.assert_array_equal(reference_b, expected_b(expected_a()))

    driver = Driver(tmp_path, "crashed", "chain", ledger=True, sleep_a=sleep_a,
                    sleep_b=sleep_b)
    snapshots: list[tuple[int, dict[str, set[int]]]] = []
    both_in_flight = 0
    try:
        # as in the single-task test; the "ledger" kills wait for b's ledger to grow
        plan = [("lines", 5, 50), ("ledger", 1, 20), ("lines", 5, 50), ("ledger", 1, 20)]
        path_b = ledger_path(driver.ledgers, "b")
        for kind, low, high in plan:
            start_lines = len(driver.lines())
            recorded = done_count(path_b)

            def b_progress() -> int:
                return sum(1 for task_id, _ in driver.lines()[start_lines:] if task_id == "b")

            driver.start()
            if kind == "ledger" and not wait_for(lambda: done_count(path_b) > recorded,
                                                 driver, "a flush of b's ledger"):
                break
            b_target = b_progress() + rng.randint(low, high)
            if not wait_for(lambda: b_progress() >= b_target, driver, f"{b_target} b lines"):
                break
            driver.kill()
            lines = driver.lines()
            a_finished = {index for task_id, index in lines if task_id == "a"}
            if len(a_finished) < SIDE**3:
                both_in_flight += 1
            done = driver.ledger_done(["a", "b"])
            check_recorded_blocks_finished(driver, done)
            if snapshots:
                for task_id in ("a", "b"):
                    assert done[task_id] >= snapshots[-1][1][task_id]
            snapshots.append((len(lines), done))
            print(f"kill {len(snapshots)} ({kind}): a finished {len(a_finished)}, b lines "
                  f"{b_progress()}, ledger a {len(done['a'])} b {len(done['b'])}")
        assert len(snapshots) >= 2, "fewer than two kills landed mid-run"
        assert both_in_flight >= 1, "no kill landed while both tasks had blocks to do"
        assert any(done["a"] and done["b"] for _, done in snapshots), (
            "no kill came after both tasks had blocks recorded")
        finish(driver, ["a", "b"], all_blocks, snapshots)
    finally:
        driver.cleanup()

    crashed_a = zarr.open_array(driver.work / "a.zarr", mode="r")[:]
    crashed_b = zarr.open_array(driver.work / "b.zarr", mode="r")[:]
    np.testing.assert_array_equal(crashed_a, reference_a)
    np.testing.assert_array_equal(crashed_b, reference_b)
