"""Reading the ledger of a task another run processes happens beside the loop that hands
out blocks: a followed ledger on a slow filesystem (a read of a second over NFS) never
holds up the blocks of the run's own tasks."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

import luigi_daisy as daisy
from luigi_daisy import Roi
from luigi_daisy.claims import LedgerFollower, TaskLock, lock_path
from luigi_daisy.ledger import ledger_path

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("no_stray_processes")]

#: how long each read of the followed ledger takes
SLOW_READ_SECONDS = 1.0
#: the run's own task: blocks of 20 ms, about 3 s of work for its 2 workers
OWN_BLOCKS = 300


def line_task(task_id: str, num_blocks: int, process_function, **options) -> daisy.Task:
    return daisy.Task(task_id, total_roi=Roi((0,), (num_blocks,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)), process_function=process_function,
                      read_write_conflict=False, **options)


def stamp(folder: Path, block) -> None:
    """Note when the block started, then work 20 ms."""
    (folder / f"{time.time():.6f}-{uuid.uuid4().hex[:8]}").touch()
    time.sleep(0.02)


def test_a_slow_followed_ledger_does_not_hold_up_the_run_s_own_blocks(tmp_path,
                                                                      monkeypatch):
    ledgers = tmp_path / "ledgers"
    ledgers.mkdir()
    starts = tmp_path / "starts"
    starts.mkdir()
    followed = line_task("elsewhere", 4, lambda block: None)
    own = line_task("own", OWN_BLOCKS, lambda block: stamp(starts, block), num_workers=2)
    # another run holds the followed task: its lock is taken (flock: per open file)
    other_run = TaskLock(lock_path(ledger_path(ledgers, "elsewhere")))
    assert other_run.try_acquire()

    reads: list[tuple[float, float]] = []
    real_new_done = LedgerFollower.new_done

    def slow_new_done(self):
        began = time.time()
        time.sleep(SLOW_READ_SECONDS)
        found = real_new_done(self)
        reads.append((began, time.time()))
        return found

    monkeypatch.setattr(LedgerFollower, "new_done", slow_new_done)

    def let_go_when_own_is_done() -> None:  # the other run "dies": ours takes the task
        deadline = time.monotonic() + 120
        while len(list(starts.iterdir())) < OWN_BLOCKS and time.monotonic() < deadline:
            time.sleep(0.05)
        other_run.release()

    releaser = threading.Thread(target=let_go_when_own_is_done)
    releaser.start()
    try:
        result = daisy.run_blockwise([followed, own], progress=False, prefetch=0,
                                     ledger_dir=ledgers, log_dir=tmp_path / "logs")
    finally:
        other_run.release()
        releaser.join(130)
    assert result, result
    block_starts = sorted(float(path.name.split("-")[0]) for path in starts.iterdir())
    first_own, last_own = block_starts[0], block_starts[-1]
    # the first read is the run's set-up (what the other run finished before it began)
    during = [(began, ended) for began, ended in reads
              if began > first_own and ended < last_own]
    assert len(during) >= 2, f"too few slow reads while the run's own blocks ran: {reads}"
    # blocks of the run's own task started while each slow read was in progress (each
    # worker holds one block at a time: a stalled loop would start none for a second)
    for began, ended in during:
        assert any(began + 0.2 < at < ended for at in block_starts), (
            f"no block started during the followed ledger's read from {began:.2f} "
            f"to {ended:.2f}: the read stalled the hand-out")
