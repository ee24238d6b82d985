"""daisy's dependency graph API (``DependencyGraph``, ``BlockwiseDependencyGraph``).

Both answer from the lazy grid arithmetic of :mod:`luigi_daisy.graph`, the same the
scheduler runs on: a query about one block builds only the blocks in its answer, and
nothing here holds all blocks or edges of a task. Only the methods whose purpose is to
enumerate (``enumerate_all_dependencies``, a generator) walk the whole grid.

The edges are the scheduler's: inside a task, a block waits for the conflicting blocks
of lower levels (daisy waits for those of the previous level only, which the lower levels
precede anyway); across tasks, a block waits for every upstream block whose write ROI
meets its read ROI. Blocks come back sorted by their daisy number, as in daisy.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from funlib.geometry import Roi

from .blocks import Block, BlockGrid, new_block
from .errors import GeometryError
from .graph import ConflictStencil, UpstreamLink
from .task import Task, collect_tasks


def _by_number(blocks: list[Block]) -> list[Block]:
    return sorted(blocks, key=lambda block: block.block_id[1])


class BlockwiseDependencyGraph:
    """The blocks of one task and the conflicts between them (daisy 1.x's API).

    Parameters
    ----------
    task_id:
        Id given to the blocks.
    block_read_roi, block_write_roi:
        One block's read and write ROI (their shapes and relative offset matter).
    read_write_conflict:
        Whether a block's read ROI must not overlap a running block's write ROI.
    fit:
        ``"valid"``, ``"overhang"`` or ``"shrink"``.
    total_read_roi, total_write_roi:
        The region to tile, given either as what the blocks read or what they write (the
        block's context converts one into the other).
    """

    def __init__(self, task_id: str | None, block_read_roi: Roi, block_write_roi: Roi,
                 read_write_conflict: bool, fit: str, total_read_roi: Roi | None = None,
                 total_write_roi: Roi | None = None) -> None:
        name = task_id if task_id is not None else "graph"
        if not isinstance(block_read_roi, Roi) or not isinstance(block_write_roi, Roi):
            raise GeometryError(
                f"{name}: block_read_roi and block_write_roi must be funlib.geometry Rois, "
                f"got {block_read_roi!r} and {block_write_roi!r}")
        context_low = block_write_roi.begin - block_read_roi.begin
        context_high = block_read_roi.end - block_write_roi.end
        if total_read_roi is None and total_write_roi is None:
            raise GeometryError(
                f"{name}: give total_read_roi or total_write_roi, the region to tile")
        if total_read_roi is None:
            total_read_roi = total_write_roi.grow(context_low, context_high)
        elif total_write_roi is not None and (
                total_write_roi.grow(context_low, context_high) != total_read_roi):
            raise GeometryError(
                f"{name}: total_write_roi {total_write_roi} grown by the block's context "
                f"({context_low}, {context_high}) is not total_read_roi {total_read_roi}; "
                f"give only one of them")
        grid = BlockGrid(total_read_roi, block_read_roi, block_write_roi, fit, name=name)
        self._setup(task_id, grid, bool(read_write_conflict))

    @classmethod
    def for_task(cls, task: Task) -> BlockwiseDependencyGraph:
        """The graph of a task, sharing the grid the scheduler uses."""
        graph = cls.__new__(cls)
        graph._setup(task.task_id, task.grid, task.read_write_conflict)
        return graph

    def _setup(self, task_id: str | None, grid: BlockGrid, read_write_conflict: bool) -> None:
        self.task_id = task_id
        self.grid = grid
        self.stencil = ConflictStencil(grid, read_write_conflict)
        self.block_read_roi = grid.read_template
        self.block_write_roi = grid.write_template
        self.read_write_conflict = read_write_conflict
        self.fit = grid.fit
        self.total_read_roi = grid.total_roi
        self.total_write_roi = grid.total_write_roi

    # ------------------------------------------------------------------ counts
    @property
    def num_blocks(self) -> int:
        """Number of blocks of the task."""
        return self.grid.num_blocks

    @property
    def num_levels(self) -> int:
        """Number of levels (blocks of one level never conflict)."""
        return self.stencil.num_levels

    def num_roots(self) -> int:
        """Number of blocks that wait for nothing inside the task (level 0)."""
        return self.stencil.root_count()

    # ------------------------------------------------------------------ blocks
    def _block(self, index: int) -> Block:
        return new_block(self.task_id, index, self.grid)

    def position_of(self, block: Block) -> tuple[int, ...]:
        """Grid position of ``block``, found from its write ROI."""
        grid = self.grid
        write_begin = tuple(int(value) for value in block.write_roi.begin)
        position = tuple((begin - first) // step for begin, first, step in
                         zip(write_begin, grid.write_begin, grid.write_shape))
        aligned = all((begin - first) % step == 0 for begin, first, step in
                      zip(write_begin, grid.write_begin, grid.write_shape))
        if not aligned or len(position) != grid.dims or not grid.contains_position(position):
            raise GeometryError(
                f"block {block.block_id} with write ROI {block.write_roi} is not a block of "
                f"task {self.task_id!r}, whose blocks write {grid.write_template.shape} "
                f"shaped ROIs from {grid.write_begin} ({grid.num_blocks} blocks); ask about "
                f"a block of this task")
        return position

    def root_gen(self) -> Iterator[Block]:
        """The level-0 blocks, last axis fastest."""
        return map(self._block, self.stencil.roots())

    def upstream(self, block: Block) -> list[Block]:
        """The blocks of this task that must finish before ``block`` may start."""
        position = self.position_of(block)
        index = self.grid.index_of(position)
        return _by_number([self._block(i) for i in self.stencil.upstream(position, index)])

    def downstream(self, block: Block) -> list[Block]:
        """The blocks of this task that wait for ``block``."""
        position = self.position_of(block)
        index = self.grid.index_of(position)
        return _by_number([self._block(i) for i in self.stencil.downstream(position, index)])

    def level_blocks(self, level: int) -> Iterator[Block]:
        """The blocks of one level, last axis fastest."""
        stencil = self.stencil
        if not 0 <= level < stencil.num_levels:
            raise GeometryError(
                f"task {self.task_id!r} has levels 0 to {stencil.num_levels - 1}, not {level}")
        pattern = []
        for period in reversed(stencil.periods):
            level, rank = divmod(level, period)
            pattern.append(period - 1 - rank)
        pattern.reverse()
        grid = self.grid
        return map(self._block, map(sum, itertools.product(*(
            range(p * stride, n * stride, period * stride)
            for p, n, stride, period in
            zip(pattern, grid.grid_shape, grid.id_strides, stencil.periods)))))

    def enumerate_all_dependencies(self) -> Iterator[tuple[Block, list[Block]]]:
        """Every block with the blocks it waits for, level by level (this walks the
        whole task: use it on small tasks)."""
        for level in range(self.num_levels):
            for block in self.level_blocks(level):
                yield block, self.upstream(block)

    def get_subgraph_blocks(self, sub_roi: Roi, read_roi: bool = False) -> list[Block]:
        """The blocks whose write ROI (with ``read_roi=True``: read ROI) meets ``sub_roi``."""
        grid = self.grid
        ranges = []
        for dim in range(grid.dims):
            begin = int(sub_roi.begin[dim])
            end = int(sub_roi.end[dim])
            interval = grid.read_interval if read_roi else grid.write_interval
            first_begin = grid.total_begin[dim] if read_roi else grid.write_begin[dim]
            extent = grid.read_shape[dim] if read_roi else grid.write_shape[dim]
            step = grid.write_shape[dim]
            count = grid.grid_shape[dim]
            first = max(0, (begin - first_begin - extent) // step + 1)
            while first < count and interval(dim, first)[1] <= begin:
                first += 1
            last = min(count, max(0, -(-(end - first_begin) // step)))
            ranges.append(range(first, last) if last > first else range(0))
        return _by_number([self._block(grid.index_of(position))
                           for position in itertools.product(*ranges)])


class DependencyGraph:
    """Blocks of several tasks and which blocks need which (daisy 1.x's API).

    Parameters
    ----------
    tasks:
        The tasks; their upstream tasks are pulled in.
    """

    def __init__(self, tasks: Task | Iterable[Task]) -> None:
        ordered = collect_tasks(tasks)
        self.task_map: dict[str, Task] = {task.task_id: task for task in ordered}
        self.task_dependency_graphs: dict[str, BlockwiseDependencyGraph] = {
            task.task_id: BlockwiseDependencyGraph.for_task(task) for task in ordered}
        self.upstream_tasks: dict[str, list[str]] = {
            task.task_id: [upstream.task_id for upstream in task.upstream_tasks]
            for task in ordered}
        self.downstream_tasks: dict[str, list[str]] = {task_id: [] for task_id in self.task_map}
        for task_id, upstream_ids in self.upstream_tasks.items():
            for upstream_id in upstream_ids:
                self.downstream_tasks[upstream_id].append(task_id)
        self._links: dict[tuple[str, str], UpstreamLink] = {}

    def _graph(self, task_id: str) -> BlockwiseDependencyGraph:
        try:
            return self.task_dependency_graphs[task_id]
        except KeyError:
            raise GeometryError(
                f"unknown task_id {task_id!r}; this graph holds "
                f"{', '.join(map(repr, self.task_map))}") from None

    def _link(self, upstream_id: str, downstream_id: str) -> UpstreamLink:
        link = self._links.get((upstream_id, downstream_id))
        if link is None:
            link = UpstreamLink(self.task_map[upstream_id].grid,
                                self.task_map[downstream_id].grid)
            self._links[(upstream_id, downstream_id)] = link
        return link

    @property
    def task_ids(self):
        """The ids of the tasks."""
        return self.task_map.keys()

    def num_blocks(self, task_id: str) -> int:
        """Number of blocks of a task."""
        return self._graph(task_id).num_blocks

    def upstream(self, block: Block) -> list[Block]:
        """Every block (of its task or an upstream task) that must finish before ``block``."""
        graph = self._graph(block.task_id)
        position = graph.position_of(block)
        upstream = list(graph.upstream(block))
        for upstream_id in self.upstream_tasks[block.task_id]:
            upstream_graph = self.task_dependency_graphs[upstream_id]
            indices = self._link(upstream_id, block.task_id).dependencies(position)
            upstream += [upstream_graph._block(index) for index in indices]
        return _by_number(upstream)

    def downstream(self, block: Block) -> list[Block]:
        """Every block (of its task or a downstream task) that waits for ``block``."""
        graph = self._graph(block.task_id)
        position = graph.position_of(block)
        downstream = list(graph.downstream(block))
        for downstream_id in self.downstream_tasks[block.task_id]:
            downstream_graph = self.task_dependency_graphs[downstream_id]
            indices = self._link(block.task_id, downstream_id).dependents(position)
            downstream += [downstream_graph._block(index) for index in indices]
        return _by_number(downstream)

    def root_tasks(self) -> list[str]:
        """The tasks that have no upstream task."""
        return [task_id for task_id, upstream in self.upstream_tasks.items() if not upstream]

    def num_roots(self, task_id: str) -> int:
        """Number of level-0 blocks of a task."""
        return self._graph(task_id).num_roots()

    def root_gen(self, task_id: str) -> Iterator[Block]:
        """The level-0 blocks of a task."""
        return self._graph(task_id).root_gen()

    def roots(self) -> dict[str, tuple[int, Iterator[Block]]]:
        """``task_id -> (number of roots, root generator)`` for the root tasks."""
        return {task_id: (self.num_roots(task_id), self.root_gen(task_id))
                for task_id in self.root_tasks()}


__all__ = ["BlockwiseDependencyGraph", "DependencyGraph"]
