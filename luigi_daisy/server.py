"""The block server: a tornado TCP server around one scheduler.

A thin loop: read bytes, decode frames, call the scheduler, write the answer. It tracks
which connection holds which block, gives the blocks of a lost connection back to the
scheduler as failed (so they are retried), reclaims blocks held past their task's
timeout, and parks ``Acquire`` requests until a block is ready or the task is done.

Workers keep blocks in hand. A worker's ``Report`` returns the results of finished
blocks and asks for more; the server hands out more than the one block a worker needs
next (prefetch, or a batch of short blocks) only while its hand holds less than its
share of the ready blocks (ready blocks over started workers), so blocks held in hand
never keep another worker waiting. A block in hand counts as processing: a worker lost or stopped with blocks in
hand fails them all (each is retried), a worker that says ``Bye`` gives them back
unstarted.

It trusts no one. Every connection, loopback included, proves the run's secret token
before anything else; its ``Hello`` names a worker id the run started and that is not
connected already; a block is released only by the connection that holds it. A
malformed, oversized or unknown frame closes that one connection and nothing else.
Connections, handshakes and buffered bytes are bounded (:class:`ServerLimits`), text
from the network is clipped before it is logged, and repeated warnings are counted
rather than repeated.
"""

from __future__ import annotations

import logging
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpserver import TCPServer

from .blocks import Block, BlockStatus
from .errors import ProtocolError, ServerConfigError
from .ledger import LedgerSet
from .listening import bind_listening_sockets
from .log_limits import WarningTally, clip
from .protocol import (
    ALREADY_CONNECTED,
    CLIENT_MESSAGES,
    PROTOCOL_VERSION,
    Acquire,
    BlockAssigned,
    BlocksAssigned,
    Bye,
    CannotWork,
    Challenge,
    Decoder,
    Heartbeat,
    Hello,
    Message,
    NoMoreBlocks,
    Refused,
    Release,
    ReleaseAndAcquire,
    Report,
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

#: bytes a connection may send before its ``Hello`` is complete (a real one is < 1 KiB)
MAX_HELLO_BYTES = 64 * 1024
#: open files the process needs besides the block server's connections
_SPARE_FILES = 256


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what peers of a block server may cost it.

    Attributes
    ----------
    max_connections:
        Connections open at once, authenticated or not; past it a new connection is
        closed at once. The default leaves room for thousands of workers; the process's
        open-file limit (``ulimit -n``) must allow as many.
    handshake_timeout:
        Seconds a connection may take to authenticate (answer the challenge with a
        valid ``Hello``) before it is closed.
    max_buffered_bytes:
        Bytes of partial frames held across all connections. Past it, the connections
        buffering most are closed, those not yet authenticated first; workers, whose
        frames are a few hundred bytes, are not touched while others buffer.
    """

    max_connections: int = 4096
    handshake_timeout: float = 10.0
    max_buffered_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if type(self.max_connections) is not int or self.max_connections < 1:
            raise ServerConfigError(
                f"ServerLimits.max_connections must be a positive integer, got "
                f"{self.max_connections!r}")
        if (not isinstance(self.handshake_timeout, (int, float))
                or isinstance(self.handshake_timeout, bool) or not self.handshake_timeout > 0):
            raise ServerConfigError(
                f"ServerLimits.handshake_timeout must be a positive number of seconds, got "
                f"{self.handshake_timeout!r}")
        if type(self.max_buffered_bytes) is not int or self.max_buffered_bytes < MAX_HELLO_BYTES:
            raise ServerConfigError(
                f"ServerLimits.max_buffered_bytes must be an integer of at least "
                f"{MAX_HELLO_BYTES} (one handshake), got {self.max_buffered_bytes!r}")


def _allow_open_files(wanted: int) -> None:
    """Raise the soft limit on open files to ``wanted`` (capped by the hard limit)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        logger.warning("could not raise the open-file limit to %d for the block server's "
                       "connections", wanted)


def wire_block(block: Block) -> WireBlock:
    """The wire form of a block handed out by the scheduler (no ``Roi`` is built)."""
    grid = block._grid
    read_begin, read_shape, write_begin, write_shape = grid.bounds_of(block.index)
    return WireBlock(block.task_id, block.index, read_begin, read_shape, write_begin,
                     write_shape, int(block.status), grid.number_of(block.index))


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

    __slots__ = ("stream", "address", "nonce", "task_id", "worker_id", "held", "closed",
                 "buffered", "handshake_timer", "wants", "batched", "reports")

    def __init__(self, stream: IOStream, address) -> None:
        self.stream = stream
        self.address = address
        self.nonce = new_nonce()
        self.task_id: str | None = None
        self.worker_id: int | None = None
        #: blocks this connection holds, in the order they were handed out
        self.held: dict[int, Block] = {}
        self.closed = False
        self.buffered = 0
        self.handshake_timer: object | None = None
        #: blocks asked for by the request waiting for its answer (0: none waits)
        self.wants = 0
        #: whether that request is answered with ``BlocksAssigned`` (a ``Report``)
        self.batched = False
        #: whether the worker sent a ``Report``: it processes its blocks in hand in order
        self.reports = False

    @property
    def authenticated(self) -> bool:
        """Whether the peer proved the token and was welcomed."""
        return self.task_id is not None

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
        Interface to listen on.
    token:
        Secret every connection must prove, on every interface; a fresh one is made
        when none is given. Workers get it in their context (environment), never on a
        command line.
    clock:
        Source of the time passed to the scheduler and to the warning tally.
    on_worker_timeout:
        Called with ``(task_id, worker_id)`` when a worker held a block past its
        task's timeout; the run stops that worker.
    ledgers:
        Where finished blocks are recorded; the server is the ledgers' only writer.
    limits:
        Bounds on connections, handshakes and buffered bytes (:class:`ServerLimits`).

    Only workers announced with :meth:`expect_worker` are welcomed, one connection
    per worker id at a time.
    """

    def __init__(self, scheduler: BlockScheduler, host: str = "127.0.0.1",
                 token: str | None = None, clock: Callable[[], float] = time.monotonic,
                 on_worker_timeout: Callable[[str, int | None], None] | None = None,
                 ledgers: LedgerSet | None = None,
                 limits: ServerLimits | None = None) -> None:
        super().__init__(max_buffer_size=1 << 22)
        self.scheduler = scheduler
        self.host = host
        self.token: str = token or new_token()
        self.clock = clock
        self.on_worker_timeout = on_worker_timeout
        self.ledgers = ledgers if ledgers is not None else LedgerSet({})
        self.limits = limits if limits is not None else ServerLimits()
        self.port: int | None = None
        self.connections: set[WorkerConnection] = set()
        # parked requests in arrival order (a dict holds each connection once): of
        # connections holding no block, and of connections asking for more in hand
        self.waiting: dict[str, dict[WorkerConnection, None]] = {
            task_id: {} for task_id in scheduler.tasks}
        self.waiting_more: dict[str, dict[WorkerConnection, None]] = {
            task_id: {} for task_id in scheduler.tasks}
        self.holder: dict[tuple[str, int], WorkerConnection] = {}
        self.failed_workers: dict[str, set[int]] = {task_id: set() for task_id in scheduler.tasks}
        # ids of the workers the run started and has not seen exit, per task
        self.expected_workers: dict[str, set[int]] = {
            task_id: set() for task_id in scheduler.tasks}
        self.connected_workers: dict[tuple[str, int], WorkerConnection] = {}
        self.buffered_bytes = 0
        # highest total seen, before shedding: the bound plus at most one read chunk
        self.peak_buffered_bytes = 0
        self.warnings = WarningTally(logger)
        #: ``(task_id, daisy block id) -> worker id`` of the blocks that failed for good
        self.failed_by: dict[tuple[str, int], int | None] = {}
        self.protocol_errors = 0
        self.refused_hellos = 0
        self.ignored_releases = 0
        self.refused_connections = 0
        self.handshake_timeouts = 0
        self.shed_connections = 0
        #: blocks handed out, and the frames that carried them (batches: several each)
        self.blocks_handed_out = 0
        self.block_frames = 0

    # ------------------------------------------------------------------ lifecycle
    def start_listening(self, port: int = 0,
                        sockets: list[socket.socket] | None = None) -> int:
        """Listen on ``host:port`` (0: any free port), or on ``sockets`` already bound
        (:func:`~luigi_daisy.listening.bind_listening_sockets`), and return the port.

        Raises this process's soft limit on open files, as far as the hard limit allows,
        to what ``limits.max_connections`` needs, so the connection cap is what refuses
        connections rather than a failing ``accept``.
        """
        _allow_open_files(self.limits.max_connections + _SPARE_FILES)
        if sockets is None:
            sockets = bind_listening_sockets(self.host, port)
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
        """Stop listening, close every connection and log the warning counts left."""
        self.stop()
        for connection in list(self.connections):
            connection.close()
        self.warnings.flush(self.clock(), force=True)

    # ------------------------------------------------------------------ workers
    def expect_worker(self, task_id: str, worker_id: int) -> None:
        """Welcome a connection of ``worker_id`` for ``task_id`` (the run started it)."""
        self.expected_workers[task_id].add(worker_id)

    def forget_worker(self, task_id: str, worker_id: int) -> None:
        """Refuse new connections of ``worker_id`` from now on (its process is gone)."""
        self.expected_workers[task_id].discard(worker_id)

    # ------------------------------------------------------------------ connections
    async def handle_stream(self, stream: IOStream, address) -> None:
        if len(self.connections) >= self.limits.max_connections:
            self.refused_connections += 1
            self.warnings.warn(
                "connections over the limit", self.clock(),
                "closing a new connection from %s: %d connections are open, the limit "
                "(ServerLimits.max_connections)", address, len(self.connections))
            stream.close()
            return
        connection = WorkerConnection(stream, address)
        self.connections.add(connection)
        connection.handshake_timer = IOLoop.current().call_later(
            self.limits.handshake_timeout, self._handshake_expired, connection)
        decoder = Decoder(accept=CLIENT_MESSAGES)
        try:
            _keep_alive(stream)
            connection.send(Challenge(connection.nonce))
            while not connection.closed:
                data = await stream.read_bytes(_READ_CHUNK, partial=True)
                for message in decoder.feed(data):
                    self._dispatch(connection, message)
                    if connection.closed:
                        break
                if not connection.authenticated and decoder.buffered_bytes > MAX_HELLO_BYTES:
                    raise ProtocolError(
                        f"{decoder.buffered_bytes} bytes sent without a complete Hello; "
                        f"a Hello takes at most {MAX_HELLO_BYTES}")
                self._account_buffer(connection, decoder.buffered_bytes)
        except (StreamClosedError, OSError):
            pass
        except ProtocolError as error:
            self.protocol_errors += 1
            self.warnings.warn("protocol errors", self.clock(),
                               "closing connection from %s: %s", address, clip(error))
        finally:
            connection.closed = True
            stream.close()
            self._forget_connection(connection)

    def _forget_connection(self, connection: WorkerConnection) -> None:
        """Drop every trace of a closed connection; its blocks go back to the scheduler."""
        self.connections.discard(connection)
        self._account_buffer(connection, 0)
        if connection.handshake_timer is not None:
            IOLoop.current().remove_timeout(connection.handshake_timer)
            connection.handshake_timer = None
        if connection.authenticated:
            key = (connection.task_id, connection.worker_id)
            if self.connected_workers.get(key) is connection:
                del self.connected_workers[key]
            self.waiting[connection.task_id].pop(connection, None)
            self.waiting_more[connection.task_id].pop(connection, None)
        self._connection_lost(connection)

    def _handshake_expired(self, connection: WorkerConnection) -> None:
        connection.handshake_timer = None
        if connection.authenticated or connection.closed:
            return
        self.handshake_timeouts += 1
        self.warnings.warn("handshake timeouts", self.clock(),
                           "closing connection from %s: no valid Hello within %g s",
                           connection.address, self.limits.handshake_timeout)
        connection.close()

    def _account_buffer(self, connection: WorkerConnection, buffered: int) -> None:
        """Record the partial-frame bytes a connection holds; past the bound, shed."""
        self.buffered_bytes += buffered - connection.buffered
        connection.buffered = buffered
        if self.buffered_bytes > self.peak_buffered_bytes:
            self.peak_buffered_bytes = self.buffered_bytes
        if self.buffered_bytes > self.limits.max_buffered_bytes:
            self._shed_buffers()

    def _shed_buffers(self) -> None:
        """Close the connections buffering most, unauthenticated ones first, until the
        bytes buffered across all connections are within the bound again."""
        candidates = sorted((connection for connection in self.connections
                             if connection.buffered and not connection.closed),
                            key=lambda connection: (connection.authenticated,
                                                    -connection.buffered))
        for connection in candidates:
            if self.buffered_bytes <= self.limits.max_buffered_bytes:
                break
            self.shed_connections += 1
            self.warnings.warn(
                "connections closed for buffering too much", self.clock(),
                "closing connection from %s (worker %s): it buffers %d bytes of partial "
                "frames and all connections %d, over the limit of %d "
                "(ServerLimits.max_buffered_bytes)", connection.address,
                connection.worker_id, connection.buffered, self.buffered_bytes,
                self.limits.max_buffered_bytes)
            self.buffered_bytes -= connection.buffered
            connection.buffered = 0
            connection.close()

    def _dispatch(self, connection: WorkerConnection, message: Message) -> None:
        if not connection.authenticated:
            self._authenticate(connection, message)
            return
        kind = type(message)
        if kind is Report:
            self._report(connection, message)
        elif kind is ReleaseAndAcquire:
            self._release(connection, message.block, message.error)
            self._acquire(connection)
        elif kind is Acquire:
            self._acquire(connection)
        elif kind is Release:
            self._release(connection, message.block, message.error)
        elif kind is CannotWork:
            self._cannot_work(connection, message)
        elif kind is Heartbeat:
            pass
        elif kind is Bye:
            if connection.reports:
                self._give_back_unstarted(connection)
            connection.close()

    def _refusal(self, message: Hello, nonce: str) -> str | None:
        """Why a ``Hello`` is refused, or None when it is welcome."""
        if message.protocol_version != PROTOCOL_VERSION:
            return (f"protocol version {message.protocol_version} is not supported; "
                    f"this server speaks {PROTOCOL_VERSION}")
        if not verify_proof(self.token, nonce, message.proof):
            return "authentication failed: the worker does not know this run's token"
        task_id, worker_id = message.task_id, message.worker_id
        if task_id not in self.scheduler.tasks:
            return (f"unknown task {clip(repr(task_id))}; this server runs "
                    f"{clip(', '.join(map(repr, self.scheduler.tasks)))}")
        if worker_id not in self.expected_workers[task_id]:
            return (f"worker {worker_id} of task {task_id!r} was not started by this run "
                    f"(or has already exited)")
        if (task_id, worker_id) in self.connected_workers:
            return (f"worker {worker_id} of task {task_id!r} {ALREADY_CONNECTED}; one "
                    f"connection per worker at a time")
        return None

    def _authenticate(self, connection: WorkerConnection, message: Message) -> None:
        if type(message) is not Hello:
            raise ProtocolError(
                f"expected Hello as the first message, got {type(message).__name__}")
        reason = self._refusal(message, connection.nonce)
        if reason is not None:
            self.refused_hellos += 1
            self.warnings.warn("refused connections", self.clock(),
                               "refusing connection from %s: %s", connection.address, reason)
            connection.send(Refused(reason))
            connection.close()
            return
        connection.task_id = message.task_id
        connection.worker_id = message.worker_id
        self.connected_workers[(message.task_id, message.worker_id)] = connection
        if connection.handshake_timer is not None:
            IOLoop.current().remove_timeout(connection.handshake_timer)
            connection.handshake_timer = None
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

    def _hold(self, connection: WorkerConnection, block: Block) -> None:
        connection.held[block.index] = block
        self.holder[(block.task_id, block.index)] = connection

    def _may_hand_extra(self, connection: WorkerConnection) -> bool:
        """Whether a worker may take a block beyond the one it needs next: only while
        its hand holds less than its share of the ready blocks (ready blocks over
        started workers), so workers that start later, or ask later, find theirs."""
        task_id = connection.task_id
        return (len(connection.held) * max(len(self.expected_workers[task_id]), 1)
                < self.scheduler.task_states[task_id].ready_count)

    def _take_blocks(self, connection: WorkerConnection, want: int,
                     first_is_free: bool) -> list[Block]:
        """Up to ``want`` blocks for ``connection``, now held by it. Beyond the first
        one (when ``first_is_free``), blocks are taken only while
        :meth:`_may_hand_extra` says so."""
        task_id = connection.task_id
        blocks: list[Block] = []
        while len(blocks) < want:
            if (blocks or not first_is_free) and not self._may_hand_extra(connection):
                break
            block = self._next_block(task_id)
            if block is None:
                break
            self._hold(connection, block)
            blocks.append(block)
        return blocks

    def _answer(self, connection: WorkerConnection, blocks: list[Block]) -> None:
        self.blocks_handed_out += len(blocks)
        self.block_frames += 1
        if connection.batched:
            connection.send(BlocksAssigned(tuple(map(wire_block, blocks))))
        else:
            connection.send(BlockAssigned(wire_block(blocks[0])))

    def _request(self, connection: WorkerConnection, want: int, batched: bool) -> None:
        """Answer a request for ``want`` blocks now, or park it until a block is ready."""
        task_id = connection.task_id
        if connection.wants:
            raise ProtocolError(
                "a request for blocks while an earlier one of this connection still waits "
                "for its answer; ask again only after the answer")
        connection.batched = batched
        first_is_free = not batched or not connection.held
        blocks = self._take_blocks(connection, want, first_is_free)
        if blocks:
            self._answer(connection, blocks)
        elif self.scheduler.task_states[task_id].is_done():
            connection.send(NoMoreBlocks())
        else:
            connection.wants = want
            if first_is_free:
                self.waiting[task_id][connection] = None
            else:
                self.waiting_more[task_id][connection] = None

    def _acquire(self, connection: WorkerConnection) -> None:
        self._request(connection, 1, batched=False)

    def _report(self, connection: WorkerConnection, message: Report) -> None:
        """Record the results of a ``Report``, then answer or park its request."""
        connection.reports = True
        task_id = connection.task_id
        if message.results:
            for result in message.results:
                self._release_index(connection, task_id, result.index, result.status,
                                    result.error, serve=False)
            if connection.held:
                self.scheduler.restart_clock(task_id, connection.held, self.clock())
            elif connection in self.waiting_more[task_id]:
                del self.waiting_more[task_id][connection]
                self.waiting[task_id][connection] = None
        if message.want:
            self._request(connection, message.want, batched=True)
        self._serve_waiting()

    def _release(self, connection: WorkerConnection, wire: WireBlock, error: str | None) -> None:
        if wire.task_id != connection.task_id:
            self._ignore_release(connection, wire.task_id, wire.index)
            return
        self._release_index(connection, wire.task_id, wire.index, wire.status, error)

    def _ignore_release(self, connection: WorkerConnection, task_id: object,
                        index: int) -> None:
        self.ignored_releases += 1
        self.warnings.warn(
            "ignored releases", self.clock(),
            "worker %s of %r released block %s of %s that it does not hold; ignored",
            connection.worker_id, connection.task_id, index, clip(repr(task_id)))

    def _release_index(self, connection: WorkerConnection, task_id: str, index: int,
                       status_code: int, error: str | None, serve: bool = True) -> None:
        """Take back block ``index`` of the connection's task with its outcome."""
        block = connection.held.pop(index, None)
        if block is None:
            self._ignore_release(connection, task_id, index)
            return
        del self.holder[(task_id, index)]
        status = BlockStatus(status_code)
        if status == BlockStatus.SUCCESS:
            failure = self.scheduler.tasks[task_id].post_check_failure(block)
            if failure is not None:
                status = BlockStatus.FAILED
                error = failure
        elif status != BlockStatus.FAILED:
            error = error or f"released with status {status.name}"
            status = BlockStatus.FAILED
        self._give_back(block, status, error, connection.worker_id, serve=serve)

    def _cannot_work(self, connection: WorkerConnection, message: CannotWork) -> None:
        """A worker that cannot process any block: its block fails for good, its task
        stops (see ``BlockScheduler.stop``) and the worker is told there is no more."""
        wire = message.block
        block = connection.held.get(wire.index) if wire.task_id == connection.task_id else None
        if block is None:
            logger.warning("worker %s reported a block %s of %r it does not hold; ignored",
                           connection.worker_id, wire.index, wire.task_id)
        else:
            del connection.held[wire.index]
            del self.holder[(block.task_id, block.index)]
            if not self.scheduler.task_states[block.task_id].stop_reason:
                logger.error("worker %s cannot process any block of %r; stopping the task",
                             connection.worker_id, block.task_id)
            self._give_back(block, BlockStatus.FAILED, message.error, connection.worker_id,
                            fatal=True)
        connection.send(NoMoreBlocks())

    def _give_back(self, block: Block, status: BlockStatus, error: str | None,
                   worker_id: int | None, worker_lost: bool = False,
                   fatal: bool = False, serve: bool = True) -> None:
        block.status = status
        block.error = error
        if status == BlockStatus.FAILED and worker_id is not None:
            self.failed_workers[block.task_id].add(worker_id)
        outcome = self.scheduler.release(block, status, self.clock(), worker_lost=worker_lost,
                                         fatal=fatal)
        if outcome is ReleaseOutcome.COMPLETED:
            self.ledgers.record_done(block.task_id, block.index)
        elif outcome is ReleaseOutcome.FAILED:
            self.ledgers.record_failed(block.task_id, block.index, error)
            self.failed_by[(block.task_id, block.block_id[1])] = worker_id
        if serve:
            self._serve_waiting()

    def _serve_waiting(self) -> None:
        """Give newly ready blocks to parked requests, first to workers holding no
        block, then to workers asking for more in hand; tell them when a task is done."""
        for task_id, waiting in self.waiting.items():
            while waiting:
                connection = next(iter(waiting))
                if connection.closed:
                    del waiting[connection]
                    continue
                blocks = self._take_blocks(connection, connection.wants, True)
                if not blocks:
                    break
                del waiting[connection]
                connection.wants = 0
                self._answer(connection, blocks)
            more = self.waiting_more[task_id]
            state = self.scheduler.task_states[task_id]
            workers = max(len(self.expected_workers[task_id]), 1)
            # each of them holds a block: none may take more unless ready > workers
            for connection in list(more) if state.ready_count > workers else ():
                blocks = [] if connection.closed else self._take_blocks(
                    connection, connection.wants, False)
                if blocks or connection.closed:
                    del more[connection]
                if blocks:
                    connection.wants = 0
                    self._answer(connection, blocks)
                if state.ready_count <= workers:
                    break
            if (waiting or more) and state.is_done():
                for connection in (*waiting, *more):
                    connection.wants = 0
                    connection.send(NoMoreBlocks())
                waiting.clear()
                more.clear()

    def _give_back_unstarted(self, connection: WorkerConnection) -> None:
        """A reporting worker leaves (``Bye``) or was stopped: the blocks it holds in
        hand were never started; they are ready again at no cost, and a request of it
        still parked is dropped."""
        self.waiting[connection.task_id].pop(connection, None)
        self.waiting_more[connection.task_id].pop(connection, None)
        connection.wants = 0
        held = list(connection.held.values())
        connection.held.clear()
        for block in held:
            del self.holder[(block.task_id, block.index)]
            self.scheduler.return_unstarted(block)
        if held:
            self._serve_waiting()

    def _connection_lost(self, connection: WorkerConnection) -> None:
        """Take back the blocks of a connection that closed without ``Bye``: each failed
        with its worker and is retried (at least once). A worker with short blocks
        sends their results several at a time, so any block it held may have been
        the one that killed it; blocks it finished but had not reported are done
        again, never skipped."""
        held = list(connection.held.values())
        connection.held.clear()
        for block in held:
            del self.holder[(block.task_id, block.index)]
            logger.warning("worker %s of %r was lost while processing block %s; retrying it",
                           connection.worker_id, block.task_id, block.block_id[1])
            self._give_back(block, BlockStatus.FAILED,
                            f"worker {connection.worker_id} was lost while processing the block",
                            connection.worker_id, worker_lost=True, serve=False)
        if held:
            self._serve_waiting()

    def drop_worker(self, task_id: str, worker_id: int) -> None:
        """Close the connections of a worker its launcher saw end; its blocks go back
        to the scheduler (a dead node's connection may otherwise look open for long)."""
        for connection in list(self.connections):
            if connection.task_id == task_id and connection.worker_id == worker_id:
                connection.close()

    # ------------------------------------------------------------------ time
    def reclaim_expired(self) -> int:
        """Fail and retry blocks held past their task's timeout; stop their workers.

        Called periodically by the run; it also writes the summaries of warnings that
        were counted rather than logged.
        """
        now = self.clock()
        self.warnings.flush(now)
        reclaimed = 0
        for expired in self.scheduler.expired(now):
            connection = self.holder.get((expired.task_id, expired.index))
            if connection is None or connection.closed:
                continue  # its worker is being stopped: its blocks go back when it closes
            del self.holder[(expired.task_id, expired.index)]
            block = connection.held.pop(expired.index)
            timeout = self.scheduler.tasks[expired.task_id].timeout
            logger.warning("block %s of %r exceeded its timeout of %ss; stopping worker %s",
                           block.block_id[1], expired.task_id, timeout, connection.worker_id)
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
