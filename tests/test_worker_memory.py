"""A worker keeps the memory of a block's freed arrays for the next block (glibc), unless
the user set glibc's malloc: real runs, real worker processes, page faults counted by
the kernel (``getrusage``)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

import luigi_daisy as daisy
from luigi_daisy import Roi

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_stray_processes")]

if not os.confstr("CS_GNU_LIBC_VERSION"):
    pytest.skip("glibc's malloc only", allow_module_level=True)

#: floats of the arrays of a block: 8 to 24 MB, and half as much beside each
SIZES = (1_000_000, 2_000_000, 3_000_000)


def faults_of_later_blocks(folder: Path, block) -> None:
    """Allocate, fill and free the arrays of one block, then of twelve more blocks of
    at most that size; record the minor faults of the twelve."""
    import numpy as np

    largest, beside = np.ones(max(SIZES)), np.ones(max(SIZES) // 2)
    del largest, beside
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for size in SIZES * 4:
        array, beside = np.ones(size), np.ones(size // 2)
        del array, beside
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    (folder / f"faults_{block.index}").write_text(str(faults))


def second_array_faults(tmp_path: Path) -> int:
    import functools

    task = daisy.Task("memory", total_roi=Roi((0,), (1,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)), read_write_conflict=False,
                      process_function=functools.partial(faults_of_later_blocks,
                                                         tmp_path))
    assert daisy.run_blockwise([task], progress=False, log_dir=tmp_path / "logs",
                               ledger_dir=tmp_path / "ledgers")
    return int((tmp_path / "faults_0").read_text())


def test_a_worker_reuses_the_memory_of_freed_arrays(tmp_path):
    # glibc's defaults: about 3,000 (its trims and maps give the pages back each time)
    assert second_array_faults(tmp_path) < 300


def test_a_users_own_malloc_settings_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # any of glibc's malloc variables
    assert second_array_faults(tmp_path) > 1000
