"""Pipelining on the example pipeline: a two-stage chain of equal cost, on and off.

Runs ``luigi --module pipeline Threshold`` (examples/pipeline.py: Raw -> Smooth ->
Threshold) in a fresh folder per run, once with ``[luigi_daisy] pipelining = true`` and
once with ``false``, every block of both stages sleeping ``--block-seconds``. Prints per
run the wall time of the ``luigi`` command, when Threshold's first block started and
Smooth's last block ended (from the example's per-block events file), and the medians
and the ratio off/on.

    python benchmarks/bench_pipeline.py [--repeat 3] [--size 64] [--block-size 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CONFIG = """[luigi_daisy]
num_workers = {workers}
pipelining = {pipelining}
ledger_dir = ledgers
log_dir = logs

[Smooth]
block_seconds = {block_seconds}
events_file = events.log

[Threshold]
block_seconds = {block_seconds}
events_file = events.log
"""


def run_once(pipelining: bool, arguments: argparse.Namespace) -> dict:
    """One ``luigi`` run in a fresh folder; the figures of that run."""
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as folder:
        folder = Path(folder)
        (folder / "luigi.cfg").write_text(CONFIG.format(
            workers=arguments.workers, pipelining=str(pipelining).lower(),
            block_seconds=arguments.block_seconds))
        environment = dict(os.environ, LUIGI_CONFIG_PATH=str(folder / "luigi.cfg"),
                           PYTHONPATH=str(REPO / "examples"))
        # Raw is an ordinary task: build it first so that only the blockwise chain is timed
        common = ["--size", str(arguments.size), "--block-size", str(arguments.block_size),
                  "--local-scheduler", "--retcode-task-failed", "3"]
        subprocess.run([sys.executable, "-m", "luigi", "--module", "pipeline", "Raw",
                        *common], cwd=folder, env=environment, check=True,
                       capture_output=True, timeout=arguments.timeout)
        started = time.monotonic()
        completed = subprocess.run(
            [sys.executable, "-m", "luigi", "--module", "pipeline", "Threshold", *common],
            cwd=folder, env=environment, capture_output=True, text=True,
            timeout=arguments.timeout)
        seconds = time.monotonic() - started
        if completed.returncode != 0:
            sys.exit(f"the luigi run failed (exit {completed.returncode}):\n"
                     f"{completed.stderr[-3000:]}")
        events = [line.split() for line in (folder / "events.log").read_text().splitlines()]
    starts = {"Smooth": [], "Threshold": []}
    ends = {"Smooth": [], "Threshold": []}
    for family, _task_id, _block, start, end, _pid in events:
        starts[family].append(float(start))
        ends[family].append(float(end))
    expected = (arguments.size // arguments.block_size) ** 3
    for family in starts:
        if len(starts[family]) != expected:
            sys.exit(f"{family} processed {len(starts[family])} blocks, expected {expected}")
    return {"seconds": seconds,
            "overlap": max(ends["Smooth"]) - min(starts["Threshold"]),
            "chain": max(ends["Threshold"]) - min(starts["Smooth"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="voxels a side")
    parser.add_argument("--block-size", type=int, default=16, help="voxels a side of a block")
    parser.add_argument("--block-seconds", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=2, help="workers per task")
    parser.add_argument("--timeout", type=float, default=600)
    arguments = parser.parse_args()
    blocks = (arguments.size // arguments.block_size) ** 3
    print(f"example pipeline: {blocks} blocks per stage, {arguments.block_seconds} s a "
          f"block, {arguments.workers} workers per task, {os.cpu_count()} CPUs")
    print(f"{'pipelining':<11} {'run':>3} {'luigi s':>8} {'chain s':>8} "
          f"{'Threshold first start - Smooth last end':>40}")
    results = {True: [], False: []}
    for repeat in range(arguments.repeat):
        for pipelining in (True, False):
            figures = run_once(pipelining, arguments)
            results[pipelining].append(figures)
            print(f"{str(pipelining).lower():<11} {repeat:>3} {figures['seconds']:>8.2f} "
                  f"{figures['chain']:>8.2f} {-figures['overlap']:>+40.2f}")
    median = {pipelining: {key: statistics.median(run[key] for run in runs)
                           for key in ("seconds", "chain")}
              for pipelining, runs in results.items()}
    print(f"median luigi command: on {median[True]['seconds']:.2f} s, off "
          f"{median[False]['seconds']:.2f} s, off/on {median[False]['seconds'] / median[True]['seconds']:.2f}")
    print(f"median chain (Smooth first start to Threshold last end): on "
          f"{median[True]['chain']:.2f} s, off {median[False]['chain']:.2f} s, off/on "
          f"{median[False]['chain'] / median[True]['chain']:.2f}")
    overlapping = sum(run["overlap"] > 0 for run in results[True])
    print(f"pipelining on: Threshold's first block started before Smooth's last ended in "
          f"{overlapping} of {len(results[True])} runs")


if __name__ == "__main__":
    main()
