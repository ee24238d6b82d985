"""The block server: a tornado TCP server around one scheduler.

A thin loop: read bytes, decode frames, call the scheduler, write the answer. It tracks
which connection holds which block, gives the blocks of a lost connection back to the
scheduler as failed (so they are retried), reclaims blocks held past their task's
timeout, and parks ``Acquire`` requests until a block is ready or the task is done.
A malformed, oversized or unknown frame closes that one connection and nothing else.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections import deque
from collections.abc import Callable

from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets
from tornado.tcpserver import TCPServer

from .blocks import Block, BlockStatus
from .errors import ProtocolError
from .ledger import LedgerSet
from .protocol import (
    CLIENT_MESSAGES,
    PROTOCOL_VERSION,
    Acquire,
    BlockAssigned,
    Bye,
    Challenge,
    Decoder,
    Heartbeat,
    Hello,
    Message,
    NoMoreBlocks,
    Refused,
    Release,
    ReleaseAndAcquire,
    Welcome,
    WireBlock,
    encode,
    new_nonce,
    new_token,
    verify_proof,
)
from .scheduler import BlockScheduler, ReleaseOutcome, TaskState

logger = logging.getLogger(__name__)

_READ_CHUNK = 1 << 16


def is_loopback(host: str) -> bool:
    """Whether ``host`` names a loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def wire_block(block: Block) -> WireBlock:
    """The wire form of a block handed out by the scheduler (no ``Roi`` is built)."""
    read_begin, read_shape, write_begin, write_shape = block._grid.bounds_of(block.index)
    return WireBlock(block.task_id, block.index, read_begin, read_shape, write_begin,
                     write_shape, int(block.status))


def _keep_alive(stream: IOStream) -> None:
    """Let the kernel probe idle connections, so a vanished worker host is noticed
    (its block goes back to the scheduler) within about a minute."""
    sock = stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class WorkerConnection:
    """Server-side record of one worker connection."""

    __slots__ = ("stream", "address", "nonce", "task_id", "worker_id", "held", "closed")

    def __init__(self, stream: IOStream, address) -> None:
        self.stream = stream
        self.address = address
        self.nonce = new_nonce()
        self.task_id: str | None = None
        self.worker_id: int | None = None
        self.held: dict[int, Block] = {}
        self.closed = False

    def send(self, message: Message) -> None:
        """Queue a message; a closed stream is noted, not raised."""
        if self.closed:
            return
        try:
            self.stream.write(encode(message))
        except StreamClosedError:
            self.closed = True

    def close(self) -> None:
        """Close the connection (its blocks are released by the read loop)."""
        self.closed = True
        self.stream.close()


class BlockServer(TCPServer):
    """Hands out the blocks of a :class:`BlockScheduler` to workers over TCP.

    Parameters
    ----------
    scheduler:
        The scheduler whose blocks are served. Check functions of its tasks are called
        here, by the server, never inside the scheduler.
    host:
        Interface to listen on. On anything but loopback a secret token is required.
    token:
        Secret every worker must prove; generated when ``host`` is not loopback.
    clock:
        Source of the time passed to the scheduler.
    on_worker_timeout:
        Called with ``(task_id, worker_id)`` when a worker held a block past its
        task's timeout; the run stops that worker.
    ledgers:
        Where finished blocks are recorded; the server is the ledgers' only writer.
    """

    def __init__(self, scheduler: BlockScheduler, host: str = "127.0.0.1",
                 token: str | None = None, clock: Callable[[], float] = time.monotonic,
                 on_worker_timeout: Callable[[str, int | None], None] | None = None,
                 ledgers: LedgerSet | None = None) -> None:
        super().__init__(max_buffer_size=1 << 22)
        self.scheduler = scheduler
        self.host = host
        if token is None and not is_loopback(host):
            token = new_token()
        self.token = token
        self.clock = clock
        self.on_worker_timeout = on_worker_timeout
        self.ledgers = ledgers if ledgers is not None else LedgerSet({})
        self.port: int | None = None
        self.connections: set[WorkerConnection] = set()
        self.waiting: dict[str, deque[WorkerConnection]] = {
            task_id: deque() for task_id in scheduler.tasks}
        self.holder: dict[tuple[str, int], WorkerConnection] = {}
        self.failed_workers: dict[str, set[int]] = {task_id: set() for task_id in scheduler.tasks}
        self.protocol_errors = 0

    # ------------------------------------------------------------------ lifecycle
    def start_listening(self, port: int = 0) -> int:
        """Listen on ``host:port`` (0: any free port) and return the port."""
        sockets = bind_sockets(port, address=self.host)
        self.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        return self.port

    def sockets(self) -> list[socket.socket]:
        """The listening sockets and every worker connection: what a forked worker must
        close, so that a connection the server closes is seen closed by its peer."""
        found = list(self._sockets.values())
        found.extend(connection.stream.socket for connection in self.connections
                     if connection.stream.socket is not None)
        return found

    @property
    def task_states(self) -> dict[str, TaskState]:
        """The scheduler's per-task counters."""
        return self.scheduler.task_states

    def close_all(self) -> None:
        """Stop listening and close every connection."""
        self.stop()
        for connection in list(self.connections):
            connection.close()

    # ------------------------------------------------------------------ connections
    async def handle_stream(self, stream: IOStream, address) -> None:
        connection = WorkerConnection(stream, address)
        self.connections.add(connection)
        _keep_alive(stream)
        decoder = Decoder(accept=CLIENT_MESSAGES)
        try:
            connection.send(Challenge(connection.nonce))
            while not connection.closed:
                data = await stream.read_bytes(_READ_CHUNK, partial=True)
                for message in decoder.feed(data):
                    self._dispatch(connection, message)
                    if connection.closed:
                        break
        except StreamClosedError:
            pass
        except ProtocolError as error:
            self.protocol_errors += 1
            logger.warning("closing connection from %s: %s", address, error)
        finally:
            connection.closed = True
            stream.close()
            self.connections.discard(connection)
            self._connection_lost(connection)

    def _dispatch(self, connection: WorkerConnection, message: Message) -> None:
        if connection.task_id is None:
            self._authenticate(connection, message)
            return
        kind = type(message)
        if kind is ReleaseAndAcquire:
            self._release(connection, message.block, message.error)
            self._acquire(connection)
        elif kind is Acquire:
            self._acquire(connection)
        elif kind is Release:
            self._release(connection, message.block, message.error)
        elif kind is Heartbeat:
            pass
        elif kind is Bye:
            connection.close()

    def _authenticate(self, connection: WorkerConnection, message: Message) -> None:
        if type(message) is not Hello:
            raise ProtocolError(
                f"expected Hello as the first message, got {type(message).__name__}")
        reason = None
        if message.protocol_version != PROTOCOL_VERSION:
            reason = (f"protocol version {message.protocol_version} is not supported; "
                      f"this server speaks {PROTOCOL_VERSION}")
        elif self.token is not None and not verify_proof(self.token, connection.nonce,
                                                          message.proof):
            reason = "authentication failed: the worker does not know this run's token"
        elif message.task_id not in self.scheduler.tasks:
            reason = (f"unknown task {message.task_id!r}; this server runs "
                      f"{', '.join(map(repr, self.scheduler.tasks))}")
        if reason is not None:
            logger.warning("refusing connection from %s: %s", connection.address, reason)
            connection.send(Refused(reason))
            connection.close()
            return
        connection.task_id = message.task_id
        connection.worker_id = message.worker_id
        connection.send(Welcome())

    # ------------------------------------------------------------------ blocks
    def _next_block(self, task_id: str) -> Block | None:
        """Acquire a block, skipping those the task's check function finds done."""
        task = self.scheduler.tasks[task_id]
        while True:
            block = self.scheduler.acquire(task_id, self.clock())
            if block is None or not task.is_done_already(block):
                return block
            self.scheduler.release(block, BlockStatus.SUCCESS, self.clock(), skipped=True)
            self.ledgers.record_done(task_id, block.index)

    def _assign(self, connection: WorkerConnection, block: Block) -> None:
        connection.held[block.index] = block
        self.holder[(block.task_id, block.index)] = connection
        connection.send(BlockAssigned(wire_block(block)))

    def _acquire(self, connection: WorkerConnection) -> None:
        task_id = connection.task_id
        block = self._next_block(task_id)
        if block is not None:
            self._assign(connection, block)
        elif self.scheduler.task_states[task_id].is_done():
            connection.send(NoMoreBlocks())
        else:
            self.waiting[task_id].append(connection)

    def _release(self, connection: WorkerConnection, wire: WireBlock, error: str | None) -> None:
        block = connection.held.get(wire.index) if wire.task_id == connection.task_id else None
        if block is None:
            logger.warning("worker %s released block %s of %r that it does not hold; ignored",
                           connection.worker_id, wire.index, wire.task_id)
            return
        del connection.held[wire.index]
        del self.holder[(block.task_id, block.index)]
        status = BlockStatus(wire.status)
        if status == BlockStatus.SUCCESS:
            failure = self.scheduler.tasks[block.task_id].post_check_failure(block)
            if failure is not None:
                status = BlockStatus.FAILED
                error = failure
        elif status != BlockStatus.FAILED:
            error = error or f"released with status {status.name}"
            status = BlockStatus.FAILED
        self._give_back(block, status, error, connection.worker_id)

    def _give_back(self, block: Block, status: BlockStatus, error: str | None,
                   worker_id: int | None, worker_lost: bool = False) -> None:
        block.status = status
        block.error = error
        if status == BlockStatus.FAILED and worker_id is not None:
            self.failed_workers[block.task_id].add(worker_id)
        outcome = self.scheduler.release(block, status, self.clock(), worker_lost=worker_lost)
        if outcome is ReleaseOutcome.COMPLETED:
            self.ledgers.record_done(block.task_id, block.index)
        elif outcome is ReleaseOutcome.FAILED:
            self.ledgers.record_failed(block.task_id, block.index, error)
        self._serve_waiting()

    def _serve_waiting(self) -> None:
        """Give newly ready blocks to parked workers; tell them when a task is done."""
        for task_id, waiting in self.waiting.items():
            while waiting:
                connection = waiting[0]
                if connection.closed:
                    waiting.popleft()
                    continue
                block = self._next_block(task_id)
                if block is None:
                    break
                waiting.popleft()
                self._assign(connection, block)
            if waiting and self.scheduler.task_states[task_id].is_done():
                while waiting:
                    waiting.popleft().send(NoMoreBlocks())

    def _connection_lost(self, connection: WorkerConnection) -> None:
        for block in list(connection.held.values()):
            del self.holder[(block.task_id, block.index)]
            logger.warning("worker %s of %r was lost while processing block %s; retrying it",
                           connection.worker_id, block.task_id, block.index)
            self._give_back(block, BlockStatus.FAILED,
                            f"worker {connection.worker_id} was lost while processing the block",
                            connection.worker_id, worker_lost=True)
        connection.held.clear()

    def drop_worker(self, task_id: str, worker_id: int) -> None:
        """Close the connections of a worker its launcher saw end; its blocks go back
        to the scheduler (a dead node's connection may otherwise look open for long)."""
        for connection in list(self.connections):
            if connection.task_id == task_id and connection.worker_id == worker_id:
                connection.close()

    def connected_workers(self) -> int:
        """Workers that have completed the handshake and are still connected."""
        return sum(1 for connection in self.connections
                   if connection.task_id is not None and not connection.closed)

    # ------------------------------------------------------------------ time
    def reclaim_expired(self) -> int:
        """Fail and retry blocks held past their task's timeout; stop their workers."""
        now = self.clock()
        reclaimed = 0
        for expired in self.scheduler.expired(now):
            connection = self.holder.pop((expired.task_id, expired.index), None)
            if connection is None:
                continue
            block = connection.held.pop(expired.index)
            timeout = self.scheduler.tasks[expired.task_id].timeout
            logger.warning("block %s of %r exceeded its timeout of %ss; stopping worker %s",
                           expired.index, expired.task_id, timeout, connection.worker_id)
            self.scheduler.task_states[expired.task_id].timeout_reclaim_count += 1
            self._give_back(block, BlockStatus.FAILED,
                            f"timeout: the block took longer than {timeout} s",
                            connection.worker_id, worker_lost=True)
            if self.on_worker_timeout is not None:
                self.on_worker_timeout(expired.task_id, connection.worker_id)
            connection.close()
            reclaimed += 1
        return reclaimed

    def serve_waiting(self) -> None:
        """Hand blocks made ready outside a release (blocks another run finished) to
        parked workers, and tell those of finished tasks that nothing more will come."""
        self._serve_waiting()
