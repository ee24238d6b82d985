"""The ledger's record on disk: one writer, readers in other processes, kill -9.

Real processes throughout: a writer process commits batches as fast as it can and is
SIGKILLed at random points (random generations, so anywhere in a commit: a chunk half
written, a manifest renamed but the folder not yet fsynced, ...); reader processes read
the record the whole time, as runs on other hosts do. What they must see:

- always a consistent prefix of the writer's commits: the done set and the failures of
  one commit, never a block done and then not done, never a torn or damaged file;
- never a ``-wal``, ``-shm`` or ``-journal`` file (no SQLite), only the record's own
  files;
- after each kill the next open works and holds at least everything a reader saw.

Also: conversion of SQLite ledgers (format 3, written by the code of the previous
version, kept as ``luigi_daisy._sqlite_ledger``), the shared interface (``origin``,
``record_done_many``, ``forget_done``, ``failed_blocks``, ``find_ledgers``,
``is_ledger``), followers (``done_since``) and the scheduler's packed path.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import luigi_daisy as daisy
from luigi_daisy import Roi, _sqlite_ledger
from luigi_daisy.blocks import PackedBlocks
from luigi_daisy.claims import LedgerFollower, TaskLock
from luigi_daisy.errors import LedgerError, SchedulerError
from luigi_daisy.ledger import (
    CHUNK_BLOCKS,
    MANIFEST,
    Ledger,
    LedgerSet,
    find_ledgers,
    is_ledger,
    ledger_path,
    legacy_path,
    read_ledger_summary,
)
from luigi_daisy.scheduler import BlockScheduler

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("no_stray_processes")]

DEADLINE = 60.0
#: blocks per chunk touched by one commit of the writer process
BATCH = 5000
#: the writer's commits touch these chunks (so a commit writes several files)
CHUNKS = (0, 1, 2)
#: the writer fails this block at its commit k: FAILED_BASE + k
FAILED_BASE = 3 * CHUNK_BLOCKS + 10
GEOMETRY = {"total_roi": [[0], [4 * CHUNK_BLOCKS]], "read_roi": [[0], [1]],
            "write_roi": [[0], [1]], "fit": "valid", "num_blocks": 4 * CHUNK_BLOCKS}

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from luigi_daisy.ledger import CHUNK_BLOCKS, Ledger
    path, geometry, batch, chunks, failed_base = (
        sys.argv[1], eval(sys.argv[2]), int(sys.argv[3]), eval(sys.argv[4]), int(sys.argv[5]))
    ledger = Ledger(path, "t", geometry)
    done = ledger.done_count()
    commit = done // (batch * len(chunks))
    assert done == commit * batch * len(chunks), done
    assert ledger.failed_count() == commit, (ledger.failed_count(), commit)
    print("opened", commit, flush=True)
    while True:
        for chunk in chunks:
            first = chunk * CHUNK_BLOCKS + commit * batch
            ledger.record_done_many(np.arange(first, first + batch))
        ledger.record_failed(failed_base + commit, f"error of commit {commit}")
        ledger.flush()
        commit += 1
""")

READER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from luigi_daisy.errors import LedgerError
    from luigi_daisy.ledger import CHUNK_BLOCKS, Ledger, read_ledger_summary
    path, geometry, batch, chunks, failed_base, stop_file, log = (
        sys.argv[1], eval(sys.argv[2]), int(sys.argv[3]), eval(sys.argv[4]),
        int(sys.argv[5]), sys.argv[6], sys.argv[7])
    out = open(log, "a", buffering=1)

    def commits_of(done):
        # which commit a done set is, or raise: it must be a prefix of the commits
        per_chunk = [done[(done >= c * CHUNK_BLOCKS) & (done < (c + 1) * CHUNK_BLOCKS)]
                     - c * CHUNK_BLOCKS for c in chunks]
        counts = {part.size for part in per_chunk}
        assert len(counts) == 1, f"chunks hold {sorted(counts)} blocks: not one commit"
        count = counts.pop()
        assert count % batch == 0, f"{count} blocks: a commit torn"
        for part in per_chunk:
            assert np.array_equal(part, np.arange(count)), "not a prefix"
        assert done.size == count * len(chunks), "blocks outside the writer's chunks"
        return count // batch

    reader, view, seen, last = None, None, np.zeros(0, dtype=np.int64), -1
    looks = 0
    while not os.path.exists(stop_file):
        names = os.listdir(path) if os.path.isdir(path) else []
        strange = [name for name in names if name != "manifest.json" and not name.startswith(
            ("done-", "failed-", ".tmp-"))]
        if strange:
            out.write(f"STRANGE {strange}\\n")
        try:
            if reader is None:
                reader = Ledger(path, "t", geometry, read_only=True)
            # a fresh reader: one whole state
            summary = read_ledger_summary(path)
            fresh = Ledger(path, "t", geometry, read_only=True)
            done = fresh.done_indices()
            failed = fresh.failed_blocks()
            fresh.close()
            # a long-lived follower: what is new since the last look
            view, new = reader.done_since(view)
            seen = np.union1d(seen, new)
        except LedgerError as error:
            if "not created completely" in str(error) or "no ledger" in str(error):
                continue
            out.write(f"ERROR {type(error).__name__}: {error}\\n")
            break
        try:
            # one manifest: its counts are of one commit
            assert summary["done"] == summary["failed"] * batch * len(chunks), summary
            commit = commits_of(done)
            assert summary["failed"] <= commit, "the manifest read first is newer"
            # the failures, read after the done blocks: a prefix, of that commit or later
            assert [index for index, _ in failed] == [
                failed_base + k for k in range(len(failed))], "failures not a prefix"
            assert len(failed) >= commit, f"failures {len(failed)} older than commit {commit}"
            assert all(error == f"error of commit {index - failed_base}"
                       for index, error in failed)
            followed = commits_of(seen)
            assert commit >= last, f"went back from commit {last} to {commit}"
            assert followed <= commit or followed >= last
        except AssertionError as error:
            out.write(f"INCONSISTENT {error}\\n")
            break
        last = max(last, commit)
        looks += 1
        out.write(f"SAW {commit} {followed}\\n")
    out.write(f"LOOKS {looks}\\n")
""")


def wait_for(condition, what, timeout: float = DEADLINE) -> None:
    """Wait for ``condition``; ``what`` (a text, or a function that gives one when the
    wait fails) says what was waited for."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.02)


def generation(path: Path) -> int:
    try:
        return json.loads((path / MANIFEST).read_text())["generation"]
    except (OSError, ValueError):
        return -1


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def test_readers_see_a_consistent_prefix_while_the_writer_is_killed_at_random(tmp_path):
    path = ledger_path(tmp_path / "ledgers", "t")
    path.parent.mkdir()
    arguments = [str(path), repr(GEOMETRY), str(BATCH), repr(CHUNKS), str(FAILED_BASE)]
    stop_file = tmp_path / "stop"
    logs = [tmp_path / f"reader{number}.log" for number in range(2)]
    readers = [subprocess.Popen([sys.executable, "-c", READER, *arguments, str(stop_file),
                                 str(log)]) for log in logs]
    rng = random.Random(20)
    writers_killed = 0
    try:
        for _round in range(6):
            writer = subprocess.Popen([sys.executable, "-c", WRITER, *arguments],
                                      stdout=subprocess.PIPE, text=True)
            try:
                assert writer.stdout is not None
                opened = writer.stdout.readline()
                assert opened.startswith("opened"), opened
                target = generation(path) + rng.randrange(1, 12)
                wait_for(lambda target=target, writer=writer: (
                    generation(path) >= target or writer.poll() is not None),
                         f"the writer to reach generation {target}")
                assert writer.poll() is None, "the writer died on its own"
            finally:
                stop(writer)
            writers_killed += 1
            assert writer.returncode == -signal.SIGKILL
            # whatever the kill interrupted, the next open works, holds at least what a
            # reader saw, and holds one commit whole
            most_seen = max((int(line.split()[1]) for log in logs if log.exists()
                             for line in log.read_text().splitlines()
                             if line.startswith("SAW")), default=0)
            with Ledger(path, "t", GEOMETRY) as ledger:
                commit = ledger.done_count() // (BATCH * len(CHUNKS))
                assert commit >= most_seen
                assert ledger.failed_count() == commit
                assert not [name for name in os.listdir(path) if name.startswith(".tmp-")]
        wait_for(lambda: all(log.exists() and log.read_text().count("SAW") >= 5
                             for log in logs),
                 lambda: "each reader to look five times; the readers' last lines: " + "; ".join(
                     log.read_text()[-300:] if log.exists() else f"{log.name} missing"
                     for log in logs), timeout=3 * DEADLINE)
    finally:
        stop_file.touch()
        for reader in readers:
            try:  # a look in progress ends first; under heavy I/O a look can be slow
                reader.wait(timeout=3 * DEADLINE)
            except subprocess.TimeoutExpired:
                stop(reader)
    assert writers_killed == 6
    for log in logs:
        text = log.read_text()
        problems = [line for line in text.splitlines()
                    if line.startswith(("ERROR", "INCONSISTENT", "STRANGE"))]
        assert not problems, problems[:5]
        assert "LOOKS" in text
    # and never a file of SQLite anywhere
    assert not [found for found in tmp_path.rglob("*")
                if found.name.endswith(("-wal", "-shm", "-journal", ".sqlite"))]


def test_a_writer_killed_mid_commit_leaves_the_previous_commit(tmp_path):
    """SIGKILL inside a commit, after the chunks are written and before the manifest is
    renamed (the writer process stops itself there): the record holds the previous
    commit, and the stray files are removed by the next writer's open."""
    path = ledger_path(tmp_path, "t")
    script = textwrap.dedent(f"""
        import os, signal
        from luigi_daisy import ledger as module
        ledger = module.Ledger({str(path)!r}, "t", {GEOMETRY!r})
        ledger.record_done_many(range(100))
        ledger.flush()
        real = module._write_whole

        def write_then_die(folder, name, data):
            if name == module.MANIFEST:
                os.kill(os.getpid(), signal.SIGKILL)
            real(folder, name, data)

        module._write_whole = write_then_die
        ledger.record_done_many(range(100, 200))
        ledger.record_failed(500, "x")
        ledger.flush()
    """)
    process = subprocess.run([sys.executable, "-c", script], timeout=DEADLINE, check=False)
    assert process.returncode == -signal.SIGKILL
    names = sorted(os.listdir(path))
    assert len([name for name in names if name.startswith("done-")]) == 2, names
    assert read_ledger_summary(path)["done"] == 100
    with Ledger(path, "t", GEOMETRY) as ledger:
        assert ledger.done_indices().tolist() == list(range(100))
        assert ledger.failed_blocks() == []
        first = json.loads((path / MANIFEST).read_text())["generation"]
        assert sorted(os.listdir(path)) == [f"done-0-{first}.zz", MANIFEST]


# ---------------------------------------------------------------- conversion
def _sqlite_record(folder: Path, task_id: str, geometry: dict, done, failed) -> Path:
    """An SQLite ledger written by the previous version's code (format 3)."""
    path = legacy_path(ledger_path(folder, task_id))
    with _sqlite_ledger.Ledger(path, task_id, geometry) as old:
        for index in done:
            old.record_done(index)
        for index, error in failed.items():
            old.record_failed(index, error)
    assert path.is_file() and path.name.endswith(".ledger.sqlite")
    return path


def test_an_sqlite_ledger_is_converted_by_a_writer_with_one_warning(tmp_path, caplog):
    geometry = dict(GEOMETRY, num_blocks=1000)
    done = list(range(0, 1000, 3))
    failed = {1: "boom\nlast line", 2: None}
    old = _sqlite_record(tmp_path, "t", geometry, done, failed)
    # readers read it as it is, converting nothing
    summary = read_ledger_summary(ledger_path(tmp_path, "t"))
    assert (summary["done"], summary["failed"], summary["origin"]) == (len(done), 2, None)
    assert find_ledgers(tmp_path) == [old] and is_ledger(old)
    with Ledger(ledger_path(tmp_path, "t"), "t", geometry, read_only=True) as reader:
        assert reader.done_indices().tolist() == done
        assert reader.failed_blocks() == sorted(failed.items())
    assert old.is_file() and not ledger_path(tmp_path, "t").exists()
    caplog.set_level(logging.INFO, logger="luigi_daisy.ledger")
    with Ledger(ledger_path(tmp_path, "t"), "t", geometry) as ledger:
        assert ledger.done_indices().tolist() == done
        assert ledger.failed_blocks() == sorted(failed.items())
    messages = [record.getMessage() for record in caplog.records
                if record.name == "luigi_daisy.ledger"]
    assert len(messages) == 1 and str(old) in messages[0], messages
    assert not old.exists()
    assert not [name for name in os.listdir(tmp_path) if "sqlite" in name]
    assert find_ledgers(tmp_path) == [ledger_path(tmp_path, "t")]
    caplog.clear()
    with Ledger(ledger_path(tmp_path, "t"), "t", geometry) as ledger:
        assert ledger.done_count() == len(done)
    assert not caplog.records, "converted twice"


def test_a_run_resumes_from_an_sqlite_ledger_of_the_previous_version(tmp_path):
    calls = []
    task = daisy.Task("old", total_roi=Roi((0,), (40,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)), process_function=lambda b: calls.append(b.index),
                      read_write_conflict=False)
    _sqlite_record(tmp_path, "old", task.grid.describe(), range(30), {})
    result = daisy.run_blockwise(task, multiprocessing=False, progress=False,
                                 ledger_dir=tmp_path)
    assert result["old"].skipped_count == 30
    assert sorted(calls) == list(range(30, 40))
    assert read_ledger_summary(ledger_path(tmp_path, "old"))["done"] == 40
    assert not legacy_path(ledger_path(tmp_path, "old")).exists()


def test_an_sqlite_ledger_of_another_geometry_is_refused_and_kept(tmp_path):
    old = _sqlite_record(tmp_path, "t", dict(GEOMETRY, num_blocks=10), range(5), {})
    with pytest.raises(LedgerError, match="geometry") as raised:
        Ledger(ledger_path(tmp_path, "t"), "t", dict(GEOMETRY, num_blocks=11))
    assert str(old) in str(raised.value)
    assert old.is_file()


def test_a_follower_of_an_sqlite_ledger_follows_on_after_its_conversion(tmp_path):
    geometry = dict(GEOMETRY, num_blocks=100)
    record = ledger_path(tmp_path, "t")
    _sqlite_record(tmp_path, "t", geometry, range(10), {})
    follower = LedgerFollower("t", record, geometry, TaskLock(Path(f"{record}.lock")))
    try:
        assert sorted(follower.initial_done()) == list(range(10))
        with Ledger(record, "t", geometry) as writer:
            writer.record_done_many(range(10, 15))
        assert sorted(follower.new_done()) == list(range(15)), "all reported once more"
        assert follower.new_done() == []
    finally:
        follower.close()


# ------------------------------------------------------- the shared interface
def test_origin_is_stored_when_given_and_kept_when_not(tmp_path):
    path = ledger_path(tmp_path, "t")
    origin = {"kind": "luigi", "family": "Seg", "module": "m", "params": {"a": "1"}}
    with Ledger(path, "t", GEOMETRY, origin=origin) as ledger:
        assert ledger.origin == origin
    with Ledger(path, "t", GEOMETRY) as ledger:
        assert ledger.origin == origin
    assert read_ledger_summary(path)["origin"] == origin
    with Ledger(path, "t", GEOMETRY, read_only=True) as reader:
        assert reader.origin == origin
    with Ledger(path, "t", GEOMETRY, origin={"kind": "daisy"}) as ledger:
        ledger.record_done(1)
    assert read_ledger_summary(path)["origin"] == {"kind": "daisy"}
    with Ledger(ledger_path(tmp_path, "u"), "u", GEOMETRY) as ledger:
        assert ledger.origin is None


def test_record_done_many_forget_done_and_failed_blocks(tmp_path):
    path = ledger_path(tmp_path, "t")
    with Ledger(path, "t", GEOMETRY) as ledger:
        ledger.record_done_many(np.arange(CHUNK_BLOCKS - 5, CHUNK_BLOCKS + 5))
        ledger.record_done_many([3, 1, 2])
        ledger.record_failed(7, "seven")
        ledger.record_failed(8, None)
        assert ledger.pending == 15
        assert read_ledger_summary(path)["done"] == 0, "written before flush"
        assert ledger.forget_done([1, 9, CHUNK_BLOCKS, 8]) == 2  # flushes first
        assert ledger.pending == 0
        assert ledger.failed_blocks() == [(7, "seven")]
    assert read_ledger_summary(path)["done"] == 11
    with Ledger(path, "t", GEOMETRY, read_only=True) as reader:
        expected = [2, 3, *range(CHUNK_BLOCKS - 5, CHUNK_BLOCKS), *range(CHUNK_BLOCKS + 1,
                                                                       CHUNK_BLOCKS + 5)]
        assert reader.done_indices().tolist() == expected
        assert reader.failed_blocks() == [(7, "seven")]
    with Ledger(path, "t", GEOMETRY) as ledger:
        assert ledger.forget_done(np.arange(CHUNK_BLOCKS - 5, CHUNK_BLOCKS + 5)) == 9
        assert ledger.forget_done([]) == 0
        assert ledger.forget_done([10**6]) == 0
    # a commit that changed nothing writes nothing
    manifest = json.loads((path / MANIFEST).read_text())
    chunk_generation, failed_generation = manifest["chunks"][0][1], manifest["failed_file"][0]
    assert manifest["generation"] == chunk_generation == failed_generation + 1
    assert sorted(os.listdir(path)) == [f"done-0-{chunk_generation}.zz",
                                        f"failed-{failed_generation}.json", MANIFEST]
    with pytest.raises(LedgerError, match="negative"):
        with Ledger(path, "t", GEOMETRY) as ledger:
            ledger.record_done_many([-1])
            ledger.flush()


def test_find_ledgers_and_is_ledger(tmp_path):
    assert find_ledgers(tmp_path) == []
    for task_id in ("b", "a"):
        Ledger(ledger_path(tmp_path, task_id), task_id, GEOMETRY).close()
    _sqlite_record(tmp_path, "c", GEOMETRY, [1], {})
    (tmp_path / "other.txt").write_text("x")
    (tmp_path / "b.ledger.lock").write_text("")
    expected = [ledger_path(tmp_path, "a"), ledger_path(tmp_path, "b"),
                legacy_path(ledger_path(tmp_path, "c"))]
    assert find_ledgers(tmp_path) == expected
    assert find_ledgers(ledger_path(tmp_path, "a")) == [ledger_path(tmp_path, "a")]
    assert all(is_ledger(path) for path in expected)
    assert not is_ledger(tmp_path / "other.txt") and not is_ledger(tmp_path)
    assert not is_ledger(tmp_path / "b.ledger.lock")


# ------------------------------------------------------------------ followers
def test_done_since_reports_each_new_block_once_and_reads_no_chunk_when_idle(tmp_path):
    path = ledger_path(tmp_path, "t")
    writer = Ledger(path, "t", GEOMETRY)
    reader = Ledger(path, "t", GEOMETRY, read_only=True)
    try:
        view, new = reader.done_since(None)
        assert new.tolist() == []
        writer.record_done_many([5, 2 * CHUNK_BLOCKS + 1])
        writer.flush()
        view, new = reader.done_since(view)
        assert new.tolist() == [5, 2 * CHUNK_BLOCKS + 1]
        writer.record_done_many([6, 5])
        writer.flush()
        view, new = reader.done_since(view)
        assert new.tolist() == [6]
        # nothing changed: the manifest alone is read (the chunks are gone and it works)
        for chunk in path.glob("done-*"):
            chunk.rename(tmp_path / chunk.name)
        view, new = reader.done_since(view)
        assert new.tolist() == []
    finally:
        reader.close()
        writer.close()


# ------------------------------------------------------------------ scheduler
def _drain(scheduler: BlockScheduler, task_id: str) -> list[int]:
    """Every block handed out, each released as done at once, in order."""
    order = []
    while (block := scheduler.acquire(task_id)) is not None:
        order.append(block.index)
        scheduler.release(block, daisy.BlockStatus.SUCCESS)
    return order


@pytest.mark.parametrize("conflict", [True, False])
def test_the_scheduler_resumes_from_packed_bits_as_from_indices(tmp_path, conflict):
    task = daisy.Task("p", total_roi=Roi((-1, -1), (42, 38)), read_roi=Roi((-1, -1), (6, 6)),
                      write_roi=Roi((0, 0), (4, 4)), process_function=lambda block: None,
                      read_write_conflict=conflict, fit="overhang")
    grid = task.grid
    every = np.ravel_multi_index(np.indices(grid.grid_shape).reshape(2, -1),
                                 grid.id_grid_shape)
    done = np.sort(np.random.default_rng(3).choice(every, size=every.size // 2,
                                                   replace=False))
    path = ledger_path(tmp_path, "p")
    with Ledger(path, "p", grid.describe()) as ledger:
        ledger.record_done_many(done)
    ledgers = LedgerSet.open([daisy.Task("p", total_roi=task.total_roi,
                                         read_roi=task.read_roi, write_roi=task.write_roi,
                                         process_function=lambda block: None,
                                         read_write_conflict=conflict, fit="overhang",
                                         ledger=tmp_path)])
    try:
        packed = ledgers.done_blocks()["p"]
    finally:
        ledgers.close()
    assert isinstance(packed, PackedBlocks) and len(packed) == done.size
    from_packed = BlockScheduler([task], {"p": packed}, block_map=True)
    from_indices = BlockScheduler([task], {"p": done}, block_map=True)
    for name in ("completed_count", "skipped_count", "ready_count"):
        assert (getattr(from_packed.task_states["p"], name)
                == getattr(from_indices.task_states["p"], name)), name
    np.testing.assert_array_equal(from_packed.block_plane("p"), from_indices.block_plane("p"))
    handed = _drain(from_packed, "p")
    assert sorted(handed) == sorted(set(every.tolist()) - set(done.tolist()))
    assert handed == _drain(from_indices, "p")


def test_packed_bits_outside_the_grid_are_refused(tmp_path):
    task = daisy.Task("p", total_roi=Roi((0, 0), (10, 10)), read_roi=Roi((0, 0), (4, 4)),
                      write_roi=Roi((0, 0), (4, 4)), process_function=lambda block: None,
                      read_write_conflict=False, fit="valid")
    grid = task.grid
    size = int(np.prod(grid.id_grid_shape))
    outside = np.ravel_multi_index((0, grid.grid_shape[1]), grid.id_grid_shape) \
        if grid.grid_shape[1] < grid.id_grid_shape[1] else size
    for index in (outside, size, CHUNK_BLOCKS + 3):
        with pytest.raises(SchedulerError, match="not a block of task"):
            BlockScheduler([task], {"p": PackedBlocks.from_indices([0, index])})


def test_status_reads_an_sqlite_ledger_without_converting_it(tmp_path):
    geometry = {"total_roi": [[0], [10]], "read_roi": [[0], [1]], "write_roi": [[0], [1]],
                "fit": "valid", "num_blocks": 10}
    old = _sqlite_record(tmp_path, "t", geometry, range(6), {7: "boom\nthe last line"})
    result = subprocess.run([sys.executable, "-m", "luigi_daisy.cli", "status", "--failed",
                             str(tmp_path)], capture_output=True, text=True, timeout=DEADLINE,
                            check=False)
    assert result.returncode == 1, result
    assert "6 done, 1 failed, 10 total" in result.stdout
    assert "the last line" in result.stdout
    assert old.is_file() and not ledger_path(tmp_path, "t").exists()
    assert sorted(os.listdir(tmp_path)) == [old.name]


def test_a_reader_opening_while_the_record_folder_is_made_never_calls_it_damaged(tmp_path):
    """A reader (a follower, ``complete()``) that looks just as the writer makes the
    record's folder saw no folder, then something there, and called the record "a file,
    not a record folder" (1 run in 5 of the random-kill test above)."""
    import threading

    path = ledger_path(tmp_path / "ledgers", "t")
    path.parent.mkdir()
    stop_making = threading.Event()

    def make_and_remove() -> None:
        while not stop_making.is_set():
            path.mkdir()
            path.rmdir()

    maker = threading.Thread(target=make_and_remove)
    maker.start()
    damaged = []
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not damaged:
            try:
                Ledger(path, "t", GEOMETRY, read_only=True).close()
            except LedgerError as error:
                if "damaged" in str(error):
                    damaged.append(str(error))
    finally:
        stop_making.set()
        maker.join(10)
    assert not damaged, damaged[:1]


def test_a_commit_whose_manifest_is_in_place_keeps_its_files_when_the_folder_fsync_fails(
        tmp_path, monkeypatch):
    """The manifest was renamed into place and the folder's fsync then failed (EIO over
    NFS): the files the manifest names must stay, or every reader finds the record
    damaged and the next run is told to delete it."""
    import errno

    from luigi_daisy import ledger as ledger_module

    path = ledger_path(tmp_path / "ledgers", "t")
    path.parent.mkdir()
    ledger = Ledger(path, "t", GEOMETRY)
    ledger.record_done_many(range(10))
    ledger.flush()
    real_fsync = ledger_module._fsync_folder
    calls = []

    def fsync_failing_after_the_rename(folder):
        calls.append(folder)
        if len(calls) == 2:  # the commit's second: after the manifest's rename
            raise OSError(errno.EIO, "Input/output error", str(folder))
        real_fsync(folder)

    monkeypatch.setattr(ledger_module, "_fsync_folder", fsync_failing_after_the_rename)
    ledger.record_done_many(range(10, 20))
    with pytest.raises(LedgerError):
        ledger.flush()
    monkeypatch.setattr(ledger_module, "_fsync_folder", real_fsync)
    with Ledger(path, "t", GEOMETRY, read_only=True) as reader:
        assert reader.done_indices().tolist() == list(range(20))
    ledger.record_done(20)
    ledger.flush()
    ledger.close()
    with Ledger(path, "t", GEOMETRY) as again:
        assert again.done_indices().tolist() == list(range(21))


def test_a_follower_sees_a_record_started_afresh_at_the_same_number_of_commits(tmp_path):
    path = ledger_path(tmp_path / "ledgers", "t")
    path.parent.mkdir()
    with Ledger(path, "t", GEOMETRY) as ledger:
        for block in range(3):
            ledger.record_done(block)
            ledger.flush()
    reader = Ledger(path, "t", GEOMETRY, read_only=True)
    try:
        view, seen = reader.done_since(None)
        assert seen.tolist() == [0, 1, 2]
        with Ledger(path, "t", GEOMETRY, fresh=True) as ledger:
            for block in (50, 51, 52):
                ledger.record_done(block)
                ledger.flush()
        assert reader.done_indices().tolist() == [50, 51, 52]
        view, seen = reader.done_since(view)
        assert seen.tolist() == [50, 51, 52]
    finally:
        reader.close()
