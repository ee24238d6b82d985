"""End-to-end ``run_blockwise`` benchmark: luigi_daisy against the released daisy.

Each case runs no-op blocks through the whole machinery (block server, worker
processes, progress bars, shutdown) with ``run_blockwise([...], multiprocessing=True)``:

``1d``
    10^4 blocks: total ROI ``[0, 10000)``, read ROI = write ROI = 1 voxel,
    ``read_write_conflict=False``.
``3d``
    30^3 = 27,000 blocks writing 10^3 voxels each, with 1 voxel of context on every
    side (read ROI 12^3), ``read_write_conflict=True``.
``chain``
    two ``1d`` tasks ``a`` -> ``b`` (``b`` lists ``a`` in ``upstream_tasks``), each with
    its own workers; 2 x 10^4 blocks. With block-level dependencies block ``i`` of ``b``
    may start as soon as block ``i`` of ``a`` is done, so the two tasks should overlap.

Every case runs with 1 and with 2 workers per task, and every (case, workers,
implementation, repetition) runs as a user's script does, in a fresh interpreter of its
own (``user_script.py``), with a time limit: the script's first statement reads the
clock, then it imports the package (``import luigi_daisy`` / ``import daisy``), builds
the tasks and calls ``run_blockwise``. The process function appends one line per block
(block index, start and end time) to a file per task and worker process. From these:

- from before the import (what the user waits for, and what the targets judge): the
  import alone, the time to the first block, the seconds and blocks per second to the
  return of ``run_blockwise``;
- from the ``run_blockwise`` call (luigi_daisy imports its run machinery in it, daisy
  at import): the time to the first block, the blocks per second to the return
  (server start, worker start, processing and shutdown), the tail (last block end to
  return), the steady rate (blocks per second between the first block's start and the
  last block's end), the CPU time per block of the run's own process (server, progress
  bars; for daisy also its Rust server threads) and of its worker processes (reaped
  children, including their start), and, for the chain, whether the downstream task's
  first block started before the upstream task's last block ended.

A run whose result is not a success, or in which some block did not run exactly once,
reports an error and no figure.

The same process function, and so the same per-block cost (two ``time.time()`` calls
and one ``os.write`` of a short line, about 6 us), runs under both packages.
Both run with their own defaults otherwise: for daisy that includes its block
tracking (done markers) and its host detection. Each child runs in a fresh temporary
directory, so no run sees the logs or done markers of another.

Usage::

    python benchmarks/bench_run.py                        # all cases, 1 and 2 workers
    python benchmarks/bench_run.py --cases 3d --workers 2 --repeat 5
    python benchmarks/bench_run.py --no-daisy             # luigi_daisy only
"""

from __future__ import annotations

import argparse
import compileall
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
USER_SCRIPT = BENCH_DIR / "user_script.py"  # one run, as a user's script
CASES = ("1d", "3d", "chain")
IMPLS = ("luigi_daisy", "daisy")
RESULT_MARKER = "BENCH-RESULT "
#: luigi_daisy / daisy blocks per second wanted (from before the import to the
#: return of run_blockwise), by workers per task
TARGET_RATIOS = {1: 1.5, 2: 3.0}


# --------------------------------------------------------------------------- #
# One run: user_script.py in a fresh interpreter, clocked from before the import
# --------------------------------------------------------------------------- #


def child_env() -> dict[str, str]:
    """Environment for a child: this checkout's ``luigi_daisy`` comes first."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    return env


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the child's process group: the child and the workers it started."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def spawn_case(impl: str, case: str, workers: int, timeout: float,
               progress: bool, ledger: bool, profile: str | None = None) -> dict[str, Any]:
    """Run one case as a user's script in a fresh interpreter and a fresh temporary
    directory; return its figures or an error record."""
    work_dir = Path(tempfile.mkdtemp(prefix=f"bench_run_{impl}_{case}_"))
    record_dir = work_dir / "records"
    record_dir.mkdir()
    command = [sys.executable, str(USER_SCRIPT), f"impl={impl}", f"case={case}",
               f"workers={workers}", f"record_dir={record_dir}",
               f"progress={int(progress)}"]
    if ledger and impl == "luigi_daisy":
        command.append(f"ledger_dir={work_dir / 'ledger'}")
    if profile:
        command.append(f"profile={profile}.{impl}-{case}-{workers}w")
    base = {"impl": impl, "case": case, "workers": workers}
    # A session of its own, so that a timeout can kill the workers along with the child;
    # the work directory as its cwd: daisy_logs and daisy's done markers land there.
    launched = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=child_env(), start_new_session=True,
                               cwd=work_dir)
    try:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(process)
            process.communicate()
            return {**base, "status": "timeout", "error": f"no result within {timeout:g} s"}
        kill_group(process)  # leftover workers of a child that is gone, if any
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER) and process.returncode == 0:
            return figures(json.loads(line[len(RESULT_MARKER):]), launched)
    lines = stderr.strip().splitlines()
    message = [line for line in lines if line.startswith("ERROR")] or lines[-1:]
    message = message or [f"exit status {process.returncode}"]
    return {**base, "status": "error", "error": " | ".join(message)}


def figures(child: dict[str, Any], launched: float) -> dict[str, Any]:
    """The figures of one run from the times ``user_script.py`` reported."""
    blocks = child["blocks"]
    started, called, returned = child["started"], child["called"], child["returned"]
    tasks = child["tasks"]
    first_start = min(task["first_start"] for task in tasks.values())
    last_end = max(task["last_end"] for task in tasks.values())
    result: dict[str, Any] = {
        "impl": child["impl"], "case": child["case"], "workers": child["workers"],
        "status": "ok", "blocks": blocks,
        # from before `import` (the script's first statement), as a user's script
        "import_s": child["imported"] - started,
        "first_from_import_s": first_start - started,
        "total_from_import_s": returned - started,
        "blocks_per_s_from_import": blocks / (returned - started),
        # from the `run_blockwise(...)` call (luigi_daisy imports its run machinery there)
        "total_s": returned - called,
        "blocks_per_s": blocks / (returned - called),
        "first_block_s": first_start - called,
        "tail_s": returned - last_end,
        "steady_blocks_per_s": blocks / (last_end - first_start),
        # interpreter start: from the driver's Popen to the script's first statement
        "interpreter_s": started - launched,
        "processes": sum(len(task["process_firsts"]) for task in tasks.values()),
        # CPU per block: this process (the server, progress bars, ...) and the workers
        "server_cpu_us": child["own_cpu_s"] / blocks * 1e6,
        "worker_cpu_us": child["children_cpu_s"] / blocks * 1e6,
    }
    if child["case"] == "chain":
        # negative: the downstream task started before the upstream task finished
        result["chain_gap_s"] = tasks["b"]["first_start"] - tasks["a"]["last_end"]
        result["downstream_first_s"] = tasks["b"]["first_start"] - called
        result["upstream_last_s"] = tasks["a"]["last_end"] - called
    return result


MEDIAN_KEYS = ("import_s", "first_from_import_s", "total_from_import_s",
               "blocks_per_s_from_import", "interpreter_s",
               "total_s", "blocks_per_s", "first_block_s", "tail_s", "steady_blocks_per_s",
               "server_cpu_us", "worker_cpu_us", "chain_gap_s",
               "downstream_first_s", "upstream_last_s")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold repetitions into one row: any error or timeout wins, else medians."""
    for status in ("error", "timeout"):
        bad = [run for run in runs if run["status"] == status]
        if bad:
            return bad[0]
    row = dict(runs[0])
    for key in MEDIAN_KEYS:
        if key in row:
            row[key] = statistics.median(run[key] for run in runs)
    if "chain_gap_s" in row:
        row["overlaps"] = sum(run["chain_gap_s"] < 0 for run in runs)
        row["runs"] = len(runs)
    return row


def overlap_text(row: dict[str, Any]) -> str:
    """``yes`` / ``no`` / ``k/n runs``, and the median gap."""
    if "chain_gap_s" not in row:
        return ""
    overlaps, runs = row["overlaps"], row["runs"]
    verdict = "yes" if overlaps == runs else "no" if overlaps == 0 else f"{overlaps}/{runs} runs"
    return (f"{verdict} (b first start - a last end = {row['chain_gap_s']:+.3f} s; "
            f"b first at {row['downstream_first_s']:.3f} s, a last at "
            f"{row['upstream_last_s']:.3f} s)")


IMPORT_HEADER = ["case", "workers", "impl", "blocks", "import s", "first block s",
                 "seconds", "blocks/s"]
HEADER = ["case", "workers", "impl", "blocks", "seconds", "blocks/s", "first block s",
          "tail s", "steady blocks/s", "server CPU us/block", "worker CPU us/block",
          "overlap"]


def format_import_row(row: dict[str, Any]) -> list[str]:
    """Table cells of one result, timed from before the import."""
    cells = [row["case"], str(row["workers"]), row["impl"]]
    if row["status"] != "ok":
        return cells + [row["status"], "-", "-", "-", "-"]
    return cells + [
        str(row["blocks"]), f"{row['import_s']:.3f}", f"{row['first_from_import_s']:.3f}",
        f"{row['total_from_import_s']:.2f}", f"{row['blocks_per_s_from_import']:.0f}"]


def format_row(row: dict[str, Any]) -> list[str]:
    """Table cells of one result, timed from the ``run_blockwise`` call."""
    cells = [row["case"], str(row["workers"]), row["impl"]]
    if row["status"] != "ok":
        return cells + [row["status"], "-", "-", "-", "-", "-", "-", "-", ""]
    return cells + [
        str(row["blocks"]), f"{row['total_s']:.2f}", f"{row['blocks_per_s']:.0f}",
        f"{row['first_block_s']:.3f}", f"{row['tail_s']:.3f}",
        f"{row['steady_blocks_per_s']:.0f}", f"{row['server_cpu_us']:.0f}",
        f"{row['worker_cpu_us']:.0f}", overlap_text(row)]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Print rows under a header as a plain, aligned table."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for cells in [header, ["-" * width for width in widths], *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip())


def package_version(name: str) -> str:
    """Installed version of ``name``, or that the checkout's copy is used."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        if (REPO_ROOT / name.replace(".", "/")).is_dir():
            return "checkout (not installed)"
        return "not installed"


def cpu_model() -> str:
    """CPU model name where the OS tells it cheaply."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_machine() -> None:
    """Print what the figures were measured on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(f"machine: {platform.platform()}; {cpu_model()}")
    print(f"nproc: {usable or os.cpu_count()} usable of {os.cpu_count()}")
    print(f"python: {platform.python_implementation()} {platform.python_version()}")
    versions = ", ".join(f"{name} {package_version(name)}"
                         for name in ("luigi_daisy", "daisy", "tornado"))
    print(f"packages: {versions}")
    print(f"load average: {load_average()} (other processes make the figures noisy)")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    try:
        return " ".join(f"{load:.2f}" for load in os.getloadavg())
    except OSError:
        return "unknown"


RATIO_HEADER = ["case", "workers", "blocks/s from import", "first block from import",
                "blocks/s from call", "seconds from call", "first block from call"]


def ratio_rows(results: dict[tuple[str, int, str], dict[str, Any]]) -> list[list[str]]:
    """Per case and worker count: luigi_daisy / daisy blocks per second and first block,
    from before the import and from the ``run_blockwise`` call."""
    rows = []
    for (case, workers, impl), ours in results.items():
        theirs = results.get((case, workers, "daisy"))
        if impl != "luigi_daisy" or theirs is None:
            continue
        if ours["status"] != "ok" or theirs["status"] != "ok":
            rows.append([case, str(workers)] + ["-"] * 5)
            continue
        ratios = [ours["blocks_per_s_from_import"] / theirs["blocks_per_s_from_import"],
                  ours["first_from_import_s"] / theirs["first_from_import_s"],
                  ours["blocks_per_s"] / theirs["blocks_per_s"],
                  ours["total_s"] / theirs["total_s"],
                  ours["first_block_s"] / theirs["first_block_s"]]
        rows.append([case, str(workers)] + [f"{ratio:.2f}" for ratio in ratios])
    return rows


def check_targets(results: dict[tuple[str, int, str], dict[str, Any]]) -> list[str]:
    """Lines judging the issue's targets on the figures that were measured."""
    lines = []
    for (case, workers, impl), ours in results.items():
        if impl != "luigi_daisy":
            continue
        theirs = results.get((case, workers, "daisy"))
        if theirs is not None and case in ("1d", "3d"):
            if ours["status"] == "ok" and theirs["status"] == "ok":
                target = TARGET_RATIOS.get(workers)
                ratio = ours["blocks_per_s_from_import"] / theirs["blocks_per_s_from_import"]
                if target is not None:
                    verdict = "PASS" if ratio >= target else "FAIL"
                    lines.append(f"{verdict:5} {case}, {workers} workers: blocks/s ratio from "
                                 f"import {ratio:.2f} (target >= {target:g})")
                first, their_first = ours["first_from_import_s"], theirs["first_from_import_s"]
                verdict = "PASS" if first <= their_first else "FAIL"
                lines.append(f"{verdict:5} {case}, {workers} workers: first block "
                             f"{first:.3f} s after the import began, daisy {their_first:.3f} s "
                             f"(target: at most daisy's)")
            else:
                lines.append(f"n/a   {case}, {workers} workers: no ratio ({ours['status']} / "
                             f"{theirs['status']})")
        if case == "chain" and ours["status"] == "ok":
            verdict = "PASS" if ours["overlaps"] == ours["runs"] else "FAIL"
            lines.append(f"{verdict:5} chain, {workers} workers: tasks overlap in "
                         f"{ours['overlaps']}/{ours['runs']} runs (median gap "
                         f"{ours['chain_gap_s']:+.3f} s)")
    return lines


def run_all(args: argparse.Namespace) -> int:
    """Run every requested case in its own process and print the tables."""
    # Workers import luigi_daisy from this checkout: compile it once, as an installed
    # package is (daisy's .pyc files come with its install), so that no worker pays for
    # compiling it (PYTHONDONTWRITEBYTECODE would otherwise make every worker do so).
    compileall.compile_dir(str(REPO_ROOT / "luigi_daisy"), quiet=1)
    cases = [case for case in args.cases.split(",") if case]
    impls = [impl for impl in args.impls.split(",") if impl]
    if args.no_daisy:
        impls = [impl for impl in impls if impl != "daisy"]
    worker_counts = [int(text) for text in args.workers.split(",") if text]
    for name in cases:
        if name not in CASES:
            sys.exit(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    for name in impls:
        if name not in IMPLS:
            sys.exit(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}")
    print_machine()
    print(f"repeat {args.repeat} (median), implementations alternate within a repetition; "
          f"time limit {args.timeout:g} s per run; progress bars "
          f"{'on' if args.progress else 'off'}; luigi_daisy ledger "
          f"{'on' if args.ledger else 'off'}, daisy block tracking on (its default)")
    results: dict[tuple[str, int, str], dict[str, Any]] = {}
    for case in cases:
        for workers in worker_counts:
            runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
            for _ in range(args.repeat):
                for impl in impls:
                    runs[impl].append(spawn_case(impl, case, workers, args.timeout,
                                                 args.progress, args.ledger, args.profile))
            for impl in impls:
                row = summarize(runs[impl])
                results[(case, workers, impl)] = row
                print(f"  done: {case} {workers} workers {impl}: {row['status']}"
                      + (f" ({row['error']})" if row["status"] != "ok" else ""),
                      file=sys.stderr, flush=True)
    print("\nfrom before `import` (the script's first statement) to the first block and "
          "to the return of run_blockwise, as a user's script sees it")
    print_table(IMPORT_HEADER, [format_import_row(row) for row in results.values()])
    print("\nfrom the run_blockwise(...) call (luigi_daisy imports its run machinery "
          "there, daisy at import)")
    print_table(HEADER, [format_row(row) for row in results.values()])
    ratios = ratio_rows(results)
    if ratios:
        print("\nluigi_daisy / daisy (blocks/s: higher is better; seconds and first block: "
              "lower is better)")
        print_table(RATIO_HEADER, ratios)
    targets = check_targets(results)
    if targets:
        print("\ntargets:")
        for line in targets:
            print("  " + line)
    print(f"\nload average at the end: {load_average()}")
    failed = [row for row in results.values() if row["status"] != "ok"]
    for row in failed:
        print(f"{row['case']} {row['workers']} workers {row['impl']} {row['status']}: "
              f"{row['error']}", file=sys.stderr)
    return 1 if failed else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--workers", default="1,2",
                        help="comma-separated worker counts per task (default: 1,2)")
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--no-daisy", action="store_true", help="skip the released daisy")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="time limit per run, seconds (default 300)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="run_blockwise(progress=False) in both packages")
    parser.add_argument("--ledger", action="store_true",
                        help="luigi_daisy records finished blocks in its ledger "
                             "(run_blockwise(ledger_dir=...)), as daisy's default block "
                             "tracking does")
    parser.add_argument("--profile", metavar="PATH",
                        help="profile each run's own process (server, progress bars) with "
                             "cProfile into PATH.<impl>-<case>-<workers>w (the last "
                             "repetition's); read with python -m pstats")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the benchmark."""
    return run_all(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
