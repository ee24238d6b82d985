"""One block server under a thousand workers: throughput, latency and idle time.

Method
------
For each block duration (``--durations``, milliseconds), this script starts:

- one **server process** (this script with ``--serve``): a real ``BlockServer`` over a
  ``BlockScheduler`` of one no-op 1D task (``--blocks`` blocks, no conflicts), on
  127.0.0.1, expecting worker ids ``0 .. W-1`` and with a fresh token, exactly as a run
  wires it, without worker processes;
- ``--client-processes`` **client processes** (``--clients``), each an asyncio loop with
  its share of the ``W`` simulated workers. Every simulated worker has its own
  connection and speaks the real protocol with ``luigi_daisy.protocol``: the challenge,
  ``Hello`` with the proof of the token, then ``Report`` frames that carry the results
  of finished blocks and ask for more, answered by ``BlocksAssigned`` frames. What to
  ask for and when is decided by ``luigi_daisy.hand.Hand``, the policy of the real
  worker loop (``prefetch`` blocks in hand, batches when blocks are much shorter than a
  round trip). "Processing" a block is ``asyncio.sleep`` of the block duration (nothing
  at 0 ms).

When every worker is connected and welcomed, all start working at once; after a
warm-up (``--warmup``, every worker starts with an empty hand) the measured window of
``--seconds`` starts in the server and in all clients. Reported per duration:

- blocks per second: blocks the server recorded done in the window, over its length;
- release -> next block: for every block a worker finished in the window, the time
  from its end to the moment the worker had its next block to start (0 when that block
  was already in hand); median and 99th percentile over all workers;
- idle: the share of the window the workers were not processing a block, averaged
  over workers (not meaningful at 0 ms, where processing takes no time);
- server CPU (user + system, and as a share of one core) over the window, and its
  peak resident memory.

The released daisy 2 is not driven here: its block server speaks another protocol
(a Rust server whose clients are its own), so 1,000 simulated daisy workers would
measure a re-implementation of its client, not daisy. ``bench_run.py`` compares the
two end to end.

Every process started is stopped (by pid) when the run ends, however it ends; every
wait has a deadline.

Usage::

    python benchmarks/bench_load.py                                  # 1,000 workers
    python benchmarks/bench_load.py --workers 100 --durations 0,10 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

TASK_ID = "load"
#: targets of the issue: idle share with 100 ms blocks, blocks/s with 0 ms blocks
TARGET_IDLE_AT_100_MS = 0.02
TARGET_BLOCKS_PER_S_AT_0_MS = 20_000
#: connections a client process opens at once (the listen backlog is 128)
CONNECT_AT_ONCE = 32
CONNECT_ATTEMPTS = 20
#: latency samples each client process sends back (a uniform sample of its own)
SAMPLES_PER_PROCESS = 50_000
SETUP_TIMEOUT = 120.0


# --------------------------------------------------------------------------- #
# The server process
# --------------------------------------------------------------------------- #

def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def serve(args: argparse.Namespace) -> int:
    """Run a block server until told to stop; print its address, then its figures."""
    from tornado.ioloop import IOLoop

    import luigi_daisy as daisy
    from luigi_daisy.server import BlockServer

    async def main() -> dict[str, Any]:
        task = daisy.Task(TASK_ID, total_roi=daisy.Roi((0,), (args.blocks,)),
                          read_roi=daisy.Roi((0,), (1,)), write_roi=daisy.Roi((0,), (1,)),
                          process_function=None, read_write_conflict=False, max_retries=0)
        server = BlockServer(daisy.BlockScheduler([task]), host="127.0.0.1")
        for worker_id in range(args.workers):
            server.expect_worker(TASK_ID, worker_id)
        port = server.start_listening(0)
        print(json.dumps({"port": port, "token": server.token}), flush=True)
        state = server.task_states[TASK_ID]
        loop = IOLoop.current()
        finished = asyncio.get_running_loop().create_future()
        marks: dict[str, tuple[float, float, int]] = {}

        def mark(name: str) -> None:
            marks[name] = (time.monotonic(), cpu_seconds(), state.completed_count)
            if name == "stop":
                finished.set_result(None)

        def on_command(fd: int, events: int) -> None:
            line = os.read(fd, 64).decode().strip()
            if line == "go":  # the window: after the warm-up, for --seconds
                loop.call_later(args.warmup, mark, "start")
                loop.call_later(args.warmup + args.seconds, mark, "stop")
            else:  # end of input: the driver gave up
                loop.remove_handler(fd)
                if not finished.done():
                    finished.set_result(None)

        loop.add_handler(sys.stdin.fileno(), on_command, IOLoop.READ)
        await finished
        if "start" not in marks or "stop" not in marks:
            server.close_all()
            return {"error": "the driver stopped the server before the window ended"}
        (start_wall, start_cpu, start_done), (stop_wall, stop_cpu, stop_done) = (
            marks["start"], marks["stop"])
        window = stop_wall - start_wall
        figures = {"window_s": window, "blocks": stop_done - start_done,
                "blocks_per_s": (stop_done - start_done) / window,
                "cpu_s": stop_cpu - start_cpu,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "frames": server.block_frames, "handed_out": server.blocks_handed_out,
                "protocol_errors": server.protocol_errors}
        print(json.dumps(figures), flush=True)
        # serve on until the workers have said goodbye and the driver stops this process
        await asyncio.get_running_loop().create_future()

    def on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    if args.profile_server:
        import cProfile
        profiler = cProfile.Profile()
        try:
            profiler.runcall(asyncio.run, main())
        finally:
            profiler.dump_stats(args.profile_server)
    else:
        asyncio.run(main())
    return 0


# --------------------------------------------------------------------------- #
# The client processes: simulated workers on one asyncio loop
# --------------------------------------------------------------------------- #

class SimulatedWorker:
    """One worker connection: the real handshake and the real ``Hand`` policy."""

    def __init__(self, worker_id: int, prefetch: int, block_seconds: float) -> None:
        from luigi_daisy.hand import Hand
        from luigi_daisy.protocol import SERVER_MESSAGES, Decoder
        self.worker_id = worker_id
        self.block_seconds = block_seconds
        self.hand: Any = Hand(prefetch)
        self.decoder = Decoder(accept=SERVER_MESSAGES)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.answer = asyncio.Event()
        self.asked_at = 0.0
        self.latencies: list[float] = []
        self.busy = 0.0
        self.done = 0

    async def connect(self, port: int, token: str) -> None:
        from luigi_daisy.protocol import (PROTOCOL_VERSION, Challenge, Hello, Welcome,
                                          encode, proof_for)
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                self.reader, self.writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), 10.0)
                break
            except (ConnectionError, OSError, asyncio.TimeoutError):
                if attempt == CONNECT_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        challenge = await self.receive()
        if type(challenge) is not Challenge:
            raise RuntimeError(f"worker {self.worker_id}: expected Challenge, got {challenge}")
        self.writer.write(encode(Hello(PROTOCOL_VERSION, TASK_ID, self.worker_id,
                                       proof_for(token, challenge.nonce))))
        welcome = await self.receive()
        if type(welcome) is not Welcome:
            raise RuntimeError(f"worker {self.worker_id} was not welcomed: {welcome}")

    async def receive(self) -> Any:
        while True:
            data = await asyncio.wait_for(self.reader.read(1 << 16), SETUP_TIMEOUT)
            if not data:
                raise ConnectionError(f"worker {self.worker_id}: the server closed")
            messages = self.decoder.feed(data)
            if messages:
                return messages[0]

    async def read_answers(self) -> None:
        """Take every answer as it arrives (the hand fills while the worker works)."""
        from luigi_daisy.protocol import BlocksAssigned, NoMoreBlocks
        while True:
            data = await self.reader.read(1 << 16)
            if not data:
                self.hand.answered(None, 0.0, exact=True)
                self.answer.set()
                return
            for message in self.decoder.feed(data):
                seconds = time.monotonic() - self.asked_at
                if type(message) is BlocksAssigned:
                    self.hand.answered(list(message.blocks), seconds, exact=True)
                elif type(message) is NoMoreBlocks:
                    self.hand.answered(None, seconds, exact=True)
                self.answer.set()

    def send_report(self, want: int) -> None:
        from luigi_daisy.protocol import Report, encode
        self.writer.write(encode(Report(self.hand.take_results(want), want)))
        if want:
            self.asked_at = time.monotonic()

    async def work(self, start: float, deadline: float) -> None:
        """The worker loop of ``Client.next_block``, until the window ends."""
        from luigi_daisy.protocol import BlockResult
        hand = self.hand
        reader = asyncio.ensure_future(self.read_answers())
        released: float | None = None
        try:
            while True:
                want = hand.to_ask()
                if want or hand.results:
                    self.send_report(want)
                while hand.must_wait():
                    self.answer.clear()
                    await self.answer.wait()
                if not hand.blocks:
                    break  # no more blocks
                now = time.monotonic()
                if now >= deadline:
                    break
                if released is not None and released >= start:
                    self.latencies.append(now - released)
                block = hand.blocks.popleft()
                if self.block_seconds:
                    await asyncio.sleep(self.block_seconds)
                released = time.monotonic()
                if released > start:
                    self.busy += min(released, deadline) - max(now, start)
                    self.done += 1
                hand.finished(BlockResult(block.index, 2), released - now)
        finally:
            if hand.results:
                self.send_report(0)
            from luigi_daisy.protocol import Bye, encode
            self.writer.write(encode(Bye()))
            reader.cancel()
            self.writer.close()


async def run_clients(args: argparse.Namespace) -> dict[str, Any]:
    workers = [SimulatedWorker(worker_id, args.prefetch, args.duration_ms / 1000)
               for worker_id in range(args.first_id, args.first_id + args.count)]
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def connect(worker: SimulatedWorker) -> None:
        async with gate:
            await worker.connect(args.port, args.token)

    await asyncio.wait_for(asyncio.gather(*(connect(worker) for worker in workers)),
                           SETUP_TIMEOUT)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    go = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline),
                                SETUP_TIMEOUT)
    if go.strip() != "go":
        return {"error": "the driver did not start the window"}
    start = time.monotonic() + args.warmup
    deadline = start + args.seconds

    async def measure_cpu() -> float:
        await asyncio.sleep(args.warmup)
        at_start = cpu_seconds()
        await asyncio.sleep(args.seconds)
        return cpu_seconds() - at_start

    cpu = asyncio.ensure_future(measure_cpu())
    await asyncio.wait_for(
        asyncio.gather(*(worker.work(start, deadline) for worker in workers)),
        args.warmup + args.seconds + SETUP_TIMEOUT)
    window = args.seconds
    latencies = [latency for worker in workers for latency in worker.latencies]
    if len(latencies) > SAMPLES_PER_PROCESS:
        latencies = random.sample(latencies, SAMPLES_PER_PROCESS)
    return {"idle": [1 - worker.busy / window for worker in workers],
            "cpu_s": await cpu,
            "blocks": sum(worker.done for worker in workers),
            "latencies": latencies}


def clients(args: argparse.Namespace) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.count + 64
    if soft < wanted <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    print(json.dumps(asyncio.run(run_clients(args))), flush=True)
    return 0


# --------------------------------------------------------------------------- #
# The driver
# --------------------------------------------------------------------------- #

def read_line(process: subprocess.Popen, timeout: float, what: str) -> str:
    """One line of a child's output, or an error naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {what} within {timeout:g} s")
        ready, _, _ = select.select([process.stdout], [], [], remaining)
        if ready:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"the process ended before its {what} "
                                   f"(exit code {process.wait()})")
            return line


def stop(processes: list[subprocess.Popen]) -> None:
    """End the children: SIGTERM (the server then writes its profile), SIGKILL for
    any still running after a few seconds."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def measure(args: argparse.Namespace, duration_ms: float) -> dict[str, Any]:
    """One duration: start the server and the clients, run the window, gather."""
    script = str(Path(__file__).resolve())
    processes: list[subprocess.Popen] = []
    try:
        server = subprocess.Popen(
            [sys.executable, script, "--serve", "--workers", str(args.workers),
             "--blocks", str(args.blocks), "--seconds", str(args.seconds),
             "--warmup", str(args.warmup),
             *(["--profile-server", f"{args.profile_server}.{duration_ms:g}ms"]
               if args.profile_server else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        processes.append(server)
        address = json.loads(read_line(server, SETUP_TIMEOUT, "server address"))
        per_process = -(-args.workers // args.client_processes)
        client_list = []
        for first in range(0, args.workers, per_process):
            count = min(per_process, args.workers - first)
            client = subprocess.Popen(
                [sys.executable, script, "--clients", "--port", str(address["port"]),
                 "--token", address["token"], "--first-id", str(first),
                 "--count", str(count), "--duration-ms", str(duration_ms),
                 "--seconds", str(args.seconds), "--warmup", str(args.warmup),
                 "--prefetch", str(args.prefetch)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            processes.append(client)
            client_list.append(client)
        for client in client_list:
            if read_line(client, SETUP_TIMEOUT, "ready line").strip() != "ready":
                raise RuntimeError("a client process did not connect its workers")
        for process in (server, *client_list):
            process.stdin.write("go\n")
            process.stdin.flush()
        window = args.warmup + args.seconds + SETUP_TIMEOUT
        served = json.loads(read_line(server, window, "server figures"))
        results = [json.loads(read_line(client, window, "figures"))
                   for client in client_list]
    finally:
        stop(processes)
    errors = [result["error"] for result in [*results, served] if "error" in result]
    if errors:
        raise RuntimeError("; ".join(errors))
    latencies = [latency for result in results for latency in result["latencies"]]
    idle = [share for result in results for share in result["idle"]]
    return {
        "duration_ms": duration_ms,
        "blocks_per_s": served["blocks_per_s"],
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * percentile(latencies, 0.99) if latencies else float("nan"),
        "idle": statistics.fmean(idle),
        "cpu_s": served["cpu_s"],
        "cpu_share": served["cpu_s"] / served["window_s"],
        "rss_mib": served["peak_rss_mib"],
        "client_cpu_share": sum(result["cpu_s"] for result in results) / args.seconds,
        "blocks_per_frame": served["handed_out"] / max(served["frames"], 1),
        "protocol_errors": served["protocol_errors"],
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ("block ms", "blocks/s", "release->next p50 ms", "p99 ms", "idle",
              "server CPU s", "of one core", "server peak RSS MiB", "blocks/frame",
              "clients' CPU, cores")
    lines = [header]
    for row in rows:
        lines.append((f"{row['duration_ms']:g}", f"{row['blocks_per_s']:,.0f}",
                      f"{row['p50_ms']:.3f}", f"{row['p99_ms']:.3f}",
                      f"{100 * row['idle']:.2f}%" if row["duration_ms"] else "n/a",
                      f"{row['cpu_s']:.2f}", f"{100 * row['cpu_share']:.0f}%",
                      f"{row['rss_mib']:.0f}", f"{row['blocks_per_frame']:.1f}",
                      f"{row['client_cpu_share']:.2f}"))
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    for line in lines:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def check_targets(rows: list[dict[str, Any]], workers: int) -> list[str]:
    verdicts = []
    for row in rows:
        if row["duration_ms"] == 100:
            verdict = "PASS" if row["idle"] < TARGET_IDLE_AT_100_MS else "FAIL"
            verdicts.append(f"{verdict:5} 100 ms blocks, {workers} workers: idle "
                            f"{100 * row['idle']:.2f}% (target < "
                            f"{100 * TARGET_IDLE_AT_100_MS:g}%)")
        if row["duration_ms"] == 0:
            verdict = "PASS" if row["blocks_per_s"] >= TARGET_BLOCKS_PER_S_AT_0_MS else "FAIL"
            verdicts.append(f"{verdict:5} 0 ms blocks, {workers} workers: "
                            f"{row['blocks_per_s']:,.0f} blocks/s (target >= "
                            f"{TARGET_BLOCKS_PER_S_AT_0_MS:,})")
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1000, help="simulated workers")
    parser.add_argument("--durations", default="0,10,100", help="block durations, ms")
    parser.add_argument("--client-processes", type=int, default=4,
                        help="processes the simulated workers are spread over")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="length of the measured window per duration")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of work before each window (every worker starts "
                             "with an empty hand)")
    parser.add_argument("--blocks", type=int, default=10**7, help="blocks of the task")
    parser.add_argument("--prefetch", type=int, default=1,
                        help="blocks a worker keeps in hand (run_blockwise's prefetch)")
    parser.add_argument("--profile-server", metavar="PATH",
                        help="run the server under cProfile; its stats go to "
                             "PATH.<duration>ms (read them with python -m pstats)")
    internal = parser.add_argument_group("internal (the server and client processes)")
    internal.add_argument("--serve", action="store_true")
    internal.add_argument("--clients", action="store_true")
    internal.add_argument("--port", type=int)
    internal.add_argument("--token")
    internal.add_argument("--first-id", type=int)
    internal.add_argument("--count", type=int)
    internal.add_argument("--duration-ms", type=float)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args)
    if args.clients:
        return clients(args)
    durations = [float(value) for value in args.durations.split(",") if value]
    print(f"{args.workers} workers in {args.client_processes} client processes, "
          f"{args.seconds:g} s windows after {args.warmup:g} s of warm-up, prefetch "
          f"{args.prefetch}, "
          f"{os.cpu_count()} cpus, load average "
          f"{' '.join(f'{load:.2f}' for load in os.getloadavg())}", flush=True)
    rows = []
    for duration in durations:
        rows.append(measure(args, duration))
        print(f"  done: {duration:g} ms", flush=True)
    print()
    print_table(rows)
    print()
    for line in check_targets(rows, args.workers):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
