"""The block server: a tornado TCP server that carries out the hand-out's decisions.

A thin loop: read bytes, decode frames, turn each message into an event for the
:class:`~luigi_daisy.handout.HandOut` (the sans-I/O state machine of who holds which
block) and carry out the instructions it returns: frames to workers, records in the
ledgers, workers stopped. Check functions run on a thread beside the loop, and their
answers come back as events; ledger commits happen on the ledgers' own writer.

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
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpserver import TCPServer

from .blocks import Block, BlockStatus
from .errors import ProtocolError, ServerConfigError
from .handout import (
    BlocksBecameReady,
    Event,
    HandOut,
    Instruction,
    PostCheckAnswered,
    PreCheckAnswered,
    RecordDone,
    RecordFailed,
    Reported,
    RunEnding,
    RunPostCheck,
    RunPreCheck,
    SendBlocks,
    SendNoMoreBlocks,
    StopWorker,
    Tick,
    Warn,
    WorkerCannotWork,
    WorkerJoined,
    WorkerLeft,
    WorkerLost,
)
from .ledger import LedgerSet
from .listening import bind_listening_sockets
from .log_limits import WarningTally, clip
from .protocol import (
    ALREADY_CONNECTED,
    CLIENT_MESSAGES,
    PROTOCOL_VERSION,
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
    Report,
    Welcome,
    WireBlock,
    encode,
    new_nonce,
    new_token,
    verify_proof,
)
from .scheduler import BlockScheduler, TaskState
from .summary import with_log

logger = logging.getLogger(__name__)

_READ_CHUNK = 1 << 16

#: bytes a connection may send before its ``Hello`` is complete (a real one is < 1 KiB)
MAX_HELLO_BYTES = 64 * 1024
#: seconds between a launcher seeing a worker end and the server closing its connection
DROP_GRACE = 1.0
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


_PROCESSING = int(BlockStatus.PROCESSING)


def wire_block(block: Block) -> WireBlock:
    """The wire form of a block handed out by the scheduler (no ``Roi`` is built); a
    block on its way to a worker is ``PROCESSING``."""
    grid = block._grid
    read_begin, read_shape, write_begin, write_shape = grid.bounds_of(block.index)
    return WireBlock(block.task_id, block.index, read_begin, read_shape, write_begin,
                     write_shape, _PROCESSING, grid.number_of(block.index))


def _keep_alive(stream: IOStream) -> None:
    """Let the kernel probe idle connections, so a vanished worker host is noticed
    (its block goes back to the scheduler) within about a minute."""
    sock = stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class WorkerConnection:
    """Server-side record of one worker connection: its bytes and who it proved to be.
    Which blocks it holds is the hand-out's business (:class:`~luigi_daisy.handout.
    HandOut`), where the connection is the worker's key."""

    __slots__ = ("stream", "address", "nonce", "task_id", "worker_id", "closed",
                 "buffered", "handshake_timer", "forgotten")

    def __init__(self, stream: IOStream, address) -> None:
        self.stream = stream
        self.address = address
        self.nonce = new_nonce()
        self.task_id: str | None = None
        self.worker_id: int | None = None
        self.closed = False
        self.buffered = 0
        self.handshake_timer: object | None = None
        #: the server dropped every trace of it (see ``BlockServer._forget_connection``)
        self.forgotten = False

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
        """Close the connection (the read loop then tells the hand-out)."""
        self.closed = True
        self.stream.close()


class BlockServer(TCPServer):
    """Serves the blocks of a :class:`BlockScheduler` to workers over TCP.

    Bytes, limits and authentication are its own; who gets which block is decided by
    its :class:`~luigi_daisy.handout.HandOut` (``self.handout``), whose instructions it
    carries out: frames to workers, records in the ledgers, workers stopped, check
    functions run on a thread beside the loop.

    Parameters
    ----------
    scheduler:
        The scheduler whose blocks are served. Check functions of its tasks are called
        on a thread of the server, never inside the scheduler nor on the loop.
    host:
        Interface to listen on.
    token:
        Secret every connection must prove, on every interface; a fresh one is made
        when none is given. Workers get it in their context (environment), never on a
        command line.
    clock:
        Source of the time passed to the hand-out and to the warning tally.
    on_worker_timeout:
        Called with ``(task_id, worker_id)`` when a worker held a block past its
        task's timeout; the run stops that worker.
    ledgers:
        Where finished blocks are recorded; the server is the ledgers' only writer.
    limits:
        Bounds on connections, handshakes and buffered bytes (:class:`ServerLimits`).
    pools, pool_policy:
        Pools of workers that serve several tasks, and how their next task is chosen
        (see :class:`~luigi_daisy.handout.HandOut`).

    Only workers announced with :meth:`expect_worker` are welcomed, one connection
    per worker id at a time.
    """

    def __init__(self, scheduler: BlockScheduler, host: str = "127.0.0.1",
                 token: str | None = None, clock: Callable[[], float] = time.monotonic,
                 on_worker_timeout: Callable[[str, int | None], None] | None = None,
                 ledgers: LedgerSet | None = None,
                 limits: ServerLimits | None = None,
                 pools: Mapping[str, Iterable[str]] | None = None,
                 pool_policy: str = "downstream") -> None:
        super().__init__(max_buffer_size=1 << 22)
        self.scheduler = scheduler
        self.handout = HandOut(scheduler, pools, pool_policy)
        self.host = host
        self.token: str = token or new_token()
        self.clock = clock
        self.on_worker_timeout = on_worker_timeout
        self.ledgers = ledgers if ledgers is not None else LedgerSet({})
        self.limits = limits if limits is not None else ServerLimits()
        self.port: int | None = None
        self.connections: set[WorkerConnection] = set()
        self.buffered_bytes = 0
        # highest total seen, before shedding: the bound plus at most one read chunk
        self.peak_buffered_bytes = 0
        self.warnings = WarningTally(logger)
        self.protocol_errors = 0
        self.refused_hellos = 0
        self.refused_connections = 0
        self.handshake_timeouts = 0
        self.shed_connections = 0
        #: workers stopped because a block of theirs ran past its task's timeout
        self.workers_stopped = 0
        #: ``(task_id, worker_id) -> path`` of the log that holds a worker's output,
        #: recorded with each failure (set by the run that started the workers)
        self.failure_log: Callable[[str, int | None], str | None] | None = None
        self._checks: ThreadPoolExecutor | None = None
        self._closed = False

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

    @property
    def connected_workers(self) -> dict[tuple[str, int], WorkerConnection]:
        """``(task_id, worker_id) -> connection`` of the workers connected now."""
        return self.handout.connected  # type: ignore[return-value]

    @property
    def failed_workers(self) -> dict[str, set[int]]:
        """Ids of the workers that failed blocks, per task."""
        return self.handout.failed_workers

    @property
    def failed_by(self) -> dict[tuple[str, int], int | None]:
        """``(task_id, daisy block id) -> worker id`` of the blocks that failed for good."""
        return self.handout.failed_by

    @property
    def ignored_releases(self) -> int:
        """Results of blocks their worker did not hold (ignored)."""
        return self.handout.ignored_results

    @property
    def blocks_handed_out(self) -> int:
        """Blocks handed out so far."""
        return self.handout.blocks_handed_out

    @property
    def block_frames(self) -> int:
        """Frames that carried the blocks handed out (a batch carries several)."""
        return self.handout.block_frames

    def end_run(self) -> None:
        """The run ends: workers closed from now on were not lost, and requests that
        wait are told there are no more blocks."""
        if not self.handout.ending:
            self._feed(RunEnding())

    def close_all(self) -> None:
        """Stop listening, close every connection and log the warning counts left."""
        self.end_run()
        self._closed = True
        self.stop()
        for connection in list(self.connections):
            self._close(connection)
        if self._checks is not None:
            self._checks.shutdown(wait=False, cancel_futures=True)
        self.warnings.flush(self.clock(), force=True)

    # ------------------------------------------------------------------ workers
    def expect_worker(self, task_id: str, worker_id: int) -> None:
        """Welcome a connection of ``worker_id`` for ``task_id`` (the run started it)."""
        self.handout.expect_worker(task_id, worker_id)

    def forget_worker(self, task_id: str, worker_id: int) -> None:
        """Refuse new connections of ``worker_id`` from now on (its process is gone)."""
        self.handout.forget_worker(task_id, worker_id)

    def drop_worker(self, task_id: str, worker_id: int) -> None:
        """Close the connections of a worker its launcher saw end, :data:`DROP_GRACE`
        seconds from now; its blocks go back to the scheduler (a dead node's
        connection may otherwise look open for long). The grace lets what the worker
        sent before it ended (the result of its last block) be read first: a process
        that exits closes its connection itself, and the loop reads to the end."""
        loop = IOLoop.current()
        for connection in list(self.connections):
            if connection.task_id == task_id and connection.worker_id == worker_id:
                loop.call_later(DROP_GRACE, self._close, connection)

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
            self._account_buffer(connection, 0)
            self._forget_connection(connection)

    def _close(self, connection: WorkerConnection) -> None:
        """Close a connection and tell the hand-out at once, so that no block is handed
        to a connection that can no longer take it."""
        connection.close()
        self._forget_connection(connection)

    def _forget_connection(self, connection: WorkerConnection) -> None:
        """Drop every trace of a closed connection (once); its blocks go back to the
        scheduler."""
        if connection.forgotten:
            return
        connection.forgotten = True
        self.connections.discard(connection)
        if connection.buffered:
            self._account_buffer(connection, 0)
        if connection.handshake_timer is not None:
            IOLoop.current().remove_timeout(connection.handshake_timer)
            connection.handshake_timer = None
        if connection.authenticated:
            self._feed(WorkerLost(connection))

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
            self._close(connection)

    def _dispatch(self, connection: WorkerConnection, message: Message) -> None:
        if not connection.authenticated:
            self._authenticate(connection, message)
            return
        kind = type(message)
        if kind is Report:
            self._feed(Reported(connection, message.results, message.want))
        elif kind is CannotWork:
            wire = message.block
            self._feed(WorkerCannotWork(connection, wire.task_id, wire.index, message.error))
        elif kind is Heartbeat:
            pass
        elif kind is Bye:
            self._feed(WorkerLeft(connection))
            self._close(connection)

    def _refusal(self, message: Hello, nonce: str) -> str | None:
        """Why a ``Hello`` is refused, or None when it is welcome."""
        if message.protocol_version != PROTOCOL_VERSION:
            return (f"protocol version {message.protocol_version} is not supported; "
                    f"this server speaks {PROTOCOL_VERSION}")
        if not verify_proof(self.token, nonce, message.proof):
            return "authentication failed: the worker does not know this run's token"
        task_id, worker_id = message.task_id, message.worker_id
        if not self.handout.is_home(task_id):
            return (f"unknown task {clip(repr(task_id))}; this server runs "
                    f"{clip(', '.join(map(repr, self.scheduler.tasks)))}")
        if not self.handout.is_expected(task_id, worker_id):
            return (f"worker {worker_id} of task {task_id!r} was not started by this run "
                    f"(or has already exited)")
        if self.handout.is_connected(task_id, worker_id):
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
        self._feed(WorkerJoined(connection, message.task_id, message.worker_id))
        if connection.handshake_timer is not None:
            IOLoop.current().remove_timeout(connection.handshake_timer)
            connection.handshake_timer = None
        connection.send(Welcome())

    # ------------------------------------------------------------------ instructions
    def _feed(self, event: Event) -> None:
        """Give an event to the hand-out and carry out what it says."""
        self._carry_out(self.handout.handle(event, self.clock()))

    def _carry_out(self, instructions: list[Instruction]) -> None:
        for instruction in instructions:
            kind = type(instruction)
            if kind is SendBlocks:
                instruction.worker.send(BlocksAssigned(tuple(map(wire_block,
                                                                 instruction.blocks))))
            elif kind is RecordDone:
                self.ledgers.record_done(instruction.task_id, instruction.index)
            elif kind is SendNoMoreBlocks:
                instruction.worker.send(NoMoreBlocks())
            elif kind is RecordFailed:
                log = (self.failure_log(instruction.task_id, instruction.worker_id)
                       if self.failure_log is not None else None)
                self.ledgers.record_failed(instruction.task_id, instruction.index,
                                           with_log(instruction.error, log))
            elif kind is Warn:
                self.warnings.warn(instruction.kind, self.clock(), "%s", instruction.text)
            elif kind is StopWorker:
                self.workers_stopped += 1
                if self.on_worker_timeout is not None:
                    self.on_worker_timeout(instruction.task_id, instruction.worker_id)
                self._close(instruction.worker)
            elif kind is RunPreCheck or kind is RunPostCheck:
                self._run_check(instruction)

    def _run_check(self, instruction: RunPreCheck | RunPostCheck) -> None:
        """Run a task's check function on the server's check thread (never on the
        loop: a check may query a database or a slow filesystem); its answer comes
        back to the hand-out on the loop. Checks run one at a time, in order, as
        they would in daisy's scheduler."""
        if self._closed:
            return
        if self._checks is None:
            self._checks = ThreadPoolExecutor(max_workers=1,
                                              thread_name_prefix="luigi_daisy-checks")
        block = instruction.block
        task = self.scheduler.tasks[block.task_id]
        loop = IOLoop.current()
        if type(instruction) is RunPreCheck:
            future = self._checks.submit(task.is_done_already, block)

            def answer(done) -> Event:
                return PreCheckAnswered(block, bool(done))
        else:
            worker_id = instruction.worker_id
            future = self._checks.submit(task.post_check_failure, block)

            def answer(failure) -> Event:
                return PostCheckAnswered(block, worker_id, failure)

        def answered(finished) -> None:
            if self._closed or finished.cancelled():
                return
            self._feed(answer(finished.result()))

        loop.add_future(future, answered)

    # ------------------------------------------------------------------ time
    def reclaim_expired(self) -> int:
        """Fail and retry blocks that run past their task's timeout and stop their
        workers (the rest of their hands go back free); return how many.

        Called periodically by the run; it also writes the summaries of warnings that
        were counted rather than logged.
        """
        self.warnings.flush(self.clock())
        stopped = self.workers_stopped
        self._feed(Tick())
        return self.workers_stopped - stopped

    def serve_waiting(self) -> None:
        """Hand blocks made ready outside a release (blocks another run finished) to
        parked workers, and tell those of finished tasks that nothing more will come."""
        self._feed(BlocksBecameReady())
