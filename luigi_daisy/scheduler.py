"""The scheduler: a pure state machine over the lazy dependency graph.

No sockets, threads or clocks: time comes in as an argument, and user code (process and
check functions) never runs inside the bookkeeping. :class:`BlockScheduler` is the core;
:class:`Scheduler` adds daisy's in-process API on top (it calls the check functions,
because in daisy the scheduler does).

Memory is proportional to the blocks in flight and the frontier: per task, the ready
queue, a countdown of unfinished dependencies for each block one of whose dependencies
has finished, the blocks being processed, and the failed and orphaned blocks. A block
that none of its dependencies has touched yet is not stored anywhere. Only a scheduler
made with ``block_map=True`` (a run that serves the live block map) also keeps one byte
per block, the block's state, updated in O(1) on every event.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, cast

from .block_states import DONE, FAILED, ORPHANED, PROCESSING, READY, WAITING
from .blocks import Block, BlockBitmap, BlockGrid, BlockStatus, PackedBlocks, new_block
from .errors import SchedulerError
from .graph import ConflictStencil, UpstreamLink
from .task import Task, collect_tasks

if TYPE_CHECKING:
    from .dependency_graph import DependencyGraph


class TaskState:
    """Counters of one task's blocks, with daisy's names.

    ``completed_count`` includes ``skipped_count`` (blocks found done and not processed),
    so ``ready + processing + pending + completed + failed + orphaned == total`` at every
    step.
    """

    __slots__ = ("task_id", "started", "total_block_count", "ready_count", "processing_count",
                 "completed_count", "skipped_count", "failed_count", "orphaned_count",
                 "worker_failure_count", "worker_restart_count", "timeout_reclaim_count",
                 "failed_blocks", "stop_reason")

    def __init__(self, task_id: str, total_block_count: int) -> None:
        self.task_id = task_id
        self.started = False
        self.total_block_count = total_block_count
        self.ready_count = 0
        self.processing_count = 0
        self.completed_count = 0
        self.skipped_count = 0
        self.failed_count = 0
        self.orphaned_count = 0
        self.worker_failure_count = 0
        self.worker_restart_count = 0
        self.timeout_reclaim_count = 0
        #: daisy's block numbers (``block.block_id[1]``) of the blocks that failed for
        #: good, with the last error text
        self.failed_blocks: dict[int, str | None] = {}
        #: why the task was stopped before all its blocks ran (see ``BlockScheduler.stop``)
        self.stop_reason: str | None = None

    @property
    def pending_count(self) -> int:
        """Blocks waiting for their dependencies."""
        return (self.total_block_count - self.ready_count - self.processing_count
                - self.completed_count - self.failed_count - self.orphaned_count)

    @property
    def succeeded(self) -> bool:
        """True when every block completed (processed or skipped)."""
        return self.completed_count == self.total_block_count

    def is_done(self) -> bool:
        """True when no block is left to process."""
        return (self.completed_count + self.failed_count + self.orphaned_count
                >= self.total_block_count)

    def __bool__(self) -> bool:
        return self.succeeded

    def __getstate__(self):
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def __repr__(self) -> str:
        return (f"TaskState({self.task_id!r}: total={self.total_block_count}, "
                f"ready={self.ready_count}, processing={self.processing_count}, "
                f"pending={self.pending_count}, completed={self.completed_count}, "
                f"skipped={self.skipped_count}, failed={self.failed_count}, "
                f"orphaned={self.orphaned_count})")


_NOT_PROCESSING = object()

#: ``done_before`` of a task none of whose blocks finished outside this run (an empty
#: frozenset answers ``in`` and truth tests at C speed on the hot path)
NOTHING_DONE: frozenset = frozenset()


class ReleaseOutcome(enum.Enum):
    """What a release changed."""

    COMPLETED = "completed"
    SKIPPED = "skipped"
    RETRYING = "retrying"
    FAILED = "failed"
    #: failed while its task was being stopped (see ``BlockScheduler.stop``); not retried
    ORPHANED = "orphaned"


class _TaskProgress:
    """The scheduler's mutable record of one task."""

    __slots__ = ("task_id", "grid", "stencil", "max_retries", "timeout", "state",
                 "upstream_links", "downstream_links", "ready", "roots", "waiting",
                 "processing", "retries", "orphaned", "has_downstream", "done_before",
                 "resuming", "followed", "held_ready", "states", "stopped")

    def __init__(self, task: Task) -> None:
        self.task_id = task.task_id
        self.grid: BlockGrid = task.grid
        self.stencil = ConflictStencil(task.grid, task.read_write_conflict)
        self.max_retries = task.max_retries
        self.timeout = task.timeout
        self.state = TaskState(task.task_id, task.grid.num_blocks)
        self.upstream_links: list[tuple[UpstreamLink, _TaskProgress]] = []
        self.downstream_links: list[tuple[UpstreamLink, _TaskProgress]] = []
        self.ready: deque[int] = deque()
        self.roots: Iterator[int] = iter(())
        self.waiting: dict[int, int] = {}
        self.processing: dict[int, float] = {}
        self.retries: dict[int, int] = {}
        self.orphaned: set[int] = set()
        self.has_downstream = False
        #: blocks finished in an earlier run (from a ledger); they are never handed out
        self.done_before: BlockBitmap | frozenset = NOTHING_DONE
        #: whether this task or an upstream one has blocks finished in an earlier run
        self.resuming = False
        #: another run processes this task; its ready blocks wait in held_ready
        self.followed = False
        self.held_ready: set[int] = set()
        #: no block of it is handed out any more (see ``BlockScheduler.stop``)
        self.stopped = False
        #: one state code per block of the index grid (``block_states``), or None
        self.states: bytearray | None = None

    def start_block_map(self) -> None:
        """Keep the state of every block from now on (before any block is handed out)."""
        self.states = bytearray((WAITING,)) * math.prod(self.grid.id_grid_shape)
        if self.done_before:
            import numpy as np
            done = np.frombuffer(self.done_bitmap()._bytes, dtype=np.uint8)
            np.frombuffer(self.states, dtype=np.uint8)[done == 1] = DONE

    def plan_roots(self) -> None:
        """Set up the lazy iterator over blocks that depend on nothing."""
        self.has_downstream = self.stencil.has_conflicts or bool(self.downstream_links)
        self.resuming = bool(self.done_before) or any(
            upstream.done_before for _, upstream in self.upstream_links)
        if not self.upstream_links:
            self.roots = self.stencil.roots()
            self.state.ready_count = self.stencil.root_count() - self._done_root_count()
        elif any(link.covers_grid for link, _ in self.upstream_links):
            self.roots = iter(())
        else:
            links = [link for link, _ in self.upstream_links]
            position_of = self.grid.position_of
            self.roots = (
                index for index in self.stencil.roots()
                if not any(link.dependency_count(position_of(index)) for link in links))
        if self.done_before:
            self.roots = itertools.filterfalse(self.done_before.__contains__, self.roots)
            self.state.completed_count = self.state.skipped_count = len(self.done_before)

    def done_bitmap(self) -> BlockBitmap:
        """``done_before`` when it holds blocks (it is a bitmap then)."""
        return cast(BlockBitmap, self.done_before)

    def _done_root_count(self) -> int:
        """How many level-0 blocks finished in an earlier run (vectorised)."""
        if not self.done_before:
            return 0
        import numpy as np  # only a resumed run needs it
        done = np.frombuffer(self.done_bitmap()._bytes, dtype=np.uint8).reshape(
            self.grid.id_grid_shape)
        # the roots are every period-th block along each axis: a strided view, no index
        roots = done[tuple(slice(period - 1, None, period) for period in self.stencil.periods)]
        return int(roots.sum(dtype=np.int64))

    def dependency_count(self, position: tuple[int, ...]) -> int:
        """How many blocks this block waits for in total, finished or not."""
        count = self.stencil.upstream_count(position)
        for link, _ in self.upstream_links:
            count += link.dependency_count(position)
        return count

    def open_dependency_count(self, position: tuple[int, ...], index: int) -> int:
        """How many blocks this block waits for that did not finish in an earlier run."""
        if not self.resuming:
            return self.dependency_count(position)
        done = self.done_before
        count = sum(1 for upstream in self.stencil.upstream(position, index)
                    if upstream not in done)
        for link, upstream_progress in self.upstream_links:
            upstream_done = upstream_progress.done_before
            count += sum(1 for upstream in link.dependencies(position)
                         if upstream not in upstream_done)
        return count

    def resume_frontier(self) -> None:
        """Queue the unfinished blocks whose dependencies all finished in an earlier run.

        Walks whichever is smaller: the unfinished blocks of this task, or the blocks
        downstream of the finished ones.
        """
        if not self.resuming or not (self.stencil.has_conflicts or self.upstream_links):
            return  # nothing waits for another block: every unfinished block is a root
        grid = self.grid
        done = self.done_before
        finished_upstream = sum(len(upstream.done_before) for _, upstream in self.upstream_links)
        if grid.num_blocks - len(done) <= len(done) + finished_upstream:
            every_block = map(sum, itertools.product(*(
                range(0, n * stride, stride)
                for n, stride in zip(grid.grid_shape, grid.id_strides))))
            candidates: Iterable[int] = itertools.filterfalse(done.__contains__, every_block)
        else:
            downstream: set[int] = set()
            for index in done:
                downstream.update(self.stencil.downstream(grid.position_of(index), index))
            for link, upstream in self.upstream_links:
                for index in upstream.done_before:
                    downstream.update(link.dependents(upstream.grid.position_of(index)))
            candidates = downstream
        for index in candidates:
            if index in done:
                continue
            position = grid.position_of(index)
            if self.dependency_count(position) and not self.open_dependency_count(
                    position, index):
                self.ready.append(index)
                self.state.ready_count += 1
                if self.states is not None:
                    self.states[index] = READY

    def is_root_plane(self, leading: tuple[int, ...], rows: int, columns: int):
        """Which blocks of a plane of the grid depend on nothing (a boolean array).

        The plane is the last two grid axes at the ``leading`` coordinates (a 1D grid is
        one row). Computed per axis, by arithmetic: no block is walked.
        """
        import numpy as np
        # each axis's coordinates, shaped to broadcast over the (rows, columns) plane
        if self.grid.dims == 1:
            axes = [np.arange(columns).reshape(1, columns)]
        else:
            axes = [np.full((1, 1), k) for k in leading]
            axes += [np.arange(rows).reshape(rows, 1), np.arange(columns).reshape(1, columns)]
        roots = np.ones((rows, columns), dtype=bool)
        for coordinates, period in zip(axes, self.stencil.periods):
            roots &= coordinates % period == period - 1
        for link, _ in self.upstream_links:
            if link.covers_grid:
                return np.zeros((rows, columns), dtype=bool)
            needed = np.ones((rows, columns), dtype=np.int64)
            for dim, coordinates in enumerate(axes):
                counts = link.dependency_counts(dim, coordinates.ravel().tolist())
                needed = needed * np.array(counts, dtype=np.int64).reshape(coordinates.shape)
            roots &= needed == 0
        return roots


def _valid_done_blocks(grid: BlockGrid, task_id: str,
                       indices: Iterable[int]) -> BlockBitmap | frozenset:
    """The done blocks as a bitmap, refusing indices that are not blocks of the grid."""
    import numpy as np  # only a resumed run needs it
    size = math.prod(grid.id_grid_shape)
    if isinstance(indices, PackedBlocks):
        return _valid_packed_blocks(grid, task_id, indices, size)
    array = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices),
                       dtype=np.int64)
    if not array.size:
        return NOTHING_DONE
    valid = (array >= 0) & (array < size)
    if valid.all():
        positions = np.unravel_index(array, grid.id_grid_shape)
        for coordinates, extent in zip(positions, grid.grid_shape):
            valid &= coordinates < extent
    if not valid.all():
        raise SchedulerError(
            f"block {int(array[~valid][0])} recorded as done is not a block of task "
            f"{task_id!r} ({grid.num_blocks} blocks); the record of finished blocks "
            f"belongs to another geometry or is damaged")
    return BlockBitmap.from_indices(size, array)


def _valid_packed_blocks(grid: BlockGrid, task_id: str, packed: PackedBlocks,
                         size: int) -> BlockBitmap | frozenset:
    """:func:`_valid_done_blocks` of packed bits: unpacked into the bitmap directly and
    checked by slices of the grid, never as one integer per block."""
    if not len(packed):
        return NOTHING_DONE
    bitmap = packed.into_bitmap(size)
    outside = bitmap is None
    if bitmap is not None:
        import numpy as np
        every = np.frombuffer(bitmap._bytes, dtype=np.uint8).reshape(grid.id_grid_shape)
        for axis, extent in enumerate(grid.grid_shape):
            if every[(slice(None),) * axis + (slice(extent, None),)].any():
                outside = True
    if outside:
        raise SchedulerError(
            f"a block recorded as done is not a block of task {task_id!r} "
            f"({grid.num_blocks} blocks); the record of finished blocks belongs to "
            f"another geometry or is damaged")
    return cast(BlockBitmap, bitmap)


class BlockScheduler:
    """Pure state machine that hands out the blocks of a set of tasks.

    Parameters
    ----------
    tasks:
        The tasks to run; upstream tasks are pulled in.
    done_blocks:
        Per task id, the indices of blocks that finished in an earlier run (from a
        ledger). They count as completed and skipped and are never handed out.
    block_map:
        Keep one byte per block with its state, for :meth:`block_plane` (the live
        block map); costs a store per event and one byte per block.
    """

    def __init__(self, tasks: Task | Iterable[Task],
                 done_blocks: Mapping[str, Iterable[int]] | None = None,
                 block_map: bool = False) -> None:
        self.tasks: dict[str, Task] = {task.task_id: task for task in collect_tasks(tasks)}
        self._progress: dict[str, _TaskProgress] = {
            task_id: _TaskProgress(task) for task_id, task in self.tasks.items()}
        for task_id, indices in (done_blocks or {}).items():
            progress = self._get(task_id)
            progress.done_before = _valid_done_blocks(progress.grid, task_id, indices)
        for task_id, task in self.tasks.items():
            progress = self._progress[task_id]
            for upstream in task.upstream_tasks:
                upstream_progress = self._progress[upstream.task_id]
                link = UpstreamLink(upstream.grid, task.grid)
                progress.upstream_links.append((link, upstream_progress))
                upstream_progress.downstream_links.append((link, progress))
        if block_map:
            for progress in self._progress.values():
                progress.start_block_map()
        for progress in self._progress.values():
            progress.plan_roots()
        for progress in self._progress.values():
            progress.resume_frontier()
        self.task_states: dict[str, TaskState] = {
            task_id: progress.state for task_id, progress in self._progress.items()}

    # ------------------------------------------------------------------ queries
    def _get(self, task_id: str) -> _TaskProgress:
        try:
            return self._progress[task_id]
        except KeyError:
            raise SchedulerError(
                f"unknown task_id {task_id!r}; this scheduler runs "
                f"{', '.join(map(repr, self._progress))}") from None

    def is_done(self) -> bool:
        """True when every task is done."""
        return all(state.is_done() for state in self.task_states.values())

    def block_plane(self, task_id: str, leading: tuple[int, ...] = ()):
        """The state codes (``block_states``) of one plane of a task's block grid.

        Parameters
        ----------
        task_id:
            The task.
        leading:
            The coordinates of every grid axis but the last two (nothing for 1D and 2D
            grids); the plane spans the last two axes. A 1D grid is one row.

        Returns
        -------
        numpy.ndarray
            ``uint8`` of shape ``(rows, columns)``: a copy, made in time proportional to
            the plane. Blocks nothing has touched yet show as ready when they depend on
            nothing, else as waiting.
        """
        import numpy as np
        progress = self._get(task_id)
        if progress.states is None:
            raise SchedulerError(
                f"this scheduler keeps no block states; create it with block_map=True to "
                f"ask for a plane of task {task_id!r}")
        grid = progress.grid
        leading = tuple(int(k) for k in leading)
        if len(leading) != max(grid.dims - 2, 0) or not all(
                0 <= k < n for k, n in zip(leading, grid.grid_shape)):
            raise SchedulerError(
                f"task {task_id!r} has a block grid of shape {grid.grid_shape}; give one "
                f"coordinate inside it for each of its first {max(grid.dims - 2, 0)} axes, "
                f"got {leading}")
        every = np.frombuffer(progress.states, dtype=np.uint8).reshape(grid.id_grid_shape)
        if grid.dims == 1:
            plane = every[None, :grid.grid_shape[0]].copy()
        else:
            plane = every[leading][:grid.grid_shape[-2], :grid.grid_shape[-1]].copy()
        untouched = plane == WAITING
        if untouched.any():
            if progress.stencil.has_conflicts or progress.upstream_links:
                untouched &= progress.is_root_plane(leading, *plane.shape)
            plane += untouched.view(np.uint8) * (READY - WAITING)
        return plane

    # ------------------------------------------------------------------ acquire
    def acquire(self, task_id: str, now: float = 0.0) -> Block | None:
        """Hand out a ready block of ``task_id``, or None if none is ready now."""
        progress = self._progress.get(task_id)
        if progress is None:
            progress = self._get(task_id)
        state = progress.state
        done_before = progress.done_before
        while True:
            if progress.ready:
                index = progress.ready.popleft()
                if not done_before or index not in done_before:
                    break
            else:
                root = next(progress.roots, None)
                if root is None:
                    return None
                index = root
                if not done_before or index not in done_before:
                    if progress.upstream_links:
                        state.ready_count += 1  # roots found on the way are not counted
                    break
            # finished by another run while this one followed the task: passed over
            # (complete_external took it out of ready_count already)
        state.ready_count -= 1
        state.processing_count += 1
        state.started = True
        progress.processing[index] = now
        if progress.states is not None:
            progress.states[index] = PROCESSING
        return new_block(task_id, index, progress.grid)

    # ------------------------------------------------------------------ release
    def release(self, block: Block, status: BlockStatus | None = None,
                now: float = 0.0, skipped: bool = False,
                worker_lost: bool = False, fatal: bool = False) -> ReleaseOutcome:
        """Take a block back.

        Parameters
        ----------
        block:
            A block handed out by :meth:`acquire` and not yet released.
        status:
            ``SUCCESS`` or ``FAILED``; defaults to ``block.status``.
        now:
            The current time (unused today; kept so callers pass time explicitly).
        skipped:
            The block was found done without being processed.
        worker_lost:
            The block failed because its worker died or timed out: it is retried at
            least once, whatever ``max_retries`` says.
        fatal:
            The block failed in a way every block of its task would (a worker that
            cannot be set up): it fails for good and the task is stopped (:meth:`stop`).
        """
        task_id = cast(str, block.task_id)
        progress = self._progress.get(task_id)
        if progress is None:
            progress = self._get(task_id)
        index = block.index
        if progress.processing.pop(index, _NOT_PROCESSING) is _NOT_PROCESSING:
            raise SchedulerError(
                f"block {block.block_id[1]} of task {block.task_id!r} was released but is "
                f"not being processed; release each acquired block exactly once")
        state = progress.state
        state.processing_count -= 1
        if status is None:
            status = block.status
        if status == BlockStatus.SUCCESS:
            state.completed_count += 1
            if skipped:
                state.skipped_count += 1
            if progress.states is not None:
                progress.states[index] = DONE
            if progress.has_downstream:
                self._finished(progress, index)
            return ReleaseOutcome.SKIPPED if skipped else ReleaseOutcome.COMPLETED
        if status != BlockStatus.FAILED:
            raise SchedulerError(
                f"block {block.block_id[1]} of task {block.task_id!r} released with status "
                f"{BlockStatus(status).name}; set it to SUCCESS or FAILED first")
        if progress.stopped:
            state.orphaned_count += 1  # in flight when its task stopped: not retried
            return ReleaseOutcome.ORPHANED
        if fatal:
            progress.retries.pop(index, None)
            state.failed_count += 1
            state.failed_blocks[block.block_id[1]] = block.error
            if progress.states is not None:
                progress.states[index] = FAILED
            self.stop(task_id, block.error or "a worker could not process any block")
            return ReleaseOutcome.FAILED
        attempts = progress.retries.get(index, 0)
        allowed = max(progress.max_retries, 1) if worker_lost else progress.max_retries
        if attempts < allowed:
            progress.retries[index] = attempts + 1
            progress.ready.append(index)
            state.ready_count += 1
            if progress.states is not None:
                progress.states[index] = READY
            return ReleaseOutcome.RETRYING
        progress.retries.pop(index, None)
        state.failed_count += 1
        state.failed_blocks[block.block_id[1]] = block.error
        if progress.states is not None:
            progress.states[index] = FAILED
        self._orphan_dependents(progress, index)
        return ReleaseOutcome.FAILED

    def return_unstarted(self, block: Block) -> None:
        """Take back a block that was handed out but never started (a worker left with
        it in hand): it is ready again, first in line, and costs no retry."""
        progress = self._get(cast(str, block.task_id))
        index = block.index
        if progress.processing.pop(index, _NOT_PROCESSING) is _NOT_PROCESSING:
            raise SchedulerError(
                f"block {block.block_id[1]} of task {block.task_id!r} was given back but is "
                f"not being processed; give back only blocks acquired and not released")
        state = progress.state
        state.processing_count -= 1
        if progress.stopped:
            state.orphaned_count += 1
            return
        progress.ready.appendleft(index)
        state.ready_count += 1
        if progress.states is not None:
            progress.states[index] = READY

    def _finished(self, progress: _TaskProgress, index: int) -> None:
        """Count down the dependencies of every block waiting for this one."""
        position = progress.grid.position_of(index)
        if progress.stencil.has_conflicts:
            self._count_down(progress, progress.stencil.downstream(position, index))
        for link, downstream in progress.downstream_links:
            self._count_down(downstream, link.dependents(position))

    @staticmethod
    def _count_down(progress: _TaskProgress, indices: list[int]) -> None:
        waiting = progress.waiting
        orphaned = progress.orphaned
        done_before = progress.done_before
        if progress.stopped:
            return
        for index in indices:
            remaining = waiting.get(index)
            if remaining is None:
                if orphaned and index in orphaned or done_before and index in done_before:
                    continue
                # first finished dependency of this block in this run: none of its other
                # dependencies finished in this run yet
                remaining = progress.open_dependency_count(
                    progress.grid.position_of(index), index)
            remaining -= 1
            if remaining:
                waiting[index] = remaining
            else:
                waiting.pop(index, None)
                if progress.followed:
                    progress.held_ready.add(index)
                else:
                    progress.ready.append(index)
                progress.state.ready_count += 1
                if progress.states is not None:
                    progress.states[index] = READY

    def _orphan_dependents(self, progress: _TaskProgress, index: int) -> None:
        """Orphan every block that transitively depends on a block failed for good."""
        stack = [(progress, index)]
        while stack:
            source, source_index = stack.pop()
            position = source.grid.position_of(source_index)
            targets = [(source, source.stencil.downstream(position, source_index))]
            targets += [(downstream, link.dependents(position))
                        for link, downstream in source.downstream_links]
            for target, indices in targets:
                if target.stopped:
                    continue  # its unfinished blocks are counted as orphaned already
                for dependent in indices:
                    if dependent in target.orphaned or dependent in target.done_before:
                        continue
                    target.orphaned.add(dependent)
                    target.waiting.pop(dependent, None)
                    target.state.orphaned_count += 1
                    if target.states is not None:
                        target.states[dependent] = ORPHANED
                    stack.append((target, dependent))

    def complete_external(self, task_id: str, index: int) -> bool:
        """Record a block of ``task_id`` that another run finished (read from its ledger).

        The block counts as completed and skipped, is never handed out here, and
        releases the blocks that wait for it. Returns False if it was known already.
        """
        progress = self._get(task_id)
        if progress.stopped or index in progress.done_before or index in progress.processing:
            return False
        done = progress.done_before
        if not isinstance(done, BlockBitmap):
            done = progress.done_before = BlockBitmap(math.prod(progress.grid.id_grid_shape))
        progress.waiting.pop(index, None)
        if index in progress.held_ready:
            progress.held_ready.discard(index)
            progress.state.ready_count -= 1
        elif not progress.upstream_links and progress.stencil.level(
                progress.grid.position_of(index)) == 0:
            progress.state.ready_count -= 1  # a root, counted ready from the start
        progress.state.completed_count += 1
        progress.state.skipped_count += 1
        if progress.states is not None:
            progress.states[index] = DONE
        if progress.has_downstream:
            self._finished(progress, index)
        # only now: the countdowns above must still count this block as unfinished
        done.add(index)
        return True

    def stop(self, task_id: str, reason: str) -> None:
        """Hand out no more blocks of ``task_id`` nor of the tasks downstream of it.

        For an error that every block would repeat: the blocks not handed out yet count
        as orphaned, and so do blocks in flight that fail later (they are not retried);
        blocks in flight that succeed still complete.
        """
        stack = [(self._get(task_id), reason)]
        while stack:
            progress, why = stack.pop()
            if progress.stopped:
                continue
            progress.stopped = True
            state = progress.state
            state.stop_reason = why
            state.orphaned_count += state.ready_count + state.pending_count
            state.ready_count = 0
            progress.ready.clear()
            progress.roots = iter(())
            progress.waiting.clear()
            progress.held_ready.clear()
            progress.retries.clear()
            for _, downstream in progress.downstream_links:
                stack.append((downstream, f"upstream task {progress.task_id!r} was stopped"))

    def follow(self, task_id: str) -> None:
        """Mark a task whose blocks another run processes: nothing of it is handed out
        here; :meth:`complete_external` records its finished blocks."""
        self._get(task_id).followed = True

    def take_over(self, task_id: str) -> None:
        """Process a followed task here from now on (the other run is gone)."""
        progress = self._get(task_id)
        progress.followed = False
        progress.ready.extend(sorted(progress.held_ready))
        progress.held_ready.clear()


class Scheduler(BlockScheduler):
    """daisy's in-process scheduler API over :class:`BlockScheduler`.

    ``acquire_block`` skips (and counts as skipped) the blocks a task's check function
    reports as done; ``release_block`` applies the post check of a ``(pre, post)`` pair.
    A released block's ``status`` must be ``SUCCESS`` or ``FAILED``; a block handed out
    has status ``CREATED``, as in daisy.

    Parameters
    ----------
    tasks:
        The tasks to run; upstream tasks are pulled in.
    count_all_orphans:
        daisy's switch to trade exact orphan counts for speed (with False, daisy may count
        orphans as pending). Orphans are counted exactly here either way: the walk only
        visits blocks that become orphans, so there is nothing to save.
    done_blocks:
        Per task id, the indices of blocks finished in an earlier run.
    """

    def __init__(self, tasks: Task | Iterable[Task], count_all_orphans: bool = True,
                 done_blocks: Mapping[str, Iterable[int]] | None = None) -> None:
        if not isinstance(count_all_orphans, bool):
            raise TypeError(
                f"count_all_orphans must be True or False, got {count_all_orphans!r}; "
                f"pass the tasks as the first argument and done blocks as done_blocks=")
        super().__init__(tasks, done_blocks)
        self.count_all_orphans = count_all_orphans
        self._dependency_graph: DependencyGraph | None = None
        # without check functions the daisy names are the core's methods, one call less
        if not any(task.pre_check for task in self.tasks.values()):
            self.acquire_block = self.acquire  # type: ignore[method-assign]
        if not any(task.post_check for task in self.tasks.values()):
            self.release_block = self.release  # type: ignore[method-assign]

    @property
    def dependency_graph(self):
        """daisy's :class:`~luigi_daisy.dependency_graph.DependencyGraph` of these tasks,
        answering from the same grid arithmetic as the scheduler."""
        if self._dependency_graph is None:
            from .dependency_graph import DependencyGraph
            self._dependency_graph = DependencyGraph(list(self.tasks.values()))
        return self._dependency_graph

    def acquire_block(self, task_id: str) -> Block | None:
        """A block of ``task_id`` to process, or None if none is ready now."""
        block = self.acquire(task_id)  # an unknown task_id raises here
        task = self.tasks[task_id]
        while block is not None and task.is_done_already(block):
            block.status = BlockStatus.SUCCESS
            self.release(block, BlockStatus.SUCCESS, skipped=True)
            block = self.acquire(task_id)
        return block

    def release_block(self, block: Block) -> ReleaseOutcome:
        """Return a processed block; its ``status`` says whether it succeeded."""
        if block.status is BlockStatus.SUCCESS:
            failure = self.tasks[cast(str, block.task_id)].post_check_failure(block)
            if failure is not None:
                block.status = BlockStatus.FAILED
                block.error = block.error or failure
        return self.release(block, block.status)
