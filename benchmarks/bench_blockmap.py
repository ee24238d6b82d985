"""What the live block map costs: per scheduler event, in memory, and per HTTP request.

Two parts:

``cost``
    The scheduler with and without its block map (``BlockScheduler(block_map=...)``),
    driven in-process with ``acquire`` / ``release`` (16 blocks in flight, every block
    a success) on 3D cube grids, for the ``noconflict`` case (one task, no context,
    ``--size`` blocks) and the ``chain`` case (``--chain-size`` blocks per task: two
    tasks ``a -> b``, 2 voxels of context, read/write conflicts, so every block is also
    made ready by a countdown). Off, on and the released daisy's ``Scheduler`` (the
    anchor; ``noconflict`` only, as its chain takes about 2 ms a block, see
    ``bench_scheduler.py``) alternate, ``--repeat`` times each, every drive in a fresh
    subprocess. The table gives the median and the minimum (the least disturbed by
    other load) microseconds per block, and the difference between on and off, which
    is what the map's stores cost. The map's memory is measured at 10^7 blocks:
    tracemalloc's peak while a scheduler is built, with and without the map, and the
    time to build it.
``endpoint``
    A ``WorkerRun`` (not started: no workers) over two tasks of about 10^7 blocks each,
    a 3D cube with conflicts and a 2D square without, of which about a fifth of the
    blocks are driven to done (some fail, so blocks are orphaned) and 16 left
    processing. Its tracking page is served by tornado in a thread and asked over HTTP
    on loopback, ``--requests`` times each: ``/api/run``, a 3D slice, the 2D plane at
    256 and at 1024 cells a side. The table gives median and 90th percentile latency
    and the answer's size, plain and gzip-compressed.

Usage::

    python benchmarks/bench_blockmap.py                    # both parts
    python benchmarks/bench_blockmap.py --part cost --size 1e6 --chain-size 1e5 --repeat 7
    python benchmarks/bench_blockmap.py --part endpoint --requests 50
    python benchmarks/bench_blockmap.py --no-daisy
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WRITE_SIDE = 10
CONTEXT = 2
WINDOW = 16
RESULT_MARKER = "BENCH-RESULT "


# ------------------------------------------------------------------ geometry
def cube_tasks(module, case: str, side: int) -> tuple[list, list[str]]:
    """The tasks of a case on a ``side``^3 grid, and the order to ask them for blocks."""
    Roi = module.Roi
    extent = side * WRITE_SIDE
    write = Roi((0, 0, 0), (WRITE_SIDE,) * 3)
    if case == "noconflict":
        task = module.Task("a", Roi((0, 0, 0), (extent,) * 3), write, write, _noop,
                           read_write_conflict=False, max_retries=0, fit="valid")
        return [task], ["a"]
    read = Roi((-CONTEXT,) * 3, (WRITE_SIDE + 2 * CONTEXT,) * 3)
    total = Roi((-CONTEXT,) * 3, (extent + 2 * CONTEXT,) * 3)
    task_a = module.Task("a", total, read, write, _noop, read_write_conflict=True,
                         max_retries=0, fit="valid")
    task_b = module.Task("b", total, read, write, _noop, read_write_conflict=True,
                         max_retries=0, fit="valid", upstream_tasks=[task_a])
    return [task_b], ["b", "a"]


def _noop(block) -> None:
    """Process function of every task here (never called)."""


def drive(scheduler, order: list[str], acquire, release, success, limit: int | None = None,
          fail_every: int = 0) -> int:
    """Acquire and release blocks, ``WINDOW`` in flight, until none is left (or
    ``limit`` were released); return how many were released."""
    in_flight = collections.deque()
    released = 0
    while True:
        while len(in_flight) < WINDOW and (limit is None or released + len(in_flight) < limit):
            block = None
            for task_id in order:
                block = acquire(task_id)
                if block is not None:
                    break
            if block is None:
                break
            in_flight.append(block)
        if not in_flight:
            return released
        block = in_flight.popleft()
        released += 1
        block.status = success
        if fail_every and released % fail_every == 0:
            block.status = type(success)(3)  # FAILED in both packages
        release(block)
        if limit is not None and released >= limit:
            return released


# ------------------------------------------------------------------ part 1: cost
def child_cost(impl: str, case: str, side: int) -> dict:
    """One drive of every block, in this process; seconds per block."""
    if impl == "daisy":
        import daisy as module
    else:
        import luigi_daisy as module
        from luigi_daisy.scheduler import BlockScheduler
    tasks, order = cube_tasks(module, case, side)
    started = time.perf_counter()
    if impl == "daisy":
        scheduler = module.Scheduler(tasks)
        acquire, release = scheduler.acquire_block, scheduler.release_block
    else:
        scheduler = BlockScheduler(tasks, block_map=(impl == "map on"))
        acquire, release = scheduler.acquire, scheduler.release
    released = drive(scheduler, order, acquire, release, module.BlockStatus.SUCCESS)
    seconds = time.perf_counter() - started
    expected = side ** 3 * len(order)
    if released != expected:
        raise SystemExit(f"{impl} {case}: released {released} blocks of {expected}")
    return {"seconds_per_block": seconds / released, "blocks": released}


def child_memory(side: int) -> dict:
    """tracemalloc peak and time while a 10^7-block scheduler is built, map off and on."""
    import luigi_daisy as module
    from luigi_daisy.scheduler import BlockScheduler
    result = {}
    for block_map in (False, True):
        tasks, _ = cube_tasks(module, "noconflict", side)
        tracemalloc.start()
        started = time.perf_counter()
        scheduler = BlockScheduler(tasks, block_map=block_map)
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        result["on" if block_map else "off"] = {"peak_bytes": peak, "build_seconds": seconds}
        del scheduler
    result["blocks"] = side ** 3
    return result


def run_child(arguments: list[str]) -> dict:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    output = subprocess.run([sys.executable, __file__, *arguments], capture_output=True,
                            text=True, env=environment, check=False)
    for line in output.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line.removeprefix(RESULT_MARKER))
    raise SystemExit(f"child {arguments} failed:\n{output.stdout}\n{output.stderr}")


def part_cost(size: float, chain_size: float, repeat: int, with_daisy: bool) -> None:
    impls = ["map off", "map on"] + (["daisy"] if with_daisy else [])
    print(f"\n## cost: {WINDOW} blocks in flight, median and minimum of {repeat} drives")
    print(f"{'case':<11} {'blocks':>10} {'implementation':<15} {'median us/block':>16} "
          f"{'min us/block':>13} {'blocks/s (median)':>18}")
    for case, blocks in (("noconflict", size), ("chain", chain_size)):
        side = round(blocks ** (1 / 3))
        case_impls = impls if case == "noconflict" else ["map off", "map on"]
        times = {impl: [] for impl in case_impls}
        for _ in range(repeat):  # alternate, so a change of load hits every implementation
            for impl in case_impls:
                times[impl].append(
                    run_child(["--child-cost", impl, case, str(side)])["seconds_per_block"])
        medians = {impl: statistics.median(values) for impl, values in times.items()}
        minima = {impl: min(values) for impl, values in times.items()}
        label = f"{case:<11} {side ** 3 * (2 if case == 'chain' else 1):>10,}"
        for impl in case_impls:
            print(f"{label} {impl:<15} {medians[impl] * 1e6:>16.3f} {minima[impl] * 1e6:>13.3f} "
                  f"{1 / medians[impl]:>18,.0f}")
        print(f"{label} {'on - off':<15} {(medians['map on'] - medians['map off']) * 1e6:>16.3f} "
              f"{(minima['map on'] - minima['map off']) * 1e6:>13.3f}   us per block "
              f"(on / off: median {medians['map on'] / medians['map off']:.3f}x, "
              f"min {minima['map on'] / minima['map off']:.3f}x)")
        if "daisy" in medians:
            print(f"{label} {'on / daisy':<15} {medians['map on'] / medians['daisy']:>15.3f}x "
                  f"{minima['map on'] / minima['daisy']:>12.3f}x  time per block")
    memory = run_child(["--child-memory", "216"])
    off, on = memory["off"], memory["on"]
    print(f"\nmemory at {memory['blocks']:,} blocks (noconflict, scheduler built, nothing "
          f"handed out): tracemalloc peak {off['peak_bytes'] / 2**20:.2f} MiB without the "
          f"map, {on['peak_bytes'] / 2**20:.2f} MiB with it "
          f"({(on['peak_bytes'] - off['peak_bytes']) / memory['blocks']:.3f} bytes per "
          f"block); built in {off['build_seconds'] * 1e3:.2f} ms and "
          f"{on['build_seconds'] * 1e3:.2f} ms")


# ------------------------------------------------------------------ part 2: endpoint
def serve_in_thread(page) -> tuple[threading.Thread, callable]:
    """Start ``page`` on loopback in a thread of its own; return it and a stopper."""
    started = threading.Event()
    state = {}

    async def main() -> None:
        state["loop"] = asyncio.get_running_loop()
        state["stop"] = asyncio.Event()
        page.start("127.0.0.1")
        started.set()
        await state["stop"].wait()
        page.stop()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    started.wait(30)

    def stop() -> None:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)
    return thread, stop


def fetch(url: str, compressed: bool) -> tuple[float, int]:
    headers = {"Accept-Encoding": "gzip"} if compressed else {}
    request = urllib.request.Request(url, headers=headers)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - loopback
        body = response.read()
    seconds = time.perf_counter() - started
    if compressed and response.headers.get("Content-Encoding") == "gzip":
        json.loads(gzip.decompress(body))
    else:
        json.loads(body)
    return seconds, len(body)


def part_endpoint(requests: int) -> None:
    import luigi_daisy as module
    from luigi_daisy.launchers.local import LocalLauncher
    from luigi_daisy.ledger import LedgerSet
    from luigi_daisy.run import WorkerRun

    side_3d, side_2d = 216, 3163
    Roi = module.Roi
    read = Roi((-CONTEXT,) * 3, (WRITE_SIDE + 2 * CONTEXT,) * 3)
    write = Roi((0, 0, 0), (WRITE_SIDE,) * 3)
    volume = module.Task("volume", Roi((-CONTEXT,) * 3, (side_3d * WRITE_SIDE + 2 * CONTEXT,) * 3),
                         read, write, _noop, read_write_conflict=True, max_retries=0)
    tile = Roi((0, 0), (WRITE_SIDE, WRITE_SIDE))
    plane = module.Task("plane", Roi((0, 0), (side_2d * WRITE_SIDE,) * 2), tile, tile, _noop,
                        read_write_conflict=False, max_retries=0)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        run = WorkerRun([volume, plane], LocalLauncher(folder), LedgerSet({}), progress=False,
                        tracking=True)
        built = time.perf_counter() - started
        scheduler = run.scheduler
        success = module.BlockStatus.SUCCESS
        started = time.perf_counter()
        for task_id, total in (("volume", side_3d ** 3), ("plane", side_2d ** 2)):
            drive(scheduler, [task_id], scheduler.acquire, scheduler.release, success,
                  limit=total // 5, fail_every=total // 100)
            for _ in range(WINDOW):
                scheduler.acquire(task_id)
        driven = time.perf_counter() - started
        print(f"\n## endpoint: tasks volume ({side_3d}^3 = {side_3d ** 3:,} blocks, conflicts) "
              f"and plane ({side_2d}^2 = {side_2d ** 2:,} blocks); run built in "
              f"{built:.2f} s, a fifth of each driven in {driven:.1f} s")
        for task_id, state in scheduler.task_states.items():
            print(f"   {state!r}")
        _, stop = serve_in_thread(run.tracking)
        try:
            base = run.tracking.url.split("?")[0]
            token = f"token={run.tracking.token}"
            queries = [
                ("api/run", "run report"),
                (f"api/blocks?task=volume&slice={side_3d // 10}", "3D slice, 256 cells"),
                ("api/blocks?task=volume&slice=100&cells=1024", "3D slice, 1024 cells"),
                ("api/blocks?task=plane", "2D plane, 256 cells"),
                ("api/blocks?task=plane&cells=1024", "2D plane, 1024 cells"),
            ]
            print(f"{'answer':<22} {'median ms':>10} {'p90 ms':>8} {'bytes':>10} "
                  f"{'gzip bytes':>11} {'gzip median ms':>15}")
            for path, label in queries:
                url = base + path + ("&" if "?" in path else "?") + token
                plain = [fetch(url, compressed=False) for _ in range(requests)]
                packed = [fetch(url, compressed=True) for _ in range(requests)]
                latencies = sorted(seconds for seconds, _ in plain)
                print(f"{label:<22} {statistics.median(latencies) * 1e3:>10.2f} "
                      f"{latencies[int(0.9 * (len(latencies) - 1))] * 1e3:>8.2f} "
                      f"{plain[-1][1]:>10,} {packed[-1][1]:>11,} "
                      f"{statistics.median(s for s, _ in packed) * 1e3:>15.2f}")
        finally:
            stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("cost", "endpoint", "all"), default="all")
    parser.add_argument("--size", type=float, default=1e6,
                        help="blocks of the noconflict case in the cost part (default 1e6)")
    parser.add_argument("--chain-size", type=float, default=1e5,
                        help="blocks per task of the chain case in the cost part (default 1e5)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--no-daisy", action="store_true")
    parser.add_argument("--child-cost", nargs=3, metavar=("IMPL", "CASE", "SIDE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--child-memory", metavar="SIDE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_cost:
        impl, case, side = args.child_cost
        print(RESULT_MARKER + json.dumps(child_cost(impl, case, int(side))))
        return
    if args.child_memory:
        print(RESULT_MARKER + json.dumps(child_memory(int(args.child_memory))))
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    with_daisy = not args.no_daisy
    if with_daisy:
        try:
            import daisy  # noqa: F401
        except ImportError:
            print("daisy is not installed (pip install -e '.[bench]'); running without it")
            with_daisy = False
    if args.part in ("cost", "all"):
        part_cost(args.size, args.chain_size, args.repeat, with_daisy)
    if args.part in ("endpoint", "all"):
        part_endpoint(args.requests)
    print(f"\nload average after: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")


if __name__ == "__main__":
    main()
