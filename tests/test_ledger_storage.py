"""When the run's own storage fails or is slow: real runs, real worker processes, a real
full file system (a small tmpfs mounted for the test), a real read-only bind mount.

- A slow commit (a delay injected before each of the writer thread's real commits: the
  only part that is not real) does not stall the hand-out: blocks start while it runs.
- The disk fills mid-run: one warning, the run keeps serving, the writes are retried and
  nothing is lost or recorded wrongly; space freed, the ledger gets every block.
- The disk stays full (past ``STORAGE_PATIENCE``, or when the run ends): the run stops
  with a ``LedgerDiskFullError`` that says so, every job of a batch launcher ended, its
  payload files removed, the ledger intact and readable.
- A read-only ledger folder and a damaged ledger file each fail with their own message;
  only the damaged file's advises deleting it.

Executions are counted from lines a block appends to a file (``O_APPEND``, one write).
The tests need root (``mount``); without it they are skipped and say why.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from test_command_launcher import fake_lsf, lsf_shaped  # noqa: F401 - fixture

import luigi_daisy as daisy
from luigi_daisy import Roi
from luigi_daisy import ledger as ledger_module
from luigi_daisy.errors import (
    LedgerDamagedError,
    LedgerDiskFullError,
    LedgerReadOnlyError,
)
from luigi_daisy.ledger import Ledger, ledger_path, read_ledger_summary

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_stray_processes")]

FULL_WARNING = "is full"
DEADLINE = 60.0


# ------------------------------------------------------------------ helpers
def mount(*arguments: str) -> None:
    result = subprocess.run(["mount", *arguments], capture_output=True, text=True,
                            timeout=30, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here (mount {' '.join(arguments)}): "
                    f"{result.stderr.strip()}")


def unmount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True, timeout=30,
                      check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30,
                       check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs of its own, unmounted afterwards."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder))
    try:
        yield folder
    finally:
        unmount(folder)


def fill(folder: Path) -> Path:
    """Take every free byte of ``folder``'s file system; return the file that does."""
    filler = folder / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(descriptor, b"\0" * 4096)
    except OSError as error:
        assert error.errno == 28, error  # ENOSPC
    finally:
        os.close(descriptor)
    return filler


def note_block(events: str, seconds: float, block) -> None:
    """Append ``index pid start-time`` to ``events`` (one write), then work a while."""
    descriptor = os.open(events, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(descriptor, f"{block.block_id[1]} {os.getpid()} {time.time()}\n".encode())
    finally:
        os.close(descriptor)
    time.sleep(seconds)


def executions(events: Path) -> Counter:
    if not events.exists():
        return Counter()
    return Counter(int(line.split()[0]) for line in events.read_text().splitlines())


def start_times(events: Path) -> list[float]:
    return sorted(float(line.split()[2]) for line in events.read_text().splitlines())


def recorded(folder: Path, task_id: str) -> set[int]:
    """The block ids a ledger records as done (read-only, as another host would)."""
    path = ledger_path(folder, task_id)
    if not path.exists():
        return set()
    summary = read_ledger_summary(path)
    with Ledger(path, task_id, summary["geometry"], read_only=True) as reader:
        return set(reader.done_indices().tolist())


def line_task(task_id: str, blocks: int, events: Path, seconds: float,
              num_workers: int = 2) -> daisy.Task:
    return daisy.Task(task_id, total_roi=Roi((0,), (blocks,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)),
                      process_function=functools.partial(note_block, str(events), seconds),
                      num_workers=num_workers, max_retries=0)


def in_thread(function) -> tuple[threading.Thread, dict]:
    outcome = {}

    def target() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:  # noqa: BLE001 - the test looks at it
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def wait_for(condition, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def full_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno == logging.WARNING and FULL_WARNING in record.getMessage()]


# ------------------------------------------------------------------ a slow commit
def test_a_slow_commit_does_not_stall_the_hand_out(tmp_path, monkeypatch):
    """Each real commit of the writer thread first waits COMMIT_SECONDS (the injected
    part, standing for an NFS commit); blocks keep starting meanwhile. With prefetch=0
    a worker gets its next block only from the server's loop, so a block that starts
    inside a commit proves the loop was serving during it."""
    commit_seconds = 1.0
    commits: list[tuple[float, float]] = []
    real_commit = Ledger._commit

    def slow_commit(self, done, failed) -> None:
        started = time.time()
        time.sleep(commit_seconds)
        real_commit(self, done, failed)
        commits.append((started, time.time()))

    monkeypatch.setattr(Ledger, "_commit", slow_commit)
    events = tmp_path / "events"
    task = line_task("slow_commit", 400, events, 0.01)
    result = daisy.run_blockwise([task], progress=False, ledger_dir=tmp_path / "ledgers",
                                 prefetch=0)
    assert result["slow_commit"].succeeded
    assert executions(events) == Counter(range(400))
    assert recorded(tmp_path / "ledgers", "slow_commit") == set(range(400))
    starts = start_times(events)
    # commits that began and ended while blocks were being handed out
    inside = [(begin, end) for begin, end in commits if end < starts[-1] and begin > starts[0]]
    assert inside, f"no commit ran while blocks were handed out: {commits}, {starts[:3]}"
    for begin, end in inside:
        # a little after the commit began: a frame already on its way does not count
        during = [start for start in starts if begin + 0.2 < start < end]
        assert during, f"no block started during the commit {begin:.2f}..{end:.2f}"


# ------------------------------------------------------------------ a full disk
def test_a_disk_that_fills_mid_run_is_waited_out_and_loses_nothing(small_disk, tmp_path,
                                                                   caplog):
    caplog.set_level(logging.WARNING)
    events = tmp_path / "events"
    blocks = 600
    task = line_task("filling", blocks, events, 0.02)
    thread, outcome = in_thread(lambda: daisy.run_blockwise(
        [task], progress=False, ledger_dir=small_disk))
    try:
        wait_for(lambda: len(recorded(small_disk, "filling")) >= 10, "the first records")
        filler = fill(small_disk)
        wait_for(lambda: full_warnings(caplog), "the warning of the full disk")
        executed_at_warning = sum(executions(events).values())
        recorded_at_warning = recorded(small_disk, "filling")
        # the run keeps serving while the disk is full
        wait_for(lambda: sum(executions(events).values()) >= min(
            blocks, executed_at_warning + 20), "blocks processed while the disk is full")
        time.sleep(1.5)  # at least one more (failing) write
        while_full = recorded(small_disk, "filling")
        # never a block recorded that did not run
        assert while_full <= set(executions(events))
        assert recorded_at_warning <= while_full
    finally:
        (small_disk / "filler").unlink(missing_ok=True)
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"]["filling"].succeeded
    assert executions(events) == Counter(range(blocks)), "a block ran twice or never"
    summary = read_ledger_summary(ledger_path(small_disk, "filling"))
    assert summary["done"] == blocks and summary["total"] == blocks
    assert len(full_warnings(caplog)) == 1, full_warnings(caplog)
    del filler


@pytest.mark.parametrize("when", ["during_the_run", "at_its_end"])
def test_a_disk_that_stays_full_stops_the_run_cleanly(small_disk, tmp_path, fake_lsf,  # noqa: F811
                                                      monkeypatch, caplog, when):
    """With a batch launcher (a command template around fake ``bsub``/``bkill``): the
    run stops with a ``LedgerDiskFullError``, no job is left, no payload file remains,
    the ledger is intact and records what the message says."""
    caplog.set_level(logging.WARNING)
    if when == "during_the_run":
        monkeypatch.setattr(ledger_module, "STORAGE_PATIENCE", 2.0)
        blocks, seconds = 3000, 0.02  # a minute of work: it stops long before
    else:
        monkeypatch.setattr(ledger_module, "FINAL_PATIENCE", 1.0)
        blocks, seconds = 300, 0.01
    events = tmp_path / "events"
    task = line_task("full", blocks, events, seconds)
    launcher = lsf_shaped(fake_lsf, tmp_path)
    thread, outcome = in_thread(lambda: daisy.run_blockwise(
        [task], progress=False, ledger_dir=small_disk, launcher=launcher))
    try:
        wait_for(lambda: len(recorded(small_disk, "full")) >= 10, "the first records")
        fill(small_disk)
        thread.join(DEADLINE)
        assert not thread.is_alive()
        error = outcome.get("error")
        assert isinstance(error, LedgerDiskFullError), outcome
        message = str(error)
        assert "full" in message and str(small_disk) in message
        assert "delete" not in message
        if when == "during_the_run":
            assert "storage_patience" in message
            assert sum(executions(events).values()) < blocks
        else:
            assert "the run ended" in message
            assert executions(events) == Counter(range(blocks))
        # the ledger is intact: readable, and records what the message says
        summary = read_ledger_summary(ledger_path(small_disk, "full"))
        assert f"records {summary['done']:,} of the task's {blocks:,} blocks" in message
        assert recorded(small_disk, "full") <= set(executions(events))
    finally:
        (small_disk / "filler").unlink(missing_ok=True)
    # every job ended, every payload file removed
    assert launcher.jobs and all(job.finished for job in launcher.jobs.values())
    payloads = tmp_path / "logs" / f".payloads-{os.getuid()}"
    assert not payloads.exists() or not list(payloads.iterdir())
    assert len(full_warnings(caplog)) == 1, full_warnings(caplog)
    lost = [record.getMessage() for record in caplog.records
            if "was lost" in record.getMessage()]
    assert not lost, f"workers stopped by the run's end reported as lost: {lost}"
    # the next run resumes from the intact ledger
    done_before = recorded(small_disk, "full")
    events.unlink()
    monkeypatch.setattr(ledger_module, "STORAGE_PATIENCE", 600.0)
    quick = line_task("full", blocks, events, 0.0)
    assert daisy.run_blockwise([quick], progress=False, ledger_dir=small_disk)["full"]
    assert set(executions(events)) == set(range(blocks)) - done_before


# ------------------------------------------------------------------ read-only, damaged
def test_a_read_only_ledger_folder_has_its_own_message(tmp_path):
    folder, read_only = tmp_path / "ledgers", tmp_path / "read_only"
    read_only.mkdir()
    events = tmp_path / "events"
    task = line_task("ro", 20, events, 0.0)
    with Ledger(ledger_path(folder, "ro"), "ro", task.grid.describe()) as ledger:
        for index in range(5):
            ledger.record_done(index)
    mount("--bind", str(folder), str(read_only))
    try:
        mount("-o", "remount,bind,ro", str(read_only))
        with pytest.raises(LedgerReadOnlyError) as refused:
            daisy.run_blockwise([task], progress=False, ledger_dir=read_only)
        message = str(refused.value)
        assert "read-only" in message and str(read_only) in message
        assert "delete" not in message
        assert not events.exists(), "blocks ran although nothing could be recorded"
        # without the lock file too: the ledger itself refuses
        with pytest.raises(LedgerReadOnlyError, match="read-only") as refused:
            Ledger(ledger_path(read_only, "ro"), "ro", task.grid.describe())
        assert "delete" not in str(refused.value)
    finally:
        unmount(read_only)
    assert read_ledger_summary(ledger_path(folder, "ro"))["done"] == 5


def test_a_damaged_ledger_file_has_its_own_message_with_the_delete_advice(tmp_path):
    events = tmp_path / "events"
    task = line_task("damaged", 20, events, 0.0)
    folder = tmp_path / "ledgers"
    with Ledger(ledger_path(folder, "damaged"), "damaged", task.grid.describe()) as ledger:
        ledger.record_done(3)
    path = ledger_path(folder, "damaged")
    (chunk,) = path.glob("done-*")
    with open(chunk, "r+b") as file:
        file.write(b"this is no zlib stream, it was overwritten")
    with pytest.raises(LedgerDamagedError) as refused:
        daisy.run_blockwise([task], progress=False, ledger_dir=folder)
    message = str(refused.value)
    assert str(path) in message and "delete the ledger" in message and "fresh=True" in message
    assert not events.exists()
