"""Tests of the sans-I/O wire codec: frames, messages, validation and authentication."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from luigi_daisy import protocol
from luigi_daisy.errors import LuigiDaisyError, ProtocolError
from luigi_daisy.protocol import (
    CLIENT_MESSAGES,
    MAX_BATCH_BLOCKS,
    MAX_DIMS,
    MAX_ERROR_CHARS,
    MAX_FRAME_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SERVER_MESSAGES,
    BlockResult,
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
    proof_for,
    truncate_error,
    verify_proof,
)

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

# ------------------------------------------------------------------------- strategies

texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
lower_hex = "0123456789abcdef"


@st.composite
def wire_blocks(draw: st.DrawFn) -> WireBlock:
    """Any valid block: 1..MAX_DIMS dims, int64 offsets, non-negative shapes."""
    dims = draw(st.integers(1, MAX_DIMS))
    offsets = st.tuples(*[st.integers(INT64_MIN, INT64_MAX)] * dims)
    shapes = st.tuples(*[st.integers(0, INT64_MAX)] * dims)
    return WireBlock(
        task_id=draw(texts),
        index=draw(st.integers(0, INT64_MAX)),
        read_offset=draw(offsets),
        read_shape=draw(shapes),
        write_offset=draw(offsets),
        write_shape=draw(shapes),
        status=draw(st.integers(0, 3)),
        number=draw(st.none() | st.integers(0, 2**128 - 1)),
    )


error_texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
errors = st.none() | error_texts

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Challenge, nonce=st.text(lower_hex, min_size=1, max_size=256)),
    st.builds(
        Hello,
        protocol_version=st.integers(0, (1 << 31) - 1),
        task_id=texts,
        worker_id=st.integers(0, INT64_MAX),
        proof=st.just("") | st.text(lower_hex, min_size=64, max_size=64),
    ),
    st.builds(Welcome),
    st.builds(Refused, reason=texts),
    st.builds(Heartbeat),
    st.builds(Bye),
    st.builds(NoMoreBlocks),
    st.builds(CannotWork, block=wire_blocks(), error=error_texts),
    st.builds(Report,
              results=st.lists(st.builds(BlockResult, index=st.integers(0, INT64_MAX),
                                         status=st.sampled_from([2, 3]), error=errors),
                               min_size=1, max_size=3).map(tuple),
              want=st.integers(0, MAX_BATCH_BLOCKS)),
    st.builds(Report, results=st.just(()), want=st.integers(1, MAX_BATCH_BLOCKS)),
    st.builds(BlocksAssigned,
              blocks=st.lists(wire_blocks(), min_size=1, max_size=4).map(tuple)),
)

BLOCK = WireBlock("predict", 7, (-4, 0, 8), (24, 24, 24), (0, 4, 12), (16, 16, 16), 1)
ONE_OF_EACH: list[Message] = [
    Challenge(new_nonce()),
    Hello(PROTOCOL_VERSION, "predict", 3, proof_for("secret", "abc123")),
    Welcome(),
    Refused("bad token"),
    Heartbeat(),
    Bye(),
    NoMoreBlocks(),
    CannotWork(dataclasses.replace(BLOCK, status=3), "setup_worker failed: ✗"),
    CannotWork(dataclasses.replace(BLOCK, status=3, number=2**70), ""),
    Report((BlockResult(7, 2), BlockResult(8, 3, "Traceback: ✗")), 2),
    Report((BlockResult(7, 2),), 1),  # a result and the next block in one frame
    Report((BlockResult(7, 3, "Traceback (most recent call last):\n  é ✓"),), 0),
    Report((), 1),
    Report((), MAX_BATCH_BLOCKS),
    BlocksAssigned((BLOCK,)),
    BlocksAssigned((dataclasses.replace(BLOCK, number=2**70),)),  # daisy's id travels too
    BlocksAssigned((BLOCK, dataclasses.replace(BLOCK, index=8, number=12))),
]


def frame(type_code: int, body: bytes) -> bytes:
    """A raw frame, built by hand (not by the code under test)."""
    return struct.pack(">IB", len(body) + 1, type_code) + body


def decode_one(data: bytes, **decoder_options: object) -> Message:
    """Decode bytes holding exactly one frame."""
    decoded = Decoder(**decoder_options).feed(data)  # type: ignore[arg-type]
    assert len(decoded) == 1
    return decoded[0]


def rejects(data: bytes, *fragments: str) -> ProtocolError:
    """Assert that decoding ``data`` raises a ProtocolError mentioning every fragment."""
    with pytest.raises(ProtocolError) as caught:
        Decoder().feed(data)
    for fragment in fragments:
        assert fragment in str(caught.value)
    return caught.value


# ---------------------------------------------------------------------- the messages


RETIRED_TYPE_CODES = {5: "Acquire", 6: "BlockAssigned", 7: "Release", 10: "ReleaseAndAcquire"}
"""The one-block messages of protocol version 1, retired by version 2 (not reused)."""


def test_message_set_is_closed_and_codes_are_unique_bytes() -> None:
    assert len(MESSAGE_TYPES) == 10
    # dataclass(slots=True) replaces each class, so compare what the module exports
    subclasses = {getattr(protocol, cls.__name__) for cls in Message.__subclasses__()}
    assert set(MESSAGE_TYPES.values()) == subclasses
    for code, cls in MESSAGE_TYPES.items():
        assert cls.TYPE_CODE == code and 0 <= code <= 255
    assert CLIENT_MESSAGES | SERVER_MESSAGES == set(MESSAGE_TYPES.values())
    assert CLIENT_MESSAGES & SERVER_MESSAGES == {Heartbeat}
    assert CLIENT_MESSAGES == {Hello, Heartbeat, Bye, CannotWork, Report}
    assert SERVER_MESSAGES == {Challenge, Welcome, Refused, BlocksAssigned, NoMoreBlocks,
                               Heartbeat}


def test_protocol_version_2_retired_the_one_block_messages() -> None:
    assert PROTOCOL_VERSION == 2
    assert set(MESSAGE_TYPES).isdisjoint(RETIRED_TYPE_CODES)
    for name in RETIRED_TYPE_CODES.values():
        assert not hasattr(protocol, name), name
        assert name not in protocol.__all__


# the bodies a version 1 peer would have sent under each retired code
RETIRED_FRAMES = [
    (5, b"{}"),
    (6, b'{"block":["t",0,[0],[1],[0],[1],1]}'),
    (7, b'{"block":["t",0,[0],[1],[0],[1],2],"error":null}'),
    (10, b'{"block":["t",0,[0],[1],[0],[1],3],"error":"boom"}'),
]


@pytest.mark.parametrize(("type_code", "body"), RETIRED_FRAMES,
                         ids=[RETIRED_TYPE_CODES[code] for code, _ in RETIRED_FRAMES])
def test_retired_type_codes_are_unknown_types(type_code: int, body: bytes) -> None:
    for accept in (None, CLIENT_MESSAGES, SERVER_MESSAGES):
        decoder = Decoder(accept=accept)
        with pytest.raises(ProtocolError, match=f"^unknown message type code {type_code}$"):
            decoder.feed(encode(Heartbeat()) + frame(type_code, body))
        assert decoder.error is not None
    rejects(frame(type_code, b"{}"), f"unknown message type code {type_code}")


@pytest.mark.parametrize("message", ONE_OF_EACH, ids=lambda m: type(m).__name__)
def test_messages_are_frozen_with_slots(message: Message) -> None:
    assert not hasattr(message, "__dict__")
    assert dataclasses.is_dataclass(message)
    for field in dataclasses.fields(message):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(message, field.name, None)
    with pytest.raises((AttributeError, TypeError)):
        message.unexpected = 1  # type: ignore[attr-defined]


def test_wire_block_is_frozen_with_slots() -> None:
    assert not hasattr(BLOCK, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        BLOCK.index = 3  # type: ignore[misc]
    assert hash(BLOCK) == hash(dataclasses.replace(BLOCK))


def test_frame_layout() -> None:
    data = encode(BlocksAssigned((BLOCK,)))
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    assert data[4] == BlocksAssigned.TYPE_CODE
    assert json.loads(data[5:].decode("utf-8")) == {
        "blocks": [["predict", 7, [-4, 0, 8], [24, 24, 24], [0, 4, 12], [16, 16, 16], 1]]
    }
    assert b" " not in data[5:]  # compact separators
    data = encode(CannotWork(dataclasses.replace(BLOCK, status=3, number=12), "boom"))
    assert data[4] == CannotWork.TYPE_CODE
    assert json.loads(data[5:].decode("utf-8")) == {
        "block": ["predict", 7, [-4, 0, 8], [24, 24, 24], [0, 4, 12], [16, 16, 16], 3, 12],
        "error": "boom",
    }
    data = encode(Report((BlockResult(7, 2), BlockResult(8, 3, "boom")), 1))
    assert data[4] == Report.TYPE_CODE
    assert data[5:] == b'{"results":[[7,2,null],[8,3,"boom"]],"want":1}'
    assert encode(Heartbeat()) == frame(Heartbeat.TYPE_CODE, b"{}")
    assert encode(Bye()) == frame(Bye.TYPE_CODE, b"{}")


def test_non_ascii_text_is_sent_as_utf8() -> None:
    data = encode(Refused("naïve ✓"))
    assert "naïve ✓".encode() in data


# -------------------------------------------------------------------------- round trip


@given(messages)
def test_round_trip_of_every_message_type(message: Message) -> None:
    assert decode_one(encode(message)) == message


@pytest.mark.parametrize("message", ONE_OF_EACH, ids=lambda m: type(m).__name__)
def test_round_trip_of_each_type_keeps_the_class(message: Message) -> None:
    decoded = decode_one(encode(message))
    assert type(decoded) is type(message)
    assert decoded == message


def test_decoded_blocks_are_ordinary_wire_blocks() -> None:
    decoded = decode_one(encode(BlocksAssigned((BLOCK,))))
    assert isinstance(decoded, BlocksAssigned)
    assert type(decoded.blocks) is tuple
    (block,) = decoded.blocks
    assert block == BLOCK and hash(block) == hash(BLOCK)
    assert type(block) is WireBlock and type(block.read_offset) is tuple
    assert dataclasses.replace(block, status=2).status == 2
    decoded = decode_one(encode(CannotWork(BLOCK, "boom")))
    assert isinstance(decoded, CannotWork)
    assert decoded.block == BLOCK and type(decoded.block.write_shape) is tuple


@given(st.lists(messages, max_size=8))
def test_many_frames_in_one_feed(batch: list[Message]) -> None:
    data = b"".join(encode(message) for message in batch)
    decoder = Decoder()
    assert decoder.feed(data) == batch
    assert decoder.buffered_bytes == 0


def test_split_at_every_byte_boundary() -> None:
    data = b"".join(encode(message) for message in ONE_OF_EACH)
    for cut in range(len(data) + 1):
        decoder = Decoder()
        decoded = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert decoded == ONE_OF_EACH, cut
        assert decoder.buffered_bytes == 0


def test_one_byte_at_a_time() -> None:
    data = b"".join(encode(message) for message in ONE_OF_EACH)
    decoder = Decoder()
    decoded: list[Message] = []
    for position in range(len(data)):
        decoded += decoder.feed(data[position : position + 1])
    assert decoded == ONE_OF_EACH


@given(st.lists(messages, min_size=1, max_size=6), st.data())
def test_random_chunkings(batch: list[Message], data: st.DataObject) -> None:
    stream = b"".join(encode(message) for message in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks = [stream[start:end] for start, end in zip([0, *cuts], [*cuts, len(stream)])]
    decoder = Decoder()
    decoded: list[Message] = []
    for chunk in chunks:
        decoded += decoder.feed(chunk)
    assert decoded == batch


def test_feed_accepts_bytearray_and_memoryview_and_empty_data() -> None:
    data = encode(Hello(PROTOCOL_VERSION, "t", 1, ""))
    decoder = Decoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(bytearray(data[:7])) == []
    assert decoder.feed(memoryview(data)[7:]) == [Hello(PROTOCOL_VERSION, "t", 1, "")]
    assert decoder.feed(memoryview(data)) == [Hello(PROTOCOL_VERSION, "t", 1, "")]


def test_feed_does_not_keep_a_reference_to_the_callers_buffer() -> None:
    data = bytearray(encode(Report((), 1)) + encode(Bye())[:3])
    decoder = Decoder()
    assert decoder.feed(data) == [Report((), 1)]
    data[:] = b"\xff" * len(data)
    assert decoder.feed(encode(Bye())[3:]) == [Bye()]


# --------------------------------------------------------------------- partial frames


@pytest.mark.parametrize("message", ONE_OF_EACH, ids=lambda m: type(m).__name__)
def test_truncated_frame_waits_for_the_rest(message: Message) -> None:
    data = encode(message)
    for cut in range(len(data)):
        decoder = Decoder()
        assert decoder.feed(data[:cut]) == []
        assert decoder.buffered_bytes == cut
        assert decoder.error is None
        assert decoder.feed(data[cut:]) == [message]


# ---------------------------------------------------------------------------- limits


def test_oversized_length_rejected_as_soon_as_the_header_arrives() -> None:
    decoder = Decoder()
    header = struct.pack(">I", MAX_FRAME_BYTES + 1)
    assert decoder.feed(header[:3]) == []
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decoder.feed(header[3:])
    assert decoder.buffered_bytes == 0


def test_custom_frame_limit() -> None:
    decoder = Decoder(max_frame_bytes=100)
    assert decoder.max_frame_bytes == 100
    with pytest.raises(ProtocolError, match="101 bytes exceeds the limit of 100"):
        decoder.feed(struct.pack(">I", 101))


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    overhead = len(encode(Refused("")))
    message = Refused("x" * (100 - (overhead - 4)))
    data = encode(message, max_frame_bytes=100)
    assert len(data) == 104
    assert Decoder(max_frame_bytes=100).feed(data) == [message]
    with pytest.raises(ProtocolError):
        Decoder(max_frame_bytes=99).feed(data)


def test_largest_unsigned_length_is_rejected() -> None:
    rejects(b"\xff\xff\xff\xff", "exceeds the limit")


@pytest.mark.parametrize("limit", [0, 2, 1 << 32, -1, 1.5, True])
def test_invalid_frame_limit(limit: object) -> None:
    with pytest.raises(ValueError, match="max_frame_bytes"):
        Decoder(max_frame_bytes=limit)  # type: ignore[arg-type]


def test_encode_refuses_frames_over_the_limit() -> None:
    with pytest.raises(ProtocolError, match="Refused: frame of"):
        encode(Refused("x" * 200), max_frame_bytes=100)


def test_huge_error_is_truncated_so_the_frame_fits() -> None:
    traceback = "Traceback (most recent call last):\n" + "  line\n" * 200_000 + "ValueError: boom"
    message = CannotWork(dataclasses.replace(BLOCK, status=3), traceback)
    assert len(message.error) <= MAX_ERROR_CHARS
    assert message.error.startswith("Traceback (most recent call last):")
    assert message.error.endswith("ValueError: boom")
    assert "characters truncated" in message.error
    data = encode(message)
    assert len(data) <= MAX_FRAME_BYTES
    assert decode_one(data) == message
    result = BlockResult(7, 3, traceback)
    assert result.error == message.error
    data = encode(Report((result,), 1))
    assert len(data) <= MAX_FRAME_BYTES
    assert decode_one(data) == Report((result,), 1)


def test_worst_case_error_text_still_fits_the_default_frame() -> None:
    # Control characters are escaped as \u00XX: six bytes on the wire per character.
    for text in ("\x01" * (2 * MAX_ERROR_CHARS), "😀" * (2 * MAX_ERROR_CHARS)):
        for message in (CannotWork(BLOCK, text), Report((BlockResult(7, 3, text),), 0)):
            assert decode_one(encode(message)) == message


def test_truncate_error() -> None:
    assert truncate_error("short") == "short"
    text = "a" * (MAX_ERROR_CHARS + 1)
    assert len(truncate_error(text)) <= MAX_ERROR_CHARS
    assert truncate_error("x" * MAX_ERROR_CHARS) == "x" * MAX_ERROR_CHARS


def test_lone_surrogates_in_error_texts_are_escaped() -> None:
    # Tracebacks may contain file names decoded with surrogateescape.
    message = CannotWork(BLOCK, "open('/data/\udcff.zarr') failed")
    assert message.error == "open('/data/\\udcff.zarr') failed"
    assert decode_one(encode(message)) == message
    report = Report((BlockResult(7, 3, "open('/data/\udcff.zarr') failed"),), 0)
    assert report.results[0].error == "open('/data/\\udcff.zarr') failed"
    assert decode_one(encode(report)) == report
    assert Refused("\ud800").reason == "\\ud800"


@given(texts, st.integers(0, 3 * MAX_ERROR_CHARS))
@settings(max_examples=50)
def test_truncated_errors_always_encode(piece: str, length: int) -> None:
    text = (piece * (length // max(len(piece), 1) + 1))[:length]
    message = CannotWork(BLOCK, text)
    assert len(message.error) <= MAX_ERROR_CHARS
    assert decode_one(encode(message)) == message
    result = BlockResult(7, 3, text)
    assert result.error is not None and len(result.error) <= MAX_ERROR_CHARS
    assert decode_one(encode(Report((result,), 0))) == Report((result,), 0)


# --------------------------------------------------------------------- bad frames


def test_empty_frame() -> None:
    rejects(b"\x00\x00\x00\x00", "empty frame")


@pytest.mark.parametrize("type_code", [0, 15, 99, 255])
def test_unknown_type_code(type_code: int) -> None:
    rejects(frame(type_code, b"{}"), f"unknown message type code {type_code}")


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b'{"nonce":', b"{}x", b" {}", b"{} ", b"nul", b"{'a':1}", b'{"a":1,}'],
)
def test_invalid_json(body: bytes) -> None:
    rejects(frame(Heartbeat.TYPE_CODE, body), "Heartbeat")


@pytest.mark.parametrize("body", [b"[]", b"1", b'"x"', b"null", b"true"])
def test_body_must_be_an_object(body: bytes) -> None:
    rejects(frame(Welcome.TYPE_CODE, body), "Welcome: body must be a JSON object")


@pytest.mark.parametrize("body", [b"\xff", b'{"reason":"\xc3"}', b'{"reason":"\xed\xa0\x80"}'])
def test_non_utf8_body(body: bytes) -> None:
    rejects(frame(Refused.TYPE_CODE, body), "Refused: body is not valid UTF-8")


def test_utf16_json_is_not_accepted() -> None:
    rejects(frame(Heartbeat.TYPE_CODE, "{}".encode("utf-16")), "Heartbeat")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_rejected(constant: str) -> None:
    body = f'{{"protocol_version":{constant},"task_id":"t","worker_id":0,"proof":""}}'
    rejects(frame(Hello.TYPE_CODE, body.encode()), "Hello", constant)


def test_deep_nesting_is_a_protocol_error() -> None:
    rejects(frame(Heartbeat.TYPE_CODE, b"[" * 100_000 + b"]" * 100_000), "Heartbeat")


def test_huge_integer_literal_is_a_protocol_error() -> None:
    body = b'{"protocol_version":' + b"9" * 10_000 + b',"task_id":"t","worker_id":0,"proof":""}'
    rejects(frame(Hello.TYPE_CODE, body), "Hello")


def test_duplicate_keys_are_rejected() -> None:
    rejects(frame(Refused.TYPE_CODE, b'{"reason":"a","reason":"b"}'), "Refused", "duplicate")


HELLO = {"protocol_version": PROTOCOL_VERSION, "task_id": "t", "worker_id": 0, "proof": ""}
GOOD_BLOCK = ["t", 0, [0, 0], [4, 4], [1, 1], [2, 2], 1]


def with_block(**changes: object) -> dict[str, object]:
    """A CannotWork body whose block has the given positions replaced."""
    names = ["task_id", "index", "read_offset", "read_shape", "write_offset", "write_shape",
             "status"]
    block = list(GOOD_BLOCK)
    for name, value in changes.items():
        block[names.index(name)] = value
    return {"block": block, "error": "boom"}


SAME_LENGTH = ("CannotWork.block: expected read_offset, read_shape, write_offset and "
               "write_shape of the same length")

BAD_BODIES: list[tuple[type[Message], object, str]] = [
    # missing, unknown and misspelt keys
    (Hello, {k: v for k, v in HELLO.items() if k != "proof"}, "Hello.proof: missing"),
    (Hello, {**HELLO, "color": "red"}, "Hello.color: unknown field"),
    (Welcome, {"x": 1}, "Welcome.x: unknown field"),
    (Challenge, {}, "Challenge.nonce: missing"),
    (CannotWork, {"block": GOOD_BLOCK}, "CannotWork.error: missing"),
    (Report, {"results": [], "want": 1, "block": GOOD_BLOCK}, "Report.block: unknown"),
    # wrong types and ranges
    (Hello, {**HELLO, "protocol_version": "1"}, "Hello.protocol_version"),
    (Hello, {**HELLO, "protocol_version": 1.0}, "Hello.protocol_version"),
    (Hello, {**HELLO, "protocol_version": -1}, "Hello.protocol_version"),
    (Hello, {**HELLO, "task_id": 5}, "Hello.task_id"),
    (Hello, {**HELLO, "task_id": None}, "Hello.task_id"),
    (Hello, {**HELLO, "worker_id": True}, "Hello.worker_id"),
    (Hello, {**HELLO, "worker_id": -3}, "Hello.worker_id"),
    (Hello, {**HELLO, "worker_id": 1 << 63}, "Hello.worker_id"),
    (Hello, {**HELLO, "proof": "abc"}, "Hello.proof"),
    (Hello, {**HELLO, "proof": "A" * 64}, "Hello.proof"),
    (Hello, {**HELLO, "proof": "0" * 65}, "Hello.proof"),
    (Hello, {**HELLO, "proof": None}, "Hello.proof"),
    (Challenge, {"nonce": ""}, "Challenge.nonce"),
    (Challenge, {"nonce": "xyz"}, "Challenge.nonce"),
    (Challenge, {"nonce": "ab\n"}, "Challenge.nonce"),
    (Challenge, {"nonce": "a" * 257}, "Challenge.nonce"),
    (Challenge, {"nonce": 12}, "Challenge.nonce"),
    (Refused, {"reason": None}, "Refused.reason"),
    (Refused, {"reason": "x" * (MAX_ERROR_CHARS + 1)}, "Refused.reason"),
    (CannotWork, {"block": GOOD_BLOCK, "error": 3}, "CannotWork.error"),
    (CannotWork, {"block": GOOD_BLOCK, "error": "x" * (MAX_ERROR_CHARS + 1)}, "CannotWork.error"),
    (CannotWork, {"block": GOOD_BLOCK, "error": None}, "CannotWork.error"),
    # blocks
    (BlocksAssigned, {"blocks": [None]}, "BlocksAssigned.blocks[0]: expected a list"),
    (BlocksAssigned, {"blocks": [{"task_id": "t"}]}, "BlocksAssigned.blocks[0]: expected a list"),
    (BlocksAssigned, {"blocks": [GOOD_BLOCK[:6]]}, "BlocksAssigned.blocks[0]: expected a list"),
    (BlocksAssigned, {"blocks": [[*GOOD_BLOCK, 0, 0]]},
     "BlocksAssigned.blocks[0]: expected a list"),
    (BlocksAssigned, {"blocks": [[*GOOD_BLOCK, -1]]}, "BlocksAssigned.blocks[0].number"),
    (BlocksAssigned, {"blocks": [[*GOOD_BLOCK, "12"]]}, "BlocksAssigned.blocks[0].number"),
    (CannotWork, {"block": GOOD_BLOCK[:6] + ["1"], "error": ""}, "CannotWork.block.status"),
    (CannotWork, {"block": None, "error": ""}, "CannotWork.block: expected a list"),
    (CannotWork, with_block(task_id=1), "CannotWork.block.task_id"),
    (CannotWork, with_block(index=-1), "CannotWork.block.index"),
    (CannotWork, with_block(index=1.0), "CannotWork.block.index"),
    (CannotWork, with_block(index=False), "CannotWork.block.index"),
    (CannotWork, with_block(index=1 << 63), "CannotWork.block.index"),
    (CannotWork, with_block(status=4), "CannotWork.block.status"),
    (CannotWork, with_block(status=-1), "CannotWork.block.status"),
    (CannotWork, with_block(read_offset=[0]), SAME_LENGTH),
    (CannotWork, with_block(write_shape=[2, 2, 2]), "same length"),
    (CannotWork, with_block(read_offset=[], read_shape=[], write_offset=[],
                            write_shape=[]), "CannotWork.block.read_offset"),
    (CannotWork, with_block(read_offset=[0] * 9, read_shape=[1] * 9,
                            write_offset=[0] * 9, write_shape=[1] * 9),
     "CannotWork.block.read_offset"),
    (CannotWork, with_block(read_shape=[4, -4]), "CannotWork.block.read_shape[1]"),
    (CannotWork, with_block(write_shape=[-1, 2]), "CannotWork.block.write_shape[0]"),
    (CannotWork, with_block(read_offset=[0, 0.5]), "CannotWork.block.read_offset[1]"),
    (CannotWork, with_block(write_offset=[True, 0]), "CannotWork.block.write_offset[0]"),
    (CannotWork, with_block(write_offset=[None, 0]), "CannotWork.block.write_offset[0]"),
    (CannotWork, with_block(read_offset=[0, -(1 << 63) - 1]),
     "CannotWork.block.read_offset[1]"),
    (CannotWork, with_block(read_shape=[4, 1 << 63]), "CannotWork.block.read_shape[1]"),
    (CannotWork, with_block(read_offset=(0, 0)), None),
    (CannotWork, with_block(read_offset="00"), "CannotWork.block.read_offset"),
    (CannotWork, with_block(read_offset=[[0], [0]]), "CannotWork.block.read_offset[0]"),
    (BlocksAssigned, {"blocks": [GOOD_BLOCK, with_block(index=-1)["block"]]},
     "BlocksAssigned.blocks[1].index"),
    (BlocksAssigned, {"blocks": [GOOD_BLOCK, with_block(read_shape=[4, -4])["block"]]},
     "BlocksAssigned.blocks[1].read_shape[1]"),
    # reports and batches
    (Report, {"results": [], "want": 0}, "Report: expected results or want > 0"),
    (Report, {"results": [[1, 2, None]]}, "Report.want: missing"),
    (Report, {"results": [[1, 2, None]], "want": MAX_BATCH_BLOCKS + 1}, "Report.want"),
    (Report, {"results": [[1, 2, None]], "want": -1}, "Report.want"),
    (Report, {"results": [[1, 2, None]], "want": True}, "Report.want"),
    (Report, {"results": None, "want": 1}, "Report.results"),
    (Report, {"results": [[1, 2, None]] * (MAX_BATCH_BLOCKS + 1), "want": 0},
     "Report.results"),
    (Report, {"results": [[1, 2]], "want": 0}, "Report.results[0]"),
    (Report, {"results": [{"index": 1}], "want": 0}, "Report.results[0]"),
    (Report, {"results": [[-1, 2, None]], "want": 0}, "Report.results[0].index"),
    (Report, {"results": [[1, 2, None], [1.5, 2, None]], "want": 0},
     "Report.results[1].index"),
    (Report, {"results": [[1, 1, None]], "want": 0}, "Report.results[0].status"),
    (Report, {"results": [[1, 0, None]], "want": 0}, "Report.results[0].status"),
    (Report, {"results": [[1, 3, 7]], "want": 0}, "Report.results[0].error"),
    (Report, {"results": [[1, 3, "x" * (MAX_ERROR_CHARS + 1)]], "want": 0},
     "Report.results[0].error"),
    (BlocksAssigned, {"blocks": []}, "BlocksAssigned.blocks"),
    (BlocksAssigned, {"blocks": [GOOD_BLOCK] * (MAX_BATCH_BLOCKS + 1)}, "BlocksAssigned.blocks"),
    (BlocksAssigned, {"blocks": GOOD_BLOCK}, "BlocksAssigned.blocks[0]"),
    (BlocksAssigned, {"blocks": [GOOD_BLOCK, GOOD_BLOCK[:5]]}, "BlocksAssigned.blocks[1]"),
    (BlocksAssigned, {"blocks": [GOOD_BLOCK], "more": 1}, "BlocksAssigned.more: unknown"),
]


@pytest.mark.parametrize(
    ("cls", "body", "fragment"), BAD_BODIES, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in
                                                  enumerate(BAD_BODIES)]
)
def test_invalid_fields_name_message_and_field(
    cls: type[Message], body: object, fragment: str | None
) -> None:
    raw = json.dumps(body, separators=(",", ":")).encode("utf-8")
    if fragment is None:  # tuples are lists in JSON: this body is valid after all
        assert type(decode_one(frame(cls.TYPE_CODE, raw))) is cls
        return
    rejects(frame(cls.TYPE_CODE, raw), fragment)


def test_lone_surrogate_escapes_in_strings_are_rejected() -> None:
    rejects(frame(Refused.TYPE_CODE, b'{"reason":"\\udcff"}'), "Refused.reason")
    body = json.dumps(with_block(task_id="\ud800")).encode()
    rejects(frame(CannotWork.TYPE_CODE, body), "CannotWork.block.task_id")
    body = json.dumps({"blocks": [GOOD_BLOCK, ["\udcff", *GOOD_BLOCK[1:]]]}).encode()
    rejects(frame(BlocksAssigned.TYPE_CODE, body), "BlocksAssigned.blocks[1].task_id")
    body = json.dumps({"block": GOOD_BLOCK, "error": "open('\udcff')"}).encode()
    rejects(frame(CannotWork.TYPE_CODE, body), "CannotWork.error")
    body = json.dumps({"results": [[1, 2, None], [2, 3, "\ud800"]], "want": 0}).encode()
    rejects(frame(Report.TYPE_CODE, body), "Report.results[1].error")


def test_escaped_unicode_in_strings_is_accepted() -> None:
    body = b'{"reason":"caf\\u00e9 \\ud83d\\ude00"}'
    assert decode_one(frame(Refused.TYPE_CODE, body)) == Refused("café 😀")


def test_error_message_does_not_echo_huge_values() -> None:
    error = rejects(frame(Hello.TYPE_CODE, json.dumps({**HELLO, "task_id": [0] * 50_000})
                          .encode()), "Hello.task_id")
    assert len(str(error)) < 300


# ---------------------------------------------------------------- decoder after errors


def test_decoder_is_unusable_after_an_error() -> None:
    decoder = Decoder()
    good = encode(Report((), 1))
    with pytest.raises(ProtocolError):
        decoder.feed(frame(200, b"{}"))
    assert isinstance(decoder.error, ProtocolError)
    assert "unknown message type code 200" in str(decoder.error)
    with pytest.raises(ProtocolError, match="unusable after an earlier error"):
        decoder.feed(good)
    with pytest.raises(ProtocolError, match="unusable"):
        decoder.feed(b"")


def test_error_in_a_later_frame_of_the_same_feed_still_raises() -> None:
    decoder = Decoder()
    with pytest.raises(ProtocolError):
        decoder.feed(encode(Report((), 1)) + frame(Heartbeat.TYPE_CODE, b"{"))
    assert decoder.error is not None


def test_protocol_error_is_a_luigi_daisy_error() -> None:
    assert issubclass(ProtocolError, LuigiDaisyError)


# ------------------------------------------------------------------------ directions


def test_server_side_decoder_accepts_only_client_messages() -> None:
    decoder = Decoder(accept=CLIENT_MESSAGES)
    assert decoder.feed(encode(Report((), 1)) + encode(Heartbeat())) == [Report((), 1),
                                                                         Heartbeat()]
    with pytest.raises(ProtocolError, match="BlocksAssigned: message not allowed"):
        decoder.feed(encode(BlocksAssigned((BLOCK,))))


@pytest.mark.parametrize("message", ONE_OF_EACH, ids=lambda m: type(m).__name__)
def test_each_direction_accepts_exactly_its_messages(message: Message) -> None:
    for accepted in (CLIENT_MESSAGES, SERVER_MESSAGES):
        decoder = Decoder(accept=accepted)
        if type(message) in accepted:
            assert decoder.feed(encode(message)) == [message]
        else:
            with pytest.raises(ProtocolError, match=f"^{type(message).__name__}: message "
                                                    "not allowed in this direction$"):
                decoder.feed(encode(message))


def test_client_side_decoder_accepts_only_server_messages() -> None:
    decoder = Decoder(accept=SERVER_MESSAGES)
    assert decoder.feed(encode(NoMoreBlocks())) == [NoMoreBlocks()]
    with pytest.raises(ProtocolError, match="Hello: message not allowed"):
        decoder.feed(encode(Hello(1, "t", 0, "")))


# ---------------------------------------------------------------------------- encoder


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(TypeError, match="not a protocol message"):
        encode("Heartbeat")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode(BLOCK)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "message",
    [
        BlocksAssigned((dataclasses.replace(BLOCK, index=object()),)),  # type: ignore[arg-type]
        BlocksAssigned((BLOCK, dataclasses.replace(BLOCK, read_shape={1, 2}))),  # type: ignore
        CannotWork(dataclasses.replace(BLOCK, read_offset=(float("nan"),)), "boom"),
        Report((BlockResult(object(), 2),), 0),  # type: ignore[arg-type]
        Refused(b"bytes"),  # type: ignore[arg-type]
        Hello(1, "t", 0, "\ud800"),
    ],
)
def test_encode_turns_unencodable_fields_into_protocol_errors(message: Message) -> None:
    with pytest.raises(ProtocolError, match=type(message).__name__):
        encode(message)


# ------------------------------------------------------------------------------- fuzz


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        decoded = Decoder().feed(data)
    except ProtocolError:
        return
    for message in decoded:
        assert type(message) in MESSAGE_TYPES.values()
        assert decode_one(encode(message)) == message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda children: st.lists(children, max_size=8) | st.dictionaries(texts, children,
                                                                       max_size=5),
    max_leaves=30,
)


@st.composite
def near_valid_bodies(draw: st.DrawFn) -> dict[str, object]:
    """Bodies with the right keys for some message but arbitrary JSON values."""
    cls = draw(st.sampled_from(sorted(MESSAGE_TYPES.values(), key=lambda c: c.TYPE_CODE)))
    keys = [field.name for field in dataclasses.fields(cls)]
    body = {key: draw(json_values) for key in keys}
    if "block" in body and draw(st.booleans()):
        body["block"] = draw(near_valid_blocks())
    if "blocks" in body and draw(st.booleans()):
        body["blocks"] = draw(st.lists(near_valid_blocks(), max_size=3))
    if "results" in body and draw(st.booleans()):
        body["results"] = draw(st.lists(st.lists(st.integers(-1, 4) | json_values,
                                                 min_size=2, max_size=4), max_size=3))
    return {"code": cls.TYPE_CODE, "body": body}


@st.composite
def near_valid_blocks(draw: st.DrawFn) -> list[object]:
    """Blocks in the list form with about the right fields but arbitrary values."""
    return [draw(texts), draw(st.integers(-2, 3)),
            *[draw(st.lists(st.integers(-2, 3) | json_values, max_size=3)) for _ in range(4)],
            draw(st.integers(-1, 4))]


@given(near_valid_bodies())
@settings(max_examples=300)
def test_fuzz_json_bodies(case: dict[str, object]) -> None:
    raw = json.dumps(case["body"]).encode("utf-8")
    try:
        decoded = Decoder().feed(frame(case["code"], raw))  # type: ignore[arg-type]
    except ProtocolError as error:
        # the detailed check names a field (the value shown may hold any text)
        assert ": expected a valid block, got" not in str(error)
        return
    assert len(decoded) == 1
    assert decode_one(encode(decoded[0])) == decoded[0]


@given(st.lists(messages, min_size=1, max_size=3), st.data())
@settings(max_examples=300)
def test_fuzz_mutated_valid_frames(batch: list[Message], data: st.DataObject) -> None:
    stream = bytearray(b"".join(encode(message) for message in batch))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(stream) - 1))
        stream[position] = data.draw(st.integers(0, 255))
    try:
        decoded = Decoder(max_frame_bytes=4096).feed(bytes(stream))
    except ProtocolError:
        return
    for message in decoded:
        assert decode_one(encode(message)) == message


# ---------------------------------------------------------------------- authentication


def test_proof_is_hmac_sha256_of_the_nonce() -> None:
    nonce = new_nonce()
    token = new_token()
    expected = hmac.new(token.encode(), nonce.encode(), hashlib.sha256).hexdigest()
    assert proof_for(token, nonce) == expected
    assert len(expected) == 64


def test_verify_proof_true_and_false() -> None:
    token, nonce = new_token(), new_nonce()
    proof = proof_for(token, nonce)
    assert verify_proof(token, nonce, proof)
    assert not verify_proof(new_token(), nonce, proof)  # wrong token
    assert not verify_proof(token, new_nonce(), proof)  # replayed proof for another nonce
    assert not verify_proof(token, nonce, "")  # no proof while the run has a token
    assert not verify_proof(token, nonce, proof[:-1])
    assert not verify_proof(token, nonce, proof.upper())
    assert not verify_proof(token, nonce, "é" * 64)
    assert not verify_proof(token, nonce, None)  # type: ignore[arg-type]


def test_runs_without_a_token() -> None:
    nonce = new_nonce()
    for no_token in ("", None):
        assert proof_for(no_token, nonce) == ""
        assert verify_proof(no_token, nonce, "")
        assert not verify_proof(no_token, nonce, proof_for("secret", nonce))


def test_proof_travels_in_hello() -> None:
    token = new_token()
    challenge = decode_one(encode(Challenge(new_nonce())))
    assert isinstance(challenge, Challenge)
    hello = decode_one(encode(Hello(PROTOCOL_VERSION, "t", 0, proof_for(token, challenge.nonce))))
    assert isinstance(hello, Hello)
    assert verify_proof(token, challenge.nonce, hello.proof)


@given(texts, st.text(lower_hex, min_size=1, max_size=256))
def test_proofs_always_pass_hello_validation(token: str, nonce: str) -> None:
    proof = proof_for(token, nonce)
    hello = Hello(PROTOCOL_VERSION, "t", 0, proof)
    assert decode_one(encode(hello)) == hello


def test_nonces_and_tokens_are_fresh_hex() -> None:
    values = {new_nonce() for _ in range(50)} | {new_token() for _ in range(50)}
    assert len(values) == 100
    for value in values:
        assert len(value) == 64 and set(value) <= set(lower_hex)


def test_a_full_report_with_one_error_fits_the_default_frame() -> None:
    """The worker loop sends a failed block's result at once, so a Report carries at
    most one error text: the largest such frame still fits."""
    results = tuple(BlockResult((1 << 63) - 1 - i, 2) for i in range(MAX_BATCH_BLOCKS - 1))
    worst = "\U0010ffff" * (3 * MAX_ERROR_CHARS)
    report = Report((*results, BlockResult(0, 3, worst)), MAX_BATCH_BLOCKS)
    assert decode_one(encode(report)) == report


def test_a_full_batch_of_the_largest_blocks_fits_the_default_frame() -> None:
    block = WireBlock("t" * 1000, (1 << 63) - 1, (-(1 << 63),) * MAX_DIMS,
                      ((1 << 63) - 1,) * MAX_DIMS, (-(1 << 63),) * MAX_DIMS,
                      ((1 << 63) - 1,) * MAX_DIMS, 1, 2**128 - 1)
    batch = BlocksAssigned((block,) * MAX_BATCH_BLOCKS)
    assert decode_one(encode(batch)) == batch


def test_report_results_are_truncated_like_other_error_texts() -> None:
    result = BlockResult(1, 3, "x" * (2 * MAX_ERROR_CHARS))
    assert len(result.error) <= MAX_ERROR_CHARS
    assert decode_one(encode(Report((result,), 0))).results[0].error == result.error


def test_the_server_direction_refuses_a_report_and_the_client_a_batch() -> None:
    with pytest.raises(ProtocolError, match="not allowed in this direction"):
        Decoder(accept=SERVER_MESSAGES).feed(encode(Report((), 1)))
    with pytest.raises(ProtocolError, match="not allowed in this direction"):
        Decoder(accept=CLIENT_MESSAGES).feed(encode(BlocksAssigned((BLOCK,))))
