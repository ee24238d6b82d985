"""The two smaller examples through the ``luigi`` command: daisy's quick start (map and
reduce over a zarr array) and a worker with an expensive setup (a model loaded once per
worker process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from luigi_daisy import open_ds

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
RUN_DEADLINE = 90.0


def run_luigi(folder: Path, *arguments: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("LUIGI_CONFIG_PATH", None)
    beside = Path(sys.executable).parent / "luigi"
    command = [str(beside)] if beside.exists() else ["luigi"]
    result = subprocess.run(
        command + list(arguments) + ["--local-scheduler", "--retcode-task-failed", "3",
                                     "--retcode-scheduling-error", "4",
                                     # Luigi's pid file per command line, kept here so
                                     # that a concurrent test suite is not a second copy
                                     "--lock-pid-dir", str(folder / "luigi-pids")],
        cwd=folder, env=env, capture_output=True, text=True, timeout=RUN_DEADLINE)
    assert result.returncode == 0, result.stderr[-5000:]
    return result.stdout


def test_the_quickstart_map_and_reduce(tmp_path):
    size, parts = 409600, 16
    output = run_luigi(tmp_path, "--module", "examples.quickstart", "Total", "--size", str(size),
                       "--block-size", "4096", "--parts", str(parts), "--num-workers", "2")
    data = tmp_path / "quickstart_data"
    squares = open_ds(str(data / "b.zarr")).to_ndarray()
    np.testing.assert_array_equal(squares, np.arange(size, dtype=np.int64) ** 2)
    result = json.loads((data / "total.json").read_text())
    expected_parts = [int(part.sum()) for part in np.split(squares, parts)]
    assert result["partial_sums"] == expected_parts
    # the exact sum of the squares 0 .. n-1, beyond 64 bits for daisy's own size
    assert result["total"] == (size - 1) * size * (2 * size - 1) // 6
    assert str(result["total"]) in output


def test_the_model_is_loaded_once_per_worker(tmp_path):
    from examples.model import CONTEXT, predict

    size, block_size, workers = 64, 16, 2
    blocks = (size // block_size) ** 3
    output = run_luigi(tmp_path, "--module", "examples.model", "Predict", "--size", str(size),
                       "--block-size", str(block_size), "--num-workers", str(workers),
                       "--load-seconds", "0.2")
    data = tmp_path / "model_data"
    setups = (data / "setups.log").read_text().split()
    # one load per worker process that ran, never one per block
    assert 1 <= len(setups) <= workers, setups
    assert len(set(setups)) == len(setups), "a worker loaded the model twice"
    assert f"loaded {len(setups)} times" in output and f"for {blocks} blocks" in output

    with np.load(data / "model_0.npz") as weights:
        model = {name: weights[name] for name in weights.files}
    raw = open_ds(str(data / "raw.zarr")).to_ndarray()
    expected = predict(model, np.pad(raw, CONTEXT))
    np.testing.assert_allclose(open_ds(str(data / "probabilities.zarr")).to_ndarray(),
                               expected, rtol=1e-5, atol=1e-6)
    assert 0.01 < (expected > 0.5).mean() < 0.9, "the model should find some foreground"
