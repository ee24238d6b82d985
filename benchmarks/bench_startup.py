"""What a fresh worker process costs: luigi_daisy (spawn, fork) against daisy 2.

Two measurements, each run of each implementation as a user's script in a fresh
interpreter of its own (``user_script.py``: its first statement reads the clock, then it
imports the package, builds the task and calls ``run_blockwise``), medians over
``--repeat`` runs, implementations interleaved:

``startup``
    A 1D task of ``8 * W`` blocks, each sleeping 20 ms, ``W`` workers (1 and 8). The
    process function appends ``index start end`` per block to a file per worker process.
    Reported, from before the import and from the ``run_blockwise`` call: the time to
    the first block's start ("first block") and to the first block of the last worker
    to begin ("all workers up"), which is the cost of starting ``W`` workers.
``throughput``
    No-op blocks, 1D, ``read_write_conflict=False``, 10^4 and 10^5 blocks, 2 workers:
    blocks per second from the ``run_blockwise`` call to its return (server start,
    worker start, processing, shutdown), and from before the import to the return.

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
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
USER_SCRIPT = Path(__file__).resolve().parent / "user_script.py"
IMPLS = ("spawn", "fork", "daisy")
RESULT_MARKER = "BENCH-RESULT "
SLEEP_PER_BLOCK = 0.02
BLOCKS_PER_WORKER = 8
STARTUP_WORKERS = (1, 8)
THROUGHPUT_BLOCKS = (10_000, 100_000)
THROUGHPUT_WORKERS = 2


def spawn_child(impl: str, measure: str, size: int, timeout: float) -> dict[str, Any]:
    """One measurement as a user's script, in a fresh interpreter and a session and
    temporary directory of its own; its figures, or ``{"error": ...}``."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep)
                            if p])
    environment.setdefault("PYTHONWARNINGS", "ignore")
    if measure == "startup":
        workers, blocks, sleep = size, BLOCKS_PER_WORKER * size, SLEEP_PER_BLOCK
    else:
        workers, blocks, sleep = THROUGHPUT_WORKERS, size, 0
    work_dir = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    record_dir = work_dir / "records"
    record_dir.mkdir()
    command = [sys.executable, str(USER_SCRIPT),
               f"impl={'daisy' if impl == 'daisy' else 'luigi_daisy'}", "case=1d",
               f"workers={workers}", f"blocks={blocks}", f"sleep={sleep}", "progress=0",
               f"record_dir={record_dir}"]
    if impl != "daisy":
        command.append(f"start_method={impl}")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=environment, start_new_session=True,
                               cwd=work_dir)
    try:
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
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER) and process.returncode == 0:
            return figures(json.loads(line[len(RESULT_MARKER):]))
    return {"error": (stderr.strip().splitlines() or [f"exit {process.returncode}"])[-1]}


def figures(child: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run from the times ``user_script.py`` reported."""
    task = child["tasks"]["a"]
    started, called, returned = child["started"], child["called"], child["returned"]
    first, last_up = min(task["process_firsts"]), max(task["process_firsts"])
    return {
        "first_block_s": first - called, "all_workers_up_s": last_up - called,
        "first_from_import_s": first - started, "all_up_from_import_s": last_up - started,
        "workers_seen": len(task["process_firsts"]),
        "total_s": returned - called, "blocks_per_s": child["blocks"] / (returned - called),
        "blocks_per_s_from_import": child["blocks"] / (returned - started),
    }


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    """Median of ``key`` over the runs that have it (None: none has)."""
    values = [run[key] for run in runs if key in run]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--only", choices=("startup", "throughput"))
    parser.add_argument("--timeout", type=float, default=600.0)
    arguments = parser.parse_args(argv)
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
            print(f"  {'':<6} {'from the run_blockwise call':^32}  {'from before import':^32}")
            print(f"  {'impl':<6} {'first block s':>14} {'all workers up s':>17}  "
                  f"{'first block s':>14} {'all workers up s':>17} {'total s':>8}")
            for impl in impls:
                print(f"  {impl:<6} {_fmt(median(runs[impl], 'first_block_s')):>14} "
                      f"{_fmt(median(runs[impl], 'all_workers_up_s')):>17}  "
                      f"{_fmt(median(runs[impl], 'first_from_import_s')):>14} "
                      f"{_fmt(median(runs[impl], 'all_up_from_import_s')):>17} "
                      f"{_fmt(median(runs[impl], 'total_s')):>8}")
        else:
            print(f"\nthroughput, {size} no-op blocks, {THROUGHPUT_WORKERS} workers")
            print(f"  {'impl':<6} {'blocks/s':>10} {'total s':>8} {'vs daisy':>9}  "
                  f"{'blocks/s from import':>20} {'vs daisy':>9}")
            reference = median(runs.get("daisy", []), "blocks_per_s")
            reference_import = median(runs.get("daisy", []), "blocks_per_s_from_import")
            for impl in impls:
                rate = median(runs[impl], "blocks_per_s")
                ratio = (f"{rate / reference:.2f}x" if rate and reference else "-")
                rate_import = median(runs[impl], "blocks_per_s_from_import")
                ratio_import = (f"{rate_import / reference_import:.2f}x"
                                if rate_import and reference_import else "-")
                print(f"  {impl:<6} {_fmt(rate, 0):>10} "
                      f"{_fmt(median(runs[impl], 'total_s')):>8} {ratio:>9}  "
                      f"{_fmt(rate_import, 0):>20} {ratio_import:>9}")
        sys.stdout.flush()
    return 0


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
