"""Ledger commits off the loop: a run whose every commit is slow, against one whose
commits are not.

Each real commit of the ledgers' writer thread first sleeps ``--commit-seconds`` (standing
for an NFS commit of a second); the run's loop only appends records. Prints the wall time
of the same run with and without the delay, and the longest gap between two block starts
(with ``prefetch=0`` a worker's next block comes from the loop, so a stalled loop shows as
a gap as long as the commit). Also the cost of ``LedgerSet.record_done`` on the loop.

    python benchmarks/bench_ledger_writer.py [--blocks 400] [--commit-seconds 1.0]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import tempfile
import time
from pathlib import Path

import luigi_daisy as daisy
from luigi_daisy import Roi
from luigi_daisy.ledger import Ledger, LedgerSet


def note(events: str, seconds: float, block) -> None:
    descriptor = os.open(events, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(descriptor, f"{time.time()}\n".encode())
    os.close(descriptor)
    time.sleep(seconds)


def one_run(folder: Path, blocks: int, block_seconds: float, commit_seconds: float) -> tuple:
    real_commit = Ledger._commit

    def slow_commit(self, done, failed) -> None:
        time.sleep(commit_seconds)
        real_commit(self, done, failed)

    Ledger._commit = slow_commit
    events = folder / "events"
    try:
        task = daisy.Task("bench", total_roi=Roi((0,), (blocks,)), read_roi=Roi((0,), (1,)),
                          write_roi=Roi((0,), (1,)),
                          process_function=functools.partial(note, str(events), block_seconds),
                          num_workers=2)
        started = time.perf_counter()
        assert daisy.run_blockwise([task], progress=False, ledger_dir=folder / "ledgers",
                                   log_dir=folder / "logs", prefetch=0)
        wall = time.perf_counter() - started
    finally:
        Ledger._commit = real_commit
    starts = sorted(float(line) for line in events.read_text().splitlines())
    gap = max(later - earlier for earlier, later in itertools.pairwise(starts))
    return wall, gap


def record_cost(records: int = 1_000_000) -> float:
    with tempfile.TemporaryDirectory() as folder:
        ledger = Ledger(Path(folder) / "t.ledger.sqlite", "t", {"num_blocks": records})
        ledgers = LedgerSet({"t": ledger}, max_pending=records + 1)
        started = time.perf_counter()
        for index in range(records):
            ledgers.record_done("t", index)
        elapsed = time.perf_counter() - started
        ledger.discard_pending()
        ledger.close()
    return elapsed / records * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=400)
    parser.add_argument("--block-seconds", type=float, default=0.01)
    parser.add_argument("--commit-seconds", type=float, default=1.0)
    arguments = parser.parse_args()
    for commit_seconds in (0.0, arguments.commit_seconds):
        with tempfile.TemporaryDirectory(prefix="bench_ledger_writer_") as folder:
            wall, gap = one_run(Path(folder), arguments.blocks, arguments.block_seconds,
                                commit_seconds)
        print(f"{arguments.blocks} blocks of {arguments.block_seconds * 1e3:g} ms, 2 workers, "
              f"commit delay {commit_seconds:g} s: wall {wall:.2f} s, longest gap between "
              f"block starts {gap * 1e3:.0f} ms")
    print(f"LedgerSet.record_done on the loop: {record_cost():.0f} ns per record")


if __name__ == "__main__":
    main()
