"""The ledger: the durable record of finished blocks that makes runs resumable.

Unit tests of :class:`Ledger` and :class:`LedgerSet` on real record folders (round trip,
batching, geometry and task checks, damaged files, a 10^6-block completeness read), the
``luigi-daisy status`` command run as a real process, and resume semantics of
``run_blockwise`` (in-process, plus one run with worker processes). The crash tests with
SIGKILL live in ``test_crash_resume.py``.

"Never a silent wrong skip" is checked the same way everywhere: whatever a damaged or
foreign ledger makes the code do, either it raises a :class:`LedgerError` that names the
file, or the blocks it treats as done are a subset of the blocks that really finished.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import luigi_daisy as daisy
from luigi_daisy import Roi
from luigi_daisy.ledger import (
    FORMAT_VERSION,
    SUFFIX,
    Ledger,
    LedgerError,
    LedgerSet,
    is_ledger,
    ledger_path,
    read_ledger_summary,
)

pytestmark = pytest.mark.timeout(120)

CLI_TIMEOUT = 60.0


# ---------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Run in tmp_path, so runs leave their logs (and any stray ledger) there."""
    monkeypatch.chdir(tmp_path)


def geometry(num_blocks: int = 10, write: int = 1, fit: str = "valid") -> dict:
    """A plain-data geometry, in the shape ``BlockGrid.describe()`` gives."""
    return {"total_roi": [[0], [num_blocks * write]], "read_roi": [[0], [write]],
            "write_roi": [[0], [write]], "fit": fit, "num_blocks": num_blocks}


def stored_manifest(path: Path) -> dict:
    """A record's manifest, read with json directly (as another host would)."""
    return json.loads((path / "manifest.json").read_text())


def stored_done(path: Path) -> set[int]:
    """The done blocks of a record, read from its files directly (manifest, then the
    zlib-compressed bitmap chunks it names), not through :class:`Ledger`."""
    manifest = stored_manifest(path)
    done: set[int] = set()
    for chunk, generation, _, _ in manifest["chunks"]:
        data = zlib.decompress((path / f"done-{chunk}-{generation}.zz").read_bytes())
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
        done.update((np.flatnonzero(bits) + chunk * manifest["chunk_blocks"]).tolist())
    return done


def stored_failed(path: Path) -> dict[int, str | None]:
    manifest = stored_manifest(path)
    if not manifest["failed_file"]:
        return {}
    data = (path / f"failed-{manifest['failed_file'][0]}.json").read_text()
    return {int(index): error for index, error in json.loads(data).items()}


class CommitLog:
    """Commits of a record: each replaces the manifest with the next generation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = stored_manifest(path)["generation"]

    def commits(self) -> int:
        return stored_manifest(self.path)["generation"] - self.start


def line_task(task_id: str, num_blocks: int, process_function, block_size: int = 10,
              **options) -> daisy.Task:
    """A 1D task of ``num_blocks`` independent blocks."""
    options.setdefault("read_write_conflict", False)
    return daisy.Task(
        task_id, total_roi=Roi((0,), (num_blocks * block_size,)),
        read_roi=Roi((0,), (block_size,)), write_roi=Roi((0,), (block_size,)),
        process_function=process_function, **options)


def grid_task(task_id: str, side: int, process_function, **options) -> daisy.Task:
    """A 2D task of ``side x side`` blocks of 4x4 voxels with 1 voxel of context."""
    return daisy.Task(
        task_id, total_roi=Roi((-1, -1), (side * 4 + 2, side * 4 + 2)),
        read_roi=Roi((-1, -1), (6, 6)), write_roi=Roi((0, 0), (4, 4)),
        process_function=process_function, **options)


def skipped_in_summary(summary: str, task_id: str) -> int:
    section = re.search(rf"Task {re.escape(task_id)}:(.*?)(?=\n\s*Task \S+:|\Z)", summary,
                        re.DOTALL)
    assert section, summary
    match = re.search(r"skipped\s*(\d+)", section.group(1))
    assert match, section.group(1)
    return int(match.group(1))


def run_status(path: Path, command: list[str] | None = None) -> subprocess.CompletedProcess:
    """``luigi-daisy status PATH`` as a real process."""
    command = command or [sys.executable, "-m", "luigi_daisy.cli"]
    return subprocess.run([*command, "status", str(path)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, check=False)


def assert_no_wrong_skip(path: Path, task_id: str, geo: dict, truly_done: set[int]) -> str:
    """Open a (possibly damaged) ledger the way a run does; return what happened.

    Either a ``LedgerError`` naming the file, or a done set inside ``truly_done``.
    Any other exception (a raw ``sqlite3`` error, a ``TypeError`` from a garbled row)
    fails the test: it is not a clear error.
    """
    try:
        with Ledger(path, task_id, geo) as ledger:
            done = set(ledger.done_indices().tolist())
            complete = ledger.is_complete(geo["num_blocks"])
    except LedgerError as error:
        assert str(path.name) in str(error), f"the error does not name the file: {error}"
        return "error"
    assert done <= truly_done, (
        f"silent wrong skip: blocks {sorted(done - truly_done)[:10]} read as done "
        f"but never finished")
    assert not complete or truly_done >= set(range(geo["num_blocks"]))
    return "fresh" if not done else "subset"


# ----------------------------------------------------------------- Ledger: basics
def test_ledger_path_is_task_file_in_folder(tmp_path):
    assert ledger_path(tmp_path, "segment") == tmp_path / f"segment{SUFFIX}"
    assert ledger_path(tmp_path / "sub", "a") == tmp_path / "sub" / "a.ledger"
    # a task id that is not a safe file name still gives a file inside the folder
    odd = ledger_path(tmp_path, "../up/and away")
    assert odd.parent == tmp_path
    assert odd.name.endswith(SUFFIX)


def test_round_trip_done_and_failed(tmp_path):
    path = ledger_path(tmp_path, "t")
    geo = geometry(20)
    with Ledger(path, "t", geo) as ledger:
        assert ledger.done_count() == 0 and ledger.failed_count() == 0
        for index in (5, 1, 7):
            ledger.record_done(index)
        ledger.record_done(5)  # recorded twice: stored once
        ledger.record_failed(3, "boom")
        ledger.record_failed(9, None)
        assert ledger.pending == 6
        assert ledger.flush() == 6
        assert ledger.pending == 0
    assert stored_done(path) == {1, 5, 7}
    assert stored_failed(path) == {3: "boom", 9: None}

    with Ledger(path, "t", geo) as ledger:
        np.testing.assert_array_equal(ledger.done_indices(), [1, 5, 7])
        assert ledger.done_indices().dtype == np.int64
        assert ledger.done_count() == 3
        assert ledger.failed_count() == 2
        # a failed block that later succeeds is done and no longer failed
        ledger.record_done(3)
        ledger.flush()
        assert ledger.failed_count() == 1
        ledger.forget_failures()
        assert ledger.failed_count() == 0
    assert stored_done(path) == {1, 3, 5, 7}
    summary = read_ledger_summary(path)
    assert summary["task_id"] == "t"
    assert summary["geometry"] == geo
    assert (summary["done"], summary["failed"], summary["total"]) == (4, 0, 20)


def test_close_flushes_pending_records(tmp_path):
    path = ledger_path(tmp_path, "t")
    ledger = Ledger(path, "t", geometry())
    ledger.record_done(2)
    ledger.close()
    assert stored_done(path) == {2}


def test_nothing_is_written_before_flush(tmp_path):
    path = ledger_path(tmp_path, "t")
    ledger = Ledger(path, "t", geometry(100))
    try:
        for index in range(50):
            ledger.record_done(index)
        ledger.record_failed(60, "error")
        # another connection (as another process would) sees nothing yet
        assert stored_done(path) == set()
        assert stored_failed(path) == {}
        assert read_ledger_summary(path)["done"] == 0
        ledger.flush()
        assert stored_done(path) == set(range(50))
        assert stored_failed(path) == {60: "error"}
    finally:
        ledger.close()


def test_each_flush_is_one_commit(tmp_path):
    path = ledger_path(tmp_path, "t")
    ledger = Ledger(path, "t", geometry(10_000))
    log = CommitLog(path)
    try:
        for index in range(1000):
            ledger.record_done(index)
        for index in range(1000, 1010):
            ledger.record_failed(index, "e")
        assert log.commits() == 0, "records were written before flush"
        ledger.flush()
        assert log.commits() == 1
        assert stored_done(path) == set(range(1000))
        assert stored_failed(path) == dict.fromkeys(range(1000, 1010), "e")
        # an empty flush writes nothing
        before = sorted(os.listdir(path))
        assert ledger.flush() == 0
        assert log.commits() == 1 and sorted(os.listdir(path)) == before
        ledger.record_done(5000)
        ledger.flush()
        assert log.commits() == 2
    finally:
        ledger.close()


def test_ledger_set_flushes_each_ledger_in_one_transaction_when_due(tmp_path):
    tasks = [line_task(task_id, 100, lambda block: None, ledger=tmp_path)
             for task_id in ("a", "b")]
    ledgers = LedgerSet.open(tasks)
    logs = {task_id: CommitLog(ledger.path) for task_id, ledger in ledgers.ledgers.items()}
    try:
        assert ledgers.flush_interval <= 1.0, "a batch must be written at least every second"
        for index in range(10):
            ledgers.record_done("a", index)
            ledgers.record_done("b", index)
        ledgers.record_done("not-kept", 3)  # a task without a ledger: ignored
        assert ledgers.flush_if_due(100.0) == 20  # first call: writes
        assert ledgers.flush_if_due(100.0 + ledgers.flush_interval / 2) == 0
        ledgers.record_done("a", 50)
        assert ledgers.flush_if_due(100.0 + ledgers.flush_interval / 2) == 0  # not yet due
        assert stored_done(ledger_path(tmp_path, "a")) == set(range(10))
        assert ledgers.flush_if_due(100.0 + ledgers.flush_interval) == 1  # due
        assert stored_done(ledger_path(tmp_path, "a")) == set(range(10)) | {50}
        assert logs["a"].commits() == 2
        assert logs["b"].commits() == 1
    finally:
        ledgers.close()


def test_ledger_set_writes_early_when_many_records_wait(tmp_path):
    task = line_task("a", 1000, lambda block: None, ledger=tmp_path)
    ledgers = LedgerSet.open([task])
    try:
        ledgers.max_pending = 100
        for index in range(250):
            ledgers.record_done("a", index)
        assert len(stored_done(ledger_path(tmp_path, "a"))) == 200
    finally:
        ledgers.close()
    assert stored_done(ledger_path(tmp_path, "a")) == set(range(250))


# ------------------------------------------------- Ledger: geometry, task, fresh
def test_geometry_change_is_refused_with_a_clear_message(tmp_path):
    path = ledger_path(tmp_path, "seg")
    with Ledger(path, "seg", geometry(10, write=4)) as ledger:
        ledger.record_done(0)
    with pytest.raises(LedgerError) as raised:
        Ledger(path, "seg", geometry(20, write=2))
    message = str(raised.value)
    assert str(path) in message
    assert "'seg'" in message
    assert "geometry" in message
    assert "fresh=True" in message
    # the file is left alone
    assert stored_done(path) == {0}


def test_geometry_change_is_refused_by_run_blockwise(tmp_path, capsys):
    calls = Counter()

    def process(block):
        calls[block.index] += 1

    def task(write: int, fit: str = "valid") -> daisy.Task:
        return daisy.Task("seg", total_roi=Roi((0,), (100,)), read_roi=Roi((0,), (write,)),
                          write_roi=Roi((0,), (write,)), process_function=process, fit=fit,
                          read_write_conflict=False)

    assert daisy.run_blockwise(task(10), multiprocessing=False, progress=False,
                               ledger_dir=tmp_path / "ledgers")
    processed_first = sum(calls.values())
    for changed in (task(20), task(10, fit="overhang")):
        with pytest.raises(LedgerError, match="geometry"):
            daisy.run_blockwise(changed, multiprocessing=False, progress=False,
                                ledger_dir=tmp_path / "ledgers")
    assert sum(calls.values()) == processed_first, "a refused run processed blocks"
    # the same geometry resumes; starting afresh processes every block again
    calls.clear()
    assert daisy.run_blockwise(task(10), multiprocessing=False, progress=False,
                               ledger_dir=tmp_path / "ledgers")
    assert not calls
    assert daisy.run_blockwise(task(20), multiprocessing=False, progress=False,
                               ledger_dir=tmp_path / "ledgers", fresh=True)
    assert calls == Counter({index: 1 for index in calls}) and len(calls) == 5


def test_ledger_of_another_task_is_refused(tmp_path):
    geo = geometry(10)
    with Ledger(ledger_path(tmp_path, "a"), "a", geo) as ledger:
        for index in range(10):
            ledger.record_done(index)
    # the same folder, another record name, but the content of a's record
    shutil.copytree(ledger_path(tmp_path, "a"), ledger_path(tmp_path, "b"))
    with pytest.raises(LedgerError) as raised:
        Ledger(ledger_path(tmp_path, "b"), "b", geo)
    message = str(raised.value)
    assert "'a'" in message and "'b'" in message
    assert str(ledger_path(tmp_path, "b")) in message


def test_task_ids_sharing_a_readable_name_do_not_share_a_ledger(tmp_path):
    """Two ids that differ only where a file name cannot follow: two ledgers."""
    first, second = "a/b", "a_b"
    assert ledger_path(tmp_path, first) != ledger_path(tmp_path, second)
    calls = Counter()

    def process(block):
        calls[(block.task_id, block.index)] += 1

    for task_id in (first, second):
        assert daisy.run_blockwise(line_task(task_id, 5, process), multiprocessing=False,
                                   progress=False, ledger_dir=tmp_path)
    assert calls == Counter({(task_id, index): 1 for task_id in (first, second)
                             for index in range(5)})
    assert read_ledger_summary(ledger_path(tmp_path, first))["task_id"] == first


def test_fresh_forgets_everything(tmp_path):
    path = ledger_path(tmp_path, "t")
    with Ledger(path, "t", geometry(10)) as ledger:
        for index in range(6):
            ledger.record_done(index)
        ledger.record_failed(8, "x")
    with Ledger(path, "t", geometry(10), fresh=True) as ledger:
        assert ledger.done_count() == 0 and ledger.failed_count() == 0
    # fresh also accepts a new geometry
    with Ledger(path, "t", geometry(30, write=2), fresh=True) as ledger:
        assert ledger.done_count() == 0
    assert read_ledger_summary(path)["geometry"] == geometry(30, write=2)


def _write_and_crash(path: Path, indices: range) -> None:
    """A process that records ``indices``, flushes, and is killed before closing."""
    script = textwrap.dedent(f"""
        import os, signal
        from luigi_daisy.ledger import Ledger
        ledger = Ledger({str(path)!r}, "t", {geometry(10)!r})
        for index in {indices!r}:
            ledger.record_done(index)
        ledger.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    process = subprocess.run([sys.executable, "-c", script], timeout=CLI_TIMEOUT, check=False)
    assert process.returncode == -signal.SIGKILL


def test_flushed_batch_survives_a_crash(tmp_path):
    path = ledger_path(tmp_path, "t")
    _write_and_crash(path, range(7))
    with Ledger(path, "t", geometry(10)) as ledger:
        assert ledger.done_count() == 7


def test_fresh_after_a_crash_forgets_what_the_killed_writer_wrote(tmp_path):
    """A killed writer leaves its record as of its last commit (and no ``-wal`` or
    ``-shm`` file: no SQLite); fresh must forget it all."""
    path = ledger_path(tmp_path, "t")
    _write_and_crash(path, range(7))
    assert stored_done(path) == set(range(7))
    assert not [name for name in os.listdir(tmp_path) if name.endswith(("-wal", "-shm"))]
    with Ledger(path, "t", geometry(10), fresh=True) as ledger:
        assert ledger.done_count() == 0
        assert ledger.done_indices().size == 0
    with Ledger(path, "t", geometry(10)) as ledger:
        assert ledger.done_count() == 0
    assert stored_done(path) == set()


# ------------------------------------------------------ Ledger: damaged files
def test_missing_file_starts_fresh(tmp_path):
    path = ledger_path(tmp_path / "not" / "yet", "t")
    with Ledger(path, "t", geometry(10)) as ledger:
        assert ledger.done_count() == 0
        assert not ledger.is_complete(10)
    assert path.is_dir() and (path / "manifest.json").is_file()


def test_empty_file_starts_fresh_or_fails_clearly(tmp_path):
    path = ledger_path(tmp_path, "t")
    path.write_bytes(b"")
    assert assert_no_wrong_skip(path, "t", geometry(10), set()) in ("error", "fresh")


@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_fail_clearly(tmp_path, seed):
    path = ledger_path(tmp_path, "t")
    path.write_bytes(random.Random(seed).randbytes(64 * 1024))
    with pytest.raises(LedgerError) as raised:
        Ledger(path, "t", geometry(10))
    assert str(path) in str(raised.value)
    assert "fresh=True" in str(raised.value) or "delete" in str(raised.value)


def test_a_text_file_in_place_of_the_ledger_fails_clearly(tmp_path):
    path = ledger_path(tmp_path, "t")
    path.write_text("done: 0 1 2 3 4 5 6 7 8 9\n" * 200)
    with pytest.raises(LedgerError):
        Ledger(path, "t", geometry(10))


def _many_rows_ledger(path: Path, geo: dict) -> set[int]:
    """A cleanly closed record: every other block of 40,000 done, one failure."""
    done = set(range(0, 2 * 20_000, 2))
    with Ledger(path, "t", geo) as ledger:
        for index in sorted(done):
            ledger.record_done(index)
        ledger.record_failed(1, "first failure")
    assert not Path(f"{path}-wal").exists()
    return done


def _record_files(path: Path) -> list[Path]:
    """The files of a record: the manifest, its chunks, its failures."""
    return sorted(path.iterdir())


@pytest.mark.parametrize("keep", [0.95, 0.7, 0.5, 0.2, 0.02])
def test_truncated_file_never_skips_wrongly(tmp_path, keep):
    """Each file of the record in turn truncated (a writer or a copy cut short)."""
    path = ledger_path(tmp_path, "t")
    geo = geometry(100_000)
    done = _many_rows_ledger(path, geo)
    originals = {file: file.read_bytes() for file in _record_files(path)}
    assert len(originals) == 3, originals.keys()  # manifest, one chunk, failures
    for file, data in originals.items():
        with open(file, "r+b") as stream:
            stream.truncate(int(len(data) * keep))
        assert assert_no_wrong_skip(path, "t", geo, done) in ("error", "fresh", "subset")
        for each, original in originals.items():
            each.write_bytes(original)


@pytest.mark.parametrize("keep_bytes", [0, 10, 100])
def test_file_truncated_inside_its_header_never_skips_wrongly(tmp_path, keep_bytes):
    path = ledger_path(tmp_path, "t")
    geo = geometry(100_000)
    done = _many_rows_ledger(path, geo)
    originals = {file: file.read_bytes() for file in _record_files(path)}
    for file in originals:
        with open(file, "r+b") as stream:
            stream.truncate(keep_bytes)
        assert assert_no_wrong_skip(path, "t", geo, done) in ("error", "fresh", "subset")
        for each, original in originals.items():
            each.write_bytes(original)


def test_a_file_the_manifest_names_that_is_missing_is_damage(tmp_path):
    path = ledger_path(tmp_path, "t")
    geo = geometry(100_000)
    _many_rows_ledger(path, geo)
    (chunk,) = path.glob("done-*")
    chunk.unlink()
    for read_only in (False, True):
        with pytest.raises(LedgerError, match="damaged") as raised:
            Ledger(path, "t", geo, read_only=read_only)
        assert str(path) in str(raised.value) and chunk.name in str(raised.value)


@pytest.mark.parametrize("seed", range(6))
def test_garbage_page_fails_clearly(tmp_path, seed):
    """A 4 KiB stretch of a file of the record overwritten with random bytes (a torn
    or foreign write): a ``LedgerError`` naming the record, or a subset."""
    path = ledger_path(tmp_path, "t")
    geo = geometry(100_000)
    done = _many_rows_ledger(path, geo)
    rng = random.Random(seed)
    file = rng.choice(_record_files(path))
    size = file.stat().st_size
    with open(file, "r+b") as stream:
        stream.seek(rng.randrange(0, max(size - 64, 1)))
        stream.write(rng.randbytes(min(4096, size)))
    assert assert_no_wrong_skip(path, "t", geo, done) in ("error", "fresh", "subset")


def test_flipped_bits_never_skip_wrongly(tmp_path):
    """Single flipped bits anywhere in the record's files (bit rot): error or subset,
    never more. Every chunk and the failures file carry a crc32 in the manifest; the
    manifest's counts are checked against the chunks."""
    path = ledger_path(tmp_path, "t")
    geo = geometry(100_000)
    done = _many_rows_ledger(path, geo)
    originals = {file: file.read_bytes() for file in _record_files(path)}
    rng = random.Random(7)
    outcomes = Counter()
    wrong = []
    for trial in range(90):
        file = list(originals)[trial % len(originals)]
        damaged = bytearray(originals[file])
        offset = rng.randrange(len(damaged))
        damaged[offset] ^= 1 << rng.randrange(8)
        file.write_bytes(bytes(damaged))
        try:
            outcomes[assert_no_wrong_skip(path, "t", geo, done)] += 1
        except AssertionError as failure:
            wrong.append((file.name, offset, str(failure).splitlines()[0]))
        except Exception as error:  # noqa: BLE001 - counted and reported below
            wrong.append((file.name, offset, f"{type(error).__name__}: {error}"))
        for each, original in originals.items():
            each.write_bytes(original)
        for stray in set(_record_files(path)) - set(originals):
            stray.unlink()  # a commit of the opener (none should happen: nothing pending)
    assert not wrong, (f"{len(wrong)} of 90 single-bit flips were not caught "
                       f"(outcomes otherwise {dict(outcomes)}): {wrong[:5]}")
    assert outcomes["error"] >= 60, outcomes


def test_damaged_ledger_stops_run_blockwise_with_a_ledger_error(tmp_path):
    """The chunk of a record (its done blocks) overwritten with garbage at its end."""
    calls = Counter()

    def process(block):
        calls[block.index] += 1

    task = line_task("t", 20_000, process, block_size=1)
    folder = tmp_path / "ledgers"
    assert daisy.run_blockwise(task, multiprocessing=False, progress=False,
                               ledger_dir=folder)
    path = ledger_path(folder, "t")
    (chunk,) = path.glob("done-*")
    size = chunk.stat().st_size
    with open(chunk, "r+b") as file:
        file.seek(max(size - 16, 0))
        file.write(random.Random(1).randbytes(16))
    calls.clear()
    try:
        result = daisy.run_blockwise(task, multiprocessing=False, progress=False,
                                     ledger_dir=folder)
    except LedgerError as error:
        assert str(path) in str(error)
        assert not calls
    else:
        # read as fresh: every block processed again; never fewer
        assert result and len(calls) == 20_000
    # fresh=True always gets the task going again
    calls.clear()
    assert daisy.run_blockwise(task, multiprocessing=False, progress=False,
                               ledger_dir=folder, fresh=True)
    assert len(calls) == 20_000


# ---------------------------------------------------- 10^6-block completeness
def test_completeness_of_a_million_blocks_reads_the_manifest_only(tmp_path):
    """``complete()`` (``read_ledger_summary``, a reader's ``is_complete``) reads the
    manifest and no chunk: with every chunk overwritten by garbage it still answers,
    while reading the done blocks fails."""
    path = ledger_path(tmp_path, "big")
    total = 10**6
    geo = {"total_roi": [[0, 0, 0], [1000, 1000, 1000]], "read_roi": [[0, 0, 0], [10, 10, 10]],
           "write_roi": [[0, 0, 0], [10, 10, 10]], "fit": "valid", "num_blocks": total}
    with Ledger(path, "big", geo) as ledger:
        ledger.record_done_many(np.arange(total))
    reader = Ledger(path, "big", geo, read_only=True)
    try:
        for chunk in path.glob("done-*"):
            chunk.write_bytes(b"garbage")
        assert read_ledger_summary(path)["done"] == total
        assert reader.is_complete(total)
        assert not reader.is_complete(total + 1)
        with pytest.raises(LedgerError, match="damaged"):
            Ledger(path, "big", geo, read_only=True)
    finally:
        reader.close()
    with Ledger(path, "big", geo, fresh=True) as ledger:
        ledger.record_done_many(np.arange(total))
    with Ledger(path, "big", geo) as ledger:
        assert ledger.forget_done([123_456, 123_456]) == 1
    with Ledger(path, "big", geo) as ledger:
        assert not ledger.is_complete(total)
        assert ledger.done_count() == total - 1
    assert stored_done(path) == set(range(total)) - {123_456}

    result = run_status(path)
    assert result.returncode == 1, result
    assert f"{total - 1} done" in result.stdout
    assert f"{total} total" in result.stdout


# ---------------------------------------------------------------- the CLI
def _cli_ledgers(folder: Path) -> None:
    """One complete task ``whole`` and one with failures ``partial`` in ``folder``."""
    whole = daisy.Task("whole", total_roi=Roi((0, 0, 0), (20, 20, 40)),
                       read_roi=Roi((0, 0, 0), (10, 10, 10)),
                       write_roi=Roi((0, 0, 0), (10, 10, 10)),
                       process_function=lambda block: None, read_write_conflict=False)
    partial = line_task("partial", 10, lambda block: 1 / (block.index % 3), max_retries=0)
    daisy.run_blockwise([whole], multiprocessing=False, progress=False, ledger_dir=folder)
    daisy.run_blockwise([partial], multiprocessing=False, progress=False, ledger_dir=folder)


def _cli_commands() -> list[list[str]]:
    commands = [[sys.executable, "-m", "luigi_daisy.cli"]]
    entry_point = shutil.which("luigi-daisy")
    if entry_point is not None:
        commands.append([entry_point])
    return commands


@pytest.fixture(params=range(len(_cli_commands())),
                ids=["module", "entry-point"][:len(_cli_commands())])
def cli(request) -> list[str]:
    return _cli_commands()[request.param]


def test_status_of_a_complete_ledger_file(tmp_path, cli):
    _cli_ledgers(tmp_path / "ledgers")
    result = run_status(ledger_path(tmp_path / "ledgers", "whole"), cli)
    assert result.returncode == 0, result
    out = result.stdout
    assert "task whole" in out and "complete" in out and "INCOMPLETE" not in out
    assert "offset (0, 0, 0) shape (20, 20, 40)" in out  # total roi
    assert re.search(r"read roi\s*:\s*offset \(0, 0, 0\) shape \(10, 10, 10\)", out)
    assert re.search(r"write roi\s*:\s*offset \(0, 0, 0\) shape \(10, 10, 10\)", out)
    assert re.search(r"fit\s*:\s*valid", out)
    assert "16 done, 0 failed, 16 total" in out
    assert "partial" not in out


def test_status_of_a_folder_with_an_incomplete_task(tmp_path, cli):
    _cli_ledgers(tmp_path / "ledgers")
    result = run_status(tmp_path / "ledgers", cli)
    assert result.returncode == 1, result
    out = result.stdout
    assert "task whole: complete" in out
    assert "task partial: INCOMPLETE" in out
    # blocks 0, 3, 6, 9 divide by zero
    assert "6 done, 4 failed, 10 total" in out
    assert str(ledger_path(tmp_path / "ledgers", "partial")) in out


def test_status_of_the_incomplete_file_alone(tmp_path, cli):
    _cli_ledgers(tmp_path / "ledgers")
    result = run_status(ledger_path(tmp_path / "ledgers", "partial"), cli)
    assert result.returncode == 1, result
    assert "task partial" in result.stdout and "whole" not in result.stdout


@pytest.mark.parametrize("case", ["missing", "empty-folder", "random-bytes", "empty-file",
                                  "text-file", "no-meta", "empty-record",
                                  "sqlite-no-meta"])
def test_status_of_unreadable_paths_exits_2(tmp_path, cli, case):
    path = tmp_path / f"x{SUFFIX}"
    if case == "empty-folder":
        path = tmp_path / "nothing-here"
        path.mkdir()
    elif case == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(10_000))
    elif case == "empty-file":
        path.write_bytes(b"")
    elif case == "text-file":
        path.write_text("not a ledger\n")
    elif case == "no-meta":
        path.mkdir()
        (path / "manifest.json").write_text("{}")
    elif case == "empty-record":
        path.mkdir()
    elif case == "sqlite-no-meta":
        import sqlite3
        path = tmp_path / f"x{SUFFIX}.sqlite"
        connection = sqlite3.connect(path)
        connection.execute("CREATE TABLE done (block INTEGER PRIMARY KEY)")
        connection.commit()
        connection.close()
    result = run_status(path, cli)
    assert result.returncode == 2, result
    assert result.stderr.strip(), "an unreadable path must say why on stderr"
    assert "Traceback" not in result.stderr


def test_status_of_a_folder_with_one_damaged_ledger_exits_2(tmp_path, cli):
    folder = tmp_path / "ledgers"
    _cli_ledgers(folder)
    (folder / f"broken{SUFFIX}").write_bytes(b"\0" * 5000)
    (folder / f"garbled{SUFFIX}").mkdir()
    (folder / f"garbled{SUFFIX}" / "manifest.json").write_bytes(b"\0" * 50)
    result = run_status(folder, cli)
    assert result.returncode == 2, result
    assert "task whole" in result.stdout  # the readable ones are still listed
    assert "broken" in result.stderr and "garbled" in result.stderr


def test_status_without_arguments_is_a_usage_error(cli):
    result = subprocess.run([*cli], capture_output=True, text=True, timeout=CLI_TIMEOUT,
                            check=False)
    assert result.returncode != 0
    assert "usage" in result.stderr.lower()


# ------------------------------------------------------- resume semantics
def test_failed_blocks_only_are_run_again(tmp_path, capsys):
    failing = {3, 7, 8, 15}
    calls = Counter()
    attempt = {"run": 1}

    def process(block):
        calls[(attempt["run"], block.index)] += 1
        if attempt["run"] == 1 and block.index in failing:
            raise RuntimeError(f"block {block.index} fails in the first run")

    task = line_task("resume", 20, process, max_retries=1)
    result = daisy.run_blockwise(task, multiprocessing=False, progress=False,
                                 ledger_dir=tmp_path)
    assert not result
    assert result["resume"].failed_count == len(failing)
    path = ledger_path(tmp_path, "resume")
    assert stored_done(path) == set(range(20)) - failing
    assert set(stored_failed(path)) == failing
    assert all("fails in the first run" in error for error in stored_failed(path).values())
    assert read_ledger_summary(path)["failed"] == len(failing)
    capsys.readouterr()

    attempt["run"] = 2
    task = line_task("resume", 20, process, max_retries=1)
    result = daisy.run_blockwise(task, multiprocessing=False, progress=False,
                                 ledger_dir=tmp_path)
    assert result
    assert {index for run, index in calls if run == 2} == failing
    assert all(count == 1 for (run, _), count in calls.items() if run == 2)
    state = result["resume"]
    assert state.completed_count == 20
    assert state.skipped_count == 20 - len(failing)
    assert skipped_in_summary(capsys.readouterr().out, "resume") == 20 - len(failing)
    assert stored_done(path) == set(range(20))
    assert stored_failed(path) == {}

    # a third run finds everything done and calls nothing
    attempt["run"] = 3
    result = daisy.run_blockwise(line_task("resume", 20, process), multiprocessing=False,
                                 progress=False, ledger_dir=tmp_path)
    assert result and result["resume"].skipped_count == 20
    assert not [key for key in calls if key[0] == 3]


def test_resume_with_conflicts_orphans_and_context(tmp_path):
    """A 2D task with context: a failed block orphans its neighbours; resuming runs both."""
    side = 6
    # position (1, 1): level 0 in daisy's order, so its conflicting neighbours wait for it
    # and become orphans
    failing = {7}
    calls = Counter()
    attempt = {"run": 1}

    def process(block):
        calls[(attempt["run"], block.index)] += 1
        if attempt["run"] == 1 and block.index in failing:
            raise RuntimeError("first run fails")

    result = daisy.run_blockwise(grid_task("g", side, process, max_retries=0),
                                 multiprocessing=False, progress=False, ledger_dir=tmp_path)
    state = result["g"]
    assert state.failed_count == 1 and state.orphaned_count > 0
    done_first = stored_done(ledger_path(tmp_path, "g"))
    first = {index for run, index in calls if run == 1}
    assert done_first == first - failing
    assert len(done_first) == side * side - 1 - state.orphaned_count

    attempt["run"] = 2
    result = daisy.run_blockwise(grid_task("g", side, process, max_retries=0),
                                 multiprocessing=False, progress=False, ledger_dir=tmp_path)
    assert result
    second = {index for run, index in calls if run == 2}
    assert second.isdisjoint(done_first)
    assert second | done_first == set(stored_done(ledger_path(tmp_path, "g")))
    assert len(second | done_first) == side * side
    assert result["g"].skipped_count == len(done_first)


def test_chain_resumes_each_task_from_its_own_ledger(tmp_path):
    calls = Counter()
    attempt = {"run": 1}

    def process_a(block):
        calls[("a", attempt["run"], block.index)] += 1
        if attempt["run"] == 1 and block.index >= 8:
            raise RuntimeError("a fails on its last blocks in the first run")

    def process_b(block):
        calls[("b", attempt["run"], block.index)] += 1

    def tasks(folder_a, folder_b=None):
        a = line_task("a", 10, process_a, max_retries=0, ledger=folder_a)
        b = line_task("b", 10, process_b, max_retries=0, upstream_tasks=[a], ledger=folder_b)
        return a, b

    _, b = tasks(tmp_path / "own-a")
    result = daisy.run_blockwise([b], multiprocessing=False, progress=False,
                                 ledger_dir=tmp_path / "default")
    assert result["a"].failed_count == 2 and result["b"].orphaned_count == 2
    # a's own folder wins; b uses the run's default folder
    assert stored_done(ledger_path(tmp_path / "own-a", "a")) == set(range(8))
    assert stored_done(ledger_path(tmp_path / "default", "b")) == set(range(8))
    assert not ledger_path(tmp_path / "default", "a").exists()

    attempt["run"] = 2
    _, b = tasks(tmp_path / "own-a")
    result = daisy.run_blockwise([b], multiprocessing=False, progress=False,
                                 ledger_dir=tmp_path / "default")
    assert result
    assert {key[2] for key in calls if key[:2] == ("a", 2)} == {8, 9}
    assert {key[2] for key in calls if key[:2] == ("b", 2)} == {8, 9}
    assert (result["a"].skipped_count, result["b"].skipped_count) == (8, 8)


def test_task_ledger_argument_without_run_default(tmp_path):
    calls = Counter()
    task = line_task("own", 5, lambda block: calls.update([block.index]),
                     ledger=tmp_path / "mine")
    assert daisy.run_blockwise(task, multiprocessing=False, progress=False)
    assert is_ledger(ledger_path(tmp_path / "mine", "own"))
    task = line_task("own", 5, lambda block: calls.update([block.index]),
                     ledger=tmp_path / "mine")
    result = daisy.run_blockwise(task, multiprocessing=False, progress=False)
    assert result["own"].skipped_count == 5
    assert calls == Counter(range(5))


def test_fresh_run_processes_every_block_again(tmp_path, capsys):
    calls = Counter()
    task = line_task("f", 12, lambda block: calls.update([block.index]))
    assert daisy.run_blockwise(task, multiprocessing=False, progress=False,
                               ledger_dir=tmp_path)
    result = daisy.run_blockwise(task, multiprocessing=False, progress=False,
                                 ledger_dir=tmp_path, fresh=True)
    assert result["f"].skipped_count == 0
    assert calls == Counter({index: 2 for index in range(12)})
    assert stored_done(ledger_path(tmp_path, "f")) == set(range(12))


def test_check_function_combines_with_the_ledger(tmp_path, capsys):
    total = 30
    failing = set(range(0, total, 3))          # fail in the first run
    found_done = {0, 6, 12, 18}                # ... of which the check reports these done
    calls = Counter()
    checked = Counter()
    attempt = {"run": 1}

    def process(block):
        calls[(attempt["run"], block.index)] += 1
        if attempt["run"] == 1 and block.index in failing:
            raise RuntimeError("first run fails")

    def check(block):
        checked[(attempt["run"], block.index)] += 1
        return block.index in found_done

    task = line_task("c", total, process, max_retries=0)
    daisy.run_blockwise(task, multiprocessing=False, progress=False, ledger_dir=tmp_path)
    assert stored_done(ledger_path(tmp_path, "c")) == set(range(total)) - failing
    capsys.readouterr()

    attempt["run"] = 2
    task = line_task("c", total, process, max_retries=0, check_function=check)
    result = daisy.run_blockwise(task, multiprocessing=False, progress=False,
                                 ledger_dir=tmp_path)
    assert result
    # blocks done in the ledger are neither checked nor processed
    assert {index for run, index in checked if run == 2} == failing
    assert {index for run, index in calls if run == 2} == failing - found_done
    skipped = total - len(failing) + len(found_done)
    assert result["c"].skipped_count == skipped
    assert result["c"].completed_count == total
    assert skipped_in_summary(capsys.readouterr().out, "c") == skipped
    # blocks the check found done are remembered too
    assert stored_done(ledger_path(tmp_path, "c")) == set(range(total))

    attempt["run"] = 3
    result = daisy.run_blockwise(line_task("c", total, process), multiprocessing=False,
                                 progress=False, ledger_dir=tmp_path)
    assert result["c"].skipped_count == total
    assert not [key for key in calls if key[0] == 3]


def test_failing_post_check_is_not_recorded_as_done(tmp_path):
    calls = Counter()
    attempt = {"run": 1}
    rejected = {2, 5}

    def post_check(block):
        return attempt["run"] > 1 or block.index not in rejected

    def make():
        return line_task("p", 8, lambda block: calls.update([(attempt["run"], block.index)]),
                         max_retries=0, check_function=(None, post_check))

    result = daisy.run_blockwise(make(), multiprocessing=False, progress=False,
                                 ledger_dir=tmp_path)
    assert result["p"].failed_count == 2
    assert stored_done(ledger_path(tmp_path, "p")) == set(range(8)) - rejected
    attempt["run"] = 2
    result = daisy.run_blockwise(make(), multiprocessing=False, progress=False,
                                 ledger_dir=tmp_path)
    assert result and result["p"].skipped_count == 6
    assert {index for run, index in calls if run == 2} == rejected


def test_without_a_ledger_nothing_is_remembered(tmp_path, capsys):
    calls = Counter()
    for _ in range(2):
        task = line_task("plain", 10, lambda block: calls.update([block.index]))
        result = daisy.run_blockwise(task, multiprocessing=False, progress=False)
        assert result and result["plain"].skipped_count == 0
    assert calls == Counter({index: 2 for index in range(10)})
    assert skipped_in_summary(capsys.readouterr().out, "plain") == 0
    assert not list(tmp_path.rglob(f"*{SUFFIX}*"))
    assert not list(tmp_path.rglob("*.sqlite*"))


def test_without_a_ledger_nothing_is_remembered_with_workers(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()

    def process(block):
        descriptor = os.open(marks / "lines", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(descriptor, f"{block.index}\n".encode())
        os.close(descriptor)

    for _ in range(2):
        result = daisy.run_blockwise(line_task("plain", 10, process, num_workers=2),
                                     progress=False, log_dir=tmp_path / "logs")
        assert result and result["plain"].skipped_count == 0
    lines = Counter(int(line) for line in (marks / "lines").read_text().split())
    assert lines == Counter({index: 2 for index in range(10)})
    assert not list(tmp_path.rglob(f"*{SUFFIX}*"))


def test_resume_with_worker_processes(tmp_path):
    """The server records finished blocks; a second run skips them and reruns failures."""
    marks = tmp_path / "marks"
    marks.mkdir()
    failing = {2, 11, 17}
    (tmp_path / "fail-first-run").touch()

    def process(block):
        if block.index in failing and (tmp_path / "fail-first-run").exists():
            raise RuntimeError("fails while the marker exists")
        descriptor = os.open(marks / "lines", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(descriptor, f"{block.index}\n".encode())
        os.close(descriptor)

    def make():
        return line_task("w", 24, process, num_workers=2, max_retries=0)

    result = daisy.run_blockwise(make(), progress=False, log_dir=tmp_path / "logs",
                                 ledger_dir=tmp_path / "ledgers")
    assert not result and result["w"].failed_count == len(failing)
    path = ledger_path(tmp_path / "ledgers", "w")
    first = [int(line) for line in (marks / "lines").read_text().split()]
    assert stored_done(path) == set(first) == set(range(24)) - failing
    assert set(stored_failed(path)) == failing

    (tmp_path / "fail-first-run").unlink()
    result = daisy.run_blockwise(make(), progress=False, log_dir=tmp_path / "logs",
                                 ledger_dir=tmp_path / "ledgers")
    assert result and result["w"].skipped_count == 24 - len(failing)
    lines = [int(line) for line in (marks / "lines").read_text().split()]
    assert sorted(lines[len(first):]) == sorted(failing)
    assert stored_done(path) == set(range(24))
    status = run_status(tmp_path / "ledgers")
    assert status.returncode == 0, status
    assert "24 done, 0 failed, 24 total" in status.stdout


def test_check_function_combines_with_the_ledger_with_worker_processes(tmp_path):
    """The server calls the check; blocks it finds done are skipped and remembered."""
    marks = tmp_path / "marks"
    marks.mkdir()
    failing = {1, 4, 9, 13, 16}
    found_done = {4, 13}
    (tmp_path / "fail-first-run").touch()
    checked = Counter()

    def process(block):
        if block.index in failing and (tmp_path / "fail-first-run").exists():
            raise RuntimeError("fails while the marker exists")
        descriptor = os.open(marks / "lines", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(descriptor, f"{block.index}\n".encode())
        os.close(descriptor)

    def check(block):
        checked[block.index] += 1  # runs in this process, in the block server
        return block.index in found_done

    def run(**options):
        return daisy.run_blockwise(line_task("wc", 20, process, num_workers=2, max_retries=0,
                                             **options),
                                   progress=False, log_dir=tmp_path / "logs",
                                   ledger_dir=tmp_path / "ledgers")

    assert not run()
    first = len((marks / "lines").read_text().split())
    assert first == 20 - len(failing)
    (tmp_path / "fail-first-run").unlink()
    result = run(check_function=check)
    assert result
    assert set(checked) == failing, "blocks done in the ledger must not be checked"
    lines = [int(line) for line in (marks / "lines").read_text().split()]
    assert sorted(lines[first:]) == sorted(failing - found_done)
    assert result["wc"].skipped_count == 20 - len(failing) + len(found_done)
    assert stored_done(ledger_path(tmp_path / "ledgers", "wc")) == set(range(20))


def test_ledger_meta_records_task_and_geometry_of_the_run(tmp_path):
    task = daisy.Task("m", total_roi=Roi((-2, 0), (24, 30)), read_roi=Roi((-2, 0), (8, 10)),
                      write_roi=Roi((0, 0), (4, 10)), process_function=lambda block: None,
                      fit="shrink")
    daisy.run_blockwise(task, multiprocessing=False, progress=False, ledger_dir=tmp_path)
    meta = stored_manifest(ledger_path(tmp_path, "m"))
    assert meta["task_id"] == "m"
    assert meta["format"] == FORMAT_VERSION
    stored = meta["geometry"]
    assert stored == task.grid.describe()
    assert stored["fit"] == "shrink"
    assert stored["num_blocks"] == task.num_blocks
    assert stored["total_roi"] == [[-2, 0], [24, 30]]
