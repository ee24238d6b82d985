"""What the ledger costs, at scale, and how fast a run resumes from it.

``scale``
    Records of 10^6, 10^8 and 10^9 blocks (``--scale-blocks``) of a synthetic 1D task,
    no workers, in this version's format and (up to ``--sqlite-max`` blocks) in the
    SQLite ledger of the previous version, kept as ``luigi_daisy._sqlite_ledger`` for
    this comparison and for converting old records. Patterns ``finished``, ``99%``,
    ``50%``: bulk recording (blocks/s), size on disk, ``complete()``; single blocks
    (``record_done``, 10^4 a flush) and one-block commits into the ``50%`` record;
    resuming the ``99%`` record to its first remaining block, with peak memory.
    Targets: a finished 10^9-block record under 130 MB, >= 10^7 blocks/s in bulk,
    ``complete()`` under 10 ms, the first remaining block of 10^9 in under 5 s.

``cost``
    10^4 no-op 1D blocks (total ROI ``[0, 10000)``, one-voxel blocks,
    ``read_write_conflict=False``) with ``run_blockwise(..., multiprocessing=True)`` and
    2 workers, once without a ledger and once with ``ledger_dir=...``, alternating, each
    run in a fresh interpreter. Blocks per second end to end (``run_blockwise`` call to
    return), median of ``--repeat`` runs each, and the ratio. Target: the ledger costs
    less than 10% of the no-op throughput (ratio >= 0.90).

``resume``
    A 3D task of 100^3 = 10^6 blocks of 10^3 voxels that is 99% done: a ledger holding
    990,000 done blocks (a seeded random 1% is left), written with ``Ledger.record_done``
    and ``flush`` (one transaction; its time is printed). Two geometries:

    - ``noconflict``: no context, ``read_write_conflict=False``;
    - ``conflict``: 1 voxel of context on each side, ``read_write_conflict=True``.

    For each, in a fresh interpreter with its own copy of the ledger:

    - *scheduler*: ``LedgerSet.open`` + ``done_blocks()`` + ``BlockScheduler(tasks,
      done_blocks=...)`` + the first ``acquire``, in-process: time to the first remaining
      block (and each phase);
    - *run*: ``run_blockwise(..., multiprocessing=True, ledger_dir=...)`` with 2 workers
      on no-op blocks: time from the call to the start of the first processed block, and
      to the return (all 10^4 remaining blocks).

    Also the time of ``Ledger.is_complete`` (one query) on the 990,000-row ledger.
    Target: the first remaining block is reached in under 5 seconds.

Usage::

    python benchmarks/bench_ledger.py                  # all parts, --repeat 3
    python benchmarks/bench_ledger.py --parts scale --scale-blocks 1e6,1e8
    python benchmarks/bench_ledger.py --parts cost --repeat 5
    python benchmarks/bench_ledger.py --parts resume --cases conflict
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_MARKER = "BENCH-RESULT "
RECORD_VARIABLE = "BENCH_LEDGER_RECORD"

COST_BLOCKS = 10_000
COST_WORKERS = 2
RESUME_SIDE = 100          # blocks along each axis: 10^6 blocks
RESUME_WRITE = 10          # voxels of a write block along each axis
RESUME_DONE_FRACTION = 0.99
RESUME_WORKERS = 2
RESUME_CASES = ("noconflict", "conflict")
TARGET_COST_RATIO = 0.90   # throughput with ledger / without
TARGET_RESUME_S = 5.0      # time to the first remaining block
SCALE_SLICE = 10**7        # blocks recorded per commit by the scale part
SCALE_PATTERNS = ("finished", "99%", "50%")
SINGLES = 100_000          # blocks recorded one by one (record_done), SINGLE_BATCH a flush
SINGLE_BATCH = 10_000      # a run at 10^4 blocks/s flushes about so many a second
COMMITS = 100              # blocks recorded one per commit (record_done + flush)
TARGET_BYTES_1E9 = 130e6   # a finished 10^9-block record on disk
TARGET_BULK_PER_S = 1e7    # recording in bulk
TARGET_COMPLETE_S = 0.010  # complete()


# --------------------------------------------------------------------------- #
# Process functions (run in the workers)
# --------------------------------------------------------------------------- #
def noop_block(block: Any) -> None:
    """No-op process function."""


_record: dict[str, int] = {}


def record_start(block: Any) -> None:
    """No-op process function that appends ``index start_time`` to a file per process."""
    start = time.time()
    descriptor = _record.get("fd")
    if descriptor is None:
        path = f"{os.environ[RECORD_VARIABLE]}.{os.getpid()}"
        descriptor = _record["fd"] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                             0o644)
    os.write(descriptor, b"%d %.6f\n" % (block.index, start))


# --------------------------------------------------------------------------- #
# Tasks
# --------------------------------------------------------------------------- #
def cost_task(daisy: Any, process_function: Any) -> Any:
    roi = daisy.Roi
    return daisy.Task("noop", total_roi=roi((0,), (COST_BLOCKS,)), read_roi=roi((0,), (1,)),
                      write_roi=roi((0,), (1,)), process_function=process_function,
                      read_write_conflict=False, num_workers=COST_WORKERS, max_retries=0)


def resume_task(daisy: Any, case: str, process_function: Any) -> Any:
    roi = daisy.Roi
    extent = RESUME_SIDE * RESUME_WRITE
    if case == "noconflict":
        total = roi((0,) * 3, (extent,) * 3)
        read = write = roi((0,) * 3, (RESUME_WRITE,) * 3)
        conflict = False
    elif case == "conflict":
        total = roi((-1,) * 3, (extent + 2,) * 3)
        read = roi((-1,) * 3, (RESUME_WRITE + 2,) * 3)
        write = roi((0,) * 3, (RESUME_WRITE,) * 3)
        conflict = True
    else:
        raise ValueError(f"unknown case {case!r}; choose from {', '.join(RESUME_CASES)}")
    return daisy.Task(f"resume_{case}", total_roi=total, read_roi=read, write_roi=write,
                      process_function=process_function, read_write_conflict=conflict,
                      num_workers=RESUME_WORKERS, max_retries=0)


def valid_indices(grid: Any) -> Any:
    """Every block index of a grid (indices live in the overhang grid)."""
    import numpy as np
    positions = np.indices(grid.grid_shape).reshape(len(grid.grid_shape), -1)
    return np.ravel_multi_index(positions, grid.id_grid_shape).astype(np.int64)


# --------------------------------------------------------------------------- #
# Children
# --------------------------------------------------------------------------- #
def quiet_import() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import luigi_daisy
    return luigi_daisy


def emit(result: dict[str, Any]) -> int:
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


def child_cost(with_ledger: bool) -> int:
    """One no-op run, with or without a ledger; prints blocks per second."""
    daisy = quiet_import()
    work = Path(tempfile.mkdtemp(prefix="bench_ledger_cost_"))
    os.chdir(work)
    try:
        task = cost_task(daisy, noop_block)
        options: dict[str, Any] = {"ledger_dir": str(work / "ledger")} if with_ledger else {}
        # one-time imports (the run machinery, and sqlite3 and numpy for the ledger)
        # happen before the clock starts: this measures what the ledger costs per block
        run_blockwise = daisy.run_blockwise
        import luigi_daisy.ledger  # noqa: F401
        called = time.perf_counter()
        result = run_blockwise([task], multiprocessing=True, progress=False,
                               log_dir=work / "logs", **options)
        elapsed = time.perf_counter() - called
        state = result["noop"]
        if not result or state.completed_count != COST_BLOCKS:
            print(f"ERROR: run did not complete: {state!r}", file=sys.stderr)
            return 2
        recorded = None
        if with_ledger:
            from luigi_daisy.ledger import ledger_path, read_ledger_summary
            recorded = read_ledger_summary(ledger_path(work / "ledger", "noop"))["done"]
            if recorded != COST_BLOCKS:
                print(f"ERROR: ledger holds {recorded} blocks", file=sys.stderr)
                return 2
    finally:
        os.chdir(REPO_ROOT)
        shutil.rmtree(work, ignore_errors=True)
    return emit({"ledger": with_ledger, "total_s": elapsed,
                 "blocks_per_s": COST_BLOCKS / elapsed})


def build_resume_ledger(case: str, folder: Path, seed: int = 0) -> dict[str, Any]:
    """Write a 99%-done ledger for ``case`` into ``folder``; return timings and counts."""
    import numpy as np
    daisy = quiet_import()
    from luigi_daisy.ledger import LedgerSet
    task = resume_task(daisy, case, noop_block)
    indices = valid_indices(task.grid)
    assert len(indices) == task.num_blocks == RESUME_SIDE**3
    rng = np.random.default_rng(seed)
    remaining = round(len(indices) * (1 - RESUME_DONE_FRACTION))
    done = np.sort(rng.permutation(indices)[remaining:])
    started = time.perf_counter()
    ledgers = LedgerSet.open([task], folder, fresh=True)
    ledger = ledgers.ledgers[task.task_id]
    for index in done.tolist():
        ledger.record_done(index)
    recorded = time.perf_counter()
    ledger.flush()
    flushed = time.perf_counter()
    ledgers.close()
    return {"done": len(done), "remaining": remaining, "record_s": recorded - started,
            "flush_s": flushed - recorded, "build_s": time.perf_counter() - started,
            "file_mb": disk_bytes(folder) / 1e6}


def child_resume_scheduler(case: str, pristine: Path) -> int:
    """In-process: open the ledger, build the scheduler, acquire the first block."""
    daisy = quiet_import()
    from luigi_daisy.ledger import LedgerSet
    from luigi_daisy.scheduler import BlockScheduler
    work = Path(tempfile.mkdtemp(prefix="bench_ledger_resume_"))
    try:
        folder = work / "ledger"
        shutil.copytree(pristine, folder)
        task = resume_task(daisy, case, noop_block)
        t0 = time.perf_counter()
        ledgers = LedgerSet.open([task], folder)
        t1 = time.perf_counter()
        done_blocks = ledgers.done_blocks()
        t2 = time.perf_counter()
        scheduler = BlockScheduler([task], done_blocks=done_blocks)
        t3 = time.perf_counter()
        block = scheduler.acquire(task.task_id)
        t4 = time.perf_counter()
        ledger = ledgers.ledgers[task.task_id]
        q0 = time.perf_counter()
        complete = ledger.is_complete(task.num_blocks)
        q1 = time.perf_counter()
        done_set = set(done_blocks[task.task_id].indices().tolist())
        problems = []
        if block is None:
            problems.append("no block to acquire")
        elif block.index in done_set:
            problems.append(f"first block {block.index} is recorded as done")
        if complete:
            problems.append("is_complete() says a 99%-done task is complete")
        state = scheduler.task_states[task.task_id]
        if state.skipped_count != len(done_set):
            problems.append(f"skipped {state.skipped_count}, ledger holds {len(done_set)}")
        # how many remaining blocks are ready at once (the resume frontier)
        ready = state.ready_count + 1
        ledgers.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if problems:
        print("ERROR: " + "; ".join(problems), file=sys.stderr)
        return 2
    return emit({"case": case, "open_s": t1 - t0, "read_done_s": t2 - t1,
                 "scheduler_s": t3 - t2, "first_acquire_s": t4 - t3,
                 "first_block_s": t4 - t0, "is_complete_s": q1 - q0,
                 "ready_at_start": ready})


def child_resume_run(case: str, pristine: Path) -> int:
    """A full multiprocessing run of the remaining 1%."""
    daisy = quiet_import()
    work = Path(tempfile.mkdtemp(prefix="bench_ledger_run_"))
    os.chdir(work)
    try:
        folder = work / "ledger"
        shutil.copytree(pristine, folder)
        records = work / "records"
        records.mkdir()
        os.environ[RECORD_VARIABLE] = str(records / "starts")
        task = resume_task(daisy, case, record_start)
        called = time.time()
        result = daisy.run_blockwise([task], multiprocessing=True, progress=False,
                                     log_dir=work / "logs", ledger_dir=folder)
        returned = time.time()
        starts = []
        indices = []
        for path in records.iterdir():
            for line in path.read_bytes().splitlines():
                index, start = line.split()
                indices.append(int(index))
                starts.append(float(start))
        state = result[task.task_id]
    finally:
        os.chdir(REPO_ROOT)
        shutil.rmtree(work, ignore_errors=True)
    expected = round(RESUME_SIDE**3 * (1 - RESUME_DONE_FRACTION))
    problems = []
    if not result:
        problems.append(f"run failed: {state!r}")
    if len(indices) != expected or len(set(indices)) != expected:
        problems.append(f"processed {len(indices)} blocks ({len(set(indices))} distinct), "
                        f"expected the {expected} remaining once each")
    if state.skipped_count != RESUME_SIDE**3 - expected:
        problems.append(f"skipped {state.skipped_count}")
    if problems:
        print("ERROR: " + "; ".join(problems), file=sys.stderr)
        return 2
    return emit({"case": case, "first_block_s": min(starts) - called,
                 "total_s": returned - called, "processed": len(indices)})


def disk_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (or of the file ``path``)."""
    if path.is_file():
        return path.stat().st_size
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def scale_task(daisy: Any, blocks: int) -> Any:
    """A 1D task of ``blocks`` one-voxel blocks with nothing to wait for."""
    roi = daisy.Roi
    return daisy.Task("scale", total_roi=roi((0,), (blocks,)), read_roi=roi((0,), (1,)),
                      write_roi=roi((0,), (1,)), process_function=noop_block,
                      read_write_conflict=False, max_retries=0)


def scale_pattern(pattern: str, start: int, stop: int, seed: int) -> Any:
    """The done blocks of ``[start, stop)`` in a pattern: ``finished`` (all), ``99%``
    (a seeded random 1% left), ``50%`` (a random half: what bits cannot compress)."""
    import numpy as np
    indices = np.arange(start, stop, dtype=np.int64)
    if pattern == "finished":
        return indices
    rng = np.random.default_rng(seed + start)
    keep = rng.random(stop - start) >= (0.01 if pattern == "99%" else 0.5)
    return indices[keep]


def child_scale(kind: str, blocks: int, pattern: str, folder: Path) -> int:
    """Write a record of ``blocks`` blocks in ``pattern`` into ``folder`` (bulk, by
    slices of SCALE_SLICE, one commit each); time it, its size, ``complete()``, and the
    recording of single blocks."""
    import numpy as np
    daisy = quiet_import()
    if kind == "sqlite":
        from luigi_daisy import _sqlite_ledger as module
    else:
        from luigi_daisy import ledger as module  # type: ignore[no-redef]
    task = scale_task(daisy, blocks)
    geometry = task.grid.describe()
    path = module.ledger_path(folder, task.task_id)
    recorded = 0
    started = time.perf_counter()
    with module.Ledger(path, task.task_id, geometry, fresh=True) as ledger:
        for start in range(0, blocks, SCALE_SLICE):
            indices = scale_pattern(pattern, start, min(start + SCALE_SLICE, blocks), 0)
            if kind == "sqlite":
                for index in indices.tolist():
                    ledger.record_done(index)
            else:
                ledger.record_done_many(indices)
            ledger.flush()
            recorded += indices.size
    bulk_s = time.perf_counter() - started
    size = disk_bytes(path)
    complete_s = []
    for _ in range(21):
        q0 = time.perf_counter()
        summary = module.read_ledger_summary(path)
        complete_s.append(time.perf_counter() - q0)
        assert summary["done"] == recorded, (summary["done"], recorded)
    # single blocks: a run's batches (SINGLE_BATCH per flush), and one block per commit,
    # into the half-done record (the blocks it left, in a seeded random order)
    singles_s = commits_s = None
    if pattern == "50%":
        first = min(blocks, SCALE_SLICE)
        missing = np.setdiff1d(np.arange(first), scale_pattern(pattern, 0, first, 0))
        missing = np.random.default_rng(1).permutation(missing)
        singles = min(SINGLES, (missing.size - COMMITS) // SINGLE_BATCH * SINGLE_BATCH)
        with module.Ledger(path, task.task_id, geometry) as ledger:
            q0 = time.perf_counter()
            chosen = missing[:singles].tolist()
            for number, index in enumerate(chosen, 1):
                ledger.record_done(index)
                if number % SINGLE_BATCH == 0:
                    ledger.flush()
            ledger.flush()
            singles_s = (time.perf_counter() - q0) / max(len(chosen), 1)
            q0 = time.perf_counter()
            chosen = missing[singles:singles + COMMITS].tolist()
            for index in chosen:
                ledger.record_done(index)
                ledger.flush()
            commits_s = (time.perf_counter() - q0) / max(len(chosen), 1)
            recorded = ledger.done_count()
    return emit({"kind": kind, "blocks": blocks, "pattern": pattern, "recorded": recorded,
                 "bulk_s": bulk_s, "bulk_per_s": blocks / bulk_s, "bytes": size,
                 "complete_s": statistics.median(complete_s),
                 "single_s": singles_s, "commit_s": commits_s})


def child_scale_resume(kind: str, blocks: int, folder: Path) -> int:
    """Resume the 99%-done record in ``folder``: open it, read the done blocks, build the
    scheduler, acquire the first remaining block."""
    daisy = quiet_import()
    if kind == "sqlite":
        from luigi_daisy import _sqlite_ledger as module
    else:
        from luigi_daisy import ledger as module  # type: ignore[no-redef]
    from luigi_daisy.scheduler import BlockScheduler
    task = scale_task(daisy, blocks)
    t0 = time.perf_counter()
    if kind == "sqlite":  # what the previous version's LedgerSet.open and done_blocks did
        ledgers = module.Ledger(module.ledger_path(folder, task.task_id), task.task_id,
                                task.grid.describe())
        t1 = time.perf_counter()
        done_blocks = {task.task_id: ledgers.done_indices()}
    else:
        ledgers = module.LedgerSet.open([task], folder)
        t1 = time.perf_counter()
        done_blocks = ledgers.done_blocks()
    t2 = time.perf_counter()
    scheduler = BlockScheduler([task], done_blocks=done_blocks)
    t3 = time.perf_counter()
    block = scheduler.acquire(task.task_id)
    t4 = time.perf_counter()
    state = scheduler.task_states[task.task_id]
    done = len(done_blocks[task.task_id])
    ledgers.close()
    problems = []
    if block is None or block.index in scheduler._progress[task.task_id].done_before:
        problems.append(f"first block {block} is none or recorded as done")
    if state.skipped_count != done:
        problems.append(f"skipped {state.skipped_count}, the record holds {done}")
    if problems:
        print("ERROR: " + "; ".join(problems), file=sys.stderr)
        return 2
    return emit({"kind": kind, "blocks": blocks, "open_s": t1 - t0, "read_done_s": t2 - t1,
                 "scheduler_s": t3 - t2, "first_acquire_s": t4 - t3,
                 "first_block_s": t4 - t0, "peak_rss_mb": peak_rss_mb()})


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- #
# Parent
# --------------------------------------------------------------------------- #
def child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    return env


def spawn(arguments: list[str], timeout: float) -> dict[str, Any]:
    """Run this script with ``arguments`` in a fresh interpreter; return its result."""
    command = [sys.executable, str(Path(__file__).resolve()), *arguments]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=child_env(), start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.communicate()
        return {"error": f"timeout after {timeout} s"}
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"error": f"exit {process.returncode}: {tail}"}


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if "error" not in run]
    return statistics.median(values) if values else None


def all_runs(runs: list[dict[str, Any]], key: str) -> str:
    return " ".join(fmt(run.get(key), 2) if "error" not in run else "err" for run in runs)


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, ["-" * width for width in widths], *rows]:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)))


def print_machine() -> None:
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{platform.platform()}")
    try:
        import sqlite3
        print(f"sqlite {sqlite3.sqlite_version}")
    except ImportError:
        pass


def run_cost(args: argparse.Namespace, misses: list[str]) -> None:
    print(f"\n== ledger cost: {COST_BLOCKS} no-op 1D blocks, {COST_WORKERS} workers, "
          f"multiprocessing=True, median of {args.repeat} ==")
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for repetition in range(args.repeat):
        order = (False, True) if repetition % 2 == 0 else (True, False)
        for with_ledger in order:
            arguments = ["--child", "cost"] + (["--ledger"] if with_ledger else [])
            result = spawn(arguments, args.timeout)
            runs[with_ledger].append(result)
            if "error" in result:
                print(f"  run {'with' if with_ledger else 'without'} ledger: "
                      f"{result['error']}")
    rows = []
    for with_ledger in (False, True):
        rows.append(["with ledger" if with_ledger else "without ledger",
                     fmt(median(runs[with_ledger], "total_s")),
                     fmt(median(runs[with_ledger], "blocks_per_s"), 0),
                     " ".join(fmt(run.get("blocks_per_s"), 0) for run in runs[with_ledger])])
    print_table(["", "total s", "blocks/s", "all runs (blocks/s)"], rows)
    without = median(runs[False], "blocks_per_s")
    with_ = median(runs[True], "blocks_per_s")
    if without and with_:
        ratio = with_ / without
        verdict = "meets" if ratio >= TARGET_COST_RATIO else "MISSES"
        print(f"throughput with / without ledger: {ratio:.3f} (cost {100 * (1 - ratio):+.1f}%)"
              f"; target >= {TARGET_COST_RATIO:.2f}: {verdict}")
        if ratio < TARGET_COST_RATIO:
            misses.append(f"ledger cost: ratio {ratio:.3f} < {TARGET_COST_RATIO}")
    else:
        misses.append("ledger cost: no figure (runs failed)")


def run_resume(args: argparse.Namespace, misses: list[str]) -> None:
    print(f"\n== resume: 3D task of {RESUME_SIDE}^3 = {RESUME_SIDE**3:,} blocks, "
          f"{RESUME_DONE_FRACTION:.0%} done in the ledger, median of {args.repeat} ==")
    for case in args.cases:
        base = Path(tempfile.mkdtemp(prefix=f"bench_ledger_{case}_"))
        try:
            pristine = base / "ledger"
            pristine.mkdir()
            build = build_resume_ledger(case, pristine)
            print(f"\n[{case}] ledger: {build['done']:,} done rows recorded in "
                  f"{build['record_s']:.2f} s, flushed in one transaction in "
                  f"{build['flush_s']:.2f} s; {build['file_mb']:.1f} MB; "
                  f"{build['remaining']:,} blocks left")
            scheduler_runs = [spawn(["--child", "resume-scheduler", "--case-of-child", case,
                                     "--ledger-folder", str(pristine)], args.timeout)
                              for _ in range(args.repeat)]
            run_runs = [spawn(["--child", "resume-run", "--case-of-child", case,
                               "--ledger-folder", str(pristine)], args.timeout)
                        for _ in range(args.repeat)]
        finally:
            shutil.rmtree(base, ignore_errors=True)
        for run in scheduler_runs + run_runs:
            if "error" in run:
                print(f"  error: {run['error']}")
        print("in-process (LedgerSet.open + done_blocks + BlockScheduler + first acquire):")
        print_table(["open s", "read done s", "scheduler s", "1st acquire s",
                     "to 1st block s", "is_complete s", "ready at start", "all runs (to 1st)"],
                    [[fmt(median(scheduler_runs, "open_s")),
                      fmt(median(scheduler_runs, "read_done_s")),
                      fmt(median(scheduler_runs, "scheduler_s")),
                      fmt(median(scheduler_runs, "first_acquire_s"), 5),
                      fmt(median(scheduler_runs, "first_block_s")),
                      fmt(median(scheduler_runs, "is_complete_s"), 4),
                      fmt(median(scheduler_runs, "ready_at_start"), 0),
                      all_runs(scheduler_runs, "first_block_s")]])
        print(f"run_blockwise(multiprocessing=True, {RESUME_WORKERS} workers) of the "
              f"remaining blocks:")
        print_table(["to 1st processed block s", "total s", "blocks processed",
                     "all runs (to 1st)"],
                    [[fmt(median(run_runs, "first_block_s")), fmt(median(run_runs, "total_s")),
                      fmt(median(run_runs, "processed"), 0),
                      all_runs(run_runs, "first_block_s")]])
        for label, runs in (("in-process", scheduler_runs), ("run_blockwise", run_runs)):
            first = median(runs, "first_block_s")
            if first is None:
                misses.append(f"resume {case} {label}: no figure (runs failed)")
                continue
            verdict = "meets" if first < TARGET_RESUME_S else "MISSES"
            print(f"  {label}: first remaining block after {first:.2f} s; target < "
                  f"{TARGET_RESUME_S:.0f} s: {verdict}")
            if first >= TARGET_RESUME_S:
                misses.append(f"resume {case} {label}: {first:.2f} s >= {TARGET_RESUME_S} s")


def run_scale(args: argparse.Namespace, misses: list[str]) -> None:
    print(f"\n== scale: records of {', '.join(f'{n:.0e}' for n in args.scale_blocks)} "
          f"blocks (synthetic 1D task, no workers), this format against the SQLite "
          f"ledger of the previous version up to {args.sqlite_max:.0e} blocks ==")
    print("(2 cores shared with other work: figures swing; bulk and sizes are one run per "
          "pattern, complete() the median of 21 reads, resume the median of --repeat)")
    rows, resume_rows = [], []
    for blocks in args.scale_blocks:
        kinds = ["new"] + (["sqlite"] if blocks <= args.sqlite_max else [])
        for kind in kinds:
            base = Path(tempfile.mkdtemp(prefix=f"bench_ledger_scale_{kind}_"))
            try:
                for pattern in SCALE_PATTERNS:
                    folder = base / pattern.replace("%", "")
                    folder.mkdir()
                    result = spawn(["--child", "scale", "--kind", kind, "--blocks",
                                    str(blocks), "--pattern", pattern, "--ledger-folder",
                                    str(folder)], args.timeout)
                    if "error" in result:
                        print(f"  {kind} {blocks:.0e} {pattern}: {result['error']}")
                        misses.append(f"scale {kind} {blocks:.0e} {pattern}: no figure")
                        continue
                    rows.append([kind, f"{blocks:.0e}", pattern, fmt(result["bulk_s"], 2),
                                 f"{result['bulk_per_s']:.3g}",
                                 fmt(result["bytes"] / 1e6, 3),
                                 fmt(1000 * result["complete_s"], 2),
                                 fmt(None if result["single_s"] is None
                                     else 1e6 * result["single_s"], 2),
                                 fmt(None if result["commit_s"] is None
                                     else 1000 * result["commit_s"], 2)])
                    check_scale(kind, blocks, pattern, result, misses)
                    if pattern != "99%":
                        shutil.rmtree(folder, ignore_errors=True)
                        continue
                    runs = [spawn(["--child", "scale-resume", "--kind", kind, "--blocks",
                                   str(blocks), "--ledger-folder", str(folder)], args.timeout)
                            for _ in range(args.repeat)]
                    for run in runs:
                        if "error" in run:
                            print(f"  resume {kind} {blocks:.0e}: {run['error']}")
                    first = median(runs, "first_block_s")
                    resume_rows.append([kind, f"{blocks:.0e}", fmt(median(runs, "open_s")),
                                        fmt(median(runs, "read_done_s")),
                                        fmt(median(runs, "scheduler_s")),
                                        fmt(median(runs, "first_acquire_s"), 5),
                                        fmt(first), fmt(median(runs, "peak_rss_mb"), 0),
                                        all_runs(runs, "first_block_s")])
                    if kind == "new" and (first is None or first >= TARGET_RESUME_S):
                        misses.append(f"scale resume {blocks:.0e}: {fmt(first)} s")
                    shutil.rmtree(folder, ignore_errors=True)
            finally:
                shutil.rmtree(base, ignore_errors=True)
    print_table(["format", "blocks", "done", "bulk s", "bulk blocks/s", "size MB",
                 "complete() ms", f"single us/block ({SINGLE_BATCH}/flush)",
                 "commit of 1 block ms"], rows)
    print("\nresume of the 99%-done record: LedgerSet.open + done_blocks + BlockScheduler "
          "+ first acquire (fresh interpreter each):")
    print_table(["format", "blocks", "open s", "read done s", "scheduler s",
                 "1st acquire s", "to 1st block s", "peak RSS MB", "all runs (to 1st)"],
                resume_rows)


def check_scale(kind: str, blocks: int, pattern: str, result: dict[str, Any],
                misses: list[str]) -> None:
    """Record the targets of issue 20 this figure misses (this format only)."""
    if kind != "new":
        return
    if blocks >= 10**9 and result["bytes"] >= TARGET_BYTES_1E9:
        misses.append(f"size at {blocks:.0e} {pattern}: {result['bytes'] / 1e6:.0f} MB")
    if pattern == "finished" and result["bulk_per_s"] < TARGET_BULK_PER_S:
        misses.append(f"bulk at {blocks:.0e}: {result['bulk_per_s']:.3g} blocks/s")
    if result["complete_s"] >= TARGET_COMPLETE_S:
        misses.append(f"complete() at {blocks:.0e}: {1000 * result['complete_s']:.1f} ms")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="scale,cost,resume",
                        help="comma-separated: scale, cost, resume (default all)")
    parser.add_argument("--scale-blocks", default="1e6,1e8,1e9",
                        help="record sizes of the scale part (blocks)")
    parser.add_argument("--sqlite-max", type=float, default=1e6,
                        help="largest size the SQLite ledger is measured at (it records "
                             "about 5*10^5 blocks/s one by one and is 25 bytes a block)")
    parser.add_argument("--cases", default=",".join(RESUME_CASES),
                        help="resume geometries: noconflict, conflict")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="time limit of one child run, seconds")
    child = parser.add_argument_group("child runs (used internally)")
    child.add_argument("--child", choices=("cost", "resume-scheduler", "resume-run",
                                           "scale", "scale-resume"))
    child.add_argument("--kind", choices=("new", "sqlite"))
    child.add_argument("--blocks", type=int)
    child.add_argument("--pattern", choices=SCALE_PATTERNS)
    child.add_argument("--ledger", action="store_true")
    child.add_argument("--case-of-child", choices=RESUME_CASES)
    child.add_argument("--ledger-folder", type=Path)
    args = parser.parse_args(argv)
    args.parts = [part for part in args.parts.split(",") if part]
    args.scale_blocks = [int(float(size)) for size in args.scale_blocks.split(",") if size]
    args.cases = [case for case in args.cases.split(",") if case]
    for case in args.cases:
        if case not in RESUME_CASES:
            parser.error(f"unknown case {case!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "cost":
        return child_cost(args.ledger)
    if args.child == "resume-scheduler":
        return child_resume_scheduler(args.case_of_child, args.ledger_folder)
    if args.child == "resume-run":
        return child_resume_run(args.case_of_child, args.ledger_folder)
    if args.child == "scale":
        return child_scale(args.kind, args.blocks, args.pattern, args.ledger_folder)
    if args.child == "scale-resume":
        return child_scale_resume(args.kind, args.blocks, args.ledger_folder)
    print_machine()
    misses: list[str] = []
    if "scale" in args.parts:
        run_scale(args, misses)
    if "cost" in args.parts:
        run_cost(args, misses)
    if "resume" in args.parts:
        run_resume(args, misses)
    print()
    if misses:
        print("targets missed:\n  " + "\n  ".join(misses))
    else:
        print("all targets met")
    return 0


if __name__ == "__main__":
    random.seed(0)
    sys.exit(main())
