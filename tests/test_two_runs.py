"""Two ``run_blockwise`` calls of one task with one ``ledger_dir`` at once: real processes.

Each run claims the task with the lock ``BlockwiseTask`` takes (``luigi_daisy.claims``);
the second follows the first through its ledger, so every block runs once in total and
both return success. When the first is SIGKILLed mid-way, its lock frees and the second
takes the task over and finishes it. Executions are counted from lines each block
appends to a file (``O_APPEND``, one write).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from luigi_daisy.ledger import ledger_path, read_ledger_summary

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_stray_processes")]

BLOCKS = 16
DEADLINE = 90.0

SCRIPT = """\
import functools, os, sys, time
import luigi_daisy as daisy
from luigi_daisy import Roi


def note(events, seconds, block):
    descriptor = os.open(events, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(descriptor, f"{block.block_id[1]} {os.getpid()}\\n".encode())
    os.close(descriptor)
    time.sleep(seconds)


if __name__ == "__main__":
    folder, events, seconds, mode = sys.argv[1:5]
    task = daisy.Task("shared", total_roi=Roi((0,), (16,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)),
                      process_function=functools.partial(note, events, float(seconds)),
                      num_workers=2)
    result = daisy.run_blockwise([task], multiprocessing=mode == "workers", progress=False,
                                 ledger_dir=folder, worker_death_timeout=3)
    sys.exit(0 if result["shared"].succeeded else 1)
"""


def start_run(tmp_path: Path, mode: str, seconds: float, name: str) -> subprocess.Popen:
    script = tmp_path / "run_shared.py"
    script.write_text(SCRIPT)
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])]
        + [part for part in [os.environ.get("PYTHONPATH")] if part])
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    try:
        return subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "ledgers"),
             str(tmp_path / "events"), str(seconds), mode],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=environment)
    finally:
        log.close()


def events(tmp_path: Path) -> list[tuple[int, int]]:
    path = tmp_path / "events"
    if not path.exists():
        return []
    return [(int(index), int(pid)) for index, pid in
            (line.split() for line in path.read_text().splitlines())]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def finish(process: subprocess.Popen, tmp_path: Path, name: str) -> int:
    try:
        return process.wait(DEADLINE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"{name} did not end:\n{(tmp_path / f'{name}.log').read_text()}")


def wait_gone(pids: set[int]) -> None:
    """Workers of a killed run exit on their own (worker_death_timeout=3)."""
    deadline = time.monotonic() + 30
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"worker {pid} of the killed run outlived it")


@pytest.mark.parametrize("mode", ["workers", "in_process"])
def test_two_runs_of_one_task_run_each_block_once(tmp_path, mode):
    first = start_run(tmp_path, mode, 0.3, "first")
    second = start_run(tmp_path, mode, 0.3, "second")
    codes = finish(first, tmp_path, "first"), finish(second, tmp_path, "second")
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("first", "second")}
    assert codes == (0, 0), logs
    ran = Counter(index for index, _ in events(tmp_path))
    assert ran == Counter(range(BLOCKS)), f"{ran}\n{logs}"
    # one of them followed the other (whichever took the lock first)
    assert sum("following it" in log for log in logs.values()) == 1, logs
    summary = read_ledger_summary(ledger_path(tmp_path / "ledgers", "shared"))
    assert summary["done"] == BLOCKS


def test_the_second_run_takes_over_when_the_first_is_killed(tmp_path):
    first = start_run(tmp_path, "workers", 0.5, "first")
    try:
        wait_for(lambda: len(events(tmp_path)) >= 2, "the first run's first blocks")
        second = start_run(tmp_path, "workers", 0.5, "second")
        wait_for(lambda: "following it" in (tmp_path / "second.log").read_text(),
                 "the second run to follow the first")
        wait_for(lambda: len(events(tmp_path)) >= 6, "more blocks of the first run")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    first_pids = {pid for _, pid in events(tmp_path)}
    code = finish(second, tmp_path, "second")
    log = (tmp_path / "second.log").read_text()
    assert code == 0, log
    assert "taking it over" in log
    ran = Counter(index for index, _ in events(tmp_path))
    assert set(ran) == set(range(BLOCKS)), ran
    # only blocks that the killed run's workers held (2 workers, a block in hand each
    # beyond the one running) can have run twice
    assert sum(count - 1 for count in ran.values()) <= 4, ran
    assert read_ledger_summary(ledger_path(tmp_path / "ledgers", "shared"))["done"] == BLOCKS
    wait_gone(first_pids - {pid for _, pid in events(tmp_path)[-1:]})
    wait_gone(first_pids)
