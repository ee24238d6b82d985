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
    Acquire,
    BlockAssigned,
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
    Release,
    ReleaseAndAcquire,
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
    )


errors = st.none() | st.text(alphabet=st.characters(codec="utf-8"), max_size=300)

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
    st.builds(Acquire),
    st.builds(ReleaseAndAcquire, block=wire_blocks(), error=errors),
    st.builds(Release, block=wire_blocks(), error=errors),
    st.builds(Heartbeat),
    st.builds(Bye),
    st.builds(BlockAssigned, block=wire_blocks()),
    st.builds(NoMoreBlocks),
    st.builds(CannotWork, block=wire_blocks(), error=texts),
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
    Acquire(),
    ReleaseAndAcquire(dataclasses.replace(BLOCK, status=2), None),
    Release(dataclasses.replace(BLOCK, status=3), "Traceback (most recent call last):\n  é ✓"),
    Heartbeat(),
    Bye(),
    BlockAssigned(BLOCK),
    BlockAssigned(dataclasses.replace(BLOCK, number=2**70)),  # daisy's id travels too
    NoMoreBlocks(),
    CannotWork(dataclasses.replace(BLOCK, status=3), "setup_worker failed: ✗"),
    Report((BlockResult(7, 2), BlockResult(8, 3, "Traceback: ✗")), 2),
    Report((), 1),
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


def test_message_set_is_closed_and_codes_are_unique_bytes() -> None:
    assert len(MESSAGE_TYPES) == 14
    # dataclass(slots=True) replaces each class, so compare what the module exports
    subclasses = {getattr(protocol, cls.__name__) for cls in Message.__subclasses__()}
    assert set(MESSAGE_TYPES.values()) == subclasses
    for code, cls in MESSAGE_TYPES.items():
        assert cls.TYPE_CODE == code and 0 <= code <= 255
    assert CLIENT_MESSAGES | SERVER_MESSAGES == set(MESSAGE_TYPES.values())
    assert CLIENT_MESSAGES & SERVER_MESSAGES == {Heartbeat}


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
    data = encode(BlockAssigned(BLOCK))
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    assert data[4] == BlockAssigned.TYPE_CODE
    assert json.loads(data[5:].decode("utf-8")) == {
        "block": ["predict", 7, [-4, 0, 8], [24, 24, 24], [0, 4, 12], [16, 16, 16], 1]
    }
    assert b" " not in data[5:]  # compact separators
    assert encode(Acquire()) == frame(Acquire.TYPE_CODE, b"{}")


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
    decoded = decode_one(encode(BlockAssigned(BLOCK)))
    assert isinstance(decoded, BlockAssigned)
    block = decoded.block
    assert block == BLOCK and hash(block) == hash(BLOCK)
    assert type(block.read_offset) is tuple
    assert dataclasses.replace(block, status=2).status == 2


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
    data = bytearray(encode(Acquire()) + encode(Bye())[:3])
    decoder = Decoder()
    assert decoder.feed(data) == [Acquire()]
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
    message = ReleaseAndAcquire(dataclasses.replace(BLOCK, status=3), traceback)
    assert message.error is not None
    assert len(message.error) <= MAX_ERROR_CHARS
    assert message.error.startswith("Traceback (most recent call last):")
    assert message.error.endswith("ValueError: boom")
    assert "characters truncated" in message.error
    data = encode(message)
    assert len(data) <= MAX_FRAME_BYTES
    assert decode_one(data) == message


def test_worst_case_error_text_still_fits_the_default_frame() -> None:
    # Control characters are escaped as \u00XX: six bytes on the wire per character.
    for text in ("\x01" * (2 * MAX_ERROR_CHARS), "😀" * (2 * MAX_ERROR_CHARS)):
        message = Release(BLOCK, text)
        assert decode_one(encode(message)) == message


def test_truncate_error() -> None:
    assert truncate_error("short") == "short"
    text = "a" * (MAX_ERROR_CHARS + 1)
    assert len(truncate_error(text)) <= MAX_ERROR_CHARS
    assert truncate_error("x" * MAX_ERROR_CHARS) == "x" * MAX_ERROR_CHARS


def test_lone_surrogates_in_error_texts_are_escaped() -> None:
    # Tracebacks may contain file names decoded with surrogateescape.
    message = Release(BLOCK, "open('/data/\udcff.zarr') failed")
    assert message.error == "open('/data/\\udcff.zarr') failed"
    assert decode_one(encode(message)) == message
    assert Refused("\ud800").reason == "\\ud800"


@given(texts, st.integers(0, 3 * MAX_ERROR_CHARS))
@settings(max_examples=50)
def test_truncated_errors_always_encode(piece: str, length: int) -> None:
    text = (piece * (length // max(len(piece), 1) + 1))[:length]
    message = Release(BLOCK, text)
    assert message.error is not None and len(message.error) <= MAX_ERROR_CHARS
    assert decode_one(encode(message)) == message


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
    rejects(frame(Acquire.TYPE_CODE, body), "Acquire")


@pytest.mark.parametrize("body", [b"[]", b"1", b'"x"', b"null", b"true"])
def test_body_must_be_an_object(body: bytes) -> None:
    rejects(frame(Welcome.TYPE_CODE, body), "Welcome: body must be a JSON object")


@pytest.mark.parametrize("body", [b"\xff", b'{"reason":"\xc3"}', b'{"reason":"\xed\xa0\x80"}'])
def test_non_utf8_body(body: bytes) -> None:
    rejects(frame(Refused.TYPE_CODE, body), "Refused: body is not valid UTF-8")


def test_utf16_json_is_not_accepted() -> None:
    rejects(frame(Acquire.TYPE_CODE, "{}".encode("utf-16")), "Acquire")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_rejected(constant: str) -> None:
    body = f'{{"protocol_version":{constant},"task_id":"t","worker_id":0,"proof":""}}'
    rejects(frame(Hello.TYPE_CODE, body.encode()), "Hello", constant)


def test_deep_nesting_is_a_protocol_error() -> None:
    rejects(frame(Acquire.TYPE_CODE, b"[" * 100_000 + b"]" * 100_000), "Acquire")


def test_huge_integer_literal_is_a_protocol_error() -> None:
    body = b'{"protocol_version":' + b"9" * 10_000 + b',"task_id":"t","worker_id":0,"proof":""}'
    rejects(frame(Hello.TYPE_CODE, body), "Hello")


def test_duplicate_keys_are_rejected() -> None:
    rejects(frame(Refused.TYPE_CODE, b'{"reason":"a","reason":"b"}'), "Refused", "duplicate")


HELLO = {"protocol_version": 1, "task_id": "t", "worker_id": 0, "proof": ""}
GOOD_BLOCK = ["t", 0, [0, 0], [4, 4], [1, 1], [2, 2], 1]


def with_block(**changes: object) -> dict[str, object]:
    """A ReleaseAndAcquire body whose block has the given positions replaced."""
    names = ["task_id", "index", "read_offset", "read_shape", "write_offset", "write_shape",
             "status"]
    block = list(GOOD_BLOCK)
    for name, value in changes.items():
        block[names.index(name)] = value
    return {"block": block, "error": None}


BAD_BODIES: list[tuple[type[Message], object, str]] = [
    # missing, unknown and misspelt keys
    (Hello, {k: v for k, v in HELLO.items() if k != "proof"}, "Hello.proof: missing"),
    (Hello, {**HELLO, "color": "red"}, "Hello.color: unknown field"),
    (Welcome, {"x": 1}, "Welcome.x: unknown field"),
    (Challenge, {}, "Challenge.nonce: missing"),
    (ReleaseAndAcquire, {"block": GOOD_BLOCK}, "ReleaseAndAcquire.error: missing"),
    (BlockAssigned, {"block": GOOD_BLOCK, "error": None}, "BlockAssigned.error: unknown"),
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
    (Release, {"block": GOOD_BLOCK, "error": 3}, "Release.error"),
    (Release, {"block": GOOD_BLOCK, "error": "x" * (MAX_ERROR_CHARS + 1)}, "Release.error"),
    # blocks
    (BlockAssigned, {"block": None}, "BlockAssigned.block"),
    (BlockAssigned, {"block": {"task_id": "t"}}, "BlockAssigned.block"),
    (BlockAssigned, {"block": GOOD_BLOCK[:6]}, "BlockAssigned.block"),
    (BlockAssigned, {"block": [*GOOD_BLOCK, 0, 0]}, "BlockAssigned.block"),
    (BlockAssigned, {"block": [*GOOD_BLOCK, -1]}, "BlockAssigned.block.number"),
    (BlockAssigned, {"block": [*GOOD_BLOCK, "12"]}, "BlockAssigned.block.number"),
    (Release, {"block": GOOD_BLOCK[:6] + ["1"], "error": None}, "Release.block.status"),
    (ReleaseAndAcquire, with_block(task_id=1), "ReleaseAndAcquire.block.task_id"),
    (ReleaseAndAcquire, with_block(index=-1), "ReleaseAndAcquire.block.index"),
    (ReleaseAndAcquire, with_block(index=1.0), "ReleaseAndAcquire.block.index"),
    (ReleaseAndAcquire, with_block(index=False), "ReleaseAndAcquire.block.index"),
    (ReleaseAndAcquire, with_block(index=1 << 63), "ReleaseAndAcquire.block.index"),
    (ReleaseAndAcquire, with_block(status=4), "ReleaseAndAcquire.block.status"),
    (ReleaseAndAcquire, with_block(status=-1), "ReleaseAndAcquire.block.status"),
    (ReleaseAndAcquire, with_block(read_offset=[0]), "same length"),
    (ReleaseAndAcquire, with_block(write_shape=[2, 2, 2]), "same length"),
    (ReleaseAndAcquire, with_block(read_offset=[], read_shape=[], write_offset=[],
                                   write_shape=[]), "ReleaseAndAcquire.block.read_offset"),
    (ReleaseAndAcquire, with_block(read_offset=[0] * 9, read_shape=[1] * 9,
                                   write_offset=[0] * 9, write_shape=[1] * 9),
     "ReleaseAndAcquire.block.read_offset"),
    (ReleaseAndAcquire, with_block(read_shape=[4, -4]), "ReleaseAndAcquire.block.read_shape[1]"),
    (ReleaseAndAcquire, with_block(write_shape=[-1, 2]),
     "ReleaseAndAcquire.block.write_shape[0]"),
    (ReleaseAndAcquire, with_block(read_offset=[0, 0.5]),
     "ReleaseAndAcquire.block.read_offset[1]"),
    (ReleaseAndAcquire, with_block(write_offset=[True, 0]),
     "ReleaseAndAcquire.block.write_offset[0]"),
    (ReleaseAndAcquire, with_block(write_offset=[None, 0]),
     "ReleaseAndAcquire.block.write_offset[0]"),
    (ReleaseAndAcquire, with_block(read_offset=[0, -(1 << 63) - 1]),
     "ReleaseAndAcquire.block.read_offset[1]"),
    (ReleaseAndAcquire, with_block(read_shape=[4, 1 << 63]),
     "ReleaseAndAcquire.block.read_shape[1]"),
    (ReleaseAndAcquire, with_block(read_offset=(0, 0)), None),
    (ReleaseAndAcquire, with_block(read_offset="00"), "ReleaseAndAcquire.block.read_offset"),
    (ReleaseAndAcquire, with_block(read_offset=[[0], [0]]),
     "ReleaseAndAcquire.block.read_offset[0]"),
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
    rejects(frame(ReleaseAndAcquire.TYPE_CODE, body), "ReleaseAndAcquire.block.task_id")


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
    good = encode(Acquire())
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
        decoder.feed(encode(Acquire()) + frame(Acquire.TYPE_CODE, b"{"))
    assert decoder.error is not None


def test_protocol_error_is_a_luigi_daisy_error() -> None:
    assert issubclass(ProtocolError, LuigiDaisyError)


# ------------------------------------------------------------------------ directions


def test_server_side_decoder_accepts_only_client_messages() -> None:
    decoder = Decoder(accept=CLIENT_MESSAGES)
    assert decoder.feed(encode(Acquire()) + encode(Heartbeat())) == [Acquire(), Heartbeat()]
    with pytest.raises(ProtocolError, match="BlockAssigned: message not allowed"):
        decoder.feed(encode(BlockAssigned(BLOCK)))


def test_client_side_decoder_accepts_only_server_messages() -> None:
    decoder = Decoder(accept=SERVER_MESSAGES)
    assert decoder.feed(encode(NoMoreBlocks())) == [NoMoreBlocks()]
    with pytest.raises(ProtocolError, match="Hello: message not allowed"):
        decoder.feed(encode(Hello(1, "t", 0, "")))


# ---------------------------------------------------------------------------- encoder


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(TypeError, match="not a protocol message"):
        encode("Acquire")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode(BLOCK)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "message",
    [
        BlockAssigned(dataclasses.replace(BLOCK, index=object())),  # type: ignore[arg-type]
        BlockAssigned(dataclasses.replace(BLOCK, read_shape={1, 2})),  # type: ignore[arg-type]
        Release(dataclasses.replace(BLOCK, read_offset=(float("nan"),)), None),
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
        body["block"] = [draw(texts), draw(st.integers(-2, 3)),
                         *[draw(st.lists(st.integers(-2, 3) | json_values, max_size=3))
                           for _ in range(4)], draw(st.integers(-1, 4))]
    return {"code": cls.TYPE_CODE, "body": body}


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


def test_report_results_are_truncated_like_release_errors() -> None:
    result = BlockResult(1, 3, "x" * (2 * MAX_ERROR_CHARS))
    assert len(result.error) <= MAX_ERROR_CHARS
    assert decode_one(encode(Report((result,), 0))).results[0].error == result.error


def test_the_server_direction_refuses_a_report_and_the_client_a_batch() -> None:
    with pytest.raises(ProtocolError, match="not allowed in this direction"):
        Decoder(accept=SERVER_MESSAGES).feed(encode(Report((), 1)))
    with pytest.raises(ProtocolError, match="not allowed in this direction"):
        Decoder(accept=CLIENT_MESSAGES).feed(encode(BlocksAssigned((BLOCK,))))
