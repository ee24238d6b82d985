"""In-process scheduler benchmark: luigi_daisy against the released daisy.

The driver acquires blocks and releases them as successful, keeping a window of
blocks in flight (16 by default), on 3D tasks of 10^4, 10^5, 10^6 and (with
``--with-1e7``) 10^7 blocks, for three cases:

``conflict``
    read ROI = write ROI grown by 2 voxels on each side, ``read_write_conflict=True``.
``noconflict``
    read ROI = write ROI, ``read_write_conflict=False``.
``chain``
    two tasks ``a`` -> ``b`` with the ``conflict`` geometry; ``b`` lists ``a`` as its
    upstream task and writes exactly the region ``a`` writes, so every interior block
    of ``b`` reads the writes of the 27 blocks of ``a`` around it. The driver asks
    ``b`` for a block first and ``a`` second.

Every (case, size, implementation, repetition) runs in a subprocess of its own
(this same script with ``--case``), which reports the time to its first block,
the blocks per second end to end (task and scheduler construction included, all
tasks' blocks counted), and its peak RSS (``ru_maxrss``) next to its RSS right
after the imports. A run that does not complete every block of every task reports
an error and no figure. daisy runs get a time limit per case; when it is reached the
table shows ``timeout`` and a bound on the ratio.

Usage::

    python benchmarks/bench_scheduler.py                      # 1e4, 1e5, 1e6
    python benchmarks/bench_scheduler.py --with-1e7           # adds 1e7
    python benchmarks/bench_scheduler.py --sizes 1e4 --cases chain --repeat 3
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CASES = ("conflict", "noconflict", "chain")
IMPLS = ("luigi_daisy", "daisy")
WRITE_SIDE = 10  # write block of 10^3 voxels
CONTEXT = 2  # voxels of context on each side (conflict and chain cases)
RESULT_MARKER = "BENCH-RESULT "
EXIT_WRONG_SCHEDULE = 2


# --------------------------------------------------------------------------- #
# Adapter: the small API surface both packages share
# --------------------------------------------------------------------------- #


class Adapter:
    """Drive ``luigi_daisy`` or ``daisy`` through the API they share.

    Parameters
    ----------
    module_name
        ``"luigi_daisy"`` or ``"daisy"``.
    """

    def __init__(self, module_name: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.module: ModuleType = importlib.import_module(module_name)
        self.success = self.module.BlockStatus.SUCCESS

    def roi(self, offset: Sequence[int], shape: Sequence[int]) -> Any:
        """Build a ``Roi`` of the package under test."""
        return self.module.Roi(tuple(offset), tuple(shape))

    def task(
        self,
        name: str,
        total_roi: Any,
        read_roi: Any,
        write_roi: Any,
        conflict: bool,
        upstream: list[Any] | None = None,
    ) -> Any:
        """Build a ``Task`` whose process function does nothing."""
        kwargs: dict[str, Any] = dict(
            total_roi=total_roi,
            read_roi=read_roi,
            write_roi=write_roi,
            process_function=_noop,
            read_write_conflict=conflict,
            num_workers=1,
            max_retries=0,
            fit="valid",
        )
        if upstream:
            kwargs["upstream_tasks"] = upstream
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return self.module.Task(name, **kwargs)

    def scheduler(self, tasks: list[Any]) -> Any:
        """Build a ``Scheduler`` over ``tasks`` (upstream tasks are pulled in)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return self.module.Scheduler(tasks)


def _noop(block: Any) -> None:
    """Process function of every benchmark task: never called in-process."""


# --------------------------------------------------------------------------- #
# Geometry
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """Geometry of one case: tasks in acquisition order and blocks per task."""

    tasks: list[Any]  # tasks handed to the Scheduler
    acquire_order: list[str]  # task names, asked in this order
    expected_blocks: dict[str, int]  # task name -> number of blocks


def grid_side(size: int) -> int:
    """Blocks along each axis of a cube grid of about ``size`` blocks."""
    return max(1, round(size ** (1 / 3)))


def build_case(adapter: Adapter, case: str, size: int) -> CaseSpec:
    """Build the tasks of ``case`` on a cube grid of about ``size`` blocks."""
    side = grid_side(size)
    blocks = side**3
    extent = side * WRITE_SIDE
    write_roi = adapter.roi((0, 0, 0), (WRITE_SIDE,) * 3)
    if case == "noconflict":
        total_roi = adapter.roi((0, 0, 0), (extent,) * 3)
        task = adapter.task("a", total_roi, write_roi, write_roi, conflict=False)
        return CaseSpec([task], ["a"], {"a": blocks})
    # Context on every side; the total ROI grows by the same context so that
    # fit="valid" keeps exactly side^3 blocks writing [0, extent)^3.
    read_roi = adapter.roi((-CONTEXT,) * 3, (WRITE_SIDE + 2 * CONTEXT,) * 3)
    total_roi = adapter.roi((-CONTEXT,) * 3, (extent + 2 * CONTEXT,) * 3)
    task_a = adapter.task("a", total_roi, read_roi, write_roi, conflict=True)
    if case == "conflict":
        return CaseSpec([task_a], ["a"], {"a": blocks})
    if case == "chain":
        task_b = adapter.task(
            "b", total_roi, read_roi, write_roi, conflict=True, upstream=[task_a]
        )
        return CaseSpec([task_b], ["b", "a"], {"a": blocks, "b": blocks})
    raise ValueError(f"unknown case {case!r}; choose from {', '.join(CASES)}")


# --------------------------------------------------------------------------- #
# Child process: run one case of one implementation
# --------------------------------------------------------------------------- #


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return peak * scale / 2**20


def acquire_next(scheduler: Any, order: list[str]) -> Any:
    """First block any task in ``order`` hands out, or ``None``."""
    for task_name in order:
        block = scheduler.acquire_block(task_name)
        if block is not None:
            return block
    return None


def drive(
    scheduler: Any,
    order: list[str],
    success: Any,
    window: int,
    deadline: float,
    on_first_block: Callable[[], None],
) -> tuple[int, bool]:
    """Acquire and release blocks until none is in flight and none can be had.

    Returns the number of blocks released and whether the deadline stopped it.
    """
    in_flight: collections.deque[Any] = collections.deque()
    released = 0
    first = acquire_next(scheduler, order)
    if first is None:
        return 0, False
    on_first_block()
    in_flight.append(first)
    while True:
        while len(in_flight) < window:
            block = acquire_next(scheduler, order)
            if block is None:
                break
            in_flight.append(block)
        if not in_flight:
            return released, False
        block = in_flight.popleft()
        block.status = success
        scheduler.release_block(block)
        released += 1
        if released & 0x3FF == 0 and time.perf_counter() > deadline:
            return released, True


def verify(scheduler: Any, expected: dict[str, int]) -> list[str]:
    """Problems with the final state: every task must have completed every block."""
    problems = []
    for task_name, blocks in expected.items():
        state = scheduler.task_states[task_name]
        if state.completed_count != blocks:
            problems.append(
                f"task {task_name!r}: completed_count={state.completed_count}, "
                f"expected {blocks}"
            )
        elif not state.is_done():
            problems.append(f"task {task_name!r}: all blocks completed but is_done() is False")
    return problems


def run_child(impl: str, case: str, size: int, window: int, time_limit: float) -> int:
    """Run one case in this process and print its result as one JSON line."""
    adapter = Adapter(impl)
    base_mib = peak_rss_mib()
    start = time.perf_counter()
    deadline = start + time_limit
    first_block_at: list[float] = []
    spec = build_case(adapter, case, size)
    scheduler = adapter.scheduler(spec.tasks)
    released, timed_out = drive(
        scheduler,
        spec.acquire_order,
        adapter.success,
        window,
        deadline,
        lambda: first_block_at.append(time.perf_counter()),
    )
    elapsed = time.perf_counter() - start
    total_blocks = sum(spec.expected_blocks.values())
    result = {
        "impl": impl,
        "case": case,
        "size": size,
        "blocks": total_blocks,
        "released": released,
        "status": "timeout" if timed_out else "ok",
        "first_block_s": (first_block_at[0] - start) if first_block_at else None,
        "total_s": elapsed,
        "blocks_per_s": released / elapsed if elapsed > 0 else None,
        "peak_mib": peak_rss_mib(),
        "base_mib": base_mib,
        "module_file": str(adapter.module.__file__),
    }
    if not timed_out:
        problems = verify(scheduler, spec.expected_blocks)
        if released != total_blocks:
            problems.append(f"released {released} blocks, expected {total_blocks}")
        if problems:
            for problem in problems:
                print(f"ERROR {impl} {case} {size}: {problem}", file=sys.stderr)
            return EXIT_WRONG_SCHEDULE
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


def spawn_case(
    impl: str, case: str, size: int, window: int, time_limit: float
) -> dict[str, Any]:
    """Run one case in a fresh interpreter; return its result or an error record."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--case", case, "--impl", impl, "--size", str(size),
        "--window", str(window), "--time-limit", str(time_limit),
    ]
    base = {"impl": impl, "case": case, "size": size}
    hard_limit = time_limit * 1.5 + 60  # for a child stuck before its first check
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=hard_limit, env=child_env()
        )
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout", "blocks": None, "peak_mib": None}
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARKER) and completed.returncode == 0:
            return json.loads(line[len(RESULT_MARKER):])
    stderr = completed.stderr.strip().splitlines()
    message = [line for line in stderr if line.startswith("ERROR")] or stderr[-1:]
    message = message or [f"exit status {completed.returncode}"]
    return {**base, "status": "error", "error": " | ".join(message)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold repetitions into one row: any error or timeout wins, else medians."""
    for status in ("error", "timeout"):
        bad = [run for run in runs if run["status"] == status]
        if bad:
            return bad[0]
    row = dict(runs[0])
    for key in ("first_block_s", "total_s", "blocks_per_s", "peak_mib", "base_mib"):
        row[key] = statistics.median(run[key] for run in runs)
    return row


def throughput_ratio(ours: dict[str, Any], theirs: dict[str, Any], limit: float) -> str:
    """luigi_daisy / daisy blocks per second, or a lower bound when daisy timed out."""
    if ours.get("status") != "ok":
        return "-"
    if theirs.get("status") == "ok":
        return f"{ours['blocks_per_s'] / theirs['blocks_per_s']:.2f}"
    if theirs.get("status") == "timeout":
        # daisy took longer than `limit` for the same blocks, so its rate is below this.
        bound = f">={ours['blocks_per_s'] * limit / ours['blocks']:.2f}"
        if theirs.get("blocks_per_s"):
            # What daisy managed before the limit: an estimate, not a bound.
            bound += f" (~{ours['blocks_per_s'] / theirs['blocks_per_s']:.0f})"
        return bound
    return "-"


def memory_ratio(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """luigi_daisy / daisy peak RSS, or an upper bound when daisy timed out."""
    if ours.get("status") != "ok" or not theirs.get("peak_mib"):
        return "-"
    ratio = ours["peak_mib"] / theirs["peak_mib"]
    return f"{ratio:.2f}" if theirs["status"] == "ok" else f"<={ratio:.2f}"


def size_label(size: int) -> str:
    """``10000`` -> ``1e4``."""
    exponent = len(str(size)) - 1
    return f"1e{exponent}" if size == 10**exponent else str(size)


def format_row(row: dict[str, Any], thr: str, mem: str) -> list[str]:
    """Cells of one table row."""
    status = row["status"]
    if status == "error":
        figures = ["ERROR"] + [""] * 5
    elif status == "timeout" and row.get("first_block_s") is None:
        figures = ["timeout"] + [""] * 5
    else:
        rate = f"{row['blocks_per_s']:,.0f}" + (" (timeout)" if status == "timeout" else "")
        figures = [
            f"{row['first_block_s'] * 1e3:.1f}",
            rate,
            f"{row['total_s']:.2f}",
            f"{row['peak_mib']:.1f}",
            f"{row['base_mib']:.1f}",
            f"{row['released']:,}/{row['blocks']:,}",
        ]
    return [row["case"], size_label(row["size"]), row["impl"], *figures, thr, mem]


HEADER = [
    "case", "size", "impl", "first block ms", "blocks/s", "total s",
    "peak MiB", "base MiB", "blocks done", "thr ld/daisy", "mem ld/daisy",
]


def print_table(rows: list[list[str]]) -> None:
    """Print rows under HEADER as a plain, aligned table."""
    widths = [max(len(cell) for cell in column) for column in zip(HEADER, *rows)]
    for cells in [HEADER, ["-" * width for width in widths], *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip())


def package_version(name: str) -> str:
    """Installed version of ``name``, or where the checkout's copy comes from."""
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


def checkout_state() -> str:
    """Commit of this checkout, marked ``-dirty`` when it has uncommitted changes."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return described.stdout.strip() or "unknown"


def print_machine() -> None:
    """Print what the figures were measured on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(f"machine: {platform.platform()}; {cpu_model()}")
    print(f"nproc: {usable or os.cpu_count()} usable of {os.cpu_count()}")
    print(f"python: {platform.python_implementation()} {platform.python_version()}")
    versions = ", ".join(
        f"{name} {package_version(name)}" for name in ("luigi_daisy", "daisy", "funlib.geometry")
    )
    print(f"packages: {versions}; checkout {checkout_state()}")


def verdict(figure: str, passes: Callable[[float], bool]) -> str:
    """PASS / FAIL for a figure, ``?`` when only a bound is known and it does not decide."""
    if figure in ("", "-"):
        return "n/a"
    bound = figure[:2] if figure[:2] in (">=", "<=") else ""
    if passes(float(figure[len(bound):].split()[0])):
        return "PASS"
    return "?" if bound else "FAIL"


def check_targets(
    results: dict[tuple[str, int, str], dict[str, Any]], limit: float
) -> list[str]:
    """Lines judging the issue's targets on the figures that were measured."""
    lines = []
    for (case, size, impl), ours in sorted(results.items()):
        if impl != "luigi_daisy":
            continue
        tag = f"{case} {size_label(size)}"
        measured = ours["status"] == "ok"
        theirs = results.get((case, size, "daisy"))
        if theirs is not None:
            needed = 10.0 if case == "chain" else 1.0
            ratio = throughput_ratio(ours, theirs, limit)
            lines.append(f"{verdict(ratio, lambda v: v >= needed):5} {tag}: "
                         f"throughput ratio {ratio} (target >= {needed:g})")
            if size == 10**6:
                mem = memory_ratio(ours, theirs)
                lines.append(f"{verdict(mem, lambda v: v < 1):5} {tag}: "
                             f"peak memory ratio {mem} (target < 1)")
        if size == 10**7:
            peak = f"{ours['peak_mib']:.0f}" if measured else "-"
            lines.append(f"{verdict(peak, lambda v: v < 1024):5} {tag}: "
                         f"peak {peak} MiB (target < 1024)")
            if case == "conflict":
                total = f"{ours['total_s']:.0f}" if measured else "-"
                lines.append(f"{verdict(total, lambda v: v <= 300):5} {tag}: "
                             f"end to end {total} s (target <= 300 s, {ours['status']})")
    return lines


def print_import_locations(results: dict[tuple[str, int, str], dict[str, Any]]) -> None:
    """Say where each measured package was imported from; warn if not this checkout."""
    locations = sorted({(key[2], row["module_file"]) for key, row in results.items()
                        if row.get("module_file")})
    for impl, module_file in locations:
        print(f"{impl} imported from {Path(module_file).parent}")
        checkout = REPO_ROOT / impl
        if impl == "luigi_daisy" and checkout.is_dir() and Path(module_file).parent != checkout:
            print(f"WARNING: another luigi_daisy shadows this checkout's ({checkout}): "
                  "an editable install of another checkout?")


def run_all(args: argparse.Namespace) -> int:
    """Run every requested case in its own process and print the table."""
    sizes = [int(float(text)) for text in args.sizes.split(",") if text]
    if args.with_1e7 and 10**7 not in sizes:
        sizes.append(10**7)
    cases = [case for case in args.cases.split(",") if case]
    impls = [impl for impl in args.impls.split(",") if impl]
    if args.no_daisy:
        impls = [impl for impl in impls if impl != "daisy"]
    for name in cases:
        if name not in CASES:
            sys.exit(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    print_machine()
    print(f"window {args.window} blocks in flight; repeat {args.repeat} (median); "
          f"daisy time limit {args.daisy_timeout:g} s, luigi_daisy {args.timeout:g} s")
    results: dict[tuple[str, int, str], dict[str, Any]] = {}
    for size in sizes:
        for case in cases:
            for impl in impls:
                limit = args.daisy_timeout if impl == "daisy" else args.timeout
                runs = [spawn_case(impl, case, size, args.window, limit)
                        for _ in range(args.repeat)]
                row = summarize(runs)
                results[(case, size, impl)] = row
                print(f"  done: {case} {size_label(size)} {impl}: {row['status']}"
                      + (f" ({row['error']})" if row["status"] == "error" else ""),
                      file=sys.stderr, flush=True)
    print_import_locations(results)
    rows = []
    for (case, size, impl), row in results.items():
        thr = mem = ""
        other = results.get((case, size, "daisy"))
        if impl == "luigi_daisy" and other is not None:
            thr = throughput_ratio(row, other, args.daisy_timeout)
            mem = memory_ratio(row, other)
        rows.append(format_row(row, thr, mem))
    print()
    print_table(rows)
    targets = check_targets(results, args.daisy_timeout)
    if targets:
        print("\ntargets:")
        for line in targets:
            print("  " + line)
    errors = [row for row in results.values() if row["status"] == "error"]
    for row in errors:
        print(f"{row['case']} {size_label(row['size'])} {row['impl']} failed: {row['error']}",
              file=sys.stderr)
    return 1 if errors else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of the driver and of its per-case children."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e4,1e5,1e6",
                        help="comma-separated block counts (default: 1e4,1e5,1e6)")
    parser.add_argument("--with-1e7", action="store_true", help="also run 10^7 blocks")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--no-daisy", action="store_true", help="skip the released daisy")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (median)")
    parser.add_argument("--window", type=int, default=16, help="blocks in flight")
    parser.add_argument("--daisy-timeout", type=float, default=120.0,
                        help="time limit per daisy case, seconds (default 120)")
    parser.add_argument("--timeout", type=float, default=1200.0,
                        help="time limit per luigi_daisy case, seconds (default 1200)")
    child = parser.add_argument_group("single case (used internally)")
    child.add_argument("--case", choices=CASES)
    child.add_argument("--impl", choices=IMPLS)
    child.add_argument("--size", type=int)
    child.add_argument("--time-limit", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.window < 1:
        parser.error("--repeat and --window must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: a single case with ``--case``, else the whole benchmark."""
    args = parse_args(argv)
    if args.case is not None:
        if args.impl is None or args.size is None:
            sys.exit("--case needs --impl and --size")
        return run_child(args.impl, args.case, args.size, args.window, args.time_limit)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
