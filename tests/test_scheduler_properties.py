"""Property tests of the daisy-compatible scheduler, against brute-force references.

Only the public API is used (``Task``, ``Scheduler``, ``BlockStatus``, ``Roi``,
``Coordinate``). The expected blocks of a task are computed here by enumerating grid
positions with funlib ROIs and filtering them by the fit mode; the expected
dependencies (read/write conflicts inside a task, upstream blocks across tasks) are
computed by testing every pair of expected blocks for intersection. A random driver
then acquires and releases blocks in random interleavings and checks, at every step,
that the scheduler never hands out a block it must not, that its counters add up,
and at the end that every block was completed, failed for good or orphaned, exactly
as the failures injected imply.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from luigi_daisy import BlockStatus, Coordinate, Roi, Scheduler, Task

FITS = ("valid", "overhang", "shrink")

# LUIGI_DAISY_PROPERTY_EXAMPLES raises the number of examples for a longer soak run.
PROPERTY_SETTINGS = settings(
    deadline=None,
    max_examples=int(os.environ.get("LUIGI_DAISY_PROPERTY_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _nothing(block):
    return None


# ---------------------------------------------------------------------------
# brute-force reference
# ---------------------------------------------------------------------------


def roi_key(roi) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A hashable (begin, shape) of a ROI, comparable across ROI implementations."""
    return tuple(int(c) for c in roi.begin), tuple(int(c) for c in roi.shape)


def expected_blocks(total_roi: Roi, read_roi: Roi, write_roi: Roi, fit: str):
    """Enumerate the (read_roi, write_roi) of every block of a task by brute force.

    Candidate blocks are all grid positions ``k >= 0`` whose read ROI begins at
    ``total_roi.begin + k * write_shape``; the fit mode decides which are kept and
    whether their ROIs are cropped. Returned in row-major grid order.
    """
    dims = total_roi.dims
    context_low = write_roi.begin - read_roi.begin
    context_high = read_roi.end - write_roi.end
    stride = write_roi.shape
    total_write_roi = total_roi.grow(-context_low, -context_high)
    ranges = [range(total_roi.shape[d] // stride[d] + 2) for d in range(dims)]
    blocks = []
    for grid_index in itertools.product(*ranges):
        read_begin = total_roi.begin + Coordinate(grid_index) * stride
        block_read_roi = Roi(read_begin, read_roi.shape)
        block_write_roi = Roi(read_begin + context_low, write_roi.shape)
        if fit == "valid":
            keep = total_roi.contains(block_read_roi)
        else:
            keep = total_write_roi.contains(block_write_roi.begin)
        if not keep:
            continue
        if fit == "shrink":
            block_read_roi = block_read_roi.intersect(total_roi)
            block_write_roi = block_write_roi.intersect(total_write_roi)
        blocks.append((block_read_roi, block_write_roi))
    return blocks


def _bounds(rois):
    begins = np.array([tuple(r.begin) for r in rois], dtype=np.int64)
    ends = np.array([tuple(r.end) for r in rois], dtype=np.int64)
    return begins, ends


def intersection_matrix(rois_a, rois_b) -> np.ndarray:
    """``m[i, j]`` is True where ``rois_a[i]`` and ``rois_b[j]`` share a voxel."""
    begins_a, ends_a = _bounds(rois_a)
    begins_b, ends_b = _bounds(rois_b)
    low = np.maximum(begins_a[:, None, :], begins_b[None, :, :])
    high = np.minimum(ends_a[:, None, :], ends_b[None, :, :])
    return np.all(low < high, axis=2)


@dataclass
class TaskSpec:
    name: str
    total_roi: Roi
    read_roi: Roi
    write_roi: Roi
    fit: str
    read_write_conflict: bool
    max_retries: int
    upstream: list[str] = field(default_factory=list)


class Reference:
    """Expected blocks and dependencies of a set of task specs (topologically ordered)."""

    def __init__(self, specs: list[TaskSpec]):
        self.specs = {spec.name: spec for spec in specs}
        self.order = [spec.name for spec in specs]
        self.blocks = {}  # name -> list of (read_roi, write_roi)
        self.index_of = {}  # name -> {(read_key, write_key): reference index}
        self.conflicts = {}  # name -> list of sets of reference indices
        self.predecessors = {}  # (name, i) -> list of (upstream name, j)
        self.successors = {}  # (name, i) -> list of (downstream name, j)
        for spec in specs:
            blocks = expected_blocks(spec.total_roi, spec.read_roi, spec.write_roi, spec.fit)
            assert blocks, "test generated a task without blocks"
            self.blocks[spec.name] = blocks
            self.index_of[spec.name] = {
                (roi_key(read), roi_key(write)): i for i, (read, write) in enumerate(blocks)
            }
            reads = [read for read, _ in blocks]
            writes = [write for _, write in blocks]
            if spec.read_write_conflict:
                read_hits_write = intersection_matrix(reads, writes)
                conflict = read_hits_write | read_hits_write.T
                np.fill_diagonal(conflict, False)
                self.conflicts[spec.name] = [set(np.flatnonzero(row).tolist()) for row in conflict]
            else:
                self.conflicts[spec.name] = [set() for _ in blocks]
            for i in range(len(blocks)):
                self.predecessors[(spec.name, i)] = []
                self.successors[(spec.name, i)] = []
            for upstream_name in spec.upstream:
                upstream_writes = [write for _, write in self.blocks[upstream_name]]
                needs = intersection_matrix(upstream_writes, reads)
                for j, i in zip(*np.nonzero(needs)):
                    self.predecessors[(spec.name, int(i))].append((upstream_name, int(j)))
                    self.successors[(upstream_name, int(j))].append((spec.name, int(i)))

    def all_blocks(self):
        for name in self.order:
            for i in range(len(self.blocks[name])):
                yield name, i


# ---------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------

WAITING, PROCESSING, COMPLETED, FAILED = "waiting", "processing", "completed", "failed"


class Driver:
    """Drives a Scheduler at random and checks it against a Reference at every step."""

    def __init__(self, specs, seed, window, failures=frozenset(), fail_probability=0.0):
        self.reference = Reference(specs)
        self.rng = random.Random(seed)
        self.window = window
        self.failures = failures  # set of (task name, reference index, attempt)
        self.fail_probability = fail_probability
        tasks = {}
        for spec in specs:
            tasks[spec.name] = Task(
                spec.name,
                total_roi=spec.total_roi,
                read_roi=spec.read_roi,
                write_roi=spec.write_roi,
                process_function=_nothing,
                read_write_conflict=spec.read_write_conflict,
                max_retries=spec.max_retries,
                fit=spec.fit,
                upstream_tasks=[tasks[name] for name in spec.upstream],
            )
        has_downstream = {name for spec in specs for name in spec.upstream}
        sinks = [tasks[spec.name] for spec in specs if spec.name not in has_downstream]
        self.scheduler = Scheduler(sinks)
        self.state = {key: WAITING for key in self.reference.all_blocks()}
        self.handouts = {key: 0 for key in self.state}
        self.failed_attempts = {key: 0 for key in self.state}
        self.unmet = {key: len(self.reference.predecessors[key]) for key in self.state}
        self.in_flight = []  # list of (block, key)
        self.block_index_to_reference = {}  # (name, scheduler index) -> reference index
        self.reference_to_block_index = {}

    # -- checks ---------------------------------------------------------------

    def check_counters(self):
        for name in self.reference.order:
            task_state = self.scheduler.task_states[name]
            total = len(self.reference.blocks[name])
            counts = {
                "ready": task_state.ready_count,
                "processing": task_state.processing_count,
                "pending": task_state.pending_count,
                "completed": task_state.completed_count,
                "failed": task_state.failed_count,
                "orphaned": task_state.orphaned_count,
            }
            assert all(count >= 0 for count in counts.values()), (name, counts)
            assert task_state.total_block_count == total, (name, task_state.total_block_count)
            assert sum(counts.values()) == total, (name, counts, total)
            states = [self.state[(name, i)] for i in range(total)]
            assert counts["processing"] == states.count(PROCESSING), (name, counts)
            assert counts["completed"] == states.count(COMPLETED), (name, counts)
            assert counts["failed"] == states.count(FAILED), (name, counts)
            assert task_state.skipped_count == 0, (name, task_state.skipped_count)
            if task_state.is_done():
                assert counts["processing"] == 0, (name, counts)
                assert counts["completed"] + counts["failed"] + counts["orphaned"] == total

    def check_nothing_ready(self, name):
        """acquire_block(name) returned None: without conflicts, nothing may be ready."""
        if self.reference.specs[name].read_write_conflict:
            return  # which of two conflicting blocks goes first is implementation-defined
        for i in range(len(self.reference.blocks[name])):
            key = (name, i)
            assert not (self.state[key] == WAITING and self.unmet[key] == 0), (
                f"acquire_block({name!r}) returned None although block {i} "
                f"{self.reference.blocks[name][i]} has all its upstream blocks completed "
                f"and is neither processing nor finished"
            )

    def check_acquired(self, name, block):
        assert block.block_id[0] == name, block.block_id
        assert isinstance(block.read_roi, Roi) and isinstance(block.write_roi, Roi)
        block_index = block.block_id[1]
        assert isinstance(block_index, int), block.block_id
        key_rois = (roi_key(block.read_roi), roi_key(block.write_roi))
        reference_index = self.reference.index_of[name].get(key_rois)
        assert reference_index is not None, (
            f"{name}: unexpected block read={block.read_roi} write={block.write_roi}; "
            f"expected one of {self.reference.blocks[name]}"
        )
        known = self.block_index_to_reference.setdefault((name, block_index), reference_index)
        assert known == reference_index, ("block index not stable", block.block_id)
        known = self.reference_to_block_index.setdefault((name, reference_index), block_index)
        assert known == block_index, ("two indices for one block", block.block_id, known)
        key = (name, reference_index)
        assert self.state[key] == WAITING, (
            f"block {block.block_id} handed out while {self.state[key]}"
        )
        for upstream_key in self.reference.predecessors[key]:
            assert self.state[upstream_key] == COMPLETED, (
                f"block {block.block_id} (read {block.read_roi}) handed out before upstream "
                f"block {upstream_key} (write {self.reference.blocks[upstream_key[0]][upstream_key[1]][1]}) "
                f"succeeded; it is {self.state[upstream_key]}"
            )
        conflicts = self.reference.conflicts[name][reference_index]
        for _, other_key in self.in_flight:
            assert not (other_key[0] == name and other_key[1] in conflicts), (
                f"conflicting blocks processing together: {key} and {other_key}"
            )
        return key

    # -- actions ----------------------------------------------------------------

    def try_acquire(self):
        names = list(self.reference.order)
        self.rng.shuffle(names)
        for name in names:
            block = self.scheduler.acquire_block(name)
            if block is None:
                self.check_nothing_ready(name)
                continue
            key = self.check_acquired(name, block)
            self.state[key] = PROCESSING
            self.handouts[key] += 1
            self.in_flight.append((block, key))
            return True
        return False

    def release_one(self):
        position = self.rng.randrange(len(self.in_flight))
        block, key = self.in_flight.pop(position)
        attempt = self.handouts[key] - 1
        fail = (key[0], key[1], attempt) in self.failures or (
            self.fail_probability and self.rng.random() < self.fail_probability
        )
        block.status = BlockStatus.FAILED if fail else BlockStatus.SUCCESS
        self.scheduler.release_block(block)
        if fail:
            self.failed_attempts[key] += 1
            max_retries = self.reference.specs[key[0]].max_retries
            self.state[key] = FAILED if self.failed_attempts[key] == max_retries + 1 else WAITING
        else:
            self.state[key] = COMPLETED
            for downstream_key in self.reference.successors[key]:
                self.unmet[downstream_key] -= 1

    def run(self):
        self.check_counters()
        max_steps = 4 * sum(
            (self.reference.specs[name].max_retries + 2) for name, _ in self.reference.all_blocks()
        ) + 10
        for _ in range(max_steps):
            if self.in_flight and (
                len(self.in_flight) >= self.window or self.rng.random() < 0.3
            ):
                self.release_one()
            elif not self.try_acquire():
                if not self.in_flight:
                    break
                self.release_one()
            self.check_counters()
        else:
            raise AssertionError("scheduler kept handing out blocks beyond any possible count")
        self.check_final()
        return self

    def check_final(self):
        reference = self.reference
        failed = {key for key, value in self.state.items() if value == FAILED}
        orphaned = {key for key, value in self.state.items() if value == WAITING}
        for name in reference.order:
            task_state = self.scheduler.task_states[name]
            total = len(reference.blocks[name])
            assert task_state.is_done(), (
                f"{name}: nothing acquirable and nothing in flight, but not done: "
                f"{self.describe(name)}"
            )
            assert task_state.processing_count == 0
            assert task_state.ready_count == 0, self.describe(name)
            assert task_state.pending_count == 0, self.describe(name)
            assert task_state.orphaned_count == sum(1 for key in orphaned if key[0] == name), (
                name,
                self.describe(name),
                sorted(key for key in orphaned if key[0] == name),
            )
            assert (
                task_state.completed_count + task_state.failed_count + task_state.orphaned_count
                == total
            )
        for key in self.state:
            completed = 1 if self.state[key] == COMPLETED else 0
            assert self.handouts[key] == self.failed_attempts[key] + completed, key

        lost = failed | orphaned
        # Whatever reads from a failed or orphaned upstream block is orphaned.
        for key in self.state:
            if any(upstream in lost for upstream in reference.predecessors[key]):
                assert key in orphaned, key
        for key in orphaned:
            name, index = key
            reads_lost = any(upstream in lost for upstream in reference.predecessors[key])
            if not reference.specs[name].read_write_conflict:
                # Without conflicts, orphans are exactly the transitive cross-task dependents.
                assert reads_lost, f"{key} orphaned but reads no failed or orphaned block"
            else:
                conflicts_lost = any((name, other) in lost for other in reference.conflicts[name][index])
                assert reads_lost or conflicts_lost, (
                    f"{key} orphaned but neither reads nor conflicts with a lost block"
                )
        # Every orphan is reachable from a failed block along upstream edges (downstream
        # direction) and conflict edges (either direction).
        reachable = set(failed)
        frontier = list(failed)
        while frontier:
            key = frontier.pop()
            neighbours = list(reference.successors[key])
            neighbours += [(key[0], other) for other in reference.conflicts[key[0]][key[1]]]
            for neighbour in neighbours:
                if neighbour not in reachable:
                    reachable.add(neighbour)
                    frontier.append(neighbour)
        assert orphaned <= reachable, sorted(orphaned - reachable)

    def describe(self, name):
        task_state = self.scheduler.task_states[name]
        return {
            attribute: getattr(task_state, attribute)
            for attribute in (
                "total_block_count",
                "ready_count",
                "processing_count",
                "pending_count",
                "completed_count",
                "skipped_count",
                "failed_count",
                "orphaned_count",
            )
        }


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------

MAX_BLOCKS_PER_DIM = {1: 30, 2: 10, 3: 5}


@st.composite
def task_geometries(draw, dims, max_blocks_per_dim=None, total_offset=None):
    """A (total_roi, read_roi, write_roi) with a few blocks along each dimension."""
    max_blocks_per_dim = max_blocks_per_dim or MAX_BLOCKS_PER_DIM[dims]
    write_shape, context_low, context_high, total_shape = [], [], [], []
    for _ in range(dims):
        write = draw(st.integers(1, 5))
        low = draw(st.integers(0, 3))
        high = draw(st.integers(0, 3))
        read = low + write + high
        blocks = draw(st.integers(1, max_blocks_per_dim))
        remainder = draw(st.integers(0, write - 1))
        write_shape.append(write)
        context_low.append(low)
        context_high.append(high)
        total_shape.append(read + (blocks - 1) * write + remainder)
    if total_offset is None:
        total_offset = [draw(st.integers(-20, 20)) for _ in range(dims)]
    # Only the shapes and relative offset of the templates matter: place them anywhere.
    template_offset = [draw(st.integers(-30, 30)) for _ in range(dims)]
    read_roi = Roi(template_offset, [low + w + high for low, w, high in zip(context_low, write_shape, context_high)])
    write_roi = Roi([o + low for o, low in zip(template_offset, context_low)], write_shape)
    total_roi = Roi(total_offset, total_shape)
    return total_roi, read_roi, write_roi


@st.composite
def task_specs(draw, name, dims, upstream=(), max_blocks_per_dim=None, total_offset=None):
    total_roi, read_roi, write_roi = draw(
        task_geometries(dims, max_blocks_per_dim=max_blocks_per_dim, total_offset=total_offset)
    )
    return TaskSpec(
        name=name,
        total_roi=total_roi,
        read_roi=read_roi,
        write_roi=write_roi,
        fit=draw(st.sampled_from(FITS)),
        read_write_conflict=draw(st.booleans()),
        max_retries=draw(st.integers(0, 2)),
        upstream=list(upstream),
    )


@st.composite
def chains(draw):
    """Two or three tasks: a chain, a fan-in, or a diamond, with different geometries."""
    dims = draw(st.integers(1, 3))
    shape_kind = draw(st.sampled_from(["two", "chain3", "fan_in", "diamond"]))
    per_dim = {1: 20, 2: 7, 3: 4}[dims]
    # Nearby total offsets, so that total ROIs overlap partly, fully or not at all.
    base = [draw(st.integers(-10, 10)) for _ in range(dims)]

    def offset():
        return [b + draw(st.integers(-6, 6)) for b in base]

    a = draw(task_specs("a", dims, (), per_dim, offset()))
    if shape_kind == "two":
        b = draw(task_specs("b", dims, ["a"], per_dim, offset()))
        return [a, b]
    if shape_kind == "chain3":
        b = draw(task_specs("b", dims, ["a"], per_dim, offset()))
        c = draw(task_specs("c", dims, ["b"], per_dim, offset()))
        return [a, b, c]
    if shape_kind == "fan_in":
        b = draw(task_specs("b", dims, (), per_dim, offset()))
        c = draw(task_specs("c", dims, ["a", "b"], per_dim, offset()))
        return [a, b, c]
    b = draw(task_specs("b", dims, ["a"], per_dim, offset()))
    c = draw(task_specs("c", dims, ["a", "b"], per_dim, offset()))
    return [a, b, c]


def failure_sets(task_names):
    return st.frozensets(
        st.tuples(st.sampled_from(task_names), st.integers(0, 400), st.integers(0, 2)),
        max_size=8,
    )


def _resolve_failures(reference, failures):
    """Map drawn (task, any int, attempt) to (task, reference index, attempt)."""
    return frozenset(
        (name, index % len(reference.blocks[name]), attempt) for name, index, attempt in failures
    )


def run_driver(specs, seed, window, failures=frozenset(), fail_probability=0.0):
    reference = Reference(specs)
    failures = _resolve_failures(reference, failures)
    return Driver(specs, seed, window, failures, fail_probability).run()


seeds = st.integers(0, 2**32 - 1)
windows = st.integers(1, 8)


# ---------------------------------------------------------------------------
# reference cases (also check the brute-force reference itself)
# ---------------------------------------------------------------------------

REFERENCE_TOTAL = Roi((0,), (100,))
REFERENCE_READ = Roi((0,), (9,))
REFERENCE_WRITE = Roi((2,), (5,))


def _drain(scheduler, name):
    """Acquire and succeed every block of one task; return the blocks in hand-out order."""
    blocks = []
    while True:
        block = scheduler.acquire_block(name)
        if block is None:
            return blocks
        blocks.append(block)
        block.status = BlockStatus.SUCCESS
        scheduler.release_block(block)


def _reference_task(fit, conflict=False, **kwargs):
    return Task(
        "a",
        total_roi=REFERENCE_TOTAL,
        read_roi=REFERENCE_READ,
        write_roi=REFERENCE_WRITE,
        process_function=_nothing,
        read_write_conflict=conflict,
        fit=fit,
        **kwargs,
    )


@pytest.mark.parametrize(
    "fit, count", [("valid", 19), ("overhang", 20), ("shrink", 20)]
)
def test_reference_brute_force_counts(fit, count):
    blocks = expected_blocks(REFERENCE_TOTAL, REFERENCE_READ, REFERENCE_WRITE, fit)
    assert len(blocks) == count
    assert blocks[0] == (Roi((0,), (9,)), Roi((2,), (5,)))
    if fit == "shrink":
        assert blocks[-1] == (Roi((95,), (5,)), Roi((97,), (1,)))
    if fit == "overhang":
        assert blocks[-1] == (Roi((95,), (9,)), Roi((97,), (5,)))
    if fit == "valid":
        assert blocks[-1] == (Roi((90,), (9,)), Roi((92,), (5,)))


@pytest.mark.parametrize("conflict", [False, True])
@pytest.mark.parametrize("fit", FITS)
def test_reference_case_blocks(fit, conflict):
    scheduler = Scheduler([_reference_task(fit, conflict)])
    expected = expected_blocks(REFERENCE_TOTAL, REFERENCE_READ, REFERENCE_WRITE, fit)
    assert scheduler.task_states["a"].total_block_count == len(expected)
    handed_out = _drain(scheduler, "a")
    assert sorted((roi_key(b.read_roi), roi_key(b.write_roi)) for b in handed_out) == sorted(
        (roi_key(read), roi_key(write)) for read, write in expected
    )
    assert len({b.block_id for b in handed_out}) == len(expected)
    task_state = scheduler.task_states["a"]
    assert task_state.is_done()
    assert task_state.completed_count == len(expected)


def test_reference_case_shrink_last_block():
    scheduler = Scheduler([_reference_task("shrink")])
    blocks = _drain(scheduler, "a")
    last = max(blocks, key=lambda b: tuple(b.write_roi.begin))
    assert last.read_roi == Roi((95,), (5,))
    assert last.write_roi == Roi((97,), (1,))


def test_template_offset_is_irrelevant():
    """Only the shapes and the relative offset of the read/write templates matter."""
    moved = Task(
        "a",
        total_roi=REFERENCE_TOTAL,
        read_roi=Roi((-40,), (9,)),
        write_roi=Roi((-38,), (5,)),
        process_function=_nothing,
        read_write_conflict=False,
        fit="overhang",
    )
    blocks = _drain(Scheduler([moved]), "a")
    expected = expected_blocks(REFERENCE_TOTAL, REFERENCE_READ, REFERENCE_WRITE, "overhang")
    assert sorted(roi_key(b.write_roi) for b in blocks) == sorted(
        roi_key(write) for _, write in expected
    )


def _chain_tasks(upstream_retries=0):
    a = Task(
        "a",
        total_roi=Roi((0,), (30,)),
        read_roi=Roi((0,), (10,)),
        write_roi=Roi((0,), (10,)),
        process_function=_nothing,
        read_write_conflict=False,
        max_retries=upstream_retries,
        fit="valid",
    )
    b = Task(
        "b",
        total_roi=Roi((0,), (30,)),
        read_roi=Roi((0,), (10,)),
        write_roi=Roi((0,), (10,)),
        process_function=_nothing,
        read_write_conflict=False,
        fit="valid",
        upstream_tasks=[a],
    )
    return a, b


@pytest.mark.parametrize("listed", ["sink", "both", "both_reversed"])
def test_listing_upstream_tasks_too_changes_nothing(listed):
    a, b = _chain_tasks()
    tasks = {"sink": [b], "both": [a, b], "both_reversed": [b, a]}[listed]
    scheduler = Scheduler(tasks)
    assert scheduler.task_states["a"].total_block_count == 3
    assert scheduler.task_states["b"].total_block_count == 3
    upstream_blocks = _drain(scheduler, "a")
    assert len(upstream_blocks) == 3
    assert len(_drain(scheduler, "b")) == 3
    assert scheduler.task_states["a"].is_done() and scheduler.task_states["b"].is_done()


def test_upstream_pulled_in_and_gates_downstream():
    _, b = _chain_tasks()
    scheduler = Scheduler([b])
    assert set(scheduler.task_states) >= {"a", "b"}
    assert scheduler.acquire_block("b") is None
    first = scheduler.acquire_block("a")
    assert first is not None
    assert scheduler.acquire_block("b") is None
    first.status = BlockStatus.SUCCESS
    scheduler.release_block(first)
    downstream = scheduler.acquire_block("b")
    assert downstream is not None
    assert downstream.read_roi == first.write_roi
    assert scheduler.acquire_block("b") is None


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_retries_then_failed_for_good(max_retries):
    task = Task(
        "a",
        total_roi=Roi((0, 0), (4, 4)),
        read_roi=Roi((0, 0), (4, 4)),
        write_roi=Roi((0, 0), (4, 4)),
        process_function=_nothing,
        read_write_conflict=False,
        max_retries=max_retries,
        fit="valid",
    )
    scheduler = Scheduler([task])
    block_ids = []
    for _ in range(max_retries + 1):
        block = scheduler.acquire_block("a")
        assert block is not None
        block_ids.append(block.block_id)
        assert not scheduler.task_states["a"].is_done()
        block.status = BlockStatus.FAILED
        scheduler.release_block(block)
    assert len(set(block_ids)) == 1
    assert scheduler.acquire_block("a") is None
    task_state = scheduler.task_states["a"]
    assert task_state.is_done()
    assert task_state.failed_count == 1
    assert task_state.completed_count == 0


def test_failure_orphans_downstream_reader():
    _, b = _chain_tasks(upstream_retries=0)
    scheduler = Scheduler([b])
    for block in [scheduler.acquire_block("a") for _ in range(3)]:
        assert block is not None
        block.status = BlockStatus.FAILED if block.write_roi.begin == (10,) else BlockStatus.SUCCESS
        scheduler.release_block(block)
    downstream = _drain(scheduler, "b")
    assert sorted(tuple(block.read_roi.begin) for block in downstream) == [(0,), (20,)]
    assert scheduler.task_states["a"].failed_count == 1
    assert scheduler.task_states["b"].orphaned_count == 1
    assert scheduler.task_states["b"].completed_count == 2
    assert scheduler.task_states["a"].is_done() and scheduler.task_states["b"].is_done()


def test_huge_task_is_lazy():
    """10^7 blocks: the first block comes back (no timing assertion) and counts are right."""
    task = Task(
        "huge",
        total_roi=Roi((0, 0, 0), (1000, 1000, 10000)),
        read_roi=Roi((0, 0, 0), (12, 12, 12)),
        write_roi=Roi((1, 1, 1), (10, 10, 10)),
        process_function=_nothing,
        read_write_conflict=True,
        fit="overhang",
    )
    scheduler = Scheduler([task])
    task_state = scheduler.task_states["huge"]
    # overhang: write begins at 1 + 10k inside [1, 999) x [1, 999) x [1, 9999)
    assert task_state.total_block_count == 100 * 100 * 1000
    block = scheduler.acquire_block("huge")
    assert block is not None
    assert block.block_id[0] == "huge"
    assert block.write_roi.shape == (10, 10, 10)
    assert all((begin - 1) % 10 == 0 for begin in block.write_roi.begin)
    assert scheduler.task_states["huge"].processing_count == 1
    block.status = BlockStatus.SUCCESS
    scheduler.release_block(block)
    assert scheduler.acquire_block("huge") is not None


def test_huge_task_valid_count():
    task = Task(
        "huge",
        total_roi=Roi((0, 0, 0), (1000, 1000, 10000)),
        read_roi=Roi((0, 0, 0), (12, 12, 12)),
        write_roi=Roi((1, 1, 1), (10, 10, 10)),
        process_function=_nothing,
        read_write_conflict=False,
        fit="valid",
    )
    scheduler = Scheduler([task])
    # valid: read [10k, 10k + 12) inside [0, 1000): k <= 98
    assert scheduler.task_states["huge"].total_block_count == 99 * 99 * 999
    assert scheduler.acquire_block("huge") is not None


# ---------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(
    dims=st.integers(1, 3),
    data=st.data(),
)
def test_tiling_matches_brute_force(dims, data):
    """Every expected block is handed out exactly once, nothing else, for all fit modes."""
    spec = data.draw(task_specs("a", dims))
    expected = expected_blocks(spec.total_roi, spec.read_roi, spec.write_roi, spec.fit)
    task = Task(
        "a",
        total_roi=spec.total_roi,
        read_roi=spec.read_roi,
        write_roi=spec.write_roi,
        process_function=_nothing,
        read_write_conflict=spec.read_write_conflict,
        fit=spec.fit,
    )
    scheduler = Scheduler([task])
    assert scheduler.task_states["a"].total_block_count == len(expected)
    handed_out = _drain(scheduler, "a")
    assert sorted((roi_key(b.read_roi), roi_key(b.write_roi)) for b in handed_out) == sorted(
        (roi_key(read), roi_key(write)) for read, write in expected
    )
    assert len({b.block_id for b in handed_out}) == len(expected)
    assert scheduler.task_states["a"].is_done()


@PROPERTY_SETTINGS
@given(
    dims=st.integers(1, 3),
    data=st.data(),
    seed=seeds,
    window=windows,
)
def test_single_task_random_interleaving(dims, data, seed, window):
    """No failures: every block completes once; conflicting blocks never run together."""
    spec = data.draw(task_specs("a", dims))
    driver = run_driver([spec], seed, window)
    assert all(value == COMPLETED for value in driver.state.values())


@PROPERTY_SETTINGS
@given(
    dims=st.integers(1, 3),
    data=st.data(),
    seed=seeds,
    window=windows,
    failures=failure_sets(["a"]),
)
def test_single_task_with_failures(dims, data, seed, window, failures):
    spec = data.draw(task_specs("a", dims))
    run_driver([spec], seed, window, failures)


@PROPERTY_SETTINGS
@given(specs=chains(), seed=seeds, window=windows)
def test_chains_without_failures(specs, seed, window):
    """Chained tasks with different grids: all blocks complete, upstream always first."""
    driver = run_driver(specs, seed, window)
    assert all(value == COMPLETED for value in driver.state.values())


@PROPERTY_SETTINGS
@given(
    specs=chains(),
    seed=seeds,
    window=windows,
    failures=failure_sets(["a", "b", "c"]),
)
def test_chains_with_drawn_failures(specs, seed, window, failures):
    names = {spec.name for spec in specs}
    failures = frozenset(failure for failure in failures if failure[0] in names)
    run_driver(specs, seed, window, failures)


@PROPERTY_SETTINGS
@given(
    specs=chains(),
    seed=seeds,
    window=windows,
    fail_probability=st.sampled_from([0.05, 0.2, 0.5]),
)
def test_chains_with_random_failures(specs, seed, window, fail_probability):
    run_driver(specs, seed, window, fail_probability=fail_probability)


@PROPERTY_SETTINGS
@given(
    specs=chains(),
    seed=seeds,
    window=windows,
    failures=failure_sets(["a", "b", "c"]),
)
def test_chains_without_conflicts_orphan_exactly(specs, seed, window, failures):
    """Without conflicts the orphans are exactly the transitive downstream readers."""
    for spec in specs:
        spec.read_write_conflict = False
    names = {spec.name for spec in specs}
    failures = frozenset(failure for failure in failures if failure[0] in names)
    driver = run_driver(specs, seed, window, failures)
    reference = driver.reference
    failed = {key for key, value in driver.state.items() if value == FAILED}
    expected_orphans = set()
    for key in reference.all_blocks():  # topological order
        if any(up in failed or up in expected_orphans for up in reference.predecessors[key]):
            expected_orphans.add(key)
    orphaned = {key for key, value in driver.state.items() if value == WAITING}
    assert orphaned == expected_orphans
