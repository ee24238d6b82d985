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
implementation, repetition) runs in a fresh interpreter of its own (this script with
``--case``), with a time limit. The process function appends one line per block
(block index, start and end time) to a file per task and worker process; from these
the child computes the time to the first block (from just before ``run_blockwise``
was called), the blocks per second end to end (``run_blockwise`` call to return:
server start, worker start, processing and shutdown), the tail (last block end to
return), the steady rate (blocks per second between the first block's start and the
last block's end), the CPU time per block of the run's own process (server, progress
bars; for daisy also its Rust server threads) and of its worker processes (reaped
children, including their start), and, for the chain, whether the downstream task's
first block started before the upstream task's last block ended. A run whose result
is not a success, or in which some block did not run exactly once, reports an error
and no figure.

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
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
MODULE_NAME = Path(__file__).stem  # imported by name in the children (see child_module)
CASES = ("1d", "3d", "chain")
IMPLS = ("luigi_daisy", "daisy")
RESULT_MARKER = "BENCH-RESULT "
RECORD_DIR_VARIABLE = "BENCH_RUN_RECORD_DIR"
EXIT_WRONG_RUN = 2
#: luigi_daisy / daisy blocks per second wanted, by workers per task
TARGET_RATIOS = {1: 1.5, 2: 3.0}

BLOCKS_1D = 10_000
SIDE_3D = 30  # blocks along each axis
WRITE_3D = 10  # voxels of a write block along each axis
CONTEXT_3D = 1  # voxels of context on each side


# --------------------------------------------------------------------------- #
# The process function (runs in the workers of both packages)
# --------------------------------------------------------------------------- #

_record_files: dict[str, int] = {}  # task id -> descriptor of this process's record file


def _open_record(task_id: str) -> int:
    folder = os.environ[RECORD_DIR_VARIABLE]
    path = os.path.join(folder, f"{task_id}.{os.getpid()}.txt")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _record_files[task_id] = descriptor
    return descriptor


def record_block(block: Any) -> None:
    """No-op process function: append ``index start end`` for the block to a file.

    One file per task and worker process, opened on the first block; ``os.write`` is
    unbuffered, so the line is in the file even when the worker leaves with
    ``os._exit``.
    """
    start = time.time()
    task_id, index = block.block_id
    descriptor = _record_files.get(task_id)
    if descriptor is None:
        descriptor = _open_record(task_id)
    os.write(descriptor, b"%d %.6f %.6f\n" % (index, start, time.time()))


# --------------------------------------------------------------------------- #
# Child process: run one case of one implementation
# --------------------------------------------------------------------------- #


def child_module() -> Any:
    """This script imported as a module, so that daisy pickles ``record_block`` by
    reference (``bench_run.record_block``) rather than by value from ``__main__``."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(MODULE_NAME)


def build_tasks(package: Any, case: str, workers: int,
                process_function: Callable[[Any], None]) -> tuple[list[Any], dict[str, int]]:
    """The tasks handed to ``run_blockwise`` and the number of blocks of every task."""
    roi = package.Roi

    def task(task_id: str, total: Any, read: Any, write: Any, conflict: bool,
             upstream: list[Any] | None = None) -> Any:
        kwargs: dict[str, Any] = {
            "total_roi": total, "read_roi": read, "write_roi": write,
            "process_function": process_function, "read_write_conflict": conflict,
            "num_workers": workers, "max_retries": 0, "fit": "valid"}
        if upstream:
            kwargs["upstream_tasks"] = upstream
        return package.Task(task_id, **kwargs)

    if case in ("1d", "chain"):
        total, block = roi((0,), (BLOCKS_1D,)), roi((0,), (1,))
        task_a = task("a", total, block, block, conflict=False)
        if case == "1d":
            return [task_a], {"a": BLOCKS_1D}
        task_b = task("b", total, block, block, conflict=False, upstream=[task_a])
        return [task_a, task_b], {"a": BLOCKS_1D, "b": BLOCKS_1D}
    if case == "3d":
        extent = SIDE_3D * WRITE_3D
        total = roi((-CONTEXT_3D,) * 3, (extent + 2 * CONTEXT_3D,) * 3)
        read = roi((-CONTEXT_3D,) * 3, (WRITE_3D + 2 * CONTEXT_3D,) * 3)
        write = roi((0,) * 3, (WRITE_3D,) * 3)
        return [task("a", total, read, write, conflict=True)], {"a": SIDE_3D**3}
    raise ValueError(f"unknown case {case!r}; choose from {', '.join(CASES)}")


def state_problems(states: Any, expected: dict[str, int]) -> list[str]:
    """What the returned task states say went wrong (nothing when all blocks succeeded)."""
    problems = []
    for task_id, blocks in expected.items():
        state = states[task_id]
        counts = {name: getattr(state, name) for name in (
            "total_block_count", "completed_count", "skipped_count", "failed_count",
            "orphaned_count")}
        if (counts["total_block_count"] != blocks or counts["completed_count"] != blocks
                or counts["skipped_count"] or counts["failed_count"]
                or counts["orphaned_count"]):
            problems.append(f"task {task_id!r}: state {counts}, expected {blocks} blocks "
                            f"completed and none skipped, failed or orphaned")
    return problems


def read_records(folder: Path, expected: dict[str, int]) -> tuple[dict[str, Any], list[str]]:
    """Per task: first start, last end, blocks recorded; and what is wrong with them."""
    per_task: dict[str, Any] = {}
    problems = []
    for task_id, blocks in expected.items():
        indices: list[int] = []
        first_start = last_end = None
        files = sorted(folder.glob(f"{task_id}.*.txt"))
        for path in files:
            for line in path.read_bytes().splitlines():
                index, start, end = line.split()
                indices.append(int(index))
                start, end = float(start), float(end)
                first_start = start if first_start is None else min(first_start, start)
                last_end = end if last_end is None else max(last_end, end)
        distinct = len(set(indices))
        if len(indices) != blocks or distinct != blocks:
            problems.append(f"task {task_id!r}: process function ran {len(indices)} times "
                            f"on {distinct} distinct blocks, expected {blocks} blocks once each")
        per_task[task_id] = {"first_start": first_start, "last_end": last_end,
                             "processes": len(files)}
    return per_task, problems


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def run_child(impl: str, case: str, workers: int, progress: bool, ledger: bool,
              profile: str | None = None) -> int:
    """Run one case in this process and print its result as one JSON line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        package = importlib.import_module(impl)
    process_function = child_module().record_block
    work_dir = Path(tempfile.mkdtemp(prefix=f"bench_run_{impl}_{case}_"))
    record_dir = work_dir / "records"
    record_dir.mkdir()
    os.environ[RECORD_DIR_VARIABLE] = str(record_dir)
    os.chdir(work_dir)  # daisy_logs and daisy's done markers land here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            tasks, expected = build_tasks(package, case, workers, process_function)
            options: dict[str, Any] = {}
            if ledger and impl == "luigi_daisy":
                options["ledger_dir"] = str(work_dir / "ledger")
            # resolved before the clock starts: luigi_daisy imports its run machinery
            # (tornado, tqdm) on first use, daisy at `import daisy`
            run_blockwise = package.run_blockwise
            cpu_before = cpu_seconds()
            profiler = None
            if profile:
                import cProfile
                profiler = cProfile.Profile()
                profiler.enable()
            called = time.time()
            states = run_blockwise(tasks, multiprocessing=True, progress=progress,
                                   return_states=True, **options)
            returned = time.time()
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(f"{profile}.{impl}-{case}-{workers}w")
            cpu_after = cpu_seconds()
        problems = state_problems(states, expected)
        per_task, record_problems = read_records(record_dir, expected)
        problems += record_problems
    finally:
        os.chdir(BENCH_DIR)
        shutil.rmtree(work_dir, ignore_errors=True)
    if problems:
        for problem in problems:
            print(f"ERROR {impl} {case} {workers} workers: {problem}", file=sys.stderr)
        return EXIT_WRONG_RUN
    blocks = sum(expected.values())
    elapsed = returned - called
    first_start = min(record["first_start"] for record in per_task.values())
    last_end = max(record["last_end"] for record in per_task.values())
    result: dict[str, Any] = {
        "impl": impl, "case": case, "workers": workers, "status": "ok",
        "blocks": blocks,
        "total_s": elapsed,
        "blocks_per_s": blocks / elapsed,
        "first_block_s": first_start - called,
        "tail_s": returned - last_end,
        "steady_blocks_per_s": blocks / (last_end - first_start),
        "processes": sum(record["processes"] for record in per_task.values()),
        # CPU per block: this process (the server, progress bars, ...) and the workers
        "server_cpu_us": (cpu_after[0] - cpu_before[0]) / blocks * 1e6,
        "worker_cpu_us": (cpu_after[1] - cpu_before[1]) / blocks * 1e6,
    }
    if case == "chain":
        # negative: the downstream task started before the upstream task finished
        result["chain_gap_s"] = per_task["b"]["first_start"] - per_task["a"]["last_end"]
        result["downstream_first_s"] = per_task["b"]["first_start"] - called
        result["upstream_last_s"] = per_task["a"]["last_end"] - called
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- #
# Parent process: spawn the cases, collect, print
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
    """Run one case in a fresh interpreter; return its result or an error record."""
    command = [sys.executable, str(Path(__file__).resolve()), "--case", case,
               "--impl", impl, "--workers-of-case", str(workers)]
    if not progress:
        command.append("--no-progress")
    if ledger:
        command.append("--ledger")
    if profile:
        command += ["--profile", profile]
    base = {"impl": impl, "case": case, "workers": workers}
    # A session of its own, so that a timeout can kill the workers along with the child.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=child_env(), start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        process.communicate()
        return {**base, "status": "timeout", "error": f"no result within {timeout:g} s"}
    kill_group(process)  # leftover workers of a child that is gone, if any
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER) and process.returncode == 0:
            return json.loads(line[len(RESULT_MARKER):])
    lines = stderr.strip().splitlines()
    message = [line for line in lines if line.startswith("ERROR")] or lines[-1:]
    message = message or [f"exit status {process.returncode}"]
    return {**base, "status": "error", "error": " | ".join(message)}


MEDIAN_KEYS = ("total_s", "blocks_per_s", "first_block_s", "tail_s", "steady_blocks_per_s",
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


HEADER = ["case", "workers", "impl", "blocks", "seconds", "blocks/s", "first block s",
          "tail s", "steady blocks/s", "server CPU us/block", "worker CPU us/block",
          "overlap"]


def format_row(row: dict[str, Any]) -> list[str]:
    """Table cells of one result."""
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


def ratio_rows(results: dict[tuple[str, int, str], dict[str, Any]]) -> list[list[str]]:
    """Per case and worker count: luigi_daisy / daisy blocks per second and first block."""
    rows = []
    for (case, workers, impl), ours in results.items():
        theirs = results.get((case, workers, "daisy"))
        if impl != "luigi_daisy" or theirs is None:
            continue
        if ours["status"] != "ok" or theirs["status"] != "ok":
            rows.append([case, str(workers), "-", "-", "-"])
            continue
        throughput = ours["blocks_per_s"] / theirs["blocks_per_s"]
        first = ours["first_block_s"] / theirs["first_block_s"]
        seconds = ours["total_s"] / theirs["total_s"]
        rows.append([case, str(workers), f"{throughput:.2f}", f"{seconds:.2f}", f"{first:.2f}"])
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
                ratio = ours["blocks_per_s"] / theirs["blocks_per_s"]
                if target is not None:
                    verdict = "PASS" if ratio >= target else "FAIL"
                    lines.append(f"{verdict:5} {case}, {workers} workers: blocks/s ratio "
                                 f"{ratio:.2f} (target >= {target:g})")
                first, their_first = ours["first_block_s"], theirs["first_block_s"]
                verdict = "PASS" if first <= their_first else "FAIL"
                lines.append(f"{verdict:5} {case}, {workers} workers: first block after "
                             f"{first:.3f} s, daisy {their_first:.3f} s (target: at most "
                             f"daisy's)")
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
    print()
    print_table(HEADER, [format_row(row) for row in results.values()])
    ratios = ratio_rows(results)
    if ratios:
        print("\nluigi_daisy / daisy (blocks/s: higher is better; seconds and first block: "
              "lower is better)")
        print_table(["case", "workers", "blocks/s", "seconds", "first block"], ratios)
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
    """Command line of the driver and of its per-case children."""
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
    child = parser.add_argument_group("single case (used internally)")
    child.add_argument("--case", choices=CASES)
    child.add_argument("--impl", choices=IMPLS)
    child.add_argument("--workers-of-case", type=int)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: a single case with ``--case``, else the whole benchmark."""
    args = parse_args(argv)
    if args.case is not None:
        if args.impl is None or args.workers_of_case is None:
            sys.exit("--case needs --impl and --workers-of-case")
        return run_child(args.impl, args.case, args.workers_of_case, args.progress,
                         args.ledger, args.profile)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
