"""A worker with an expensive setup: load a model once per worker, not once per block.

A small numpy "model" (a two-layer perceptron over each voxel's 3x3x3 neighbourhood)
predicts a foreground probability for every voxel of the segmentation example's
synthetic volume. Loading a real model (reading weights, building a GPU graph) takes
seconds; ``setup_worker`` does it once in each worker process, before its first block,
and ``process_block`` only applies it::

    SyntheticVolume (examples.segmentation)  raw.zarr
    TrainModel      (luigi.Task)             model.npz: the weights
     -> Predict     (BlockwiseTask)          probabilities.zarr (float32); setup_worker
                                             loads model.npz (and sleeps --load-seconds,
                                             standing for a slow load) and appends its pid
                                             to setups.log

Run it from the repository root::

    luigi --module examples.model Predict --local-scheduler
    cat model_data/setups.log      # one line per worker process, however many blocks
"""

from __future__ import annotations

import os
import time

import luigi
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from examples.segmentation import (
    VOXEL_SIZE,
    SegmentationParameters,
    SyntheticVolume,
    prepare_output,
)
from luigi_daisy import BlockwiseTask, Coordinate, Roi, ZarrTarget

#: voxels of context a prediction reads on each side (the 3x3x3 neighbourhood)
CONTEXT = 1
HIDDEN = 16


def make_model(seed: int) -> dict[str, np.ndarray]:
    """The weights: a mean filter and random features, then a ReLU layer and a sigmoid."""
    rng = np.random.default_rng(seed)
    inputs = (2 * CONTEXT + 1) ** 3
    first = rng.normal(0.0, 0.02, size=(inputs, HIDDEN)).astype(np.float32)
    first[:, 0] = 1.0 / inputs  # hidden unit 0: the neighbourhood's mean intensity
    return {"first": first, "first_bias": np.float32(-105.0) * (np.arange(HIDDEN) == 0),
            "second": np.concatenate([[0.2], rng.normal(0.0, 0.01, HIDDEN - 1)]).astype(np.float32),
            "second_bias": np.float32(-3.0)}


def predict(model: dict[str, np.ndarray], data: np.ndarray) -> np.ndarray:
    """Foreground probability of every voxel whose whole neighbourhood is in ``data``."""
    window = (2 * CONTEXT + 1,) * 3
    features = sliding_window_view(data.astype(np.float32), window).reshape(
        *(s - 2 * CONTEXT for s in data.shape), -1)
    hidden = np.maximum(features @ model["first"] + model["first_bias"].astype(np.float32), 0)
    logits = hidden @ model["second"] + model["second_bias"]
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


class ModelParameters(SegmentationParameters):
    """The segmentation's volume parameters, with a smaller default volume."""

    workdir = luigi.Parameter(default="model_data", description="folder of the arrays")
    size = luigi.IntParameter(default=128, description="voxels a side of the volume")
    block_size = luigi.IntParameter(default=32, description="voxels a side of a block")
    model_seed = luigi.IntParameter(default=0, description="seed of the model's weights")
    load_seconds = luigi.FloatParameter(
        default=1.0, significant=False,
        description="seconds loading the model takes (a stand-in for a real model's load)")

    def volume(self) -> dict:
        """The parameters of the segmentation's SyntheticVolume."""
        return {name: getattr(self, name) for name in
                ("workdir", "size", "block_size", "seed", "num_workers")}


class TrainModel(ModelParameters, luigi.Task):
    """Writes the model's weights (a stand-in for training one)."""

    def output(self):
        return luigi.LocalTarget(self.path(f"model_{self.model_seed}.npz"))

    def run(self):
        os.makedirs(self.workdir, exist_ok=True)
        with self.output().temporary_path() as path, open(path, "wb") as file:
            np.savez(file, **make_model(self.model_seed))


class Predict(ModelParameters, BlockwiseTask):
    """Applies the model block by block; each worker loads it once."""

    read_write_conflict = False

    def requires(self):
        return {"raw": SyntheticVolume(**self.volume()),
                "model": TrainModel(**self.volume(), model_seed=self.model_seed)}

    def output(self):
        return {"blocks": self.ledger_target(),
                "array": ZarrTarget(self.path("probabilities.zarr"))}

    def context(self) -> Coordinate:
        return VOXEL_SIZE * CONTEXT

    def total_roi(self) -> Roi:
        return self.volume_roi().grow(self.context(), self.context())

    def read_roi(self) -> Roi:
        return self.block_roi().grow(self.context(), self.context())

    def write_roi(self) -> Roi:
        return self.block_roi()

    def setup_worker(self) -> None:
        """The expensive part, once per worker process."""
        time.sleep(self.load_seconds)
        with np.load(self.input()["model"].path) as weights:
            self.model = {name: weights[name] for name in weights.files}
        self.raw = self.input()["raw"]["array"].open("r", fill_value=0)
        self.probabilities = prepare_output(self.path("probabilities.zarr"), self.volume_roi(),
                                            np.float32, self.block_roi().shape)
        with open(self.path("setups.log"), "a") as log:
            log.write(f"{os.getpid()}\n")

    def process_block(self, block) -> None:
        self.probabilities[block.write_roi] = predict(self.model, self.raw[block.read_roi])

    def run(self) -> None:
        super().run()
        setups = open(self.path("setups.log")).read().split()
        print(f"\nprobabilities in {os.path.abspath(self.path('probabilities.zarr'))}; the "
              f"model was loaded {len(setups)} times (once per worker process, see "
              f"{self.path('setups.log')}) for "
              f"{(self.size // self.block_size) ** 3} blocks\n")
