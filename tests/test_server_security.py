"""A block server that trusts no one (issue 9, section 3), tested with raw sockets.

Two kinds of tests:

- against a real run: a ``WorkerRun`` with real worker processes serves a task in a
  thread while the test, a stranger on 127.0.0.1, talks to its server with raw
  sockets. The workers wait at a gate (a file) until the attacks are over, so the run
  is still going while it is attacked; afterwards the ``RunResult``, the files the
  workers leave per block and the ledger show every block done exactly once.
- against a ``BlockServer`` alone, on an event loop in a thread, where the run is not
  needed (limits, the waiting queue, log volume), with real ``Client`` workers where a
  legitimate worker must be unaffected.

Every wait has a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import luigi_daisy as daisy
from luigi_daisy import BlockScheduler, BlockStatus, Context, Roi
from luigi_daisy.client import Client
from luigi_daisy.errors import RefusedByServerError, ServerConfigError
from luigi_daisy.launchers.local import LocalLauncher
from luigi_daisy.ledger import LedgerSet
from luigi_daisy.log_limits import WarningTally, clip
from luigi_daisy.protocol import (
    PROTOCOL_VERSION,
    BlockResult,
    BlocksAssigned,
    Challenge,
    Decoder,
    Heartbeat,
    Hello,
    NoMoreBlocks,
    Refused,
    Report,
    Welcome,
    WireBlock,
    encode,
    proof_for,
)
from luigi_daisy.run import WorkerRun, run_coroutine
from luigi_daisy.server import MAX_HELLO_BYTES, BlockServer, ServerLimits

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_stray_processes")]

HOST = "127.0.0.1"
#: seconds any single wait of these tests may take before the test fails
WAIT = 30.0


# ---------------------------------------------------------------------------- helpers
def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except RuntimeError:  # a dict of the server changed size while it was read
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def record(folder: Path, name: str) -> None:
    """Leave a file ``folder/name.<unique>`` (one file per event)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.{uuid.uuid4().hex}").touch()


def recorded(folder: Path) -> Counter:
    """How often each name was recorded in ``folder``."""
    if not folder.exists():
        return Counter()
    return Counter(path.name.rsplit(".", 1)[0] for path in folder.iterdir())


def line_task(task_id: str, num_blocks: int, process_function, **options) -> daisy.Task:
    """A 1D task of ``num_blocks`` independent blocks of size 1."""
    options.setdefault("read_write_conflict", False)
    return daisy.Task(task_id, total_roi=Roi((0,), (num_blocks,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)), process_function=process_function, **options)


def gated(gate: Path, done: Path) -> Callable:
    """A process function that waits for the file ``gate``, then records its block."""

    def process(block) -> None:
        deadline = time.monotonic() + WAIT
        while not gate.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gate {gate} never opened")
            time.sleep(0.01)
        record(done, str(block.index))

    return process


def assert_counts(state: daisy.TaskState, total: int, completed: int, failed: int = 0) -> None:
    actual = (state.total_block_count, state.completed_count, state.failed_count,
              state.orphaned_count, state.processing_count)
    assert actual == (total, completed, failed, 0, 0), state


def rss_bytes() -> int:
    """Resident memory of this process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def allow_open_files(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


class RawPeer:
    """A stranger on loopback that speaks raw bytes over a blocking socket."""

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection((HOST, port), timeout=WAIT)
        self.decoder = Decoder()
        self.inbox: list = []

    def receive(self):
        """The next message, or None when the server closed the connection."""
        while not self.inbox:
            try:
                data = self.socket.recv(1 << 16)
            except ConnectionError:
                return None
            if not data:
                return None
            self.inbox.extend(self.decoder.feed(data))
        return self.inbox.pop(0)

    def send(self, data: bytes) -> bool:
        """Send bytes; False when the server has closed the connection."""
        try:
            self.socket.sendall(data)
        except OSError:
            return False
        return True

    def hello(self, task_id: str, token: str | None, worker_id: int, then: bytes = b""):
        """Answer the challenge (an empty proof without a token) and return the answer.

        ``then`` is sent in the same write as the ``Hello``, as an impatient attacker
        would, before any answer arrives.
        """
        challenge = self.receive()
        assert type(challenge) is Challenge, challenge
        proof = proof_for(token, challenge.nonce)
        self.send(encode(Hello(PROTOCOL_VERSION, task_id, worker_id, proof)) + then)
        return self.receive()

    def closed_by_server(self) -> bool:
        """Read until the server closes the connection (True) or WAIT passes (False)."""
        try:
            while self.socket.recv(1 << 16):
                pass
        except TimeoutError:
            return False
        except OSError:
            pass
        return True

    def close(self) -> None:
        self.socket.close()


#: a request for one block, as ``Client.acquire`` sends it
REQUEST = encode(Report((), 1))


def result_frame(index: int, status: BlockStatus, want: int = 0,
                 error: str | None = None) -> bytes:
    """A ``Report`` of the result of block ``index`` (of the connection's task: a result
    names no task) and, with ``want``, a request for more blocks."""
    return encode(Report((BlockResult(index, int(status), error),), want))


def one_block(peer: RawPeer) -> WireBlock:
    """The single block of the ``BlocksAssigned`` answering a request for one."""
    answer = peer.receive()
    assert type(answer) is BlocksAssigned, answer
    assert len(answer.blocks) == 1, answer
    return answer.blocks[0]


def holders(server: BlockServer, task_id: str) -> dict[int, list[int]]:
    """``worker id -> indices of the blocks it holds`` of the workers of ``task_id``
    connected now that hold any (read from the test's thread: a snapshot)."""
    found = {}
    for (task, worker_id), connection in list(server.connected_workers.items()):
        held = server.handout.held_by(connection)
        if task == task_id and held:
            found[worker_id] = held
    return found


class ServedScheduler:
    """A ``BlockServer`` on its own event loop in a thread, for direct tests."""

    def __init__(self, scheduler: BlockScheduler, **options) -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.server: BlockServer | None = None

        def serve() -> None:
            asyncio.set_event_loop(self.loop)

            async def start() -> None:
                self.server = BlockServer(scheduler, host=HOST, **options)
                self.server.start_listening(0)

            try:
                self.loop.run_until_complete(start())
            finally:
                started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, name="block-server", daemon=True)
        self.thread.start()
        assert started.wait(WAIT) and self.server is not None, "the server did not start"
        self.port = self.server.port

    def call(self, function: Callable, *args):
        """Run ``function(*args)`` on the server's loop and return its result."""

        async def run():
            return function(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(WAIT)

    def expect(self, task_id: str, *worker_ids: int) -> None:
        for worker_id in worker_ids:
            self.call(self.server.expect_worker, task_id, worker_id)

    def context(self, task_id: str, worker_id: int) -> Context:
        self.expect(task_id, worker_id)
        return Context(hostname=HOST, port=str(self.port), task_id=task_id,
                       worker_id=str(worker_id), token=self.server.token)

    def stop(self) -> None:
        if self.loop.is_running():
            self.call(self.server.close_all)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the server loop did not stop"
        self.loop.close()


@contextlib.contextmanager
def served(scheduler: BlockScheduler, **options) -> Iterator[ServedScheduler]:
    serving = ServedScheduler(scheduler, **options)
    try:
        yield serving
    finally:
        serving.stop()


class RunInThread:
    """A real ``WorkerRun`` (real worker processes) running in a thread."""

    def __init__(self, tasks: list[daisy.Task], tmp_path: Path,
                 server_limits: ServerLimits | None = None) -> None:
        self.ledger_dir = tmp_path / "ledgers"
        self.tasks = tasks
        self.ledgers = LedgerSet.open(tasks, self.ledger_dir)
        # every task gets all the workers its num_workers asks for, whatever the CPUs
        self.run = WorkerRun(tasks, LocalLauncher(tmp_path / "logs"), self.ledgers,
                             progress=False, server_limits=server_limits,
                             total_workers=sum(task.num_workers for task in tasks))
        self.outcome: dict = {}

        def target() -> None:
            try:
                self.outcome["result"] = run_coroutine(self.run.run)
            except BaseException as error:  # noqa: BLE001 - re-raised by result()
                self.outcome["error"] = error

        self.thread = threading.Thread(target=target, name="worker-run", daemon=True)
        self.thread.start()
        wait_until(lambda: self.run.server is not None and self.run.server.port is not None,
                   "the run's block server")
        self.server: BlockServer = self.run.server

    def result(self) -> daisy.RunResult:
        self.thread.join(2 * WAIT)
        assert not self.thread.is_alive(), "the run did not end"
        self.ledgers.close()
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["result"]

    def done_in_ledger(self, task_id: str) -> list[int]:
        reopened = LedgerSet.open(self.tasks, self.ledger_dir)
        try:
            return sorted(int(index) for index in reopened.done_blocks()[task_id])
        finally:
            reopened.close()


# ---------------------------------------------------------------- against a real run
def test_without_the_token_a_local_process_cannot_take_or_return_blocks(tmp_path):
    """No token, a wrong proof, or no Hello at all: nothing acquired, nothing released;
    the run then does every block exactly once with its real workers."""
    num_blocks, gate, done = 24, tmp_path / "gate", tmp_path / "done"
    task = line_task("guarded", num_blocks, gated(gate, done), num_workers=2)
    run = RunInThread([task], tmp_path)
    try:
        server = run.server
        wait_until(lambda: len(server.connected_workers) == 2, "both workers connected")
        forged = b"".join(result_frame(index, BlockStatus.SUCCESS) for index in (1, 2, 3))

        # no token: the empty proof, even under a real worker's id, with forged
        # results and a request sent right behind the Hello
        peer = RawPeer(server.port)
        answer = peer.hello("guarded", None, 0, then=forged + REQUEST)
        assert type(answer) is Refused and "token" in answer.reason
        assert peer.receive() is None, "nothing but the refusal may come back"
        peer.close()
        # a wrong proof
        peer = RawPeer(server.port)
        answer = peer.hello("guarded", "a-guessed-token", 5)
        assert type(answer) is Refused and "token" in answer.reason
        assert peer.closed_by_server()
        peer.close()
        # results and requests with no Hello at all
        for frames in (forged, REQUEST, result_frame(4, BlockStatus.FAILED, want=1)):
            peer = RawPeer(server.port)
            assert type(peer.receive()) is Challenge
            peer.send(frames)
            assert peer.closed_by_server()
            assert peer.receive() is None
            peer.close()

        # the token travels in the workers' environment, never on their command line
        worker_pids = [worker.pid for worker in run.run.workers["guarded"]]
        assert len(worker_pids) == 2
        for pid in worker_pids:
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert server.token.encode() not in command_line

        state = server.task_states["guarded"]
        assert (state.completed_count, state.failed_count) == (0, 0)
        assert server.refused_hellos == 2
        assert server.protocol_errors == 3
        assert server.ignored_releases == 0, "no unauthenticated release reached a block"
        gate.touch()
        result = run.result()
    finally:
        gate.touch()
    assert result
    assert_counts(result["guarded"], num_blocks, num_blocks)
    assert result["guarded"].worker_failure_count == 0
    assert recorded(done) == Counter({str(index): 1 for index in range(num_blocks)})
    assert run.done_in_ledger("guarded") == list(range(num_blocks))


def test_a_real_run_survives_a_flood_within_its_limits(tmp_path):
    """More connections than the cap, silent ones, partial Hellos past the buffer bound
    and refused Hellos: the attackers are closed, the workers keep their connections
    and the run does every block exactly once."""
    num_blocks, gate, done = 40, tmp_path / "gate", tmp_path / "done"
    limits = ServerLimits(max_connections=40, handshake_timeout=1.0,
                          max_buffered_bytes=1 << 20)
    task = line_task("flooded", num_blocks, gated(gate, done), num_workers=2)
    run = RunInThread([task], tmp_path, server_limits=limits)
    attackers = 60
    peers = []
    try:
        server = run.server
        wait_until(lambda: len(server.connected_workers) == 2, "both workers connected")
        workers = dict(server.connected_workers)
        partial_hello = struct.pack(">IB", 1 << 20, Hello.TYPE_CODE) + b"z" * (60 << 10)
        for number in range(attackers):
            peer = RawPeer(server.port)
            peers.append(peer)
            if number % 3 == 1:
                peer.send(partial_hello)
            elif number % 3 == 2:
                peer.send(encode(Hello(PROTOCOL_VERSION, "flooded", number, "")))
        for peer in peers:
            assert peer.closed_by_server()
        wait_until(lambda: len(server.connections) == 2 and server.buffered_bytes == 0,
                   "only the workers connected, nothing buffered")
        closed = (server.refused_connections + server.handshake_timeouts
                  + server.shed_connections + server.refused_hellos)
        assert closed == attackers, vars(server)
        # silent peers time out, partial Hellos are shed, token-less Hellos refused;
        # refused Hellos free their places at once, so whether any attacker met the cap
        # depends on timing (under load: none), never the total
        assert min(server.handshake_timeouts, server.shed_connections,
                   server.refused_hellos) >= 1, vars(server)
        assert server.connected_workers == workers, "the workers kept their connections"
        gate.touch()
        result = run.result()
    finally:
        gate.touch()
        for peer in peers:
            peer.close()
    assert result
    assert_counts(result["flooded"], num_blocks, num_blocks)
    assert result["flooded"].worker_failure_count == 0
    assert recorded(done) == Counter({str(index): 1 for index in range(num_blocks)})
    assert run.done_in_ledger("flooded") == list(range(num_blocks))


OWN_LOOP_OUTCOMES = "outcomes"


def reconnecting_worker(out: Path) -> Callable[[], None]:
    """A daisy-style worker loop: one Client at a time under its worker id, a fresh
    connection for every block, and a second Client while one is open refused."""

    def own_loop() -> None:
        first = Client()
        try:
            Client()
        except RefusedByServerError as error:
            record(out / OWN_LOOP_OUTCOMES, "second_client_refused"
                   if "already connected" in str(error) else "refused_otherwise")
        else:
            record(out / OWN_LOOP_OUTCOMES, "second_client_welcomed")
        first.close()
        while True:
            client = Client()
            with client.acquire_block() as block:
                if block is None:
                    client.close()
                    return
                record(out / "done", str(block.index))
            client.close()

    return own_loop


def test_worker_ids_must_be_started_by_the_run_and_connected_once(tmp_path):
    """With the token but a worker id the run did not start, or one that is connected:
    refused. Real workers that reconnect for every block keep working."""
    num_blocks, gate = 30, tmp_path / "gate"
    held = line_task("held", 4, gated(gate, tmp_path / "held_done"), num_workers=1)
    hopping = line_task("hopping", num_blocks, reconnecting_worker(tmp_path), num_workers=2)
    run = RunInThread([held, hopping], tmp_path)
    try:
        server = run.server
        wait_until(lambda: holders(server, "held"), "the gated worker holding a block")
        ((worker_id, held_blocks),) = holders(server, "held").items()
        peer = RawPeer(server.port)
        answer = peer.hello("held", server.token, worker_id)
        assert type(answer) is Refused and "already connected" in answer.reason
        assert peer.closed_by_server()
        peer.close()
        for task_id, stranger in (("held", 999), ("hopping", worker_id)):
            peer = RawPeer(server.port)
            answer = peer.hello(task_id, server.token, stranger)
            assert type(answer) is Refused and "not started by this run" in answer.reason
            peer.close()
        still = holders(server, "held")
        assert list(still) == [worker_id], "the real worker holds on"
        assert set(held_blocks) <= set(still[worker_id]), "to the blocks it held"
        gate.touch()
        result = run.result()
    finally:
        gate.touch()
    assert result
    assert_counts(result["held"], 4, 4)
    assert_counts(result["hopping"], num_blocks, num_blocks)
    assert result["held"].worker_failure_count == result["hopping"].worker_failure_count == 0
    assert recorded(tmp_path / "done") == Counter({str(index): 1 for index in range(num_blocks)})
    assert recorded(tmp_path / OWN_LOOP_OUTCOMES) == Counter(second_client_refused=2)
    # the test's three, and the second Client of each worker, tried for a moment
    assert server.refused_hellos >= 3 + 2


def test_a_client_whose_last_connection_dropped_without_goodbye_gets_back_in():
    """A Client dropped without ``close`` (a process function that forgot it) and a new
    Client under the same worker id right after: the new one is welcomed once the
    server has noticed the drop; a Client next to one still open is refused."""
    scheduler = BlockScheduler([line_task("again", 40, None)])
    processed = []
    with served(scheduler) as serving:
        context = serving.context("again", 3)
        for _ in range(20):
            client = Client(context, connect_timeout=WAIT)
            block = client.acquire()
            processed.append(block.index)
            block.status = BlockStatus.SUCCESS
            client.release(block)
            client._socket.close()  # dropped: no Bye, no wait
        with Client(context, connect_timeout=WAIT) as client:
            with pytest.raises(RefusedByServerError, match="already connected"):
                Client(context, connect_timeout=WAIT)
            while True:
                with client.acquire_block() as block:
                    if block is None:
                        break
                    processed.append(block.index)
        assert sorted(processed) == list(range(40))
        assert_counts(serving.server.task_states["again"], 40, 40)


# -------------------------------------------------------------- releases and holders
def test_a_forged_release_from_another_connection_changes_nothing(tmp_path):
    task = line_task("forged", 4, None, max_retries=2)
    ledgers = LedgerSet.open([task], tmp_path)
    scheduler = BlockScheduler([task])
    try:
        with served(scheduler, ledgers=ledgers) as serving:
            server = serving.server
            serving.expect("forged", 1, 2)
            holder = RawPeer(serving.port)
            assert type(holder.hello("forged", server.token, 1)) is Welcome
            holder.send(REQUEST)
            index = one_block(holder).index

            forger = RawPeer(serving.port)
            assert type(forger.hello("forged", server.token, 2)) is Welcome
            forger.send(result_frame(index, BlockStatus.SUCCESS)
                        + result_frame(index, BlockStatus.FAILED, error="forged")
                        + encode(Heartbeat()))
            wait_until(lambda: server.ignored_releases == 2, "two ignored results")
            # dropping and coming back again and again, releasing the block each time
            for _ in range(3):
                forger.close()
                wait_until(lambda: ("forged", 2) not in server.connected_workers,
                           "the forger's connection dropped")
                forger = RawPeer(serving.port)
                assert type(forger.hello("forged", server.token, 2)) is Welcome
                forger.send(result_frame(index, BlockStatus.FAILED))
            wait_until(lambda: server.ignored_releases == 5, "five ignored results")
            forger.close()
            wait_until(lambda: len(server.connections) == 1, "only the holder left")

            state = server.task_states["forged"]
            assert (state.completed_count, state.failed_count, state.processing_count) == (
                0, 0, 1)
            assert index not in state.failed_blocks
            holding = server.connected_workers[("forged", 1)]
            assert holding in server.connections
            assert server.handout.held_by(holding) == [index]
            serving.call(ledgers.flush)
            assert not ledgers.done_blocks()["forged"].size, "nothing recorded done"

            holder.send(result_frame(index, BlockStatus.SUCCESS))
            wait_until(lambda: state.completed_count == 1, "the holder's result")
            holder.close()
            serving.call(ledgers.flush)
            assert [int(done) for done in ledgers.done_blocks()["forged"]] == [index]
    finally:
        ledgers.close()


def test_taking_and_dropping_a_block_fails_it_only_for_its_holder_and_loses_nothing(
        tmp_path):
    """A connection that takes the block and drops it uses the block's retries
    (max_retries=2: the third drop fails it); a connection that does not hold it can
    drop as often as it likes. A block failed that way is not recorded done: the next
    run does it with real workers."""
    done = tmp_path / "done"

    def process(block) -> None:
        record(done, str(block.index))

    task = line_task("fragile", 1, process, max_retries=2)
    ledgers = LedgerSet.open([task], tmp_path / "ledgers")
    scheduler = BlockScheduler([task])
    try:
        with served(scheduler, ledgers=ledgers) as serving:
            server = serving.server
            state = server.task_states["fragile"]
            serving.expect("fragile", 5, 6)
            for drop in range(1, 4):
                taker = RawPeer(serving.port)
                assert type(taker.hello("fragile", server.token, 5)) is Welcome
                taker.send(REQUEST)
                assert one_block(taker).index == 0
                # another connection drops three times while the block is held
                for _ in range(3):
                    bystander = RawPeer(serving.port)
                    assert type(bystander.hello("fragile", server.token, 6)) is Welcome
                    bystander.send(result_frame(0, BlockStatus.FAILED))
                    bystander.close()
                    wait_until(lambda: ("fragile", 6) not in server.connected_workers,
                               "the bystander gone")
                assert (state.processing_count, state.failed_count) == (1, 0)
                taker.close()
                wait_until(lambda: state.processing_count == 0, f"drop {drop} noticed")
                failed = serving.call(lambda: state.failed_count)  # once the loop is done
                assert failed == (1 if drop == 3 else 0), (drop, state)
            assert "worker 5 was lost" in state.failed_blocks[0]
            assert server.ignored_releases == 9
            serving.call(ledgers.flush)
            assert not ledgers.done_blocks()["fragile"].size
    finally:
        ledgers.close()
    result = daisy.run_blockwise([task], progress=False, log_dir=tmp_path / "logs",
                                 ledger_dir=tmp_path / "ledgers")
    assert result
    assert_counts(result["fragile"], 1, 1)
    assert recorded(done) == Counter({"0": 1})


# -------------------------------------------------------------------------- logs
def test_clip_keeps_the_head_and_says_how_long_the_text_was():
    assert clip("short") == "short"
    clipped = clip("é" * 1000, 10)
    assert clipped == "é" * 10 + "...(2000 bytes)"


def test_warning_tally_logs_the_first_few_then_sums_up_by_the_clock_it_is_given(caplog):
    logger = logging.getLogger("tally-test")
    tally = WarningTally(logger, first=3, interval=10.0)
    with caplog.at_level(logging.WARNING, logger="tally-test"):
        for number in range(100):
            tally.warn("noise", 0.0 + number * 0.01, "noise %d", number)
        assert [record.getMessage() for record in caplog.records][:3] == [
            "noise 0", "noise 1", "noise 2"]
        assert len(caplog.records) == 4  # the three and the note that counting begins
        tally.warn("noise", 10.5, "noise %d", 100)  # the interval has passed
        assert caplog.records[-1].getMessage() == (
            "noise: 98 more since the last report (101 in all)")
        tally.warn("noise", 11.0, "noise %d", 101)
        assert len(caplog.records) == 5
        tally.flush(11.0, force=True)
        assert caplog.records[-1].getMessage() == (
            "noise: 1 more since the last report (102 in all)")
        tally.flush(100.0, force=True)
        assert len(caplog.records) == 6, "nothing unreported, nothing written"
    assert tally.count("noise") == 102 and tally.count("other") == 0


def test_network_text_and_repeated_warnings_add_a_bounded_amount_to_the_log(caplog):
    """16 refused Hellos naming a 60 kB task, 16 with a 1 MB task id and 200 ignored
    results of blocks not held write a few kilobytes, not megabytes, and the ignored
    results are summed up."""
    scheduler = BlockScheduler([line_task("quiet", 4, None)])
    refusals, huge_hellos, releases = 16, 16, 200
    assert 60_000 < MAX_HELLO_BYTES < 1_000_000  # refused Hellos, then oversized ones
    with caplog.at_level(logging.WARNING, logger="luigi_daisy.server"):
        with served(scheduler, clock=lambda: 0.0) as serving:
            server = serving.server
            for number in range(refusals):
                peer = RawPeer(serving.port)
                answer = peer.hello(f"{number}" + "x" * 60_000, server.token, 1)
                assert type(answer) is Refused and "unknown task" in answer.reason
                assert len(answer.reason) < 1000
                peer.close()
            for number in range(huge_hellos):
                peer = RawPeer(serving.port)
                assert type(peer.receive()) is Challenge
                peer.send(encode(Hello(PROTOCOL_VERSION, "y" * 1_000_000, 1, "")))
                assert peer.closed_by_server()
                peer.close()
            wait_until(lambda: server.protocol_errors == huge_hellos, "oversized Hellos")
            serving.expect("quiet", 1)
            peer = RawPeer(serving.port)
            assert type(peer.hello("quiet", server.token, 1)) is Welcome
            peer.send(b"".join(result_frame(index % 4, BlockStatus.SUCCESS)
                               for index in range(releases)))
            wait_until(lambda: server.ignored_releases == releases, "ignored results")
            peer.close()
            assert server.refused_hellos == refusals
        messages = [record.getMessage() for record in caplog.records]
    logged_bytes = sum(len(message) for message in messages)
    assert logged_bytes < 16_000, (logged_bytes, messages)
    release_lines = [message for message in messages if "ignored results" in message
                     or "does not hold" in message]
    assert len(release_lines) == 5 + 1 + 1, release_lines
    assert release_lines[-1] == (
        f"ignored results: {releases - 5} more since the last report ({releases} in all)")
    assert any(f"({refusals} in all)" in message for message in messages), messages
    assert any(f"({huge_hellos} in all)" in message for message in messages), messages


# ------------------------------------------------------------------------ limits
def test_limits_are_checked():
    for bad in (dict(max_connections=0), dict(max_connections=1.5),
                dict(handshake_timeout=0), dict(handshake_timeout="10"),
                dict(max_buffered_bytes=1000)):
        with pytest.raises(ServerConfigError, match="ServerLimits"):
            ServerLimits(**bad)


def test_connections_past_the_cap_are_closed_at_once():
    scheduler = BlockScheduler([line_task("capped", 20, None)])
    with served(scheduler, limits=ServerLimits(max_connections=8)) as serving:
        server = serving.server
        peers = [RawPeer(serving.port) for _ in range(8)]
        for peer in peers:
            assert type(peer.receive()) is Challenge
        extra = RawPeer(serving.port)
        assert extra.receive() is None, "past the cap, no challenge: closed at once"
        extra.close()
        assert server.refused_connections == 1
        peers.pop().close()
        wait_until(lambda: len(server.connections) == 7, "a place freed")
        processed = []
        with Client(serving.context("capped", 0), connect_timeout=WAIT) as client:
            while True:
                with client.acquire_block() as block:
                    if block is None:
                        break
                    processed.append(block.index)
        assert sorted(processed) == list(range(20))
        for peer in peers:
            peer.close()


def test_a_connection_that_does_not_authenticate_in_time_is_closed():
    scheduler = BlockScheduler([line_task("hurried", 3, None)])
    with served(scheduler, limits=ServerLimits(handshake_timeout=0.5)) as serving:
        server = serving.server
        serving.expect("hurried", 1)
        worker = RawPeer(serving.port)
        assert type(worker.hello("hurried", server.token, 1)) is Welcome
        silent = RawPeer(serving.port)
        partial = RawPeer(serving.port)
        assert type(partial.receive()) is Challenge
        partial.send(encode(Hello(PROTOCOL_VERSION, "hurried", 2, ""))[:10])
        assert silent.closed_by_server() and partial.closed_by_server()
        assert server.handshake_timeouts == 2
        # the authenticated connection, idle for longer than the deadline, is served
        worker.send(REQUEST)
        one_block(worker)
        for peer in (worker, silent, partial):
            peer.close()


def test_bytes_buffered_across_connections_are_bounded(tmp_path):
    """Strangers with partial Hellos, then holders of the token with partial 1 MiB
    frames, try to buffer about 100 MiB; the server keeps its buffers under the bound,
    its memory grows by far less than the attack, and a real worker is not touched."""
    bound = 4 << 20
    unauthenticated, authenticated = 128, 96
    allow_open_files(2 * (unauthenticated + authenticated) + 256)
    num_blocks = 30
    scheduler = BlockScheduler([line_task("buffered", num_blocks, None)])
    attack_started, attack_over = threading.Event(), threading.Event()
    processed: list[int] = []
    with served(scheduler, limits=ServerLimits(max_buffered_bytes=bound)) as serving:
        server = serving.server
        serving.expect("buffered", *range(1, authenticated + 1))
        context = serving.context("buffered", 0)

        def worker() -> None:
            with Client(context, connect_timeout=WAIT) as client:
                while True:
                    with client.acquire_block() as block:
                        if block is None:
                            return
                        processed.append(block.index)
                        if len(processed) == 1:
                            attack_started.set()
                            assert attack_over.wait(WAIT)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        assert attack_started.wait(WAIT)
        rss_before = rss_bytes()
        peers = []
        partial_hello = struct.pack(">IB", 1 << 20, Hello.TYPE_CODE) + b"x" * (60 << 10)
        for _ in range(unauthenticated):
            peer = RawPeer(serving.port)
            assert type(peer.receive()) is Challenge
            peer.send(partial_hello)
            peers.append(peer)
        wait_until(lambda: server.shed_connections > 0, "shedding of partial Hellos")
        shed_strangers = server.shed_connections
        partial_release = struct.pack(">IB", 1 << 20, Report.TYPE_CODE) + bytes(
            (1 << 20) - 100)
        for worker_id in range(1, authenticated + 1):
            peer = RawPeer(serving.port)
            assert type(peer.hello("buffered", server.token, worker_id)) is Welcome
            peer.send(partial_release)
            peers.append(peer)
        wait_until(lambda: server.buffered_bytes <= bound and server.shed_connections
                   > shed_strangers + authenticated // 2, "shedding of partial frames")
        rss_during = rss_bytes()
        assert server.peak_buffered_bytes <= bound + (1 << 16)
        attack_over.set()
        thread.join(WAIT)
        assert not thread.is_alive()
        for peer in peers:
            peer.close()
        wait_until(lambda: len(server.connections) == 0, "every connection gone")
        assert serving.call(lambda: server.buffered_bytes) == 0
    attempted = unauthenticated * len(partial_hello) + authenticated * len(partial_release)
    assert attempted > 100 << 20
    margin = 40 << 20
    assert rss_during - rss_before < bound + margin, (rss_before, rss_during)
    assert sorted(processed) == list(range(num_blocks)), "the worker was not touched"
    assert_counts(scheduler.task_states["buffered"], num_blocks, num_blocks)


# ------------------------------------------------------------------ waiting queue
def test_the_waiting_queue_holds_each_connection_once_and_no_closed_ones():
    scheduler = BlockScheduler([line_task("queue", 1, None)])
    with served(scheduler) as serving:
        server = serving.server
        serving.expect("queue", *range(0, 102))
        holder = RawPeer(serving.port)
        assert type(holder.hello("queue", server.token, 0)) is Welcome
        holder.send(REQUEST)
        assigned = one_block(holder)
        peers = []
        for worker_id in range(1, 101):
            peer = RawPeer(serving.port)
            assert type(peer.hello("queue", server.token, worker_id)) is Welcome
            peer.send(REQUEST)
            peers.append(peer)
        wait_until(lambda: len(server.handout.waiting["queue"]) == 100, "100 parked requests")
        # a second request while one is parked is a protocol violation: that peer is closed
        greedy = RawPeer(serving.port)
        assert type(greedy.hello("queue", server.token, 101)) is Welcome
        greedy.send(REQUEST * 5)
        assert greedy.closed_by_server()
        wait_until(lambda: server.protocol_errors == 1 and ("queue", 101) not in
                   server.connected_workers, "the greedy peer counted and forgotten")
        assert serving.call(lambda: len(server.handout.waiting["queue"])) == 100
        for peer in peers:
            peer.close()
        wait_until(lambda: len(server.connections) == 1, "the parked peers gone")
        assert serving.call(lambda: len(server.handout.waiting["queue"])) == 0, "no dead entries"
        # the holder finishes; the task is done and it is told so
        holder.send(result_frame(assigned.index, BlockStatus.SUCCESS, want=1))
        assert type(holder.receive()) is NoMoreBlocks
        holder.close()
        assert_counts(server.task_states["queue"], 1, 1)
