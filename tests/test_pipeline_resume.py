"""A pipelined Luigi run killed mid-way resumes from its ledgers.

The example pipeline (``examples/pipeline.py``: Raw -> Smooth -> two Thresholds ->
Reports) runs through the ``luigi`` command, started in a session of its own, with slow
blocks. Once both Smooth and a Threshold have blocks recorded in their ledgers, the whole
process group (Luigi, its worker processes, the block workers) gets SIGKILL. The run is
started again and must finish with arrays equal to those of an uninterrupted run, without
processing again any block the ledgers recorded as done before the kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr
from ledger_files import record_done, record_manifest

from luigi_daisy.cli import find_records

pytestmark = pytest.mark.timeout(150)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SIZE, BLOCK_SIZE = 32, 8
EXAMPLE_BLOCKS = (SIZE // BLOCK_SIZE) ** 3
LEVELS = (0.5, 0.7)
RUN_DEADLINE = 90.0        # seconds a run to completion may take
PROGRESS_DEADLINE = 60.0   # seconds to wait for the progress the kill waits for
EXIT_DEADLINE = 15.0       # seconds the killed processes may take to disappear


def write_config(folder: Path, block_seconds: float) -> None:
    stage = f"events_file = {folder / 'events.log'}\nblock_seconds = {block_seconds}\n"
    (folder / "luigi.cfg").write_text(
        "[luigi_daisy]\nnum_workers = 2\nledger_dir = ledgers\nlog_dir = logs\n\n"
        f"[Smooth]\n{stage}\n[Threshold]\n{stage}")


def start_pipeline(folder: Path, log_name: str) -> subprocess.Popen:
    beside = Path(sys.executable).parent / "luigi"
    command = [str(beside)] if beside.exists() else ["luigi"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), str(REPO), env.get("PYTHONPATH", "")])
    env["LUIGI_CONFIG_PATH"] = str(folder / "luigi.cfg")
    log = open(folder / log_name, "wb")  # noqa: SIM115 - the child keeps its own copy
    try:
        return subprocess.Popen(
            command + ["--module", "pipeline", "AllReports", "--size", str(SIZE),
                       "--block-size", str(BLOCK_SIZE), "--local-scheduler", "--workers", "1",
                       "--retcode-task-failed", "3"],
            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    finally:
        log.close()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the whole process group and wait until none of it is left."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=EXIT_DEADLINE)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + EXIT_DEADLINE
    while group_members(process.pid):
        if time.monotonic() > deadline:
            pytest.fail(f"processes {group_members(process.pid)} survived SIGKILL")
        time.sleep(0.05)


def run_to_completion(folder: Path, log_name: str) -> None:
    process = start_pipeline(folder, log_name)
    try:
        returncode = process.wait(timeout=RUN_DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the pipeline did not finish in {RUN_DEADLINE} s:\n"
                    f"{(folder / log_name).read_text()[-5000:]}")
    finally:
        kill_group(process)
    assert returncode == 0, (folder / log_name).read_text()[-5000:]


def ledger_done(folder: Path) -> dict[str, set[int]]:
    """``task_id -> blocks recorded as done`` from every ledger below ``folder`` (the
    tasks keep them with the arrays they write)."""
    done = {}
    for path in find_records(folder):
        manifest = record_manifest(path)
        if manifest is None:  # being created right now
            continue
        task_id, blocks = manifest["task_id"], record_done(path)
        done[task_id] = blocks
    return done


def events(folder: Path) -> list[tuple[str, str, int]]:
    """``(family, task_id, block)`` per processed block, in the order written."""
    path = folder / "events.log"
    if not path.exists():
        return []
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(family, task_id, int(block)) for family, task_id, block, *_ in lines]


def outputs(folder: Path) -> dict[str, np.ndarray]:
    data = folder / "pipeline_data"
    names = ["raw.zarr", "smoothed.zarr"] + [f"mask_{level:g}.zarr" for level in LEVELS]
    return {name: zarr.open_array(str(data / name), mode="r")[:] for name in names}


def test_a_killed_pipelined_run_resumes_from_its_ledgers(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    write_config(reference, block_seconds=0.0)
    run_to_completion(reference, "luigi.log")

    work = tmp_path / "interrupted"
    work.mkdir()
    write_config(work, block_seconds=0.1)
    process = start_pipeline(work, "killed.log")
    try:
        deadline = time.monotonic() + PROGRESS_DEADLINE
        while True:
            assert process.poll() is None, (work / "killed.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "the run did not get far enough to be killed"
            done = ledger_done(work)
            recorded = {task_id.split("_")[0] for task_id, blocks in done.items() if blocks}
            if {"Smooth", "Threshold"} <= recorded:
                break
            time.sleep(0.05)
    finally:
        kill_group(process)

    done_before = ledger_done(work)
    processed_before = events(work)
    # the kill interrupted the pipeline: some blocks of some task are not done
    assert sum(len(blocks) for blocks in done_before.values()) < 3 * EXAMPLE_BLOCKS
    # a block is recorded as done only after it was processed
    processed_set = {(task_id, block) for _, task_id, block in processed_before}
    for task_id, blocks in done_before.items():
        assert {(task_id, block) for block in blocks} <= processed_set, task_id

    write_config(work, block_seconds=0.0)
    run_to_completion(work, "resumed.log")

    processed_after = events(work)[len(processed_before):]
    again = [(task_id, block) for _, task_id, block in processed_after
             if block in done_before.get(task_id, set())]
    assert not again, f"blocks done before the kill were processed again: {again[:10]}"

    done_after = ledger_done(work)
    assert len(done_after) == 3
    for task_id, blocks in done_after.items():
        assert blocks == set(range(EXAMPLE_BLOCKS)), task_id
    # after the resumed run, every block not done before the kill was processed once
    counts = Counter((task_id, block) for _, task_id, block in processed_after)
    for task_id, blocks in done_after.items():
        missing = blocks - done_before.get(task_id, set())
        assert {key for key in counts if key[0] == task_id} <= {
            (task_id, block) for block in blocks}
        assert all(counts[(task_id, block)] == 1 for block in missing), task_id

    expected, resumed = outputs(reference), outputs(work)
    for name, array in expected.items():
        np.testing.assert_array_equal(resumed[name], array, err_msg=name)
    for level in LEVELS:
        name = f"report_{level:g}.json"
        ours = json.loads((work / "pipeline_data" / name).read_text())
        theirs = json.loads((reference / "pipeline_data" / name).read_text())
        assert ours["foreground"] == theirs["foreground"] > 0
