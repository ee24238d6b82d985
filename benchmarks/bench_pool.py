"""One pool of workers per run: the pool's policies, per-task workers, daisy 2, and the
same work in one process.

A chain of ``--stages`` tasks (default 3) over ``--blocks`` blocks each; block i of a
stage reads block i of the stage before it. Each block does real CPU work (sorting
``--work`` random floats, about 15 ms per 200,000 here) and appends one line to an
events file. Variants, each run ``--repeat`` times in a fresh interpreter of its own:

- ``downstream``: luigi_daisy, ``total_workers=2``, ``pool_policy="downstream"``;
- ``most_ready``: luigi_daisy, ``total_workers=2``, ``pool_policy="most_ready"``;
- ``per_task``: luigi_daisy with as many workers as the tasks' caps add up to
  (``total_workers`` = stages x ``--cap``): what every task starting its own
  ``num_workers`` cost before the pool;
- ``daisy``: the released daisy 2.0, ``num_workers=--cap`` per task;
- ``one_process``: the same blocks computed in one loop in one process, stage by
  stage (the hardware's yardstick).

Figures per run: wall time, CPU of the whole process tree (the child's own plus its
reaped children), when the first block of the last stage finished ("first object
done"), and the most intermediate blocks alive at once (done in a stage, not yet read
by the next: what a pipeline keeps on disk or in memory). Medians over the repeats,
and ratios against ``downstream``.

    python benchmarks/bench_pool.py [--repeat 3] [--blocks 60] [--work 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("downstream", "most_ready", "per_task", "daisy", "one_process")
MARKER = "BENCH_POOL_RESULT "


def work(seed: int, size: int) -> float:
    """The block's computation: sort ``size`` random floats."""
    import numpy as np

    values = np.random.default_rng(seed).random(size)
    values.sort()
    return float(values[size // 2])


class Block:
    """The process function: compute, then append ``stage index start end``."""

    def __init__(self, stage: int, size: int, events: str) -> None:
        self.stage = stage
        self.size = size
        self.events = events

    def __call__(self, block) -> None:
        started = time.time()
        index = block.block_id[1]
        work(self.stage * 1_000_003 + index, self.size)
        line = f"{self.stage} {index} {started} {time.time()}\n".encode()
        descriptor = os.open(self.events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, line)
        finally:
            os.close(descriptor)


def build_tasks(package, arguments: argparse.Namespace, events: str) -> list:
    """The chain of stages, with ``package``'s Task; the process functions are
    ``bench_pool.Block``s, imported by name in the workers (not from ``__main__``)."""
    from bench_pool import Block
    tasks: list = []
    roi = package.Roi((0,), (arguments.blocks,))
    one = package.Roi((0,), (1,))
    for stage in range(arguments.stages):
        tasks.append(package.Task(
            f"stage{stage}", total_roi=roi, read_roi=one, write_roi=one,
            process_function=Block(stage, arguments.work, events),
            read_write_conflict=False, num_workers=arguments.cap, max_retries=0,
            upstream_tasks=tasks[-1:]))
    return tasks


def child(variant: str, arguments: argparse.Namespace) -> None:
    """Run one variant here and print its figures as JSON."""
    folder = Path(tempfile.mkdtemp(prefix=f"bench_pool_{variant}_"))
    events = str(folder / "events")
    os.chdir(folder)
    started = time.time()
    if variant == "one_process":
        for stage in range(arguments.stages):
            function = Block(stage, arguments.work, events)
            for index in range(arguments.blocks):
                function(type("B", (), {"block_id": (f"stage{stage}", index)})())
    elif variant == "daisy":
        import daisy

        assert daisy.run_blockwise(build_tasks(daisy, arguments, events))
    else:
        import luigi_daisy

        total = 2 if variant != "per_task" else arguments.stages * arguments.cap
        policy = "most_ready" if variant == "most_ready" else "downstream"
        assert luigi_daisy.run_blockwise(
            build_tasks(luigi_daisy, arguments, events), progress=False,
            total_workers=total, pool_policy=policy, ledger_dir=str(folder / "ledgers"))
    ended = time.time()
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line.split() for line in Path(events).read_text().splitlines()]
    print(MARKER + json.dumps({
        "wall": ended - started,
        "cpu": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
        "events": [(int(stage), int(index), float(start), float(end))
                   for stage, index, start, end in lines],
        "started": started}), flush=True)


def figures(result: dict, stages: int) -> dict:
    """First object done and the most intermediate blocks alive, from the events."""
    events = result["events"]
    last = stages - 1
    first_object = min(end for stage, _, _, end in events if stage == last) - result["started"]
    # a block of stage s is alive from its end until block i of stage s + 1 starts
    consumed = {(stage, index): start for stage, index, start, _ in events}
    changes = []
    for stage, index, _, end in events:
        if stage == last:
            continue
        changes.append((end, 1))
        changes.append((consumed.get((stage + 1, index), float("inf")), -1))
    alive = most = 0
    for _, change in sorted(changes):
        alive += change
        most = max(most, alive)
    return {"wall": result["wall"], "cpu": result["cpu"], "first_object": first_object,
            "intermediate": most, "blocks": len(events)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--cap", type=int, default=2, help="num_workers of each task")
    parser.add_argument("--work", type=int, default=200_000,
                        help="random floats sorted per block")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        child(arguments.child, arguments)
        return
    variants = arguments.variants.split(",")
    print(f"{arguments.stages} stages x {arguments.blocks} blocks, {arguments.work} floats "
          f"sorted per block, cap {arguments.cap} per task; {os.cpu_count()} CPUs, load "
          f"average {os.getloadavg()[0]:.2f} at the start")
    results: dict[str, list[dict]] = {variant: [] for variant in variants}
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]))
    for _ in range(arguments.repeat):
        for variant in variants:  # interleaved: drifting load touches every variant
            command = [sys.executable, str(Path(__file__).resolve()), "--child", variant,
                       "--blocks", str(arguments.blocks), "--stages", str(arguments.stages),
                       "--cap", str(arguments.cap), "--work", str(arguments.work)]
            completed = subprocess.run(command, capture_output=True, text=True,
                                       env=environment, timeout=1800)
            found = [line for line in completed.stdout.splitlines()
                     if line.startswith(MARKER)]
            if not found:
                print(f"{variant}: failed\n{completed.stderr[-2000:]}")
                continue
            results[variant].append(figures(json.loads(found[0][len(MARKER):]),
                                            arguments.stages))
    medians = {}
    print(f"\n{'variant':<12} {'wall s':>8} {'CPU s':>8} {'first object s':>15} "
          f"{'intermediate':>13}   (medians of {arguments.repeat})")
    for variant, runs in results.items():
        if not runs:
            continue
        medians[variant] = {key: statistics.median(run[key] for run in runs)
                            for key in ("wall", "cpu", "first_object", "intermediate")}
        row = medians[variant]
        print(f"{variant:<12} {row['wall']:>8.2f} {row['cpu']:>8.2f} "
              f"{row['first_object']:>15.2f} {row['intermediate']:>13.0f}")
    base = medians.get("downstream")
    if base:
        print("\nratios to downstream (wall, CPU, first object, intermediate):")
        for variant, row in medians.items():
            if variant == "downstream":
                continue
            print(f"  {variant:<12} " + ", ".join(
                f"{row[key] / base[key]:.2f}x" if base[key] else "n/a"
                for key in ("wall", "cpu", "first_object", "intermediate")))


if __name__ == "__main__":
    main()
