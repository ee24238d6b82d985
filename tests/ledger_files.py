"""A ledger record read from its files directly (manifest, then the zlib-compressed
bitmap chunks it names), as a reader on another host would, not through ``Ledger``."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np


def record_manifest(path: Path) -> dict | None:
    """The manifest of the record ``path``; None while there is none (not created yet)."""
    try:
        return json.loads((Path(path) / "manifest.json").read_text())
    except FileNotFoundError:
        return None


def record_done(path: Path) -> set[int]:
    """The done blocks of the record ``path``; empty while it has no manifest. Reads
    the manifest again when a chunk it named was replaced meanwhile (a live writer)."""
    for _ in range(50):
        manifest = record_manifest(path)
        if manifest is None:
            return set()
        done: set[int] = set()
        try:
            for chunk, generation, _, _ in manifest["chunks"]:
                data = (Path(path) / f"done-{chunk}-{generation}.zz").read_bytes()
                bits = np.unpackbits(np.frombuffer(zlib.decompress(data), dtype=np.uint8))
                done.update((np.flatnonzero(bits) + chunk * manifest["chunk_blocks"]).tolist())
        except FileNotFoundError:
            continue
        return done
    raise AssertionError(f"the chunks of {path} kept vanishing")


def record_done_count(path: Path) -> int:
    """How many blocks the record ``path`` holds (its manifest); 0 before it has one."""
    manifest = record_manifest(path)
    return 0 if manifest is None else int(manifest["done"])
