"""The segmentation example (``examples/segmentation.py``) through the ``luigi`` command.

Each run's labels must partition the voxels exactly as ``scipy.ndimage.label`` does on
the whole smoothed and thresholded volume in one process: the same foreground, and a
one-to-one correspondence between our objects and scipy's (label values may differ).
Runs with 1 and with 3 workers per stage, and a run whose whole process group gets
SIGKILL in the middle, then a rerun.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy", reason="the segmentation example needs the examples extra "
                                    "(scipy), which the test extra installs")

from examples.segmentation import whole_volume_labels  # noqa: E402
from luigi_daisy import open_ds  # noqa: E402
from luigi_daisy.cli import find_records  # noqa: E402
from luigi_daisy.errors import LedgerError  # noqa: E402
from luigi_daisy.ledger import read_ledger_summary  # noqa: E402

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
SIZE, BLOCK_SIZE = 48, 16
BLOCKS = (SIZE // BLOCK_SIZE) ** 3
RUN_DEADLINE = 60.0        # seconds a run to completion may take
PROGRESS_DEADLINE = 40.0   # seconds to wait for the progress the kill waits for
EXIT_DEADLINE = 15.0       # seconds the killed processes may take to disappear
SIGMA, LEVEL = 2.0, 105.0


def luigi_command() -> list[str]:
    beside = Path(sys.executable).parent / "luigi"
    return [str(beside)] if beside.exists() else ["luigi"]


def start(folder: Path, log_name: str, *options: str) -> subprocess.Popen:
    """``luigi --module examples.segmentation Segmentation`` at the small size, in a
    session of its own (so the whole process group can be killed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("LUIGI_CONFIG_PATH", None)
    log = open(folder / log_name, "wb")  # noqa: SIM115 - the child keeps its own copy
    try:
        return subprocess.Popen(
            luigi_command() + ["--module", "examples.segmentation", "Segmentation",
                               "--size", str(SIZE), "--block-size", str(BLOCK_SIZE),
                               "--workdir", "data", "--local-scheduler",
                               "--retcode-task-failed", "3", *options,
                               # Luigi's pid file per command line, kept here so that a
                               # concurrent test suite is not taken for a second copy
                               "--lock-pid-dir", str(folder / "luigi-pids")],
            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    finally:
        log.close()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] not in ("Z", "X")


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the whole process group and wait until none of it is left."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=EXIT_DEADLINE)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + EXIT_DEADLINE
    while group_members(process.pid):
        if time.monotonic() > deadline:
            pytest.fail(f"processes {group_members(process.pid)} survived SIGKILL")
        time.sleep(0.05)


def run_to_completion(folder: Path, log_name: str, *options: str) -> str:
    process = start(folder, log_name, *options)
    try:
        returncode = process.wait(timeout=RUN_DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the segmentation did not finish in {RUN_DEADLINE} s:\n"
                    f"{(folder / log_name).read_text()[-5000:]}")
    finally:
        kill_group(process)
    output = (folder / log_name).read_text()
    assert returncode == 0, output[-5000:]
    return output


def timed_blocks(folder: Path) -> Counter:
    """Blocks processed so far, per stage (every worker's timing records)."""
    counts: Counter = Counter()
    for log in (folder / "data" / "timings").glob("*.log"):
        counts.update(line.split()[0] for line in log.read_text().splitlines() if line.strip())
    return counts


def ledger_done(folder: Path, family: str) -> int:
    """Blocks of the stage ``family`` its ledger records as done."""
    for ledger in find_records(folder):
        if not ledger.name.startswith(f"{family}_"):
            continue
        try:
            return read_ledger_summary(ledger)["done"]
        except LedgerError:  # being created right now
            return 0
    return 0


def worker_pids(folder: Path) -> set[int]:
    """Processes that processed blocks (their timing files are named after them;
    MergeTable, not blockwise, runs in Luigi's own process)."""
    return {int(log.stem) for log in (folder / "data" / "timings").glob("*.log")
            if any(line.split()[0] != "MergeTable" for line in log.read_text().splitlines()
                   if line.strip())}


def assert_same_partition_as_scipy(folder: Path) -> int:
    """The labels are scipy's labels of the whole volume, up to a renumbering; the ids
    are exactly 1..N. Returns N."""
    data = folder / "data"
    raw = open_ds(str(data / "raw.zarr")).to_ndarray()
    labels = open_ds(str(data / "labels.zarr")).to_ndarray()
    expected, count = whole_volume_labels(raw, SIGMA, LEVEL)
    assert count > 3, "the small volume should hold several objects"
    np.testing.assert_array_equal(labels > 0, expected > 0)
    foreground = labels > 0
    ours = np.unique(labels[foreground])
    np.testing.assert_array_equal(ours, np.arange(1, count + 1, dtype=labels.dtype))
    # one-to-one: as many distinct (ours, scipy's) pairs as objects on either side
    pairs = np.unique(np.stack([labels[foreground], expected[foreground]]), axis=1)
    assert pairs.shape[1] == count, "an object of one labelling is split in the other"
    summary = json.loads((data / "summary.json").read_text())
    assert summary["objects"] == count
    assert summary["fragments"] > count, "no object crossed a block face: nothing merged"
    return count


@pytest.mark.parametrize("workers", [1, 3])
def test_the_segmentation_matches_scipy_on_the_whole_volume(tmp_path, workers):
    output = run_to_completion(tmp_path, "run.log", "--num-workers", str(workers))
    count = assert_same_partition_as_scipy(tmp_path)
    assert f"{count} objects" in output
    picture = tmp_path / "data" / "segmentation.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(picture.relative_to(tmp_path)) in output
    with __import__("PIL.Image").Image.open(picture) as image:
        # three slices side by side, each as wide as the volume (scaled up alike)
        assert image.width > 3 * image.height
    stages = timed_blocks(tmp_path)
    for stage in ("SyntheticVolume", "GaussianSmooth", "ForegroundMask", "BlockFragments",
                  "FaceMerges", "Relabel"):
        assert stages[stage] == BLOCKS, stages
    if workers == 3:
        assert len(worker_pids(tmp_path)) > 1, "3 workers per stage, yet one process"

    # a second run finds everything done and processes nothing
    again = run_to_completion(tmp_path, "again.log", "--num-workers", str(workers))
    assert "already done" in again or "Did not run any tasks" in again, again[-3000:]
    assert timed_blocks(tmp_path) == stages


def test_a_killed_segmentation_resumes_with_the_same_partition(tmp_path):
    process = start(tmp_path, "killed.log", "--num-workers", "3", "--block-seconds", "0.1")
    try:
        deadline = time.monotonic() + PROGRESS_DEADLINE
        while True:
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "the run did not get far enough to be killed"
            if (timed_blocks(tmp_path)["BlockFragments"] >= 3
                    and ledger_done(tmp_path, "SyntheticVolume") > 0):
                break
            time.sleep(0.05)
    finally:
        kill_group(process)
    # the block workers die with the run (they are in process groups of their own)
    deadline = time.monotonic() + EXIT_DEADLINE
    while any(alive(pid) for pid in worker_pids(tmp_path)):
        assert time.monotonic() < deadline, "block workers outlived the killed run"
        time.sleep(0.05)

    before = timed_blocks(tmp_path)
    recorded = ledger_done(tmp_path, "SyntheticVolume")
    assert before["Relabel"] == 0, "the kill came too late: the run was nearly finished"
    run_to_completion(tmp_path, "resumed.log", "--num-workers", "2")
    assert_same_partition_as_scipy(tmp_path)
    after = timed_blocks(tmp_path)
    # the rerun resumed: the blocks the ledger recorded before the kill were not redone
    assert after["SyntheticVolume"] - before["SyntheticVolume"] <= BLOCKS - recorded, \
        (recorded, before, after)
    assert after["Relabel"] == BLOCKS


def test_fragment_ids_stay_unique_and_in_uint64_for_sparse_block_ids(tmp_path):
    """Block ids need not be dense (daisy numbers blocks by the Cantor number of their
    position): a block's ids are ``block_id * max_objects_per_block + 1 ..``, exactly,
    up to the largest block id whose ids fit uint64; one more is refused by name."""
    from examples.segmentation import BlockFragments
    from luigi_daisy import Block, GeometryError, Roi, prepare_ds

    block_size = 8
    task = BlockFragments(workdir=str(tmp_path), size=16, block_size=block_size)
    mask = prepare_ds(str(tmp_path / "mask.zarr"), Roi((0, 0, 0), (16, 16, 16)), (1, 1, 1),
                      np.uint8, write_size=(block_size,) * 3)
    pattern = np.zeros((block_size,) * 3, dtype=np.uint8)
    pattern[0, 0, 0] = pattern[4:, 4:, 4:] = 1  # two objects in the block
    mask[Roi((0, 0, 0), (block_size,) * 3)] = pattern
    task.setup_worker()
    per_block = task.max_objects_per_block
    largest = (2 ** 64 - 1 - 2) // per_block  # its two ids are the largest that fit
    for block_id in (0, 7, 10 ** 9 + 7, largest):
        block = Block(Roi((0, 0, 0), (16, 16, 16)), Roi((0, 0, 0), (block_size,) * 3),
                      Roi((0, 0, 0), (block_size,) * 3), block_id=block_id, task_id="t")
        task.compute(block)
        ids = np.unique(open_ds(str(tmp_path / "fragments.zarr")).to_ndarray(block.write_roi))
        assert ids.dtype == np.uint64
        assert [int(i) for i in ids] == [0, block_id * per_block + 1, block_id * per_block + 2]
    too_large = Block(Roi((0, 0, 0), (16, 16, 16)), Roi((0, 0, 0), (block_size,) * 3),
                      Roi((0, 0, 0), (block_size,) * 3), block_id=largest + 1, task_id="t")
    with pytest.raises(GeometryError, match="beyond uint64"):
        task.compute(too_large)


# --------------------------------------------------------------------------- FaceMerges' helpers
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from examples.segmentation import present_ids, unique_pairs  # noqa: E402

ids_of_a_block = st.integers(0, 2 ** 63).flatmap(
    lambda first: st.lists(st.integers(0, 300).map(lambda k: 0 if k == 0 else first + k),
                           max_size=400))


@settings(max_examples=200, deadline=None)
@given(ids_of_a_block, ids_of_a_block)
def test_unique_pairs_are_numpys_unique_rows(a, b):
    """FaceMerges records exactly the rows np.unique(axis=0) would, without its sort of
    opaque records."""
    length = min(len(a), len(b))
    a = np.asarray(a[:length], dtype=np.uint64)
    b = np.asarray(b[:length], dtype=np.uint64)
    got = unique_pairs(a, b)
    got = got[np.lexsort((got[:, 1], got[:, 0]))]
    expected = np.unique(np.stack([a, b], axis=1).reshape(-1, 2), axis=0)
    assert got.dtype == expected.dtype == np.uint64
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=200, deadline=None)
@given(ids_of_a_block, st.booleans())
def test_present_ids_are_numpys_unique_foreground(ids, spread):
    """A block's ids are counted in a table; ids spread wider than the block fall back
    to sorting, with the same answer."""
    fragments = np.asarray(ids + [0], dtype=np.uint64)
    if spread and fragments.size > 2:
        fragments[1] = np.uint64(2 ** 64 - 1)
    expected = np.unique(fragments)
    expected = expected[expected > 0]
    got = present_ids(fragments)
    assert got.dtype == np.uint64
    np.testing.assert_array_equal(got, expected)


def test_the_gaussian_stage_smooths_bit_for_bit_as_the_whole_filter():
    """GaussianSmooth filters axis by axis, keeping only what later passes use; the
    result must be smooth(data)[inner] to the last bit (the reference uses smooth)."""
    from examples.segmentation import smooth, smooth_inside
    rng = np.random.default_rng(3)
    for sigma in (2.0, 1.3, 0.4):
        context = int(4.0 * sigma + 0.5)
        data = rng.integers(0, 256, size=(20 + 2 * context, 24 + 2 * context,
                                          16 + 2 * context)).astype(np.uint8)
        inner = tuple(slice(context, extent - context) for extent in data.shape)
        expected = smooth(data, sigma)[inner]
        got = smooth_inside(data, sigma, context)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
