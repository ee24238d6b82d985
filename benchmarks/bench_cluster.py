"""SLURM workers against local workers on the same no-op task.

Starts its own single-node SLURM on 127.0.0.1 (``tests/slurm/cluster.py``; needs root
and ``apt-get install slurmctld slurmd slurm-client munge``), then runs, alternating and
``--repeat`` times each, a 1D task of ``--blocks`` no-op blocks (``read_write_conflict``
off) with ``--workers`` workers, once with ``LocalLauncher`` (fresh local processes) and
once with ``SlurmLauncher`` (one ``sbatch`` job per worker). Each worker process notes
the time of its first block and, when it exits, of its last. Reported (medians):

``first block``
    from the ``run_blockwise`` call (server start, submission) to the first block
``blocks/s``
    blocks divided by the time from the first block to the last
``run``
    the whole ``run_blockwise`` call
``end -> gone``
    from the last block to the moment the last worker (job) is gone according to the
    launcher, i.e. ``run_blockwise`` returned (it waits for ``squeue`` to confirm);
    ``squeue`` is checked to be empty right after

Usage::

    python benchmarks/bench_cluster.py                       # 4000 blocks, 4 workers, 3 runs
    python benchmarks/bench_cluster.py --blocks 20000 --workers 8 --repeat 5
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT))

from slurm.cluster import SlurmCluster  # noqa: E402

_noted: dict = {}


def noop(folder: str, block) -> None:
    """Nothing, but note this process's first block and, at exit, its last."""
    now = time.time()
    if not _noted:
        _noted["first"] = now
        _noted["folder"] = folder
        atexit.register(_write_times)
    _noted["last"] = now


def _write_times() -> None:
    path = Path(_noted["folder"]) / f"times.{os.getpid()}"
    path.write_text(f"{_noted['first']} {_noted['last']}")


def run_once(kind: str, blocks: int, workers: int, cluster: SlurmCluster) -> dict:
    import functools

    import luigi_daisy as daisy
    from luigi_daisy.launchers.local import LocalLauncher
    from luigi_daisy.launchers.slurm import SlurmLauncher

    folder = Path(tempfile.mkdtemp(prefix=f"bench_cluster_{kind}_"))
    task = daisy.Task(f"noop_{kind}", total_roi=daisy.Roi((0,), (blocks,)),
                      read_roi=daisy.Roi((0,), (1,)), write_roi=daisy.Roi((0,), (1,)),
                      process_function=functools.partial(noop, str(folder)),
                      read_write_conflict=False, num_workers=workers)
    if kind == "slurm":
        launcher = SlurmLauncher(log_dir=folder / "logs", poll_interval=1.0)
    else:
        launcher = LocalLauncher(folder / "logs")
    started = time.time()
    result = daisy.run_blockwise([task], launcher=launcher, progress=False,
                                 ledger_dir=folder / "ledgers")
    returned = time.time()
    if not result[task.task_id].succeeded:
        raise RuntimeError(f"{kind}: the run failed; logs in {folder / 'logs'}")
    left = cluster.job_ids()
    times = [tuple(map(float, path.read_text().split())) for path in folder.glob("times.*")]
    first = min(first for first, _ in times)
    last = max(last for _, last in times)
    return {"first block": first - started, "blocks/s": blocks / max(last - first, 1e-9),
            "run": returned - started, "end -> gone": returned - last,
            "jobs left": len(left)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cluster = SlurmCluster().start()
    os.environ.update(cluster.environment)
    figures: dict[str, list[dict]] = {"local": [], "slurm": []}
    try:
        for _ in range(arguments.repeat):
            for kind in ("local", "slurm"):
                figures[kind].append(run_once(kind, arguments.blocks, arguments.workers,
                                              cluster))
    finally:
        cluster.stop()
    keys = ("first block", "blocks/s", "run", "end -> gone", "jobs left")
    print(f"\n{arguments.blocks} no-op blocks, {arguments.workers} workers, medians of "
          f"{arguments.repeat} runs (python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
    print(f"{'launcher':<10}" + "".join(f"{key:>14}" for key in keys))
    medians = {}
    for kind, runs in figures.items():
        medians[kind] = {key: statistics.median(run[key] for run in runs) for key in keys}
        print(f"{kind:<10}" + "".join(
            f"{medians[kind][key]:>14.0f}" if key in ("blocks/s", "jobs left")
            else f"{medians[kind][key]:>13.2f}s" for key in keys))
    print("slurm/local" + "".join(
        f"{medians['slurm'][key] / medians['local'][key]:>13.2f}x"
        if medians["local"][key] else f"{'-':>14}" for key in keys[:4]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
