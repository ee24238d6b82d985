"""``Client``: a worker's connection to the block server (blocking sockets, no event loop).

::

    client = Client()                      # context from LUIGI_DAISY_CONTEXT / DAISY_CONTEXT
    while True:
        with client.acquire_block() as block:
            if block is None:
                break
            process(block)                 # an exception fails this block only

Workers use plain sockets rather than tornado: they may be forked from a process whose
event loop is running, and an IOLoop does not survive ``fork``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
import traceback
from collections.abc import Iterator

from funlib.geometry import Roi

from . import watchdog
from .blocks import Block, BlockStatus, block_from_rois
from .context import Context
from .errors import (
    ContextError,
    ProtocolError,
    RefusedByServerError,
    ServerUnreachableError,
)
from .hand import DEFAULT_PREFETCH, MAX_PREFETCH, Hand
from .protocol import (
    ALREADY_CONNECTED,
    PROTOCOL_VERSION,
    BlockResult,
    BlocksAssigned,
    Bye,
    CannotWork,
    Challenge,
    Decoder,
    Hello,
    Message,
    NoMoreBlocks,
    Refused,
    Report,
    Welcome,
    WireBlock,
    encode,
    proof_for,
)

logger = logging.getLogger(__name__)

#: seconds ``Client.close`` waits for the server to close its end after ``Bye``
CLOSE_TIMEOUT = 5.0
#: seconds a new ``Client`` keeps trying while its worker id is still connected (an
#: earlier connection of this worker dropped without ``close`` and the server has not
#: noticed yet), and the first pause between two tries (doubled after each)
RECONNECT_GRACE = 2.0
RECONNECT_PAUSE = 0.01



class _WireGeometry:
    """Builds a received block's ROIs only when they are asked for."""

    __slots__ = ("wire",)

    def __init__(self, wire: WireBlock) -> None:
        self.wire = wire

    def rois_of(self, index: int) -> tuple[Roi, Roi]:
        wire = self.wire
        return (Roi(wire.read_offset, wire.read_shape),
                Roi(wire.write_offset, wire.write_shape))


def _prefetch_of(context: Context) -> int:
    """The ``prefetch`` key of a worker context: blocks to keep in hand (0 to
    :data:`MAX_PREFETCH`)."""
    value = context.get("prefetch", str(DEFAULT_PREFETCH))
    try:
        prefetch = int(value)
    except (TypeError, ValueError):
        prefetch = -1
    if not 0 <= prefetch <= MAX_PREFETCH:
        raise ContextError(
            f"the worker context's prefetch is {value!r}; it must be an integer from 0 "
            f"to {MAX_PREFETCH} (blocks a worker keeps in hand)")
    return prefetch


def block_from_wire(wire: WireBlock) -> Block:
    """A ``Block`` for a block received from the server; a worker holding it is processing
    it, so its status is ``PROCESSING`` (as daisy's ``Client`` sets it)."""
    block = block_from_rois(wire.task_id, wire.index, wire.number, None, None,
                            BlockStatus.PROCESSING)
    block._rois = None
    block._grid = _WireGeometry(wire)
    return block


def wire_of(block: Block) -> WireBlock:
    """The wire form of a block received from the server, with its current status."""
    geometry = block._grid
    if isinstance(geometry, _WireGeometry):
        wire = geometry.wire
        return WireBlock(wire.task_id, wire.index, wire.read_offset, wire.read_shape,
                         wire.write_offset, wire.write_shape, int(block.status))
    read_roi, write_roi = block.read_roi, block.write_roi
    return WireBlock(block.task_id, block.index, tuple(read_roi.begin), tuple(read_roi.shape),
                     tuple(write_roi.begin), tuple(write_roi.shape), int(block.status))


class Client:
    """A worker's connection to the block server of a run.

    Parameters
    ----------
    context:
        Where the server is and who this worker is; read from the environment
        (``LUIGI_DAISY_CONTEXT``, or daisy's ``DAISY_CONTEXT``) when not given.
    connect_timeout:
        Seconds to wait for the server before giving up with a clear error.
    """

    def __init__(self, context: Context | None = None, connect_timeout: float = 30.0) -> None:
        self.context = context if context is not None else Context.from_env()
        try:
            self.host = self.context["hostname"]
            self.port = int(self.context["port"])
            self.task_id = self.context["task_id"]
            self.worker_id = int(self.context.get("worker_id", 0))
        except (KeyError, ValueError) as error:
            shown = {key: value for key, value in self.context.items() if key != "token"}
            raise ContextError(
                f"worker context {shown!r} lacks a valid {error}; it needs "
                f"hostname, port, task_id, worker_id and token") from None
        self.prefetch = _prefetch_of(self.context)
        token = self.context.get("token")
        if not token:
            raise ContextError(
                f"the worker context for task {self.task_id!r} has no token: every block "
                f"server requires its run's token; a Client runs inside a worker started "
                f"by the run, whose context carries it")
        deadline = time.monotonic() + min(connect_timeout, RECONNECT_GRACE)
        pause = RECONNECT_PAUSE
        while True:
            self._connect(connect_timeout)
            refusal = self._handshake(token)
            if refusal is None:
                return
            self._socket.close()
            if ALREADY_CONNECTED not in refusal or time.monotonic() >= deadline:
                raise RefusedByServerError(
                    f"the block server refused worker {self.worker_id} of task "
                    f"{self.task_id!r}: {refusal}")
            time.sleep(pause)  # the server has not yet seen our last connection close
            pause = min(2 * pause, 0.25)

    def _connect(self, connect_timeout: float) -> None:
        self._decoder = Decoder()
        self._inbox: list[Message] = []
        self._hand: Hand[Block] = Hand(self.prefetch)
        self._asked_at = 0.0
        self._handed_at = 0.0
        try:
            self._socket = socket.create_connection((self.host, self.port),
                                                    timeout=connect_timeout)
        except OSError as error:
            raise ServerUnreachableError(
                f"cannot reach the block server at {self.host}:{self.port} for task "
                f"{self.task_id!r}: {error}; is the run still going?") from None
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        watchdog.watch(self._socket)
        self._socket.settimeout(None)

    # ------------------------------------------------------------------ wire
    def _send(self, message: Message) -> None:
        try:
            self._socket.sendall(encode(message))
        except OSError as error:
            raise ServerUnreachableError(
                f"lost the block server at {self.host}:{self.port}: {error}") from None

    def _read(self, flags: int = 0) -> bool:
        """Read what the server sent into the inbox; False when nothing was there
        (only with ``socket.MSG_DONTWAIT``)."""
        try:
            data = self._socket.recv(1 << 16, flags)
        except BlockingIOError:
            return False
        except OSError as error:
            raise ServerUnreachableError(
                f"lost the block server at {self.host}:{self.port}: {error}") from None
        if not data:
            raise ServerUnreachableError(
                f"the block server at {self.host}:{self.port} closed the connection")
        self._inbox.extend(self._decoder.feed(data))
        return True

    def _receive(self) -> Message:
        while not self._inbox:
            self._read()
        return self._inbox.pop(0)

    def _handshake(self, token: str) -> str | None:
        """Prove the token; None when welcome, else the server's reason for refusing."""
        challenge = self._receive()
        if type(challenge) is not Challenge:
            raise ProtocolError(f"expected Challenge from the server, got {challenge!r}")
        proof = proof_for(token, challenge.nonce)
        self._send(Hello(PROTOCOL_VERSION, self.task_id, self.worker_id, proof))
        answer = self._receive()
        if type(answer) is Refused:
            return answer.reason
        if type(answer) is not Welcome:
            raise ProtocolError(f"expected Welcome from the server, got {answer!r}")
        return None

    # ------------------------------------------------------------------ blocks
    def acquire(self) -> Block | None:
        """The next block to process, or None when the task is done (waits if needed)."""
        self._send(Report((), 1))
        answer = self._receive()
        if type(answer) is BlocksAssigned:
            if len(answer.blocks) != 1:
                raise ProtocolError(
                    f"the server sent {len(answer.blocks)} blocks for a request of 1")
            return block_from_wire(answer.blocks[0])
        if type(answer) is NoMoreBlocks:
            return None
        raise ProtocolError(f"expected a block or NoMoreBlocks from the server, got {answer!r}")

    def release(self, block: Block) -> None:
        """Return a processed block; ``block.status`` says SUCCESS or FAILED."""
        self._send(Report((self._result_of(block),), 0))

    # ------------------------------------------------------------- worker loop
    def next_block(self, finished: Block | None = None) -> Block | None:
        """Report ``finished`` (if given) and return the next block, or None when the
        task is done: the worker loop's one call per block.

        Keeps blocks in hand so the worker never waits for its next one: ``prefetch``
        of them (from the context), or, for blocks shorter than a second or two round
        trips, that much work, asked for and reported several per frame (see
        :class:`~luigi_daisy.hand.Hand`). ``finished.status`` must say SUCCESS or
        FAILED; any other status fails the block with an error that says so.
        """
        hand = self._hand
        if finished is not None:
            self.report(finished)
        if hand.asked:
            self._poll()
        want = hand.to_ask()
        if want or hand.results:
            # the result travels before the next block starts: a worker that dies in
            # that block cannot take a finished one with it
            self._send_report(want)
        if hand.must_wait():
            self._wait_for_answer()
        if hand.blocks:
            self._handed_at = time.perf_counter()
            return hand.blocks.popleft()
        return None

    def report(self, block: Block) -> None:
        """Note the outcome of a block from :meth:`next_block` (``block.status`` SUCCESS
        or FAILED); it goes to the server with the next call of :meth:`next_block`,
        before the next block starts, or on :meth:`close`."""
        self._hand.finished(self._result_of(block), time.perf_counter() - self._handed_at)

    @staticmethod
    def _result_of(block: Block) -> BlockResult:
        """The wire result of a processed block; a status other than SUCCESS or FAILED
        fails it with an error that says so."""
        status, error = int(block.status), block.error
        if status not in (BlockStatus.SUCCESS, BlockStatus.FAILED):
            error = (f"block {block.block_id[1]} of task {block.task_id!r} was reported "
                     f"with status {BlockStatus(status).name}; set it to SUCCESS or FAILED")
            status = int(BlockStatus.FAILED)
        return BlockResult(block.index, status, error)

    def _send_report(self, want: int) -> None:
        self._send(Report(self._hand.take_results(want), want))
        if want:
            self._asked_at = time.perf_counter()

    def _take_answer(self, message: Message, exact: bool) -> None:
        hand = self._hand
        seconds = time.perf_counter() - self._asked_at
        if type(message) is BlocksAssigned:
            if len(message.blocks) > hand.asked:
                raise ProtocolError(
                    f"the server sent {len(message.blocks)} blocks for a request of "
                    f"{hand.asked}")
            hand.answered(list(map(block_from_wire, message.blocks)), seconds, exact)
        elif type(message) is NoMoreBlocks:
            hand.answered(None, seconds, exact)
        else:
            raise ProtocolError(
                f"expected blocks or NoMoreBlocks from the server, got {message!r}")

    def _wait_for_answer(self) -> None:
        self._take_answer(self._receive(), exact=True)

    def _poll(self) -> None:
        """Take the answer to the waiting request if it has arrived (never waits)."""
        if not self._inbox and not self._read(socket.MSG_DONTWAIT):
            return
        if self._inbox:
            self._take_answer(self._inbox.pop(0), exact=False)

    def cannot_work(self, block: Block, error: str) -> None:
        """Tell the server this worker cannot process any block of ``block``'s task (an
        error every block would repeat): ``block`` fails for good and the task stops.
        Waits for the server's answer, so the task is stopped before this worker exits
        (or, in a pool, goes on with other tasks: blocks that arrive meanwhile are kept
        in hand)."""
        block.status = BlockStatus.FAILED
        block.error = error
        if self._hand.results:
            self._send_report(0)
        self._send(CannotWork(wire_of(block), error))
        while True:  # answers to earlier requests come first
            answer = self._receive()
            if type(answer) is NoMoreBlocks:
                break
            if type(answer) is not BlocksAssigned:
                raise ProtocolError(
                    f"expected blocks or NoMoreBlocks from the server, got {answer!r}")
            self._hand.blocks.extend(map(block_from_wire, answer.blocks))
        self._hand.asked = 0

    @contextlib.contextmanager
    def acquire_block(self) -> Iterator[Block | None]:
        """Context manager around one block: yields None when the task is done.

        Leaving the ``with`` normally marks the block SUCCESS (unless it was set to
        FAILED); an exception marks it FAILED with its traceback, is logged, and does
        not propagate, so the worker goes on to the next block.
        """
        block = self.acquire()
        if block is None:
            yield None
            return
        try:
            yield block
        except Exception:  # noqa: BLE001 - an exception fails the block, not the worker
            block.status = BlockStatus.FAILED
            block.error = traceback.format_exc()
            logger.error("block %s of task %r failed:\n%s", block.block_id[1], block.task_id,
                         block.error)
        else:
            if block.status != BlockStatus.FAILED:
                block.status = BlockStatus.SUCCESS
        self.release(block)

    def close(self) -> None:
        """Say goodbye and close the connection.

        Waits (at most :data:`CLOSE_TIMEOUT` seconds) until the server has closed its
        end, so that a new ``Client`` under the same worker id, made right after, is
        not refused as already connected.
        """
        try:
            if self._hand.results:
                self._send_report(0)
            self._send(Bye())  # blocks still in hand go back unstarted
            said_goodbye = True
        except ServerUnreachableError:
            said_goodbye = False
        watchdog.unwatch(self._socket)
        if said_goodbye:
            try:
                self._socket.settimeout(CLOSE_TIMEOUT)
                while self._socket.recv(1 << 16):
                    pass
            except OSError:
                pass
        self._socket.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
