"""The daisy tutorial, run with luigi_daisy: smooth a 2D image block by block, then
threshold the smoothed image in a second task that reads it with context.

Run: python examples/tutorial.py
"""

import numpy as np

import luigi_daisy as daisy
from luigi_daisy import Roi

SHAPE = (512, 512)
CONTEXT = 4


def to_slices(roi: Roi) -> tuple[slice, ...]:
    """Index a numpy array whose origin is (0, 0) with a ROI."""
    return tuple(slice(begin, end) for begin, end in zip(roi.begin, roi.end))


def main() -> bool:
    rng = np.random.default_rng(0)
    image = rng.random(SHAPE).astype(np.float32)
    smoothed = np.zeros(SHAPE, dtype=np.float32)
    mask = np.zeros(SHAPE, dtype=np.uint8)

    def smooth(block: daisy.Block) -> None:
        data = image[to_slices(block.read_roi)]
        kernel = np.ones(2 * CONTEXT + 1) / (2 * CONTEXT + 1)
        for axis in range(data.ndim):
            data = np.apply_along_axis(np.convolve, axis, data, kernel, mode="same")
        inner = block.write_roi - block.read_roi.begin
        smoothed[to_slices(block.write_roi)] = data[to_slices(inner)]

    def threshold(block: daisy.Block) -> None:
        region = smoothed[to_slices(block.write_roi)]
        mask[to_slices(block.write_roi)] = region > 0.5

    total = Roi((0, 0), SHAPE)
    smooth_task = daisy.Task(
        "smooth", total_roi=total,
        read_roi=Roi((0, 0), (64 + 2 * CONTEXT,) * 2),
        write_roi=Roi((CONTEXT, CONTEXT), (64, 64)),
        process_function=smooth, fit="shrink", read_write_conflict=False)
    threshold_task = daisy.Task(
        "threshold", total_roi=total.grow((-CONTEXT,) * 2, (-CONTEXT,) * 2),
        read_roi=Roi((0, 0), (32, 32)), write_roi=Roi((0, 0), (32, 32)),
        process_function=threshold, read_write_conflict=False,
        upstream_tasks=[smooth_task])
    result = daisy.run_blockwise([threshold_task], multiprocessing=False)
    print(f"foreground fraction: {mask.mean():.3f}")
    return bool(result)


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
