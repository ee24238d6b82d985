"""The daisy tutorial, run with luigi_daisy: smooth a 2D image stored in zarr block by
block on two worker processes, then threshold the smoothed image in a second task that
starts on each block as soon as the smoothed blocks it reads are written.

Run: python examples/tutorial.py [output folder]   (default: tutorial_data)

The arrays and the workers' logs (named in the execution summary when a block fails) stay
in the output folder; run it again and it starts afresh.
"""

import sys
from pathlib import Path

import numpy as np
import zarr

import luigi_daisy as daisy
from luigi_daisy import Roi

SHAPE = (1024, 1024)
BLOCK = 128
CONTEXT = 4


def to_slices(roi: Roi, origin: tuple[int, ...] = (0, 0)) -> tuple[slice, ...]:
    """Index an array whose first voxel is at ``origin`` with a ROI."""
    return tuple(slice(begin - first, end - first)
                 for begin, end, first in zip(roi.begin, roi.end, origin))


def main(folder: Path) -> bool:
    rng = np.random.default_rng(0)
    # the raw image has CONTEXT voxels more on every side than the output
    raw_origin = (-CONTEXT, -CONTEXT)
    raw_shape = tuple(extent + 2 * CONTEXT for extent in SHAPE)
    raw = zarr.open_array(folder / "raw.zarr", mode="w", shape=raw_shape,
                          chunks=(BLOCK, BLOCK), dtype="float32")
    raw[:] = rng.random(raw_shape, dtype=np.float32)
    smoothed = zarr.open_array(folder / "smoothed.zarr", mode="w", shape=SHAPE,
                               chunks=(BLOCK, BLOCK), dtype="float32")
    mask = zarr.open_array(folder / "mask.zarr", mode="w", shape=SHAPE,
                           chunks=(BLOCK, BLOCK), dtype="uint8")

    def smooth(block: daisy.Block) -> None:
        data = raw[to_slices(block.read_roi, raw_origin)]
        kernel = np.ones(2 * CONTEXT + 1) / (2 * CONTEXT + 1)
        for axis in range(data.ndim):
            data = np.apply_along_axis(np.convolve, axis, data, kernel, mode="same")
        inner = block.write_roi - block.read_roi.begin
        smoothed[to_slices(block.write_roi)] = data[to_slices(inner)]

    def threshold(block: daisy.Block) -> None:
        mask[to_slices(block.write_roi)] = smoothed[to_slices(block.read_roi)] > 0.5

    total = Roi((0, 0), SHAPE)
    smooth_task = daisy.Task(
        "smooth", total_roi=total.grow((CONTEXT,) * 2, (CONTEXT,) * 2),
        read_roi=Roi((0, 0), (BLOCK + 2 * CONTEXT,) * 2),
        write_roi=Roi((CONTEXT, CONTEXT), (BLOCK, BLOCK)),
        process_function=smooth, read_write_conflict=False, num_workers=2)
    threshold_task = daisy.Task(
        "threshold", total_roi=total, read_roi=Roi((0, 0), (BLOCK, BLOCK)),
        write_roi=Roi((0, 0), (BLOCK, BLOCK)), process_function=threshold,
        read_write_conflict=False, num_workers=1, upstream_tasks=[smooth_task])
    result = daisy.run_blockwise([threshold_task], log_dir=folder / "daisy_logs")
    print(f"foreground fraction: {np.asarray(mask[:]).mean():.3f}")
    print(f"output in {folder.resolve()}: raw.zarr, smoothed.zarr, mask.zarr (zarr arrays, "
          f"e.g. zarr.open_array('{folder / 'mask.zarr'}')[:]), worker logs in "
          f"{folder / 'daisy_logs'}")
    return bool(result)


if __name__ == "__main__":
    output = Path(sys.argv[1] if len(sys.argv) > 1 else "tutorial_data")
    output.mkdir(parents=True, exist_ok=True)
    raise SystemExit(0 if main(output) else 1)
