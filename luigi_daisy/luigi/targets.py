"""Luigi targets over ledgers: a blockwise task is complete when its ledger says so."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import luigi
import numpy as np
import zarr
import zarr.errors
from funlib.geometry import Roi

from ..datasets import Array, open_ds, prepare_ds
from ..errors import LedgerError
from ..ledger import ledger_path, read_ledger_summary

#: the folder, inside or next to a task's first output, that holds its record
RECORD_FOLDER = ".luigi_daisy"


def record_folder_of(target: luigi.Target) -> Path | None:
    """Where a task whose first output is ``target`` keeps its record of done blocks:
    inside a local zarr array (``<array>/.luigi_daisy``), next to a local file or folder
    (``<its folder>/.luigi_daisy``); None for any other target (a remote store, a
    database), whose task keeps its record in ``ledger_dir``."""
    if isinstance(target, ZarrTarget):
        if "://" in target.path:
            return None
        return Path(target.path) / RECORD_FOLDER
    if isinstance(target, luigi.LocalTarget):
        return Path(target.path).parent / RECORD_FOLDER
    return None


def ledger_progress(path: str | os.PathLike) -> tuple[int, dict | None]:
    """``(blocks done, geometry)`` recorded in a ledger file, in one query.

    A missing or unreadable file reads as ``(0, None)``.
    """
    try:
        summary = read_ledger_summary(path)
    except LedgerError:
        return 0, None
    return summary["done"], summary["geometry"]


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

    def summary(self) -> dict | None:
        """What the record holds (:func:`~luigi_daisy.ledger.read_ledger_summary`);
        None when it is missing, unreadable or of another geometry."""
        try:
            summary = read_ledger_summary(self.path)
        except LedgerError:
            return None
        return summary if summary["geometry"] == self.geometry else None

    def blocks_done(self) -> int:
        """Blocks recorded as done for the current geometry."""
        summary = self.summary()
        return 0 if summary is None else summary["done"]

    def exists(self) -> bool:
        """Whether every block is recorded as done."""
        return self.blocks_done() >= self.geometry["num_blocks"]

    def __repr__(self) -> str:
        return f"LedgerTarget({str(self.path)!r})"


class ZarrTarget(luigi.Target):
    """A Luigi target for a zarr array (a dataset of :func:`prepare_ds`).

    ``exists()`` is true once the array exists; it says nothing about which blocks were
    written (a blockwise task's ledger says that).

    Parameters
    ----------
    path:
        The array, or the container holding it when ``dataset`` is given.
    dataset:
        Path of the array inside ``path`` (daisy's ``filename, ds_name`` pair).
    """

    def __init__(self, path: str | os.PathLike, dataset: str | None = None) -> None:
        path = os.fspath(path)
        if dataset:
            path = f"{path.rstrip('/')}/{dataset.strip('/')}"
        self.path = path

    def exists(self) -> bool:
        """Whether a zarr array exists at ``path``."""
        try:
            zarr.open_array(store=self.path, mode="r")
        except (FileNotFoundError, zarr.errors.NodeTypeValidationError):
            return False
        return True

    def open(self, mode: str = "r", fill_value: Any = 0) -> Array:
        """The array (see :func:`open_ds`)."""
        return open_ds(self.path, mode=mode, fill_value=fill_value)

    def prepare(self, total_roi: Roi, voxel_size: Sequence[int], dtype: Any = np.float32,
                **kwargs: Any) -> Array:
        """Create or reuse the array (see :func:`prepare_ds`)."""
        return prepare_ds(self.path, total_roi, voxel_size, dtype, **kwargs)

    def __repr__(self) -> str:
        return f"ZarrTarget({self.path!r})"
