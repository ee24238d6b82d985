"""The lazy blockwise dependency graph: pure arithmetic on block grids.

Two kinds of edges exist, and neither is ever materialised for the whole volume:

* **Conflicts inside a task** (``read_write_conflict=True``): blocks ``g`` and ``h``
  conflict when one's read ROI overlaps the other's write ROI. Along a dimension with
  write shape ``w`` and context ``c_low``, ``c_high`` that happens exactly when
  ``|g - h| <= r = ceil(max(c_low, c_high) / w)`` in every dimension. Conflicting blocks
  are ordered by *level*, daisy's scheme: the period along an axis is ``r + 1``, capped
  at the grid's extent there (so no level is empty), and the level of a block is the
  rank of its position modulo the period in *descending* lexicographic order (level 0
  is the pattern ``(period - 1, ...)``, the last level ``(0, ...)``, as daisy orders its
  level offsets). Two conflicting blocks always have different levels, the lower level
  runs first, and all blocks of level 0 are independent. Unlike daisy, a block waits
  only for its own conflicting neighbours of lower levels, not for a whole level.
* **Upstream tasks**: a block of a downstream task depends on every block of an upstream
  task whose write ROI intersects its read ROI. Boxes intersect exactly when their
  intervals intersect in every dimension, so per-dimension index ranges, computed by
  arithmetic, answer both "what does this block need" and "who needs this block" as
  products of ranges.
"""

from __future__ import annotations

import itertools
import math

from .blocks import BlockGrid
from .errors import GeometryError


def _combine(terms_per_dim: list[list[int]]) -> list[int]:
    """All sums that take one term from each dimension (linear indices of a box)."""
    combined = [0]
    for terms in terms_per_dim:
        combined = [base + term for base in combined for term in terms]
    return combined


def _sums(axes: list[range]):
    """Sums taking one term from each axis, in row-major order, computed one at a time:
    unlike ``itertools.product``, which holds every axis as a tuple (a MemoryError for
    an axis of 10^9 blocks)."""
    head, *rest = axes
    if not rest:
        return iter(head)
    return (first + others for first in head for others in _sums(rest))


class ConflictStencil:
    """Read/write conflicts between the blocks of one task, ordered by level.

    Parameters
    ----------
    grid:
        The task's block grid.
    read_write_conflict:
        Without conflicts every block is independent (a single level).
    """

    def __init__(self, grid: BlockGrid, read_write_conflict: bool) -> None:
        self.grid = grid
        if read_write_conflict:
            self.radius = tuple(
                -(-max(low, high) // step) for low, high, step in
                zip(grid.context_low, grid.context_high, grid.write_shape))
        else:
            self.radius = (0,) * grid.dims
        self.has_conflicts = any(self.radius)
        self.periods = tuple(min(r + 1, n) for r, n in zip(self.radius, grid.grid_shape))
        self.num_levels = math.prod(self.periods)
        # upstream / downstream offsets per level pattern: (offset, linear delta)
        self._upstream: dict[tuple[int, ...], list[tuple[tuple[int, ...], int]]] = {}
        self._downstream: dict[tuple[int, ...], list[tuple[tuple[int, ...], int]]] = {}
        if not self.has_conflicts:
            return
        offsets = [
            offset for offset in itertools.product(*(range(-r, r + 1) for r in self.radius))
            if any(offset)]
        for pattern in itertools.product(*(range(p) for p in self.periods)):
            level = self.level_of_pattern(pattern)
            upstream, downstream = [], []
            for offset in offsets:
                neighbour = tuple((p + o) % n for p, o, n in zip(pattern, offset, self.periods))
                delta = sum(o * s for o, s in zip(offset, grid.id_strides))
                if self.level_of_pattern(neighbour) < level:
                    upstream.append((offset, delta))
                else:
                    downstream.append((offset, delta))
            self._upstream[pattern] = upstream
            self._downstream[pattern] = downstream

    def level_of_pattern(self, pattern: tuple[int, ...]) -> int:
        """Rank of a position-modulo-period pattern, descending (0 runs first)."""
        level = 0
        for p, n in zip(pattern, self.periods):
            level = level * n + (n - 1 - p)
        return level

    def level(self, position: tuple[int, ...]) -> int:
        """The level of a block: blocks of lower level run first."""
        return self.level_of_pattern(tuple(k % n for k, n in zip(position, self.periods)))

    def _is_interior(self, position: tuple[int, ...]) -> bool:
        for k, r, n in zip(position, self.radius, self.grid.grid_shape):
            if k < r or k + r >= n:
                return False
        return True

    def _neighbours(self, table, position, index) -> list[int]:
        pattern = tuple(k % n for k, n in zip(position, self.periods))
        offsets = table[pattern]
        if self._is_interior(position):
            return [index + delta for _, delta in offsets]
        grid_shape = self.grid.grid_shape
        return [
            index + delta for offset, delta in offsets
            if all(0 <= k + o < n for k, o, n in zip(position, offset, grid_shape))]

    def upstream(self, position: tuple[int, ...], index: int) -> list[int]:
        """Indices of the conflicting blocks that must finish before this one."""
        if not self.has_conflicts:
            return []
        return self._neighbours(self._upstream, position, index)

    def downstream(self, position: tuple[int, ...], index: int) -> list[int]:
        """Indices of the conflicting blocks that wait for this one."""
        if not self.has_conflicts:
            return []
        return self._neighbours(self._downstream, position, index)

    def upstream_count(self, position: tuple[int, ...]) -> int:
        """How many conflicting blocks must finish before this one."""
        if not self.has_conflicts:
            return 0
        pattern = tuple(k % n for k, n in zip(position, self.periods))
        if self._is_interior(position):
            return len(self._upstream[pattern])
        grid_shape = self.grid.grid_shape
        return sum(
            1 for offset, _ in self._upstream[pattern]
            if all(0 <= k + o < n for k, o, n in zip(position, offset, grid_shape)))

    def roots(self):
        """Iterator over the indices of level-0 blocks, in row-major order (last axis
        fastest, as ``itertools.product``)."""
        grid = self.grid
        *outer, last = (
            range((period - 1) * stride, n * stride, period * stride)
            for n, stride, period in zip(grid.grid_shape, grid.id_strides, self.periods))
        if not outer:
            return iter(last)
        return (base + offset for base in _sums(outer) for offset in last)

    def root_count(self) -> int:
        """Number of level-0 blocks."""
        return math.prod(n // p for n, p in zip(self.grid.grid_shape, self.periods))


class UpstreamLink:
    """Block-level dependencies of a downstream task on one upstream task.

    Block ``g`` of ``downstream`` depends on block ``k`` of ``upstream`` when
    ``upstream``'s write ROI of ``k`` intersects ``downstream``'s read ROI of ``g``
    (both cropped when their task fits with ``shrink``).
    """

    def __init__(self, upstream: BlockGrid, downstream: BlockGrid) -> None:
        if upstream.dims != downstream.dims:
            raise GeometryError(
                f"{downstream.name} reads from upstream task {upstream.name}, but they have "
                f"{downstream.dims} and {upstream.dims} dimensions; give them the same")
        self.upstream = upstream
        self.downstream = downstream
        # The downstream indices with a non-empty range along an axis are contiguous, so
        # the whole grid depends on the upstream task when both ends of every axis do.
        self.covers_grid = all(
            self._needs(dim, 0)[1] > self._needs(dim, 0)[0]
            and self._needs(dim, extent - 1)[1] > self._needs(dim, extent - 1)[0]
            for dim, extent in enumerate(downstream.grid_shape))

    def _needs(self, dim: int, g: int) -> tuple[int, int]:
        """Range of upstream grid indices whose write interval meets read interval ``g``."""
        read_begin, read_end = self.downstream.read_interval(dim, g)
        upstream = self.upstream
        first_write = upstream.write_begin[dim]
        step = upstream.write_shape[dim]
        count = upstream.grid_shape[dim]
        first = max(0, (read_begin - first_write) // step)
        while first < count and upstream.write_interval(dim, first)[1] <= read_begin:
            first += 1  # only a cropped last block can need this
        end = min(count, max(0, -(-(read_end - first_write) // step)))
        return (first, end) if end > first else (0, 0)

    def _needed_by(self, dim: int, k: int) -> tuple[int, int]:
        """Range of downstream grid indices whose read interval meets write interval ``k``."""
        write_begin, write_end = self.upstream.write_interval(dim, k)
        downstream = self.downstream
        first_read = downstream.total_begin[dim]
        step = downstream.write_shape[dim]
        count = downstream.grid_shape[dim]
        first = max(0, (write_begin - first_read - downstream.read_shape[dim]) // step + 1)
        while first < count and downstream.read_interval(dim, first)[1] <= write_begin:
            first += 1  # only a cropped last block can need this
        end = min(count, max(0, -(-(write_end - first_read) // step)))
        return (first, end) if end > first else (0, 0)

    def dependency_count(self, position: tuple[int, ...]) -> int:
        """Number of upstream blocks the downstream block at ``position`` needs."""
        count = 1
        for dim, g in enumerate(position):
            first, end = self._needs(dim, g)
            count *= end - first
        return count

    def dependency_counts(self, dim: int, coordinates: list[int]) -> list[int]:
        """Along axis ``dim``, how many upstream grid indices each downstream grid
        coordinate needs (a block needs the product of its axes' counts)."""
        counts = []
        for g in coordinates:
            first, end = self._needs(dim, g)
            counts.append(end - first)
        return counts

    def dependencies(self, position: tuple[int, ...]) -> list[int]:
        """Indices of the upstream blocks the downstream block at ``position`` needs."""
        strides = self.upstream.id_strides
        return _combine([
            [k * stride for k in range(*self._needs(dim, g))]
            for dim, (g, stride) in enumerate(zip(position, strides))])

    def dependents(self, position: tuple[int, ...]) -> list[int]:
        """Indices of the downstream blocks that need the upstream block at ``position``."""
        strides = self.downstream.id_strides
        return _combine([
            [g * stride for g in range(*self._needed_by(dim, k))]
            for dim, (k, stride) in enumerate(zip(position, strides))])
