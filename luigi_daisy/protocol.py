"""Wire protocol between the block server and its workers (sans-I/O).

Frames
------
Every frame is a 4-byte big-endian unsigned payload length followed by the payload.
The payload is one byte of message type code followed by a compact UTF-8 JSON object
(the message body). No pickle is used anywhere: only the closed set of messages defined
here can cross the wire, and every field is validated when it is decoded.

Conversation
------------
::

    server -> client   Challenge(nonce)                  first frame on every connection
    client -> server   Hello(version, task_id, worker_id, proof)
    server -> client   Welcome()  or  Refused(reason) and close
    client -> server   Report(results, want)             finished blocks, and want more
    server -> client   BlocksAssigned(blocks)  or  NoMoreBlocks()    answer to want > 0
    client -> server   CannotWork(block, error)          no block of this task can work
    server -> client   NoMoreBlocks()                    answer to CannotWork
    either             Heartbeat()
    client -> server   Bye()                             then the server closes

``Report`` is the one message of the worker's side of the conversation: it carries
the results of finished blocks, up to :data:`MAX_BATCH_BLOCKS`, and asks for up to as
many more (``want``). A worker keeps blocks in hand (prefetch, batches of short blocks)
and processes them in the order they were sent; the result of each block is sent
before the next one starts, so the server always knows which block was running when a
worker died. A connection has at most one request (a ``Report`` with ``want > 0``)
waiting for its answer: the block server closes a connection that asks again before
the answer came. A worker that says ``Bye`` with blocks in hand gives them back
unstarted. A block is released only by the connection it was assigned to; other
results for it are ignored.

Version 2 retired the one-block messages of version 1 (``Acquire``,
``BlockAssigned``, ``Release``, ``ReleaseAndAcquire``; type codes 5, 6, 7 and 10 are
not reused).

The module holds no sockets, threads or clocks: :func:`encode` turns a message into the
bytes of one frame and :class:`Decoder` turns bytes, in whatever chunks they arrive,
into messages.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, NoReturn

from luigi_daisy.context import new_token
from luigi_daisy.errors import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_FRAME_BYTES",
    "MAX_ERROR_CHARS",
    "MAX_DIMS",
    "MAX_NONCE_CHARS",
    "PROOF_CHARS",
    "ALREADY_CONNECTED",
    "Message",
    "WireBlock",
    "Challenge",
    "Hello",
    "Welcome",
    "Refused",
    "Heartbeat",
    "Bye",
    "NoMoreBlocks",
    "CannotWork",
    "BlockResult",
    "Report",
    "BlocksAssigned",
    "MAX_BATCH_BLOCKS",
    "MESSAGE_TYPES",
    "CLIENT_MESSAGES",
    "SERVER_MESSAGES",
    "encode",
    "Decoder",
    "truncate_error",
    "proof_for",
    "verify_proof",
    "new_nonce",
    "new_token",
]

PROTOCOL_VERSION = 2
"""Version sent in :class:`Hello`; the server refuses workers that speak another one."""

MAX_FRAME_BYTES = 1 << 20
"""Default limit on a frame's payload length (type byte plus JSON body), in bytes."""

MAX_ERROR_CHARS = 64 * 1024
"""Error and refusal texts longer than this are truncated (see :func:`truncate_error`)."""

MAX_DIMS = 8
"""Most dimensions a block may have on the wire."""

MAX_BATCH_BLOCKS = 64
"""Most blocks one :class:`BlocksAssigned` carries, and most results and blocks one
:class:`Report` carries or asks for."""

MAX_NONCE_CHARS = 256
"""Longest nonce accepted in a :class:`Challenge`."""

PROOF_CHARS = 64
"""Length of a non-empty proof: the hex digest of HMAC-SHA256."""

ALREADY_CONNECTED = "is already connected"
"""Words of a :class:`Refused` reason for a worker id that has a connection open. A
client whose previous connection just closed retries briefly: the server may not have
seen that close yet."""

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_INT32_MAX = (1 << 31) - 1
_STATUS_MAX = 3  # CREATED, PROCESSING, SUCCESS, FAILED
_RESULT_STATUSES = (2, 3)  # SUCCESS, FAILED
_HEADER = struct.Struct(">I")
_HEADER_AND_CODE = struct.Struct(">IB")
_HEADER_BYTES = _HEADER.size
_MIN_FRAME_LIMIT = 3  # type byte plus "{}"
_MAX_FRAME_LIMIT = (1 << 32) - 1
_LOWER_HEX = re.compile(r"[0-9a-f]+")
_TRUNCATION_HEAD = MAX_ERROR_CHARS // 4
_TRUNCATION_MARKER_RESERVE = 64
_REPR_LIMIT = 80


# ----------------------------------------------------------------------------- errors


def _short_repr(value: object) -> str:
    """Return ``repr(value)`` cut to a length that fits an error message."""
    text = repr(value)
    if len(text) > _REPR_LIMIT:
        return text[: _REPR_LIMIT - 3] + "..."
    return text


def _fail(where: str, expected: str, value: object) -> NoReturn:
    """Raise a :class:`ProtocolError` naming the message field ``where``."""
    raise ProtocolError(f"{where}: expected {expected}, got {_short_repr(value)}")


# ------------------------------------------------------------------------- validators


def _is_text(value: object) -> bool:
    """Whether ``value`` is a str that can be encoded as UTF-8 (no lone surrogates)."""
    if type(value) is not str:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: object, where: str) -> str:
    """Validate a str field."""
    if not _is_text(value):
        _fail(where, "a string", value)
    return value  # type: ignore[return-value]


def _optional_error(value: object, where: str) -> str | None:
    """Validate an error text field: null, or a string of at most MAX_ERROR_CHARS."""
    if value is None:
        return None
    if not _is_text(value) or len(value) > MAX_ERROR_CHARS:  # type: ignore[arg-type]
        _fail(where, f"null or a string of at most {MAX_ERROR_CHARS} characters", value)
    return value  # type: ignore[return-value]


def _bounded_text(value: object, where: str) -> str:
    """Validate a str field of at most MAX_ERROR_CHARS characters."""
    if not _is_text(value) or len(value) > MAX_ERROR_CHARS:  # type: ignore[arg-type]
        _fail(where, f"a string of at most {MAX_ERROR_CHARS} characters", value)
    return value  # type: ignore[return-value]


def _integer(value: object, where: str, minimum: int, maximum: int) -> int:
    """Validate an int field (bools are not ints here) within ``[minimum, maximum]``."""
    if type(value) is not int or not minimum <= value <= maximum:
        _fail(where, f"an integer in [{minimum}, {maximum}]", value)
    return value


def _int_tuple(value: object, where: str, minimum: int) -> tuple[int, ...]:
    """Validate a list of 1..MAX_DIMS ints, each in ``[minimum, int64 max]``."""
    if type(value) is not list or not 1 <= len(value) <= MAX_DIMS:
        _fail(where, f"a list of 1 to {MAX_DIMS} integers", value)
    for position, item in enumerate(value):
        if type(item) is not int or not minimum <= item <= _INT64_MAX:
            _fail(f"{where}[{position}]", f"an integer in [{minimum}, {_INT64_MAX}]", item)
    return tuple(value)


def _lower_hex(value: object, where: str, max_chars: int) -> str:
    """Validate a non-empty lowercase hexadecimal string of at most ``max_chars``."""
    if (
        type(value) is not str
        or not 1 <= len(value) <= max_chars
        or _LOWER_HEX.fullmatch(value) is None
    ):
        _fail(where, f"1 to {max_chars} lowercase hexadecimal characters", value)
    return value


def _proof(value: object, where: str) -> str:
    """Validate a proof: empty, or PROOF_CHARS lowercase hexadecimal characters."""
    if value == "":
        return ""
    if type(value) is not str or len(value) != PROOF_CHARS or not _LOWER_HEX.fullmatch(value):
        _fail(where, f'"" or {PROOF_CHARS} lowercase hexadecimal characters', value)
    return value


# ----------------------------------------------------------------------- error texts


def truncate_error(text: str) -> str:
    """Make an error text safe and small enough for the wire.

    Lone surrogates (for example from file names decoded with ``surrogateescape``) are
    replaced by backslash escapes, and a text longer than :data:`MAX_ERROR_CHARS` keeps
    its head and its tail (where a traceback names the exception) around a marker
    saying how many characters were cut.

    Parameters
    ----------
    text:
        Any string, typically a formatted traceback.

    Returns
    -------
    str
        ``text`` itself when it is already short and encodable, else the shortened text.
    """
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= MAX_ERROR_CHARS:
        return text
    tail_chars = MAX_ERROR_CHARS - _TRUNCATION_HEAD - _TRUNCATION_MARKER_RESERVE
    omitted = len(text) - _TRUNCATION_HEAD - tail_chars
    marker = f"\n[... {omitted} characters truncated ...]\n"
    return text[:_TRUNCATION_HEAD] + marker + text[-tail_chars:]


def _clean_error(message: object, name: str) -> None:
    """Truncate the text field ``name`` of a freshly built frozen message (or result)
    in place."""
    value = getattr(message, name)
    if type(value) is str and (len(value) > MAX_ERROR_CHARS or not value.isascii()):
        object.__setattr__(message, name, truncate_error(value))


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class WireBlock:
    """The coordinates and status of one block, as they travel on the wire.

    Only coordinates cross the wire, never data. Offsets may be negative, shapes may
    not; the four tuples have the same length (1 to :data:`MAX_DIMS`).

    Attributes
    ----------
    task_id:
        Id of the task the block belongs to.
    index:
        Block id within its task (>= 0).
    read_offset, read_shape:
        Begin and shape of the block's read ROI, in world units.
    write_offset, write_shape:
        Begin and shape of the block's write ROI, in world units.
    status:
        0 CREATED, 1 PROCESSING, 2 SUCCESS, 3 FAILED (the values of ``BlockStatus``).
    number:
        daisy's block number (``block.block_id[1]``), sent with blocks the server hands
        out so that workers show the ids users know; None (not sent) on releases.
    """

    task_id: str
    index: int
    read_offset: tuple[int, ...]
    read_shape: tuple[int, ...]
    write_offset: tuple[int, ...]
    write_shape: tuple[int, ...]
    status: int
    number: int | None = None


def _block_json(block: WireBlock) -> list[Any]:
    """Return the compact list form of a block (the number last, when there is one)."""
    fields = [
        block.task_id,
        block.index,
        block.read_offset,
        block.read_shape,
        block.write_offset,
        block.write_shape,
        block.status,
    ]
    if block.number is not None:
        fields.append(block.number)
    return fields


def _set_slot(cls: type, name: str) -> Callable[[Any, Any], None]:
    """Return the slot setter of ``cls.name`` (bypasses a frozen ``__setattr__``)."""
    return getattr(cls, name).__set__


_set_task_id = _set_slot(WireBlock, "task_id")
_set_index = _set_slot(WireBlock, "index")
_set_read_offset = _set_slot(WireBlock, "read_offset")
_set_read_shape = _set_slot(WireBlock, "read_shape")
_set_write_offset = _set_slot(WireBlock, "write_offset")
_set_write_shape = _set_slot(WireBlock, "write_shape")
_set_status = _set_slot(WireBlock, "status")
_set_number = _set_slot(WireBlock, "number")
#: bound of a block number on the wire (Cantor numbers of huge 5D grids exceed int64)
_NUMBER_MAX = 2**128
_INT_ONLY = {int}


def _new_wire_block(
    task_id: str,
    index: int,
    read_offset: tuple[int, ...],
    read_shape: tuple[int, ...],
    write_offset: tuple[int, ...],
    write_shape: tuple[int, ...],
    status: int,
    number: int | None,
) -> WireBlock:
    """Build a validated :class:`WireBlock` without the cost of the frozen ``__init__``."""
    block = object.__new__(WireBlock)
    _set_task_id(block, task_id)
    _set_index(block, index)
    _set_read_offset(block, read_offset)
    _set_read_shape(block, read_shape)
    _set_write_offset(block, write_offset)
    _set_write_shape(block, write_shape)
    _set_status(block, status)
    _set_number(block, number)
    return block


def _block_from_json(value: object, where: str) -> WireBlock:
    """Validate the compact list form of a block and build the :class:`WireBlock`.

    The checks run once on the fast path; only a rejected block is examined again,
    field by field, by :func:`_explain_bad_block` to name what is wrong.
    """
    if type(value) is list and 7 <= len(value) <= 8:
        task_id, index, read_offset, read_shape, write_offset, write_shape, status = value[:7]
        number = value[7] if len(value) == 8 else None
        if (
            (number is None or type(number) is int and 0 <= number < _NUMBER_MAX)
            and
            type(task_id) is str
            and (task_id.isascii() or _is_text(task_id))
            and type(index) is int
            and 0 <= index <= _INT64_MAX
            and type(status) is int
            and 0 <= status <= _STATUS_MAX
            and type(read_offset) is list
            and type(read_shape) is list
            and type(write_offset) is list
            and type(write_shape) is list
            and 1 <= len(read_offset) <= MAX_DIMS
            and len(read_offset) == len(read_shape) == len(write_offset) == len(write_shape)
        ):
            coordinates = read_offset + read_shape + write_offset + write_shape
            if (
                set(map(type, coordinates)) == _INT_ONLY
                and _INT64_MIN <= min(coordinates)
                and max(coordinates) <= _INT64_MAX
                and min(read_shape) >= 0
                and min(write_shape) >= 0
            ):
                return _new_wire_block(
                    task_id,
                    index,
                    tuple(read_offset),
                    tuple(read_shape),
                    tuple(write_offset),
                    tuple(write_shape),
                    status,
                    number,
                )
    _explain_bad_block(value, where)


def _explain_bad_block(value: object, where: str) -> NoReturn:
    """Raise a :class:`ProtocolError` naming the first invalid field of a block."""
    if type(value) is not list or not 7 <= len(value) <= 8:
        _fail(where, "a list [task_id, index, read_offset, read_shape, write_offset, "
                     "write_shape, status] with an optional number last", value)
    task_id, index, read_offset, read_shape, write_offset, write_shape, status = value[:7]
    if len(value) == 8:
        _integer(value[7], f"{where}.number", 0, _NUMBER_MAX - 1)
    _text(task_id, f"{where}.task_id")
    _integer(index, f"{where}.index", 0, _INT64_MAX)
    dims = {
        len(_int_tuple(read_offset, f"{where}.read_offset", _INT64_MIN)),
        len(_int_tuple(read_shape, f"{where}.read_shape", 0)),
        len(_int_tuple(write_offset, f"{where}.write_offset", _INT64_MIN)),
        len(_int_tuple(write_shape, f"{where}.write_shape", 0)),
    }
    _integer(status, f"{where}.status", 0, _STATUS_MAX)
    if len(dims) != 1:
        _fail(where, "read_offset, read_shape, write_offset and write_shape of the same "
                     "length", value)
    _fail(where, "a valid block", value)  # unreachable while both paths agree


class Message:
    """Base class of every message; subclasses are frozen dataclasses with slots.

    Each subclass has a class attribute ``TYPE_CODE``, the byte that names it on the
    wire. The set of subclasses is closed: see :data:`MESSAGE_TYPES`.
    """

    __slots__ = ()
    TYPE_CODE: ClassVar[int]

    def _json(self) -> dict[str, Any]:
        """Return the JSON-ready body of this message."""
        return {}

    @classmethod
    def _from_json(cls, body: dict[str, Any]) -> Message:
        """Build the message from a body whose keys were already checked."""
        return cls()


@dataclass(frozen=True, slots=True)
class Challenge(Message):
    """Server to client, the first frame on every connection.

    Attributes
    ----------
    nonce:
        Fresh lowercase hex string (see :func:`new_nonce`) the client must sign.
    """

    TYPE_CODE: ClassVar[int] = 1
    nonce: str

    def _json(self) -> dict[str, Any]:
        return {"nonce": self.nonce}

    @classmethod
    def _from_json(cls, body: dict[str, Any]) -> Challenge:
        return cls(_lower_hex(body["nonce"], "Challenge.nonce", MAX_NONCE_CHARS))


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Client to server, the answer to :class:`Challenge`.

    Attributes
    ----------
    protocol_version:
        :data:`PROTOCOL_VERSION` of the client.
    task_id:
        Task whose blocks this worker processes.
    worker_id:
        Id of the worker (>= 0).
    proof:
        ``proof_for(token, nonce)``: the hex HMAC-SHA256 of the challenge nonce under
        the run's token. The block server always has a token, so ``""`` (what a
        client without one sends) is always refused there.
    """

    TYPE_CODE: ClassVar[int] = 2
    protocol_version: int
    task_id: str
    worker_id: int
    proof: str

    def _json(self) -> dict[str, Any]:
        return {
            "protocol_version": self.protocol_version,
            "task_id": self.task_id,
            "worker_id": self.worker_id,
            "proof": self.proof,
        }

    @classmethod
    def _from_json(cls, body: dict[str, Any]) -> Hello:
        return cls(
            _integer(body["protocol_version"], "Hello.protocol_version", 0, _INT32_MAX),
            _text(body["task_id"], "Hello.task_id"),
            _integer(body["worker_id"], "Hello.worker_id", 0, _INT64_MAX),
            _proof(body["proof"], "Hello.proof"),
        )


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """Server to client: authentication accepted, the client may ask for blocks."""

    TYPE_CODE: ClassVar[int] = 3


@dataclass(frozen=True, slots=True)
class Refused(Message):
    """Server to client just before the server closes the connection.

    Attributes
    ----------
    reason:
        Why, for example a bad token or an unknown task (truncated like error texts).
    """

    TYPE_CODE: ClassVar[int] = 4
    reason: str

    def __post_init__(self) -> None:
        _clean_error(self, "reason")

    def _json(self) -> dict[str, Any]:
        return {"reason": self.reason}

    @classmethod
    def _from_json(cls, body: dict[str, Any]) -> Refused:
        return cls(_bounded_text(body["reason"], "Refused.reason"))


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Either direction: I am still alive."""

    TYPE_CODE: ClassVar[int] = 8


@dataclass(frozen=True, slots=True)
class Bye(Message):
    """Client to server: this worker is leaving and holds no block."""

    TYPE_CODE: ClassVar[int] = 9


@dataclass(frozen=True, slots=True)
class NoMoreBlocks(Message):
    """Server to client: the task is done; the worker should exit."""

    TYPE_CODE: ClassVar[int] = 11


@dataclass(frozen=True, slots=True)
class CannotWork(Message):
    """Client to server: this worker cannot process any block of its task.

    For an error every block would repeat (a ``setup_worker`` that raises, an output
    the blocks cannot write safely). The server fails ``block`` for good, stops the
    task (no retries, no replacement workers) and answers :class:`NoMoreBlocks`.

    Attributes
    ----------
    block:
        The block the worker holds (status FAILED).
    error:
        Text of the error; truncated to :data:`MAX_ERROR_CHARS`.
    """

    TYPE_CODE: ClassVar[int] = 12
    block: WireBlock
    error: str

    def __post_init__(self) -> None:
        _clean_error(self, "error")

    def _json(self) -> dict[str, Any]:
        return {"block": _block_json(self.block), "error": self.error}

    @classmethod
    def _from_json(cls, body: dict[str, Any]) -> CannotWork:
        return cls(
            _block_from_json(body["block"], "CannotWork.block"),
            _bounded_text(body["error"], "CannotWork.error"),
        )


@dataclass(frozen=True, slots=True)
class BlockResult:
    """The outcome of one block a worker held, in a :class:`Report`.

    Attributes
    ----------
    index:
        Block id within the connection's task (``WireBlock.index``).
    status:
        2 SUCCESS or 3 FAILED (the values of ``BlockStatus``).
    error:
        Text of the failure (a traceback), or None; truncated to :data:`MAX_ERROR_CHARS`.
    """

    index: int
    status: int
    error: str | None = None

    def __post_init__(self) -> None:
        if self.error is not None:
            _clean_error(self, "error")


_new_result = BlockResult.__new__
_set_result_index = _set_slot(BlockResult, "index")
_set_result_status = _set_slot(BlockResult, "status")
_set_result_error = _set_slot(BlockResult, "error")


def _results_from_json(value: object, where: str) -> tuple[BlockResult, ...]:
    """Validate the list of ``[index, status, error]`` rows of a :class:`Report`."""
    if type(value) is not list or len(value) > MAX_BATCH_BLOCKS:
        _fail(where, f"a list of at most {MAX_BATCH_BLOCKS} [index, status, error] rows",
              value)
    results = []
    for position, row in enumerate(value):
        if type(row) is not list or len(row) != 3:
            _fail(f"{where}[{position}]", "a list [index, status, error]", row)
        index, status, error = row
        _integer(index, f"{where}[{position}].index", 0, _INT64_MAX)
        if type(status) is not int or status not in _RESULT_STATUSES:
            _fail(f"{where}[{position}].status", "2 (SUCCESS) or 3 (FAILED)", status)
        if error is not None:
            _optional_error(error, f"{where}[{position}].error")
        result = _new_result(BlockResult)
        _set_result_index(result, index)
        _set_result_status(result, status)
        _set_result_error(result, error)
        results.append(result)
    return tuple(results)


@dataclass(frozen=True, slots=True)
class Report(Message):
    """Client to server: the results of finished blocks, and a request for more.

    The worker loop's message: it keeps blocks in hand (prefetch) and, for blocks much
    shorter than a round trip, moves several per frame (batches). A block is recorded
    done when its result arrives, after its function returned.

    Attributes
    ----------
    results:
        Outcomes of blocks this connection holds, at most :data:`MAX_BATCH_BLOCKS`.
    want:
        How many more blocks the worker asks for, 0 to :data:`MAX_BATCH_BLOCKS`. Above
        0, the server answers with :class:`BlocksAssigned` (1 to ``want`` blocks; it may
        give fewer, for example when other workers need the ready blocks) as soon as a
        block is ready, or :class:`NoMoreBlocks`; 0 expects no answer.
    """

    TYPE_CODE: ClassVar[int] = 13
    results: tuple[BlockResult, ...]
    want: int

    def _json(self) -> dict[str, Any]:
        return {"results": [[result.index, result.status, result.error]
                            for result in self.results],
                "want": self.want}

    @classmethod
    def _from_json(cls, body: dict[str, Any]) -> Report:
        results = _results_from_json(body["results"], "Report.results")
        want = _integer(body["want"], "Report.want", 0, MAX_BATCH_BLOCKS)
        if not results and not want:
            _fail("Report", "results or want > 0", body)
        return cls(results, want)


@dataclass(frozen=True, slots=True)
class BlocksAssigned(Message):
    """Server to client: process these blocks, in this order (the answer to a
    :class:`Report` that wants blocks).

    Attributes
    ----------
    blocks:
        1 to :data:`MAX_BATCH_BLOCKS` blocks, each with status PROCESSING.
    """

    TYPE_CODE: ClassVar[int] = 14
    blocks: tuple[WireBlock, ...]

    def _json(self) -> dict[str, Any]:
        return {"blocks": [_block_json(block) for block in self.blocks]}

    @classmethod
    def _from_json(cls, body: dict[str, Any]) -> BlocksAssigned:
        value = body["blocks"]
        if type(value) is not list or not 1 <= len(value) <= MAX_BATCH_BLOCKS:
            _fail("BlocksAssigned.blocks", f"a list of 1 to {MAX_BATCH_BLOCKS} blocks", value)
        return cls(tuple(_block_from_json(item, f"BlocksAssigned.blocks[{position}]")
                         for position, item in enumerate(value)))


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE_CODE: cls
    for cls in (
        Challenge,
        Hello,
        Welcome,
        Refused,
        Heartbeat,
        Bye,
        NoMoreBlocks,
        CannotWork,
        Report,
        BlocksAssigned,
    )
}
"""Every message class by its type code: the closed set of the protocol."""

CLIENT_MESSAGES: frozenset[type[Message]] = frozenset(
    {Hello, Heartbeat, Bye, CannotWork, Report}
)
"""Messages a worker may send (what a server's :class:`Decoder` should accept)."""

SERVER_MESSAGES: frozenset[type[Message]] = frozenset(
    {Challenge, Welcome, Refused, BlocksAssigned, NoMoreBlocks, Heartbeat}
)
"""Messages a server may send (what a worker's :class:`Decoder` should accept)."""

_BODY_KEYS: dict[type[Message], frozenset[str]] = {
    cls: frozenset(field.name for field in fields(cls))  # type: ignore[arg-type]
    for cls in MESSAGE_TYPES.values()
}


# ----------------------------------------------------------------------------- encode

def _not_json(value: object) -> NoReturn:
    """JSON hook: refuse values JSON has no form for (numpy ints, sets, objects...)."""
    raise TypeError(f"{type(value).__name__} {_short_repr(value)} is not JSON serializable")


def _make_json_encoder() -> Callable[[object], str]:
    """Return a function encoding a JSON-ready value as compact, non-ASCII-escaping JSON.

    ``json.JSONEncoder.encode`` builds a new C encoder on every call, which costs more
    than encoding a block; the C encoder is built once here when the interpreter has
    it, and the pure-Python encoder is the fallback.
    """
    fallback = json.JSONEncoder(
        separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False,
        default=_not_json,
    ).encode
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # pragma: no cover - interpreters without _json
        return fallback
    try:
        # Same arguments as JSONEncoder.iterencode passes (CPython 3.11 to 3.13).
        c_encoder = c_make_encoder(
            None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False,
            False,
        )

        def encode_json(value: object) -> str:
            return "".join(c_encoder(value, 0))

        sample = {"a": [1, -2, (3,), None, "é\n"], "b": True}
        if encode_json(sample) != fallback(sample):  # pragma: no cover
            return fallback
    except Exception:  # noqa: BLE001  # pragma: no cover - a private signature changed
        return fallback
    return encode_json


_encode_json = _make_json_encoder()


def _frame(type_code: int, body: bytes) -> bytes:
    """Return the frame holding ``body`` under ``type_code``."""
    return _HEADER_AND_CODE.pack(len(body) + 1, type_code) + body


_EMPTY_FRAMES: dict[type[Message], bytes] = {
    cls: _frame(cls.TYPE_CODE, b"{}")
    for cls in MESSAGE_TYPES.values()
    if not _BODY_KEYS[cls]
}


def encode(message: Message, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Encode one message as the bytes of a whole frame.

    The message's fields are trusted (the receiving :class:`Decoder` validates them);
    values JSON cannot represent raise :class:`ProtocolError`.

    Parameters
    ----------
    message:
        Any instance of a class in :data:`MESSAGE_TYPES`.
    max_frame_bytes:
        Largest payload to produce; the peer's decoder must accept at least as much.

    Returns
    -------
    bytes
        Length header, type code and JSON body.

    Raises
    ------
    TypeError
        ``message`` is not a protocol message.
    ProtocolError
        A field cannot be encoded, or the frame would exceed ``max_frame_bytes``.
    """
    cls = type(message)
    empty_frame = _EMPTY_FRAMES.get(cls)
    if empty_frame is not None:
        return empty_frame
    if cls not in _BODY_KEYS:
        raise TypeError(f"not a protocol message: {_short_repr(message)}")
    try:
        body = _encode_json(message._json()).encode("utf-8")
    except (TypeError, ValueError, AttributeError, RecursionError) as error:
        raise ProtocolError(f"{cls.__name__}: cannot encode: {error}") from error
    if len(body) + 1 > max_frame_bytes:
        raise ProtocolError(
            f"{cls.__name__}: frame of {len(body) + 1} bytes exceeds the limit of "
            f"{max_frame_bytes} bytes"
        )
    return _frame(cls.TYPE_CODE, body)


# ----------------------------------------------------------------------------- decode


def _reject_constant(name: str) -> NoReturn:
    """JSON hook: NaN and Infinity are not JSON and never valid in a message."""
    raise ValueError(f"{name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON hook: build an object, rejecting duplicate keys."""
    body = dict(pairs)
    if len(body) != len(pairs):
        seen: set[str] = set()
        repeated: set[str] = set()
        for key, _ in pairs:
            (repeated if key in seen else seen).add(key)
        duplicates = sorted(repeated)
        raise ValueError(f"duplicate keys {duplicates}")
    return body


_JSON_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, object_pairs_hook=_unique_keys
)


def _parse_body(name: str, raw: bytes | bytearray) -> dict[str, Any]:
    """Parse a frame body as a compact UTF-8 JSON object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ProtocolError(f"{name}: body is not valid UTF-8: {error}") from None
    try:
        body, end = _JSON_DECODER.raw_decode(text)
    except (ValueError, RecursionError) as error:
        raise ProtocolError(f"{name}: body is not valid JSON: {error}") from None
    if end != len(text):
        raise ProtocolError(f"{name}: body has data after the JSON object at {end}")
    if type(body) is not dict:
        raise ProtocolError(f"{name}: body must be a JSON object, got {_short_repr(body)}")
    return body


def _check_keys(cls: type[Message], body: dict[str, Any]) -> None:
    """Raise unless ``body`` has exactly the fields of ``cls``."""
    expected = _BODY_KEYS[cls]
    if body.keys() == expected:
        return
    name = cls.__name__
    missing = sorted(expected - body.keys())
    if missing:
        raise ProtocolError(f"{name}.{missing[0]}: missing required field")
    unknown = sorted(body.keys() - expected)
    raise ProtocolError(f"{name}.{unknown[0]}: unknown field")


def _decode_payload(
    type_code: int, raw_body: bytes | bytearray, accepted: frozenset[type[Message]] | None
) -> Message:
    """Decode one frame payload (type code and body) into a validated message."""
    cls = MESSAGE_TYPES.get(type_code)
    if cls is None:
        raise ProtocolError(f"unknown message type code {type_code}")
    if accepted is not None and cls not in accepted:
        raise ProtocolError(f"{cls.__name__}: message not allowed in this direction")
    body = _parse_body(cls.__name__, raw_body)
    _check_keys(cls, body)
    return cls._from_json(body)


class Decoder:
    """Turn a byte stream into messages, however the bytes are chunked (sans-I/O).

    Feed it whatever the socket produced; it returns the whole messages now available
    and keeps any partial frame for the next call. The first malformed, oversized or
    unexpected frame raises :class:`ProtocolError`; after that the decoder is unusable
    (every further ``feed`` raises too) and the connection should be closed.

    Parameters
    ----------
    max_frame_bytes:
        Largest payload length accepted. A header announcing more is rejected as soon
        as its four bytes arrive, before any of the body is buffered.
    accept:
        Message classes allowed on this stream, for example :data:`CLIENT_MESSAGES` on
        the server side; None accepts every message type.
    """

    __slots__ = ("_accepted", "_buffer", "_error", "_max_frame_bytes")

    def __init__(
        self,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        accept: Iterable[type[Message]] | None = None,
    ) -> None:
        if type(max_frame_bytes) is not int or not (
            _MIN_FRAME_LIMIT <= max_frame_bytes <= _MAX_FRAME_LIMIT
        ):
            raise ValueError(
                f"max_frame_bytes must be an integer in [{_MIN_FRAME_LIMIT}, "
                f"{_MAX_FRAME_LIMIT}], got {_short_repr(max_frame_bytes)}"
            )
        self._max_frame_bytes = max_frame_bytes
        self._accepted = None if accept is None else frozenset(accept)
        self._buffer = bytearray()
        self._error: ProtocolError | None = None

    @property
    def max_frame_bytes(self) -> int:
        """Largest payload length this decoder accepts."""
        return self._max_frame_bytes

    @property
    def error(self) -> ProtocolError | None:
        """The error that made this decoder unusable, or None while it is usable."""
        return self._error

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Add received bytes and return every whole message now available.

        Parameters
        ----------
        data:
            The next bytes of the stream, any length including zero.

        Returns
        -------
        list of Message
            The messages completed by ``data``, in order; empty while a frame is partial.

        Raises
        ------
        ProtocolError
            A frame is malformed, oversized, of unknown or unaccepted type, or the
            decoder already failed before.
        """
        if self._error is not None:
            raise ProtocolError(f"decoder is unusable after an earlier error: {self._error}")
        buffer = self._buffer
        if buffer:
            buffer += data
            stream: bytes | bytearray = buffer
        else:  # nothing pending: decode straight from ``data``, keep only its tail
            stream = data if type(data) is bytes or type(data) is bytearray else bytes(data)
        try:
            messages, consumed = self._frames(stream)
        except ProtocolError as error:
            self._error = error
            buffer.clear()
            raise
        if stream is buffer:
            del buffer[:consumed]
        elif consumed < len(stream):
            buffer += stream[consumed:]
        return messages

    def _frames(self, buffer: bytes | bytearray) -> tuple[list[Message], int]:
        """Decode the whole frames at the start of ``buffer``; return them and their size."""
        messages: list[Message] = []
        position = 0
        available = len(buffer)
        while available - position >= _HEADER_BYTES:
            (length,) = _HEADER.unpack_from(buffer, position)
            self._check_length(length)
            end = position + _HEADER_BYTES + length
            if end > available:
                break
            type_code = buffer[position + _HEADER_BYTES]
            raw_body = buffer[position + _HEADER_BYTES + 1 : end]
            messages.append(_decode_payload(type_code, raw_body, self._accepted))
            position = end
        return messages, position

    def _check_length(self, length: int) -> None:
        """Reject a payload length of zero or over the limit."""
        if length > self._max_frame_bytes:
            raise ProtocolError(
                f"frame of {length} bytes exceeds the limit of {self._max_frame_bytes} bytes"
            )
        if length == 0:
            raise ProtocolError("empty frame: no message type code")


# ----------------------------------------------------------------------- authentication


def proof_for(token: str | None, nonce: str) -> str:
    """Return the proof a client sends in :class:`Hello` for a challenge ``nonce``.

    Parameters
    ----------
    token:
        The run's shared secret, or None / ``""`` when the run has none.
    nonce:
        The nonce of the server's :class:`Challenge`.

    Returns
    -------
    str
        Lowercase hex HMAC-SHA256 of the nonce's UTF-8 bytes keyed by the token's UTF-8
        bytes, or ``""`` when there is no token.
    """
    if not token:
        return ""
    return hmac.new(token.encode("utf-8"), nonce.encode("utf-8"), hashlib.sha256).hexdigest()


def verify_proof(token: str | None, nonce: str, proof: str) -> bool:
    """Check a client's proof in constant time.

    Without a token the only valid proof is ``""``, never any proof. The block server
    always has a token (see ``luigi_daisy.server``); the token-less case is for
    callers of the codec alone.

    Parameters
    ----------
    token:
        The run's shared secret, or None / ``""`` when the run has none.
    nonce:
        The nonce the server sent in its :class:`Challenge` on this connection.
    proof:
        The ``proof`` field of the client's :class:`Hello`.

    Returns
    -------
    bool
        Whether ``proof == proof_for(token, nonce)``, compared with
        :func:`hmac.compare_digest`.
    """
    if type(proof) is not str:
        return False
    expected = proof_for(token, nonce).encode("utf-8")
    return hmac.compare_digest(expected, proof.encode("utf-8", "backslashreplace"))


def new_nonce() -> str:
    """Return a fresh challenge nonce: 32 random bytes as 64 lowercase hex characters."""
    import secrets  # only servers make nonces and tokens: workers start without it
    return secrets.token_hex(32)

