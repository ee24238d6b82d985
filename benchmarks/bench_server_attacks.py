"""What hostile peers cost the block server: log bytes, queue entries, buffered memory.

Replays the attacks of issue 9 against a ``BlockServer`` on 127.0.0.1 (its own event
loop in a thread; the peers are raw sockets of this process) and prints what they
cost:

``logs``
    16 refused ``Hello`` frames naming an unknown task of 60,000 characters (sent with
    the token, so the task id is what gets refused), 16 ``Hello`` frames with a task id
    of 1,000,000 characters (closed as oversized handshakes), and 2,000 results (each
    a ``Report``) of blocks the sender does not hold. Prints the bytes and lines added to
    the log.
``queue``
    100 authenticated peers that each ask for a block (``Report`` with ``want`` 1) while
    no block is ready and then close. Prints the waiting-queue entries while they are
    parked and after they left.
``buffers``
    192 authenticated peers that each send a partial 1 MiB frame. Prints the bytes
    buffered, the peak, the connections shed and the growth of this process's RSS,
    with the default bound (``ServerLimits.max_buffered_bytes``, 64 MiB) and with the
    bound lifted to 1 TiB (what a server without it would do). Each bound runs in a
    fresh interpreter.

There is no daisy column: the released daisy has no token, no worker ids and no limits
to compare with.

Usage::

    python benchmarks/bench_server_attacks.py                 # every scenario
    python benchmarks/bench_server_attacks.py --scenarios logs,queue
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time

from funlib.geometry import Roi

import luigi_daisy as daisy
from luigi_daisy.protocol import (
    PROTOCOL_VERSION,
    BlockResult,
    Challenge,
    Decoder,
    Hello,
    Report,
    Welcome,
    encode,
    proof_for,
)
from luigi_daisy.scheduler import BlockScheduler
from luigi_daisy.server import BlockServer, ServerLimits

HOST = "127.0.0.1"
WAIT = 60.0
SCENARIOS = ("logs", "queue", "buffers")
#: a request for one block, as ``Client.acquire`` sends it
REQUEST = encode(Report((), 1))


def line_task(task_id: str, num_blocks: int) -> daisy.Task:
    return daisy.Task(task_id, total_roi=Roi((0,), (num_blocks,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)), process_function=None,
                      read_write_conflict=False)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Served:
    """A block server on an event loop in a thread."""

    def __init__(self, scheduler: BlockScheduler, **options) -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)

            async def start() -> None:
                self.server = BlockServer(scheduler, host=HOST, **options)
                self.server.start_listening(0)

            self.loop.run_until_complete(start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        if not started.wait(WAIT):
            raise RuntimeError("the server did not start")

    def call(self, function, *args):
        async def run():
            return function(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(WAIT)

    def stop(self) -> None:
        self.call(self.server.close_all)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


class Peer:
    """A raw socket speaking frames."""

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection((HOST, port), timeout=WAIT)
        self.decoder = Decoder()
        self.inbox: list = []

    def receive(self):
        while not self.inbox:
            try:
                data = self.socket.recv(1 << 16)
            except OSError:
                return None
            if not data:
                return None
            self.inbox.extend(self.decoder.feed(data))
        return self.inbox.pop(0)

    def send(self, data: bytes) -> None:
        try:
            self.socket.sendall(data)
        except OSError:
            pass

    def hello(self, task_id: str, token: str, worker_id: int):
        challenge = self.receive()
        assert type(challenge) is Challenge
        self.send(encode(Hello(PROTOCOL_VERSION, task_id, worker_id,
                               proof_for(token, challenge.nonce))))
        return self.receive()

    def close(self) -> None:
        self.socket.close()


def scenario_logs() -> dict:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    server_logger = logging.getLogger("luigi_daisy.server")
    server_logger.addHandler(handler)
    server_logger.setLevel(logging.WARNING)
    served = Served(BlockScheduler([line_task("logs", 4)]))
    server = served.server
    try:
        for number in range(16):
            peer = Peer(server.port)
            peer.hello(f"{number}" + "x" * 60_000, server.token, 1)
            peer.close()
        for number in range(16):
            peer = Peer(server.port)
            peer.receive()
            peer.send(encode(Hello(PROTOCOL_VERSION, "y" * 1_000_000, 1, "")))
            while peer.receive() is not None:
                pass
            peer.close()
        wait_until(lambda: server.protocol_errors == 16, "the oversized handshakes")
        served.call(server.expect_worker, "logs", 1)
        peer = Peer(server.port)
        assert type(peer.hello("logs", server.token, 1)) is Welcome
        for index in range(2000):
            peer.send(encode(Report((BlockResult(index % 4, 2, None),), 0)))
        wait_until(lambda: server.ignored_releases == 2000, "the ignored results")
        peer.close()
    finally:
        served.stop()
        server_logger.removeHandler(handler)
        server_logger.setLevel(logging.ERROR)
    text = stream.getvalue()
    return {"refused hellos": server.refused_hellos, "oversized hellos": server.protocol_errors,
            "ignored releases": server.ignored_releases, "log bytes": len(text.encode()),
            "log lines": text.count("\n")}


def scenario_queue() -> dict:
    served = Served(BlockScheduler([line_task("queue", 1)]))
    server = served.server
    try:
        for worker_id in range(101):
            served.call(server.expect_worker, "queue", worker_id)
        holder = Peer(server.port)
        holder.hello("queue", server.token, 0)
        holder.send(REQUEST)
        holder.receive()
        peers = []
        for worker_id in range(1, 101):
            peer = Peer(server.port)
            peer.hello("queue", server.token, worker_id)
            peer.send(REQUEST)
            peers.append(peer)
        wait_until(lambda: len(server.handout.waiting["queue"]) == 100, "parked peers")
        parked = served.call(lambda: len(server.handout.waiting["queue"]))
        for peer in peers:
            peer.close()
        wait_until(lambda: len(server.connections) == 1, "the peers gone")
        left = served.call(lambda: len(server.handout.waiting["queue"]))
        holder.close()
    finally:
        served.stop()
    return {"peers": 100, "entries while parked": parked, "entries after they left": left}


def scenario_buffers(bound: int, peers: int = 192) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(4 * peers + 256, hard), hard))
    served = Served(BlockScheduler([line_task("buffers", 4)]),
                    limits=ServerLimits(max_buffered_bytes=bound))
    server = served.server
    frame = struct.pack(">IB", 1 << 20, Report.TYPE_CODE) + bytes((1 << 20) - 100)
    try:
        for worker_id in range(1, peers + 1):
            served.call(server.expect_worker, "buffers", worker_id)
        before = rss_bytes()
        sockets = []
        for worker_id in range(1, peers + 1):
            peer = Peer(server.port)
            peer.hello("buffers", server.token, worker_id)
            peer.send(frame)
            sockets.append(peer)

        def all_read() -> bool:
            return served.call(lambda: server.shed_connections + sum(
                1 for connection in server.connections
                if connection.buffered >= len(frame) - 5)) >= peers

        wait_until(all_read, "every partial frame read or shed")
        during = rss_bytes()
        figures = served.call(lambda: {
            "peers": peers, "attempted MiB": round(peers * len(frame) / 2**20, 1),
            "bound MiB": bound / 2**20, "buffered MiB": round(server.buffered_bytes / 2**20, 1),
            "peak MiB": round(server.peak_buffered_bytes / 2**20, 2),
            "shed": server.shed_connections})
        figures["RSS growth MiB"] = round((during - before) / 2**20, 1)
        for peer in sockets:
            peer.close()
    finally:
        served.stop()
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--buffers-bound", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    server_logger = logging.getLogger("luigi_daisy.server")
    server_logger.propagate = False
    server_logger.setLevel(logging.ERROR)  # only the logs scenario looks at warnings
    if args.buffers_bound is not None:
        print(json.dumps(scenario_buffers(args.buffers_bound)))
        return 0
    for name in args.scenarios.split(","):
        if name == "logs":
            print("logs:", scenario_logs())
        elif name == "queue":
            print("queue:", scenario_queue())
        elif name == "buffers":
            for bound in (ServerLimits().max_buffered_bytes, 1 << 40):
                child = subprocess.run(
                    [sys.executable, __file__, "--buffers-bound", str(bound)],
                    capture_output=True, text=True, timeout=600, check=True)
                print("buffers:", json.loads(child.stdout.strip().splitlines()[-1]))
        else:
            parser.error(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
