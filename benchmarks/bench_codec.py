"""The wire codec per block: ``luigi_daisy.protocol`` against msgspec (JSON and msgpack).

The issue asked whether msgspec, whose typed structs decode and validate JSON or
msgpack in one pass in C, should replace the hand-written codec. This script encodes
and decodes the two hot messages, the server's ``BlocksAssigned`` and the worker's
``Report``, with batches of 1 and 16 blocks, three ways:

``protocol``
    ``luigi_daisy.protocol.encode`` and ``Decoder.feed``: framing, strict validation
    with errors that name the field, frozen dataclasses.
``msgspec-json`` / ``msgspec-msgpack``
    ``msgspec.Struct`` equivalents held to the same rules where msgspec can state them
    (``Meta`` bounds on every integer and list, unknown fields refused, the four
    coordinate lists of equal length in ``__post_init__``), with the same 5-byte frame
    header. One rule cannot be kept: msgspec integers stop at 64 bits, and daisy's
    block numbers (Cantor numbers) of large 5D grids exceed that; the structs here
    carry them as integers anyway, so msgspec is measured at its best.

It prints microseconds per block (encode + decode, medians of ``--repeat`` timings)
and the ratios. Requires ``pip install msgspec`` (not a dependency of luigi_daisy).

Usage::

    python benchmarks/bench_codec.py
    python benchmarks/bench_codec.py --repeat 9 --number 2000
"""

# no "from __future__ import annotations": msgspec reads the structs' annotations

import argparse
import statistics
import struct
import sys
import timeit
from pathlib import Path
from typing import Annotated, Any, Literal

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from luigi_daisy.protocol import (  # noqa: E402
    MAX_BATCH_BLOCKS,
    MAX_DIMS,
    MAX_ERROR_CHARS,
    BlockResult,
    BlocksAssigned,
    Decoder,
    Report,
    WireBlock,
    encode,
)

INT64_MAX = (1 << 63) - 1
HEADER = struct.Struct(">IB")


def msgspec_codecs() -> dict[str, tuple[Any, Any, Any, Any]] | None:
    """(encode, decode) of BlocksAssigned and Report, for JSON and msgpack."""
    try:
        import msgspec
        from msgspec import Meta, Struct
    except ImportError:
        return None
    Int64 = Annotated[int, Meta(ge=-(1 << 63), le=INT64_MAX)]
    Size = Annotated[int, Meta(ge=0, le=INT64_MAX)]
    Coordinates = Annotated[list[Int64], Meta(min_length=1, max_length=MAX_DIMS)]
    Shape = Annotated[list[Size], Meta(min_length=1, max_length=MAX_DIMS)]

    class Block(Struct, array_like=True, forbid_unknown_fields=True):
        task_id: str
        index: Size
        read_offset: Coordinates
        read_shape: Shape
        write_offset: Coordinates
        write_shape: Shape
        status: Annotated[int, Meta(ge=0, le=3)]
        number: Size | None = None

        def __post_init__(self) -> None:
            if not (len(self.read_offset) == len(self.read_shape) == len(self.write_offset)
                    == len(self.write_shape)):
                raise ValueError("read_offset, read_shape, write_offset and write_shape "
                                 "of the same length")

    class Assigned(Struct, forbid_unknown_fields=True):
        blocks: Annotated[list[Block], Meta(min_length=1, max_length=MAX_BATCH_BLOCKS)]

    class Result(Struct, array_like=True, forbid_unknown_fields=True):
        index: Size
        status: Literal[2, 3]
        error: Annotated[str, Meta(max_length=MAX_ERROR_CHARS)] | None

    class Reported(Struct, forbid_unknown_fields=True):
        results: Annotated[list[Result], Meta(max_length=MAX_BATCH_BLOCKS)]
        want: Annotated[int, Meta(ge=0, le=MAX_BATCH_BLOCKS)]

    codecs = {}
    for name, module in (("msgspec-json", msgspec.json), ("msgspec-msgpack", msgspec.msgpack)):
        encoder = module.Encoder()
        assigned_decoder = module.Decoder(Assigned)
        report_decoder = module.Decoder(Reported)

        def framed(code: int, message: Any, encoder: Any = encoder) -> bytes:
            body = encoder.encode(message)
            return HEADER.pack(len(body) + 1, code) + body

        def assigned(blocks: list[WireBlock]) -> Any:
            return Assigned([Block(b.task_id, b.index, list(b.read_offset),
                                   list(b.read_shape), list(b.write_offset),
                                   list(b.write_shape), b.status, b.number)
                             for b in blocks])

        def reported(results: list[BlockResult], want: int) -> Any:
            return Reported([Result(r.index, r.status, r.error) for r in results], want)

        codecs[name] = (
            lambda blocks, f=framed, a=assigned: f(14, a(blocks)),
            lambda frame, d=assigned_decoder: d.decode(memoryview(frame)[5:]),
            lambda results, want, f=framed, r=reported: f(13, r(results, want)),
            lambda frame, d=report_decoder: d.decode(memoryview(frame)[5:]),
        )
    return codecs


def sample(batch: int) -> tuple[list[WireBlock], list[BlockResult]]:
    blocks = [WireBlock("segment", 1000 + i, (120 + 40 * i, -8, 32), (56, 56, 56),
                        (128 + 40 * i, 0, 40), (40, 40, 40), 1, 4_000_000 + i)
              for i in range(batch)]
    results = [BlockResult(1000 + i, 2) for i in range(batch)]
    return blocks, results


def time_per_block(function: Any, batch: int, number: int, repeat: int) -> float:
    timings = timeit.repeat(function, number=number, repeat=repeat)
    return 1e6 * statistics.median(timings) / number / batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--number", type=int, default=1000)
    args = parser.parse_args(argv)
    codecs = msgspec_codecs()
    if codecs is None:
        print("msgspec is not installed: pip install msgspec")
        return 1
    rows = []
    for batch in (1, 16):
        blocks, results = sample(batch)
        assigned_frame = encode(BlocksAssigned(tuple(blocks)))
        report_frame = encode(Report(tuple(results), batch))
        timings = {
            ("BlocksAssigned", "protocol"): time_per_block(
                lambda: Decoder().feed(encode(BlocksAssigned(tuple(blocks)))),
                batch, args.number, args.repeat),
            ("Report", "protocol"): time_per_block(
                lambda: Decoder().feed(encode(Report(tuple(results), batch))),
                batch, args.number, args.repeat),
        }
        for name, (encode_assigned, decode_assigned, encode_report,
                   decode_report) in codecs.items():
            timings[("BlocksAssigned", name)] = time_per_block(
                lambda: decode_assigned(encode_assigned(blocks)), batch, args.number,
                args.repeat)
            timings[("Report", name)] = time_per_block(
                lambda: decode_report(encode_report(results, batch)), batch, args.number,
                args.repeat)
            sizes = (len(encode_assigned(blocks)), len(encode_report(results, batch)))
            rows.append((f"{name} frame bytes", batch, *sizes))
        rows.append(("protocol frame bytes", batch, len(assigned_frame), len(report_frame)))
        for message in ("BlocksAssigned", "Report"):
            base = timings[(message, "protocol")]
            for name in ("protocol", *codecs):
                value = timings[(message, name)]
                print(f"{message:15} batch {batch:2}  {name:16} {value:6.2f} us/block "
                      f"encode+decode  ({base / value:4.1f}x protocol's speed)")
    print()
    for label, batch, assigned_bytes, report_bytes in rows:
        print(f"{label:28} batch {batch:2}: BlocksAssigned {assigned_bytes:5} B, "
              f"Report {report_bytes:5} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
