"""What a fresh worker process costs: luigi_daisy (spawn, fork) against daisy 2.

Two measurements, each run of each implementation in a fresh interpreter of its own
(this script with ``--child``), medians over ``--repeat`` runs:

``startup``
    A 1D task of ``8 * W`` blocks, each sleeping 20 ms, ``W`` workers (1 and 8). The
    process function appends ``pid start`` per block to a file per worker process.
    Reported: the time from just before ``run_blockwise`` is called to the first block's
    start ("first block"), and to the first block of the last worker to begin ("all
    workers up"), which is the cost of starting ``W`` workers.
``throughput``
    No-op blocks, 1D, ``read_write_conflict=False``, 10^4 and 10^5 blocks, 2 workers:
    blocks per second from the ``run_blockwise`` call to its return (server start,
    worker start, processing, shutdown).

luigi_daisy is byte-compiled before the runs (as an installed package is), so that no
worker pays for compiling it.

Implementations: ``spawn`` (luigi_daisy's default), ``fork`` (``start_method="fork"``)
and ``daisy`` (the released daisy 2, whose workers are subprocesses fed a cloudpickle).

Usage::

    python benchmarks/bench_startup.py                     # everything, 3 runs each
    python benchmarks/bench_startup.py --only throughput --repeat 5
"""

from __future__ import annotations

import argparse
import compileall
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
MODULE_NAME = Path(__file__).stem
IMPLS = ("spawn", "fork", "daisy")
RESULT_MARKER = "BENCH-RESULT "
RECORD_DIR_VARIABLE = "BENCH_STARTUP_RECORD_DIR"
SLEEP_PER_BLOCK = 0.02
BLOCKS_PER_WORKER = 8
STARTUP_WORKERS = (1, 8)
THROUGHPUT_BLOCKS = (10_000, 100_000)
THROUGHPUT_WORKERS = 2

_record = {}


def record_start(block: Any) -> None:
    """Append ``pid start`` for this block, then sleep (so every worker gets blocks)."""
    start = time.time()
    descriptor = _record.get("fd")
    if descriptor is None:
        path = os.path.join(os.environ[RECORD_DIR_VARIABLE], f"{os.getpid()}.txt")
        descriptor = _record["fd"] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                             0o644)
    os.write(descriptor, b"%d %.6f\n" % (os.getpid(), start))
    time.sleep(SLEEP_PER_BLOCK)


def noop(block: Any) -> None:
    """A block that costs nothing."""


def _module() -> Any:
    # imported by name, so both packages pickle the functions by reference
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(MODULE_NAME)


def run_child(impl: str, measure: str, size: int) -> dict[str, Any]:
    """Run one measurement in this (fresh) interpreter."""
    module = _module()
    if impl == "daisy":
        import daisy as package
    else:
        import luigi_daisy as package
        from luigi_daisy.run import run_blockwise as _resolved  # noqa: F401 - import first
    if measure == "startup":
        workers, blocks, function = size, BLOCKS_PER_WORKER * size, module.record_start
    else:
        workers, blocks, function = THROUGHPUT_WORKERS, size, module.noop
    total = package.Roi((0,), (blocks,))
    block = package.Roi((0,), (1,))
    if impl == "daisy":
        task = package.Task("bench", total, block, block, function, read_write_conflict=False,
                            max_workers=workers)
        options = {"progress": False} if "progress" in _parameters(package) else {}
    else:
        task = package.Task("bench", total, block, block, function, read_write_conflict=False,
                            num_workers=workers)
        options = {"progress": False, "start_method": impl}
    records = tempfile.mkdtemp(prefix="bench_startup_")
    os.environ[RECORD_DIR_VARIABLE] = records
    started = time.time()
    clock = time.perf_counter()
    result = package.run_blockwise([task], **options)
    elapsed = time.perf_counter() - clock
    if not result:
        raise SystemExit(f"ERROR the run of {impl} did not succeed")
    row: dict[str, Any] = {"impl": impl, "measure": measure, "size": size,
                           "total_s": elapsed}
    if measure == "startup":
        firsts = []
        for path in Path(records).iterdir():
            starts = [float(line.split()[1]) for line in path.read_text().splitlines()]
            firsts.append(min(starts))
        row["first_block_s"] = min(firsts) - started
        row["all_workers_up_s"] = max(firsts) - started
        row["workers_seen"] = len(firsts)
    else:
        row["blocks_per_s"] = blocks / elapsed
    return row


def _parameters(package: Any) -> set[str]:
    import inspect
    try:
        return set(inspect.signature(package.run_blockwise).parameters)
    except (TypeError, ValueError):
        return set()


def spawn_child(impl: str, measure: str, size: int, timeout: float) -> dict[str, Any]:
    """One measurement in a fresh interpreter, in a session of its own."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep)
                            if p])
    environment.setdefault("PYTHONWARNINGS", "ignore")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", impl, measure,
               str(size)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=environment, start_new_session=True,
                               cwd=tempfile.mkdtemp(prefix="bench_startup_cwd_"))
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"error": f"timeout after {timeout:g} s"}
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    return {"error": (stderr.strip().splitlines() or [f"exit {process.returncode}"])[-1]}


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if key in run]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--only", choices=("startup", "throughput"))
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "MEASURE", "SIZE"),
                        help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.child:
        impl, measure, size = arguments.child
        row = run_child(impl, measure, int(size))
        print(RESULT_MARKER + json.dumps(row), flush=True)
        return 0
    impls = arguments.impls.split(",")
    # Workers import luigi_daisy from this checkout: compile it once, as an installed
    # package is (daisy's .pyc files come with its install), so that no worker pays for
    # compiling it (PYTHONDONTWRITEBYTECODE would otherwise make every worker do so).
    compileall.compile_dir(str(REPO_ROOT / "luigi_daisy"), quiet=1)
    cases = []
    if arguments.only in (None, "startup"):
        cases += [("startup", workers) for workers in STARTUP_WORKERS]
    if arguments.only in (None, "throughput"):
        cases += [("throughput", blocks) for blocks in THROUGHPUT_BLOCKS]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, load "
          f"{os.getloadavg()[0]:.2f}, medians of {arguments.repeat} runs")
    for measure, size in cases:
        runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
        # interleaved, so that a change of load hits every implementation alike
        for _ in range(arguments.repeat):
            for impl in impls:
                row = spawn_child(impl, measure, size, arguments.timeout)
                if "error" in row:
                    print(f"  {impl} {measure} {size}: {row['error']}", flush=True)
                else:
                    runs[impl].append(row)
        if measure == "startup":
            print(f"\nstartup, {size} worker(s), {BLOCKS_PER_WORKER * size} blocks of "
                  f"{SLEEP_PER_BLOCK * 1000:g} ms")
            print(f"  {'impl':<6} {'first block s':>14} {'all workers up s':>17} "
                  f"{'total s':>8}")
            for impl in impls:
                print(f"  {impl:<6} {_fmt(median(runs[impl], 'first_block_s')):>14} "
                      f"{_fmt(median(runs[impl], 'all_workers_up_s')):>17} "
                      f"{_fmt(median(runs[impl], 'total_s')):>8}")
        else:
            print(f"\nthroughput, {size} no-op blocks, {THROUGHPUT_WORKERS} workers")
            print(f"  {'impl':<6} {'blocks/s':>10} {'total s':>8} {'vs daisy':>9}")
            reference = median(runs.get("daisy", []), "blocks_per_s")
            for impl in impls:
                rate = median(runs[impl], "blocks_per_s")
                ratio = (f"{rate / reference:.2f}x" if rate and reference else "-")
                print(f"  {impl:<6} {_fmt(rate, 0):>10} "
                      f"{_fmt(median(runs[impl], 'total_s')):>8} {ratio:>9}")
        sys.stdout.flush()
    return 0


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
