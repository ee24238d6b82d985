"""``prepare_ds(..., mode="a")`` called by several processes at once, as every worker's
``setup_worker`` does when it prepares the task's output: one creates the array, the
others reuse it; none fails."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from luigi_daisy import Roi, open_ds, prepare_ds

pytestmark = pytest.mark.timeout(120)

PROCESSES = 6
ROUNDS = 8


def prepare_after_barrier(path: str, barrier, results) -> None:
    try:
        barrier.wait(timeout=30)
        array = prepare_ds(path, Roi((0, 0), (64, 64)), (1, 1), np.uint8, write_size=(16, 16))
        array[Roi((0, 0), (16, 16))] = 1
        results.put("ok")
    except Exception as error:  # noqa: BLE001 - reported to the test
        results.put(f"{type(error).__name__}: {error}")


def test_processes_preparing_one_array_at_once_all_get_it(tmp_path, no_stray_processes):
    context = multiprocessing.get_context("fork")
    for round_number in range(ROUNDS):
        path = str(tmp_path / f"round_{round_number}.zarr")
        barrier = context.Barrier(PROCESSES)
        results = context.Queue()
        processes = [context.Process(target=prepare_after_barrier, args=(path, barrier, results))
                     for _ in range(PROCESSES)]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(30)
        assert outcomes == ["ok"] * PROCESSES, outcomes
        array = open_ds(path)
        assert array.roi == Roi((0, 0), (64, 64)) and array.chunk_shape == (16, 16)


def test_an_incompatible_array_created_meanwhile_is_still_refused(tmp_path):
    path = str(tmp_path / "other.zarr")
    prepare_ds(path, Roi((0, 0), (32, 32)), (1, 1), np.uint8)
    with pytest.raises(Exception, match="differs"):
        prepare_ds(path, Roi((0, 0), (64, 64)), (1, 1), np.uint8)
