"""The hand-out while a batch launcher works: a slow ``squeue``, a burst of ``sbatch``.

Method
------
This process runs a real ``BlockServer`` over a ``BlockScheduler`` of one no-op 1D task
on its asyncio loop, and drives a real ``SlurmLauncher`` from the same loop the way a
run does (``start()`` for every job at once, ``poll()`` every 50 ms). The fake ``sbatch``,
``squeue`` and ``scancel`` are shell scripts first on ``PATH`` in a temporary folder:
``sbatch`` sleeps ``--sbatch-ms`` and prints a new job id (the job never runs: it stays
pending until cancelled), ``squeue`` sleeps ``--squeue-s`` and lists every job.

Blocks are taken by ``--workers`` simulated workers in one client process
(``bench_load.py --clients``: the real handshake, the real ``Hand`` policy, a block is
an ``asyncio.sleep`` of ``--block-ms``). After ``--warmup`` seconds, a window of
``--seconds`` is measured while the launcher does one thing:

- ``baseline``: nothing;
- ``squeue``: four jobs were submitted before the window; ``poll()`` every 50 ms, each
  ``squeue`` takes ``--squeue-s``;
- ``sbatch``: ``--jobs`` jobs are started at the window's start (``sbatch`` of
  ``--sbatch-ms`` each), ``poll()`` every 50 ms;
- ``squeue on loop`` and ``sbatch on loop``: the same commands run on the loop, as the
  launchers did before (``subprocess.run`` in ``poll()`` and ``start()``), for
  comparison.

Reported: blocks done per second over the window (recorded by the scheduler), the
longest time without a block done, the longest stall of the loop (a 5 ms ticker's
longest gap), and how many submit / query / cancel commands ran in the window and at
the end (``stop_all``, which cancels every job and waits for ``squeue`` to confirm).
Figures, no verdict: the machine may be shared.

Usage::

    python benchmarks/bench_launchers.py
    python benchmarks/bench_launchers.py --jobs 200 --seconds 5 --scenarios baseline,sbatch
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

TASK_ID = "load"  # the task bench_load.py's clients ask for
MONITOR_INTERVAL = 0.05  # run.py's look at its workers
TICK = 0.005
SETUP_TIMEOUT = 120.0
SCENARIOS = ("baseline", "squeue", "squeue on loop", "sbatch", "sbatch on loop")

FAKE_SBATCH = """#!/bin/sh
sleep "$(cat "$(dirname "$0")/sbatch_delay")"
: > "$(dirname "$0")/jobs/$$"
echo "$$"
"""
FAKE_SQUEUE = """#!/bin/sh
here=$(dirname "$0")
sleep "$(cat "$here/squeue_delay")"
for path in "$here"/jobs/*; do
  [ -e "$path" ] || continue
  id=${path##*/}
  case "$id" in
    *.cancelled) ;;
    *) if [ -e "$path.cancelled" ]; then echo "$id|CANCELLED|0|None"
       else echo "$id|PENDING|0|Priority"; fi;;
  esac
done
"""
FAKE_SCANCEL = """#!/bin/sh
for id; do : > "$(dirname "$0")/jobs/$id.cancelled"; done
"""


def fake_commands(folder: Path, sbatch_seconds: float, squeue_seconds: float) -> None:
    """Write the fake commands into ``folder`` (emptied of jobs)."""
    (folder / "jobs").mkdir(parents=True, exist_ok=True)
    for path in (folder / "jobs").iterdir():
        path.unlink()
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE),
                       ("scancel", FAKE_SCANCEL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    (folder / "sbatch_delay").write_text(f"{sbatch_seconds:g}")
    (folder / "squeue_delay").write_text(f"{squeue_seconds:g}")


async def readline(process: subprocess.Popen, timeout: float) -> str:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, process.stdout.readline),
                                  timeout)


async def scenario(name: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One window of ``name``; the figures."""
    import luigi_daisy as daisy
    from luigi_daisy.launchers.base import WorkerSpec
    from luigi_daisy.launchers.slurm import SlurmLauncher
    from luigi_daisy.payload import FunctionTarget, WorkerPayload
    from luigi_daisy.server import BlockServer

    fake_commands(folder, args.sbatch_ms / 1000, args.squeue_s if "squeue" in name else 0)
    task = daisy.Task(TASK_ID, total_roi=daisy.Roi((0,), (10**8,)),
                      read_roi=daisy.Roi((0,), (1,)), write_roi=daisy.Roi((0,), (1,)),
                      process_function=None, read_write_conflict=False, max_retries=0)
    scheduler = daisy.BlockScheduler([task])
    server = BlockServer(scheduler, host="127.0.0.1")
    for worker_id in range(args.workers):
        server.expect_worker(TASK_ID, worker_id)
    port = server.start_listening(0)
    state = scheduler.task_states[TASK_ID]
    launcher = SlurmLauncher(log_dir=folder / "logs", poll_interval=args.poll_interval)
    payload = WorkerPayload(FunctionTarget(len), "bench")

    def spec(number: int) -> WorkerSpec:
        return WorkerSpec(task_id="bench", worker_id=number, environment={},
                          payload=payload, stdout_path=folder / "logs" / f"{number}.out",
                          stderr_path=folder / "logs" / f"{number}.err",
                          job_name=f"bench-{number}")

    client = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("bench_load.py")), "--clients",
         "--port", str(port), "--token", server.token, "--first-id", "0",
         "--count", str(args.workers), "--duration-ms", str(args.block_ms),
         "--seconds", str(args.seconds), "--warmup", str(args.warmup), "--prefetch", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if (await readline(client, SETUP_TIMEOUT)).strip() != "ready":
            raise RuntimeError("the client process did not connect its workers")
        client.stdin.write("go\n")
        client.stdin.flush()
        if name.startswith("squeue"):
            for number in range(4):
                launcher.start(spec(number))
        await asyncio.sleep(args.warmup)
        before = dict(launcher.command_counts)
        inline_calls = 0
        start = time.monotonic()
        deadline = start + args.seconds
        done_at_start = state.completed_count
        ticks: list[tuple[float, int]] = [(start, done_at_start)]

        async def ticker() -> None:
            while True:  # one tick at least: after a stall longer than the window
                await asyncio.sleep(TICK)
                ticks.append((time.monotonic(), state.completed_count))
                if ticks[-1][0] >= deadline:
                    return

        ticking = asyncio.ensure_future(ticker())
        if name == "sbatch":
            for number in range(args.jobs):
                launcher.start(spec(number))
        elif name == "sbatch on loop":
            for number in range(args.jobs):
                subprocess.run(["sbatch", "--parsable", f"--job-name=bench-{number}"],
                               capture_output=True, text=True, timeout=60)
                inline_calls += 1
        last_inline_query = -1e9
        while time.monotonic() < deadline:
            await asyncio.sleep(MONITOR_INTERVAL)
            if name in ("squeue", "sbatch"):
                launcher.poll()
            elif name == "squeue on loop" and \
                    time.monotonic() - last_inline_query >= args.poll_interval:
                subprocess.run(["squeue", "--noheader", "--states=all"],
                               capture_output=True, text=True, timeout=60)
                inline_calls += 1
                last_inline_query = time.monotonic()
        await ticking
        end = time.monotonic()
        done = state.completed_count - done_at_start
        during = {what: launcher.command_counts[what] - before.get(what, 0)
                  for what in ("submit", "query", "cancel")}
        stopping = time.monotonic()
        left = await asyncio.get_running_loop().run_in_executor(
            None, launcher.stop_all, 60.0)
        stop_seconds = time.monotonic() - stopping
        gaps = [later[0] - earlier[0] for earlier, later in zip(ticks, ticks[1:])]
        idle, last_change = 0.0, ticks[0][0]
        for (moment, count), (_, previous) in zip(ticks[1:], ticks):
            idle = max(idle, moment - last_change)
            if count != previous:
                last_change = moment
        await readline(client, args.warmup + args.seconds + SETUP_TIMEOUT)
    finally:
        if client.poll() is None:
            client.terminate()
        client.wait(10)
        server.close_all()
    return {"scenario": name, "blocks_per_s": done / (end - start),
            "longest_no_block_s": idle, "longest_stall_s": max(gaps, default=0.0),
            "window_s": end - start, "submits": during["submit"] or
            (inline_calls if name == "sbatch on loop" else 0),
            "queries": during["query"] or (inline_calls if name == "squeue on loop" else 0),
            "all_commands": dict(launcher.command_counts), "stop_all_s": stop_seconds,
            "not_gone": len(left)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--workers", type=int, default=20, help="simulated workers")
    parser.add_argument("--block-ms", type=float, default=10.0, help="block duration")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before it")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs of the sbatch burst")
    parser.add_argument("--sbatch-ms", type=float, default=20.0, help="one sbatch call")
    parser.add_argument("--squeue-s", type=float, default=1.0, help="one squeue call")
    parser.add_argument("--poll-interval", type=float, default=1.0,
                        help="the launcher's poll_interval (the minimum by default)")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    print(f"{args.workers} simulated workers, {args.block_ms:g} ms blocks, "
          f"{args.seconds:g} s windows; squeue {args.squeue_s:g} s, {args.jobs} sbatch of "
          f"{args.sbatch_ms:g} ms; poll_interval {args.poll_interval:g} s; "
          f"{os.cpu_count()} cpus, load average "
          f"{' '.join(f'{load:.2f}' for load in os.getloadavg())}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_launchers_") as temporary:
        folder = Path(temporary)
        os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ['PATH']}"
        for name in names:
            rows.append(asyncio.run(scenario(name, args, folder)))
            print(f"  done: {name}", flush=True)
    print()
    header = (f"{'scenario':<16}{'blocks/s':>10}{'no block (s)':>14}{'loop stall (s)':>16}"
              f"{'submits':>9}{'queries':>9}{'stop_all (s)':>14}")
    print(header)
    for row in rows:
        print(f"{row['scenario']:<16}{row['blocks_per_s']:>10.0f}"
              f"{row['longest_no_block_s']:>14.3f}{row['longest_stall_s']:>16.3f}"
              f"{row['submits']:>9}{row['queries']:>9}{row['stop_all_s']:>14.2f}")
    print()
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
