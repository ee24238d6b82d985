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
from .protocol import (
    PROTOCOL_VERSION,
    Acquire,
    BlockAssigned,
    Bye,
    Challenge,
    Decoder,
    Hello,
    Message,
    NoMoreBlocks,
    Refused,
    Release,
    ReleaseAndAcquire,
    Welcome,
    WireBlock,
    encode,
    proof_for,
)

logger = logging.getLogger(__name__)






class _WireGeometry:
    """Builds a received block's ROIs only when they are asked for."""

    __slots__ = ("wire",)

    def __init__(self, wire: WireBlock) -> None:
        self.wire = wire

    def rois_of(self, index: int) -> tuple[Roi, Roi]:
        wire = self.wire
        return (Roi(wire.read_offset, wire.read_shape),
                Roi(wire.write_offset, wire.write_shape))


def block_from_wire(wire: WireBlock) -> Block:
    """A ``Block`` for a block received from the server."""
    block = block_from_rois(wire.task_id, wire.index, None, None, BlockStatus(wire.status))
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
            raise ContextError(
                f"worker context {dict(self.context)!r} lacks a valid {error}; it needs "
                f"hostname, port, task_id and worker_id") from None
        self._decoder = Decoder()
        self._inbox: list[Message] = []
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
        self._handshake(self.context.get("token"))

    # ------------------------------------------------------------------ wire
    def _send(self, message: Message) -> None:
        try:
            self._socket.sendall(encode(message))
        except OSError as error:
            raise ServerUnreachableError(
                f"lost the block server at {self.host}:{self.port}: {error}") from None

    def _receive(self) -> Message:
        while not self._inbox:
            try:
                data = self._socket.recv(1 << 16)
            except OSError as error:
                raise ServerUnreachableError(
                    f"lost the block server at {self.host}:{self.port}: {error}") from None
            if not data:
                raise ServerUnreachableError(
                    f"the block server at {self.host}:{self.port} closed the connection")
            self._inbox.extend(self._decoder.feed(data))
        return self._inbox.pop(0)

    def _handshake(self, token: str | None) -> None:
        challenge = self._receive()
        if type(challenge) is not Challenge:
            raise ProtocolError(f"expected Challenge from the server, got {challenge!r}")
        proof = proof_for(token, challenge.nonce) if token else ""
        self._send(Hello(PROTOCOL_VERSION, self.task_id, self.worker_id, proof))
        answer = self._receive()
        if type(answer) is Refused:
            raise RefusedByServerError(
                f"the block server refused worker {self.worker_id} of task "
                f"{self.task_id!r}: {answer.reason}")
        if type(answer) is not Welcome:
            raise ProtocolError(f"expected Welcome from the server, got {answer!r}")

    def _answer_to_block(self) -> Block | None:
        answer = self._receive()
        if type(answer) is BlockAssigned:
            return block_from_wire(answer.block)
        if type(answer) is NoMoreBlocks:
            return None
        raise ProtocolError(f"expected a block or NoMoreBlocks from the server, got {answer!r}")

    # ------------------------------------------------------------------ blocks
    def acquire(self) -> Block | None:
        """The next block to process, or None when the task is done (waits if needed)."""
        self._send(Acquire())
        return self._answer_to_block()

    def release(self, block: Block) -> None:
        """Return a processed block; ``block.status`` says SUCCESS or FAILED."""
        self._send(Release(wire_of(block), block.error))

    def release_and_acquire(self, block: Block) -> Block | None:
        """Return a processed block and get the next one in the same round trip."""
        self._send(ReleaseAndAcquire(wire_of(block), block.error))
        return self._answer_to_block()

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
            logger.error("block %s of task %r failed:\n%s", block.index, block.task_id,
                         block.error)
        else:
            if block.status != BlockStatus.FAILED:
                block.status = BlockStatus.SUCCESS
        self.release(block)

    def close(self) -> None:
        """Say goodbye and close the connection."""
        try:
            self._send(Bye())
        except ServerUnreachableError:
            pass
        watchdog.unwatch(self._socket)
        self._socket.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
