"""Prefetch and batches: a worker keeps its next blocks in hand, and short blocks travel
several per frame.

The wire tests run a real ``BlockServer`` on 127.0.0.1 in an asyncio loop and real
``Client`` objects in threads; the server's clock is a variable the test moves, so
timeouts are tested without sleeping. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import luigi
import pytest

import luigi_daisy as daisy
from luigi_daisy import BlockScheduler, BlockStatus, Context, Roi
from luigi_daisy.client import Client
from luigi_daisy.errors import ConfigError, ContextError
from luigi_daisy.hand import BATCH_SECONDS
from luigi_daisy.server import BlockServer

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_stray_processes")]

HOST = "127.0.0.1"
WAIT = 30.0


def line_task(task_id: str, num_blocks: int, process_function=None, **options) -> daisy.Task:
    """A 1D task of ``num_blocks`` blocks of size 1."""
    options.setdefault("read_write_conflict", False)
    return daisy.Task(task_id, total_roi=Roi((0,), (num_blocks,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)), process_function=process_function, **options)


def context_for(server: BlockServer, task_id: str, worker_id: int, prefetch: int) -> Context:
    server.expect_worker(task_id, worker_id)
    return Context(hostname=HOST, port=str(server.port), task_id=task_id,
                   worker_id=str(worker_id), token=server.token, prefetch=str(prefetch))


async def in_thread(function: Callable, *args):
    return await asyncio.wait_for(asyncio.to_thread(function, *args), WAIT)


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT} s waiting for {what}")
        await asyncio.sleep(0.002)


def connection_of(server: BlockServer, task_id: str, worker_id: int):
    return server.connected_workers.get((task_id, worker_id))


def held_by(server: BlockServer, task_id: str, worker_id: int) -> list[int]:
    connection = connection_of(server, task_id, worker_id)
    return [] if connection is None else server.handout.held_by(connection)


def serve(scenario, *tasks: daisy.Task, clock: Callable[[], float] = time.monotonic) -> None:
    """Run ``scenario(server)`` against a listening server of ``tasks``."""
    async def main() -> None:
        server = BlockServer(BlockScheduler(list(tasks)), host=HOST, clock=clock)
        server.start_listening(0)
        try:
            await scenario(server)
        finally:
            server.close_all()

    asyncio.run(asyncio.wait_for(main(), 3 * WAIT))


def succeed(block) -> None:
    block.status = BlockStatus.SUCCESS


# ------------------------------------------------------------------ blocks in hand

def test_a_worker_holds_its_next_block_while_it_processes_one():
    async def scenario(server: BlockServer) -> None:
        client = await in_thread(Client, context_for(server, "hand", 0, 1))
        try:
            first = await in_thread(client.next_block)
            await until(lambda: len(held_by(server, "hand", 0)) == 2, "a block in hand")
            state = server.task_states["hand"]
            assert state.processing_count == 2, "a block in hand counts as processing"
            assert held_by(server, "hand", 0)[0] == first.index
            succeed(first)
            second = await in_thread(client.next_block, first)
            assert second.index == held_by(server, "hand", 0)[0]
            await until(lambda: state.completed_count == 1 and state.processing_count >= 2,
                        "the first block recorded and more blocks in hand")
        finally:
            await in_thread(client.close)

    serve(scenario, line_task("hand", 10))


def test_no_block_in_hand_while_fewer_blocks_are_ready_than_workers():
    async def scenario(server: BlockServer) -> None:
        for worker_id in (1, 2):
            server.expect_worker("few", worker_id)
        client = await in_thread(Client, context_for(server, "few", 0, 2))
        try:
            await in_thread(client.next_block)
            await until(lambda: server.task_states["few"].processing_count >= 1, "a block")
            assert held_by(server, "few", 0) == [held_by(server, "few", 0)[0]]
            assert server.task_states["few"].ready_count == 2
        finally:
            await in_thread(client.close)

    serve(scenario, line_task("few", 3))


def test_prefetch_zero_holds_only_the_block_being_processed():
    async def scenario(server: BlockServer) -> None:
        client = await in_thread(Client, context_for(server, "single", 0, 0))
        try:
            block = await in_thread(client.next_block)
            seen = []
            while block is not None:
                seen.append(len(held_by(server, "single", 0)))
                succeed(block)
                block = await in_thread(client.next_block, block)
            assert set(seen) == {1}
            assert server.blocks_handed_out == server.block_frames == 50
        finally:
            await in_thread(client.close)

    serve(scenario, line_task("single", 50))


def test_a_lost_worker_is_charged_only_for_the_block_it_was_processing():
    async def scenario(server: BlockServer) -> None:
        client = await in_thread(Client, context_for(server, "lost", 0, 1))
        first = await in_thread(client.next_block)
        await until(lambda: len(held_by(server, "lost", 0)) == 2, "a block in hand")
        in_hand = held_by(server, "lost", 0)[1]
        from luigi_daisy import watchdog
        watchdog.unwatch(client._socket)
        client._socket.close()  # the worker dies: no results, no Bye
        state = server.task_states["lost"]
        await until(lambda: state.processing_count == 0, "both blocks back")
        # the worker processes its hand in order: the first block was running and is
        # retried (a lost worker's block is, even with max_retries=0); the one in hand
        # never started and goes back first in line, free
        progress = server.scheduler._progress["lost"]
        assert progress.retries == {first.index: 1}
        assert progress.ready[0] == in_hand
        assert state.ready_count == 10 and state.failed_count == 0
        other = await in_thread(Client, context_for(server, "lost", 1, 0))
        try:
            processed = await in_thread(process_all, other, 0.0)
        finally:
            await in_thread(other.close)
        assert sorted(processed) == list(range(10))
        assert state.completed_count == 10 and state.failed_count == 0

    serve(scenario, line_task("lost", 10, max_retries=0))


def test_a_worker_leaving_gives_its_blocks_in_hand_back_at_once():
    async def scenario(server: BlockServer) -> None:
        client = await in_thread(Client, context_for(server, "bye", 0, 2))
        first = await in_thread(client.next_block)
        await until(lambda: len(held_by(server, "bye", 0)) == 3, "two blocks in hand")
        succeed(first)
        client.report(first)
        await in_thread(client.close)
        state = server.task_states["bye"]
        await until(lambda: state.processing_count == 0, "the blocks in hand back")
        assert state.completed_count == 1 and state.ready_count == 9
        assert server.scheduler._progress["bye"].retries == {}, "no retry was spent"

    serve(scenario, line_task("bye", 10, max_retries=0))


def test_a_block_in_hand_times_out_from_when_the_block_before_it_was_released():
    now = [0.0]

    async def scenario(server: BlockServer) -> None:
        stopped = []
        server.on_worker_timeout = lambda task_id, worker_id: stopped.append(worker_id)
        client = await in_thread(Client, context_for(server, "slow", 0, 1))
        try:
            first = await in_thread(client.next_block)
            await until(lambda: len(held_by(server, "slow", 0)) == 2, "a block in hand")
            now[0] = 8.0  # the first block took 8 s of the 10 s timeout
            # long enough a block to keep just one in hand
            await in_thread(time.sleep, BATCH_SECONDS + 0.1)
            succeed(first)
            second = await in_thread(client.next_block, first)
            state = server.task_states["slow"]
            await until(lambda: state.completed_count == 1, "the first result")
            now[0] = 15.0  # 15 s since the second block was handed out, 7 s since it began
            assert server.reclaim_expired() == 0 and stopped == []
            now[0] = 18.5
            assert server.reclaim_expired() == 1 and stopped == [0]
            assert state.timeout_reclaim_count == 1
            await until(lambda: state.processing_count == 0, "the block in hand back")
            # only the block that ran too long is charged; the one behind it never started
            retries = server.scheduler._progress["slow"].retries
            assert retries == {second.index: 1}, retries
            assert state.ready_count == 9 and state.failed_count == 0
        finally:
            await in_thread(client.close)

    serve(scenario, line_task("slow", 10, timeout=10.0), clock=lambda: now[0])


def test_a_block_reported_without_an_outcome_fails_with_a_clear_error():
    async def scenario(server: BlockServer) -> None:
        client = await in_thread(Client, context_for(server, "vague", 0, 0))
        try:
            block = await in_thread(client.next_block)
            assert block.status == BlockStatus.PROCESSING
            assert await in_thread(client.next_block, block) is None  # not set: failed
        finally:
            await in_thread(client.close)
        state = server.task_states["vague"]
        assert state.failed_count == 1 and server.protocol_errors == 0
        assert "was reported with status PROCESSING" in state.failed_blocks[0]

    serve(scenario, line_task("vague", 1, max_retries=0))


# ------------------------------------------------------------------------- batches

def process_all(client: Client, seconds_per_block: float) -> list[int]:
    processed = []
    block = client.next_block()
    while block is not None:
        if seconds_per_block:
            time.sleep(seconds_per_block)
        processed.append(block.index)
        succeed(block)
        block = client.next_block(block)
    return processed


def test_short_blocks_travel_several_per_frame():
    async def scenario(server: BlockServer) -> None:
        client = await in_thread(Client, context_for(server, "short", 0, 1))
        try:
            processed = await in_thread(process_all, client, 0.0)
        finally:
            await in_thread(client.close)
        assert sorted(processed) == list(range(3000)), "each block exactly once"
        assert server.task_states["short"].completed_count == 3000
        assert server.blocks_handed_out == 3000
        assert server.block_frames < 3000 / 2, (
            f"{server.block_frames} frames for 3000 no-op blocks: no batches")

    serve(scenario, line_task("short", 3000))


def test_long_blocks_travel_one_per_frame():
    async def scenario(server: BlockServer) -> None:
        client = await in_thread(Client, context_for(server, "long", 0, 1))
        try:
            processed = await in_thread(process_all, client, BATCH_SECONDS + 0.1)
        finally:
            await in_thread(client.close)
        assert sorted(processed) == list(range(3))
        # the first answer brings the block to process and the one in hand, then one
        # (both, were a round trip on a loaded machine to take over half a second)
        assert server.block_frames >= 2
        assert server.blocks_handed_out == 3

    serve(scenario, line_task("long", 3))


# ------------------------------------------------------------------------ whole runs

def record_and_maybe_fail(block) -> None:
    """Append ``index start end`` to a file of this worker; fail every 7th block the
    first time it runs."""
    folder = Path(os.environ["PREFETCH_TEST_DIR"])
    index = block.block_id[1]
    start = time.monotonic()
    marker = folder / f"tried-{index}"
    if index % 7 == 3 and not marker.exists():
        marker.touch()
        raise RuntimeError(f"first try of block {index} fails")
    time.sleep(0.001)
    with open(folder / f"record-{os.getpid()}.txt", "a") as record:
        record.write(f"{index} {start} {time.monotonic()}\n")


def records(folder: Path) -> list[tuple[int, float, float]]:
    found = []
    for path in folder.glob("record-*.txt"):
        for line in path.read_text().splitlines():
            index, start, end = line.split()
            found.append((int(index), float(start), float(end)))
    return found


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_runs_with_conflicts_do_each_block_once_and_never_overlap_neighbours(
        tmp_path, monkeypatch, prefetch):
    monkeypatch.setenv("PREFETCH_TEST_DIR", str(tmp_path))
    task = daisy.Task("conflicts", total_roi=Roi((0,), (122,)), read_roi=Roi((0,), (4,)),
                      write_roi=Roi((1,), (2,)), process_function=record_and_maybe_fail,
                      read_write_conflict=True, num_workers=2, max_retries=1)
    result = daisy.run_blockwise([task], progress=False, log_dir=tmp_path / "logs",
                                 prefetch=prefetch)
    assert result["conflicts"].succeeded, result["conflicts"]
    done = records(tmp_path)
    counts = Counter(index for index, _, _ in done)
    assert sorted(counts) == list(range(60)) and set(counts.values()) == {1}
    spans = {index: (start, end) for index, start, end in done}
    for index in range(59):  # neighbours read each other's output: never at once
        (start_a, end_a), (start_b, end_b) = spans[index], spans[index + 1]
        assert end_a <= start_b or end_b <= start_a, f"blocks {index} and {index + 1}"


@pytest.mark.parametrize("prefetch", [-1, 9, "1", 1.0, True])
def test_a_bad_prefetch_is_refused_before_the_run(tmp_path, prefetch):
    with pytest.raises(ConfigError, match="prefetch"):
        daisy.run_blockwise([line_task("refused", 4, succeed)], progress=False,
                            log_dir=tmp_path / "logs", prefetch=prefetch)


def test_a_bad_prefetch_in_a_worker_context_names_the_key():
    context = Context(hostname=HOST, port="1", task_id="t", worker_id="0", token="x",
                      prefetch="lots")
    with pytest.raises(ContextError, match="prefetch is 'lots'"):
        Client(context, connect_timeout=1.0)


def test_prefetch_is_a_key_of_the_luigi_daisy_section():
    from luigi_daisy.luigi.config import luigi_daisy as section
    config = luigi.configuration.get_config()
    config.set("luigi_daisy", "prefetch", "0")
    try:
        assert section().prefetch == 0
    finally:
        config.remove_option("luigi_daisy", "prefetch")
    assert section().prefetch == 1


def test_a_result_sent_just_before_the_worker_is_seen_gone_is_kept():
    """The launcher sees a worker's process end right after its last result was sent
    and before the server read it: the connection closes only after a grace, so the
    result is read and the finished block is not run again."""
    async def scenario(server: BlockServer) -> None:
        client = await in_thread(Client, context_for(server, "drop", 0, 0))
        block = await in_thread(client.next_block)
        succeed(block)
        client.report(block)
        # on the loop's own thread: the bytes reach the kernel, the loop has not run
        client._send_report(0)
        server.drop_worker("drop", 0)
        state = server.task_states["drop"]
        await until(lambda: state.completed_count == 1, "the result read before the close")
        await until(lambda: connection_of(server, "drop", 0) is None, "the connection closed")
        assert server.scheduler._progress["drop"].retries == {}
        assert state.ready_count == 1 and state.processing_count == 0
        from luigi_daisy import watchdog
        watchdog.unwatch(client._socket)
        client._socket.close()

    serve(scenario, line_task("drop", 2))
