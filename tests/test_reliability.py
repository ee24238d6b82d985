"""Reliability of the block server and its workers: crashes, hangs, hostile bytes, load.

Runs with worker processes use ``run_blockwise``; every block that succeeds leaves one
file per success in ``tmp_path``, so "no block lost" and "no block done twice" are read
from the file system. The wire tests start a ``BlockServer`` in an asyncio loop on
127.0.0.1 and talk to it with real sockets: hostile connections built from raw bytes, and
real workers (``Client`` in threads). No test waits a fixed time; every wait has a
deadline.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import signal
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import luigi_daisy as daisy
from luigi_daisy import BlockScheduler, BlockStatus, Context, Roi
from luigi_daisy.client import Client, RefusedByServerError
from luigi_daisy.errors import ContextError
from luigi_daisy.protocol import (
    MAX_BATCH_BLOCKS,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    BlockResult,
    BlocksAssigned,
    Bye,
    Challenge,
    Decoder,
    Heartbeat,
    Hello,
    NoMoreBlocks,
    Refused,
    Report,
    Welcome,
    encode,
    proof_for,
)
from luigi_daisy.server import BlockServer

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_stray_processes")]

HOST = "127.0.0.1"
#: seconds any single wait of these tests may take before the test fails
WAIT = 30.0


# ---------------------------------------------------------------------------- helpers
def record(folder: Path, name: str) -> None:
    """Leave a file ``folder/name.<unique>`` (one file per event)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.{uuid.uuid4().hex}").touch()


def recorded(folder: Path) -> Counter:
    """How often each name was recorded in ``folder``."""
    if not folder.exists():
        return Counter()
    return Counter(path.name.rsplit(".", 1)[0] for path in folder.iterdir())


def first_time(marker: Path) -> bool:
    """True exactly once per marker path, across processes."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def line_task(task_id: str, num_blocks: int, process_function, **options) -> daisy.Task:
    """A 1D task of ``num_blocks`` independent blocks of size 1."""
    options.setdefault("read_write_conflict", False)
    return daisy.Task(task_id, total_roi=Roi((0,), (num_blocks,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)), process_function=process_function, **options)


def run(tasks, tmp_path: Path, **options) -> daisy.RunResult:
    return daisy.run_blockwise(tasks, progress=False, log_dir=tmp_path / "logs", **options)


def assert_counts(state: daisy.TaskState, total: int, completed: int, failed: int = 0,
                  orphaned: int = 0) -> None:
    actual = (state.total_block_count, state.completed_count, state.failed_count,
              state.orphaned_count, state.processing_count)
    assert actual == (total, completed, failed, orphaned, 0), state


def each_once(num_blocks: int) -> Counter:
    return Counter({str(index): 1 for index in range(num_blocks)})


# ---------------------------------------------------------------------------- dying workers
NUM_BLOCKS = 20
CHOSEN = 5


def done_exactly_once(done: Path, prefetch: int) -> None:
    """Every block was done exactly once, whatever the prefetch: a worker's results
    travel before its next block starts, so a worker that dies takes no finished block
    with it."""
    assert recorded(done) == each_once(NUM_BLOCKS), f"prefetch {prefetch}"


@pytest.mark.parametrize("prefetch", [0, 1, 8])
def test_worker_killed_with_sigkill_mid_block(tmp_path, prefetch):
    done = tmp_path / "done"

    def process(block):
        if block.index == CHOSEN and first_time(tmp_path / "killed"):
            os.kill(os.getpid(), signal.SIGKILL)
        record(done, str(block.index))

    result = run([line_task("sigkill", NUM_BLOCKS, process, num_workers=2)], tmp_path,
                 prefetch=prefetch)
    assert (tmp_path / "killed").exists()
    assert result
    assert_counts(result["sigkill"], NUM_BLOCKS, NUM_BLOCKS)
    done_exactly_once(done, prefetch)
    assert result["sigkill"].worker_failure_count <= 1


@pytest.mark.parametrize("prefetch", [0, 1, 8])
def test_worker_calling_os_exit_mid_block(tmp_path, prefetch):
    done = tmp_path / "done"

    def process(block):
        if block.index == CHOSEN and first_time(tmp_path / "exited"):
            os._exit(1)
        record(done, str(block.index))

    result = run([line_task("os_exit", NUM_BLOCKS, process, num_workers=2)], tmp_path,
                 prefetch=prefetch)
    assert (tmp_path / "exited").exists()
    assert result
    assert_counts(result["os_exit"], NUM_BLOCKS, NUM_BLOCKS)
    done_exactly_once(done, prefetch)


@pytest.mark.parametrize("prefetch", [0, 1, 8])
def test_only_worker_killed_is_replaced(tmp_path, prefetch):
    """With a single worker, nobody else could finish the block: the run must restart it."""
    done = tmp_path / "done"

    def process(block):
        if block.index == CHOSEN and first_time(tmp_path / "killed"):
            os.kill(os.getpid(), signal.SIGKILL)
        record(done, str(block.index))

    result = run([line_task("lonely", NUM_BLOCKS, process, num_workers=1)], tmp_path,
                 prefetch=prefetch)
    assert result
    assert_counts(result["lonely"], NUM_BLOCKS, NUM_BLOCKS)
    done_exactly_once(done, prefetch)
    assert result["lonely"].worker_failure_count == 1
    assert result["lonely"].worker_restart_count == 1


@pytest.mark.parametrize("prefetch", [0, 1, 8])
def test_worker_hanging_past_the_timeout_is_stopped_and_its_block_retried(tmp_path,
                                                                         prefetch):
    done = tmp_path / "done"

    def process(block):
        if block.index == CHOSEN and first_time(tmp_path / "hung"):
            time.sleep(60)
        record(done, str(block.index))

    start = time.monotonic()
    result = run([line_task("hang", NUM_BLOCKS, process, num_workers=2, timeout=1.0)],
                 tmp_path, prefetch=prefetch)
    elapsed = time.monotonic() - start
    assert (tmp_path / "hung").exists()
    assert elapsed < 30, f"the run waited for the hung block ({elapsed:.1f} s)"
    assert result
    assert_counts(result["hang"], NUM_BLOCKS, NUM_BLOCKS)
    assert result["hang"].timeout_reclaim_count == 1
    done_exactly_once(done, prefetch)


def test_process_function_raising_in_every_block(tmp_path):
    attempts = tmp_path / "attempts"
    num_blocks, max_retries = 20, 1

    def process(block):
        record(attempts, str(block.index))
        raise RuntimeError(f"always fails: block {block.index}")

    task = line_task("always_fails", num_blocks, process, num_workers=2,
                     max_retries=max_retries, max_worker_restarts=2)
    result = run([task], tmp_path)
    state = result["always_fails"]
    assert not result
    assert_counts(state, num_blocks, 0, num_blocks)
    assert sorted(state.failed_blocks) == list(range(num_blocks))
    for index, error in state.failed_blocks.items():
        assert f"RuntimeError: always fails: block {index}" in error
    assert recorded(attempts) == Counter({str(index): max_retries + 1
                                          for index in range(num_blocks)})


def test_huge_non_ascii_error_texts_fail_only_their_block(tmp_path):
    done = tmp_path / "done"

    def process(block):
        if block.index % 3 == 0:
            raise ValueError(f"block {block.index} \u00e9\u4e2d\U0001F600 " + "x\u00e9" * 200_000)
        record(done, str(block.index))

    result = run([line_task("huge_errors", 12, process, num_workers=2, max_retries=0)],
                 tmp_path)
    state = result["huge_errors"]
    assert_counts(state, 12, 8, 4)
    assert sorted(state.failed_blocks) == [0, 3, 6, 9]
    for index, error in state.failed_blocks.items():
        assert f"block {index}" in error
    assert state.worker_failure_count == 0
    assert recorded(done) == Counter({str(index): 1 for index in range(12) if index % 3})


def test_failed_upstream_blocks_orphan_their_downstream_blocks(tmp_path):
    done = tmp_path / "done"
    broken = {2, 9}

    def upstream_process(block):
        if block.index in broken:
            raise RuntimeError("broken upstream block")

    upstream = line_task("upstream", 12, upstream_process, num_workers=2, max_retries=0)
    downstream = line_task("downstream", 12, lambda block: record(done, str(block.index)),
                           num_workers=1, upstream_tasks=[upstream])
    result = run([downstream], tmp_path)
    assert_counts(result["upstream"], 12, 10, 2)
    assert_counts(result["downstream"], 12, 10, 0, 2)
    assert recorded(done) == Counter({str(index): 1 for index in range(12)
                                      if index not in broken})


def test_workers_that_always_die_end_the_run(tmp_path):
    """A worker that dies on every block: restarts run out and the run ends, unfinished."""

    def process(block):
        os.kill(os.getpid(), signal.SIGKILL)

    task = line_task("doomed", 5, process, num_workers=1, max_worker_restarts=2,
                     max_retries=10)
    result = run([task], tmp_path)
    state = result["doomed"]
    assert not result
    assert state.completed_count == 0
    assert state.worker_restart_count == 2


# ---------------------------------------------------------------------------- the wire
def serving_task(task_id: str, num_blocks: int, **options) -> daisy.Task:
    return line_task(task_id, num_blocks, None, **options)


def context_for(server: BlockServer, task_id: str, worker_id: int,
                token: str | None = None) -> Context:
    """The context of a worker the test starts: announced to the server like a run
    announces its workers, with the server's token unless ``token`` says otherwise."""
    if task_id in server.handout.expected:
        server.expect_worker(task_id, worker_id)
    return Context(hostname=HOST, port=str(server.port), task_id=task_id,
                   worker_id=str(worker_id), token=server.token if token is None else token)


async def run_in_thread(function: Callable, *args, timeout: float = WAIT):
    """Run a blocking function in a thread, failing the test when it overstays."""
    return await asyncio.wait_for(asyncio.to_thread(function, *args), timeout)


def client_loop(context: Context, processed: list[int], gate: Callable[[int], None]) -> None:
    """A real worker: ``Client().acquire_block()`` until the task is done."""
    client = Client(context, connect_timeout=WAIT)
    try:
        while True:
            with client.acquire_block() as block:
                if block is None:
                    return
                processed.append(block.index)
                gate(len(processed))
    finally:
        client.close()


class RawConnection:
    """A hostile or hand-driven connection that speaks raw bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = Decoder()
        self.inbox: list = []

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), WAIT)
        return cls(reader, writer)

    async def receive(self):
        while not self.inbox:
            data = await asyncio.wait_for(self.reader.read(1 << 16), WAIT)
            if not data:
                return None
            self.inbox.extend(self.decoder.feed(data))
        return self.inbox.pop(0)

    async def send(self, data: bytes) -> bool:
        """Send bytes; False when the server already closed the connection."""
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), WAIT)
        except (ConnectionError, OSError):
            return False
        return True

    async def closed_by_server(self) -> bool:
        """Read until the server closes the connection (True) or WAIT passes."""
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(1 << 16), WAIT)
                if not data:
                    return True
        except (ConnectionError, OSError):
            return True
        except TimeoutError:
            return False

    async def hello(self, task_id: str, token: str | None, worker_id: int):
        challenge = await self.receive()
        assert type(challenge) is Challenge
        proof = proof_for(token, challenge.nonce)
        await self.send(encode(Hello(PROTOCOL_VERSION, task_id, worker_id, proof)))
        return await self.receive()

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), WAIT)
        except (ConnectionError, OSError):
            pass


# Hostile connections. Each returns how many protocol errors it must have caused.
async def random_bytes_before_hello(port, task_id, token, data: bytes, worker_id: int) -> int:
    connection = await RawConnection.open(port)
    await connection.receive()  # the Challenge
    await connection.send(data)
    await connection.close()
    return 0  # random bytes may be a frame still waiting for its end


async def random_bytes_after_welcome(port, task_id, token, data: bytes, worker_id: int) -> int:
    connection = await RawConnection.open(port)
    assert type(await connection.hello(task_id, token, worker_id)) is Welcome
    await connection.send(data)
    await connection.close()
    return 0


async def unknown_message_type(port, task_id, token, data: bytes, worker_id: int) -> int:
    connection = await RawConnection.open(port)
    body = b"{}" + data[:16]
    await connection.send(struct.pack(">IB", len(body) + 1, 0xEE) + body)
    assert await connection.closed_by_server()
    return 1


async def not_json(port, task_id, token, data: bytes, worker_id: int) -> int:
    connection = await RawConnection.open(port)
    assert type(await connection.hello(task_id, token, worker_id)) is Welcome
    body = b"\xff{not json" + data[:32]
    await connection.send(struct.pack(">IB", len(body) + 1, Report.TYPE_CODE) + body)
    assert await connection.closed_by_server()
    return 1


async def oversized_frame(port, task_id, token, data: bytes, worker_id: int) -> int:
    connection = await RawConnection.open(port)
    length = MAX_FRAME_BYTES + 1 + int.from_bytes(data[:3].ljust(3, b"\0"), "big")
    # the header alone is refused; the body that follows may meet a closed socket
    await connection.send(struct.pack(">IB", length, Report.TYPE_CODE) + bytes(64 * 1024))
    assert await connection.closed_by_server()
    return 1


async def truncated_frame(port, task_id, token, data: bytes, worker_id: int) -> int:
    connection = await RawConnection.open(port)
    frame = encode(Hello(PROTOCOL_VERSION, task_id, worker_id, proof_for(token, "ab")))
    cut = 1 + len(data) % (len(frame) - 1)
    await connection.send(frame[:cut])
    await connection.close()
    return 0


async def wrong_token(port, task_id, token, data: bytes, worker_id: int) -> int:
    connection = await RawConnection.open(port)
    answer = await connection.hello(task_id, "not-" + token + data.hex(), worker_id)
    assert type(answer) is Refused and "token" in answer.reason
    assert await connection.closed_by_server()
    return 0


async def server_message_from_a_worker(port, task_id, token, data: bytes, worker_id: int) -> int:
    connection = await RawConnection.open(port)
    assert type(await connection.hello(task_id, token, worker_id)) is Welcome
    await connection.send(encode(NoMoreBlocks()))
    assert await connection.closed_by_server()
    return 1


async def release_of_a_block_never_held(port, task_id, token, data: bytes, worker_id: int) -> int:
    connection = await RawConnection.open(port)
    assert type(await connection.hello(task_id, token, worker_id)) is Welcome
    # a result names a block of the connection's task by its index: this one holds none
    foreign = BlockResult(data[0] if data else 0, int(BlockStatus.SUCCESS), None)
    await connection.send(encode(Report((foreign,), 0)) + encode(Heartbeat())
                          + encode(Bye()))
    assert await connection.closed_by_server()
    return 0


async def takes_a_block_then_garbage(port, task_id, token, data: bytes, worker_id: int) -> int:
    connection = await RawConnection.open(port)
    assert type(await connection.hello(task_id, token, worker_id)) is Welcome
    # it asks for up to a batch; the blocks it got beyond the first never started
    want = 1 + (data[0] if data else 0) % MAX_BATCH_BLOCKS
    await connection.send(encode(Report((), want)))
    answer = await connection.receive()
    assert type(answer) is BlocksAssigned and 1 <= len(answer.blocks) <= want, answer
    body = b"garbage" + data[:16]
    await connection.send(struct.pack(">IB", len(body) + 1, 0) + body)
    assert await connection.closed_by_server()
    return 1


async def split_at_every_byte(port, task_id, token, data: bytes, worker_id: int) -> int:
    connection = await RawConnection.open(port)
    challenge = await connection.receive()
    proof = proof_for(token, challenge.nonce)
    for byte in encode(Hello(PROTOCOL_VERSION, task_id, worker_id, proof)):
        await connection.send(bytes([byte]))
    assert type(await connection.receive()) is Welcome
    await connection.send(encode(Bye()))
    assert await connection.closed_by_server()
    return 0


#: connections the stalling attacks leave open until the run is over
HELD_OPEN: list[RawConnection] = []


async def silent_connection(port, task_id, token, data: bytes, worker_id: int) -> int:
    HELD_OPEN.append(await RawConnection.open(port))  # never answers the Challenge
    return 0


async def stalled_partial_frame(port, task_id, token, data: bytes, worker_id: int) -> int:
    connection = await RawConnection.open(port)
    HELD_OPEN.append(connection)
    await connection.receive()
    await connection.send(struct.pack(">I", 100 + len(data)) + b"\x02" + data[:50])
    return 0


ATTACKS = [random_bytes_before_hello, random_bytes_after_welcome, unknown_message_type,
           not_json, oversized_frame, truncated_frame, wrong_token,
           server_message_from_a_worker, release_of_a_block_never_held,
           takes_a_block_then_garbage, split_at_every_byte, silent_connection,
           stalled_partial_frame]


async def run_under_attack(attacks: list[tuple[int, bytes]], num_blocks: int = 40,
                           token: str = "secret") -> None:
    """Serve a task to one real worker while the attacks hit the server; check that
    every block was done exactly once and the server counted the protocol errors."""
    task_id = "target"
    scheduler = BlockScheduler([serving_task(task_id, num_blocks, max_retries=20)])
    server = BlockServer(scheduler, host=HOST, token=token)
    server.start_listening(0)
    attacks_over = threading.Event()
    processed: list[int] = []

    def gate(processed_count: int) -> None:
        # the worker pauses half way through until every attack is over
        if processed_count == num_blocks // 2:
            assert attacks_over.wait(WAIT), "the attacks did not end"

    try:
        worker = asyncio.ensure_future(run_in_thread(
            client_loop, context_for(server, task_id, 0, token), processed, gate))
        attacker_ids = range(1, len(attacks) + 1)
        for worker_id in attacker_ids:
            server.expect_worker(task_id, worker_id)
        outcomes = await asyncio.gather(*(
            ATTACKS[kind % len(ATTACKS)](server.port, task_id, token, data, worker_id)
            for (kind, data), worker_id in zip(attacks, attacker_ids)),
            return_exceptions=True)
        attacks_over.set()
        await worker
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        assert not failures, failures
        assert sorted(processed) == list(range(num_blocks)), "each block exactly once"
        assert_counts(scheduler.task_states[task_id], num_blocks, num_blocks)
        assert server.protocol_errors >= sum(outcomes)
        assert not any(server.handout.held_by(connection)
                       for connection in server.connections), "no block is held"
    finally:
        attacks_over.set()
        server.close_all()
        while HELD_OPEN:
            await HELD_OPEN.pop().close()


attack_lists = st.lists(st.tuples(st.integers(0, len(ATTACKS) - 1), st.binary(max_size=300)),
                        min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(attacks=attack_lists)
def test_hostile_connections_during_a_run_do_not_disturb_it(attacks):
    asyncio.run(asyncio.wait_for(run_under_attack(attacks), 2 * WAIT))


def test_many_hostile_connections_at_once():
    generator = random.Random(20240611)
    attacks = [(kind, generator.randbytes(generator.randrange(0, 2000)))
               for kind in range(len(ATTACKS)) for _ in range(8)]
    asyncio.run(asyncio.wait_for(run_under_attack(attacks, num_blocks=200), 2 * WAIT))


def test_protocol_errors_are_counted():
    async def scenario() -> None:
        scheduler = BlockScheduler([serving_task("counted", 4)])
        server = BlockServer(scheduler, host=HOST)
        server.start_listening(0)
        server.expect_worker("counted", 1)
        try:
            assert server.protocol_errors == 0
            await oversized_frame(server.port, "counted", server.token, b"", 1)
            await unknown_message_type(server.port, "counted", server.token, b"", 1)
            await server_message_from_a_worker(server.port, "counted", server.token, b"", 1)
            assert server.protocol_errors == 3
        finally:
            server.close_all()

    asyncio.run(asyncio.wait_for(scenario(), 2 * WAIT))


def test_token_is_required_when_the_server_has_one():
    async def scenario() -> None:
        scheduler = BlockScheduler([serving_task("guarded", 10)])
        server = BlockServer(scheduler, host=HOST, token="secret")
        server.start_listening(0)
        try:
            with pytest.raises(RefusedByServerError, match="token"):
                await run_in_thread(Client, context_for(server, "guarded", 1, "wrong"))
            with pytest.raises(ContextError, match="no token"):
                await run_in_thread(Client, context_for(server, "guarded", 1, ""))
            with pytest.raises(RefusedByServerError, match="unknown task"):
                await run_in_thread(Client, context_for(server, "no_such_task", 1, "secret"))
            assert server.task_states["guarded"].started is False
            processed: list[int] = []
            await run_in_thread(client_loop, context_for(server, "guarded", 2, "secret"),
                                processed, lambda count: None)
            assert sorted(processed) == list(range(10))
            assert_counts(server.task_states["guarded"], 10, 10)
        finally:
            server.close_all()

    asyncio.run(asyncio.wait_for(scenario(), 2 * WAIT))


def test_every_server_makes_a_token_of_its_own():
    scheduler = BlockScheduler([serving_task("exposed", 1)])
    tokens = {BlockServer(scheduler, host=host).token
              for host in ("0.0.0.0", "127.0.0.1", "127.0.0.1")}
    assert len(tokens) == 3 and all(len(token) == 64 for token in tokens)
    assert BlockServer(scheduler, token="given").token == "given"


def test_two_hundred_concurrent_clients_on_loopback():
    num_clients, num_blocks = 200, 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * num_clients + 256
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))

    async def scenario() -> None:
        scheduler = BlockScheduler([serving_task("crowd", num_blocks)])
        server = BlockServer(scheduler, host=HOST)
        server.start_listening(0)
        everyone_holds_a_block = threading.Barrier(num_clients)
        processed: dict[int, list[int]] = {worker: [] for worker in range(num_clients)}
        errors: list[BaseException] = []

        def worker(worker_id: int) -> None:
            try:
                with Client(context_for(server, "crowd", worker_id),
                            connect_timeout=WAIT) as client:
                    with client.acquire_block() as block:
                        assert block is not None
                        processed[worker_id].append(block.index)
                        try:
                            everyone_holds_a_block.wait(WAIT)
                        except threading.BrokenBarrierError as error:
                            errors.append(error)  # acquire_block would swallow it
                            raise
                    while True:
                        with client.acquire_block() as block:
                            if block is None:
                                break
                            processed[worker_id].append(block.index)
            except BaseException as error:  # noqa: BLE001 - reported by the test
                everyone_holds_a_block.abort()
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(worker_id,), daemon=True)
                   for worker_id in range(num_clients)]

        def start_and_join() -> None:
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 2 * WAIT
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))

        try:
            await run_in_thread(start_and_join, timeout=3 * WAIT)
        finally:
            server.close_all()
        assert not [thread for thread in threads if thread.is_alive()], "clients hung"
        assert not errors, errors[:3]
        assert all(processed[worker] for worker in range(num_clients)), "a client starved"
        done = Counter(index for indices in processed.values() for index in indices)
        assert done == Counter(range(num_blocks)), "each block exactly once"
        assert_counts(scheduler.task_states["crowd"], num_blocks, num_blocks)

    asyncio.run(asyncio.wait_for(scenario(), 4 * WAIT))
