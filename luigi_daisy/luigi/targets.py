"""Luigi targets over ledgers: a blockwise task is complete when its ledger says so."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import luigi

from ..ledger import ledger_path


def ledger_progress(path: str | os.PathLike) -> tuple[int, dict | None]:
    """``(blocks done, geometry)`` recorded in a ledger file, in one query.

    A missing or unreadable file reads as ``(0, None)``.
    """
    path = Path(path)
    if not path.is_file():
        return 0, None
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            done, geometry = connection.execute(
                "SELECT (SELECT COUNT(*) FROM done), "
                "(SELECT value FROM meta WHERE key = 'geometry')").fetchone()
        finally:
            connection.close()
    except sqlite3.DatabaseError:
        return 0, None
    return done, (json.loads(geometry) if geometry else None)


class LedgerTarget(luigi.Target):
    """Exists when the ledger of a task records every one of its blocks as done.

    Parameters
    ----------
    folder:
        The ledger folder.
    task_id:
        The task whose ledger is read.
    geometry:
        The task's current geometry (``BlockGrid.describe()``); a ledger written for
        another geometry does not count.
    """

    def __init__(self, folder: str | os.PathLike, task_id: str, geometry: dict) -> None:
        self.path = ledger_path(folder, task_id)
        self.task_id = task_id
        self.geometry = geometry

    def blocks_done(self) -> int:
        """Blocks recorded as done for the current geometry."""
        done, geometry = ledger_progress(self.path)
        if geometry != self.geometry:
            return 0
        return done

    def exists(self) -> bool:
        """Whether every block is recorded as done."""
        return self.blocks_done() >= self.geometry["num_blocks"]

    def __repr__(self) -> str:
        return f"LedgerTarget({str(self.path)!r})"
