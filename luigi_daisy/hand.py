"""``Hand``: what a worker keeps in hand and when it asks for more (sans-I/O).

A worker never waits for its next block: it keeps blocks in hand while it processes
one, and when its blocks take much less than a round trip to the server it keeps enough
for a few round trips and moves them several per frame. ``Hand`` makes these decisions
from events (a block finished, a request sent, an answer arrived) and durations passed
in; it holds no socket and reads no clock, so the blocking :class:`~luigi_daisy.client.
Client` and the asyncio workers of ``benchmarks/bench_load.py`` share it.

One request at a time waits for its answer (the server's rule). The result of every
block is sent before the next block starts, with the next request when one is due and
on its own otherwise: batches save requests and answers, never the results, so a worker
that dies takes no finished block with it (see :mod:`luigi_daisy.handout`).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Generic, TypeVar

from .context import DEFAULT_PREFETCH, MAX_PREFETCH  # noqa: F401 - the hand's, kept there
from .protocol import MAX_BATCH_BLOCKS, BlockResult

#: most blocks in hand when blocks are much shorter than a round trip (a batch)
MAX_IN_HAND = 32
#: the hand holds the blocks of this many round trips (at least ``prefetch``), and a
#: worker asks for more when less than half of that is left, so each request brings
#: the blocks of about one round trip
BATCH_ROUND_TRIPS = 2
#: and at least this many seconds of blocks: a worker whose blocks are shorter asks
#: about once per half of it, so a thousand workers of 100 ms blocks send the server
#: a few thousand frames a second, not twenty thousand (see benchmarks/bench_load.py:
#: with half a second, 1,000 such workers were idle 0.03% to 2.5% of the time)
BATCH_SECONDS = 1.0
#: weight of the newest measurement in the running block duration and round trip
SMOOTHING = 0.2

BlockT = TypeVar("BlockT")


class Hand(Generic[BlockT]):
    """The blocks a worker holds, the results it has not sent, and its request.

    Parameters
    ----------
    prefetch:
        Blocks to keep in hand beyond the one being processed (0: none, no batches).
    """

    __slots__ = ("prefetch", "blocks", "results", "asked", "no_more_blocks",
                 "block_seconds", "round_trip_seconds")

    def __init__(self, prefetch: int = DEFAULT_PREFETCH) -> None:
        self.prefetch = prefetch
        #: blocks received and not yet started, in the order the server sent them
        self.blocks: deque[BlockT] = deque()
        #: results of finished blocks not sent yet (sent before the next block starts)
        self.results: list[BlockResult] = []
        #: blocks asked for by the request waiting for its answer (0: none waits)
        self.asked = 0
        #: the server said the task is done
        self.no_more_blocks = False
        #: running estimates, None until measured
        self.block_seconds: float | None = None
        self.round_trip_seconds: float | None = None

    # ------------------------------------------------------------------ events
    def finished(self, result: BlockResult, seconds: float) -> None:
        """A block finished after ``seconds`` of processing."""
        previous = self.block_seconds
        self.block_seconds = seconds if previous is None else (
            previous + SMOOTHING * (seconds - previous))
        self.results.append(result)

    def take_results(self, want: int) -> tuple[BlockResult, ...]:
        """The results to send now with a request for ``want`` blocks (0: none)."""
        results, self.results = self.results, []
        if want:
            self.asked = want
        return tuple(results)

    def answered(self, blocks: list[BlockT] | None, seconds: float, exact: bool) -> None:
        """The answer to the waiting request: blocks, or None for ``NoMoreBlocks``.

        ``seconds`` since the request was sent: the round trip when ``exact`` (the
        worker waited for the answer), an upper bound when the answer was found
        between two blocks.
        """
        if blocks is None:
            self.no_more_blocks = True
        else:
            self.blocks.extend(blocks)
        self.asked = 0
        previous = self.round_trip_seconds
        if previous is None:
            self.round_trip_seconds = seconds
        elif exact:
            self.round_trip_seconds = previous + SMOOTHING * (seconds - previous)
        else:
            self.round_trip_seconds = min(previous, seconds)

    # --------------------------------------------------------------- decisions
    def ahead(self) -> int:
        """How many blocks to keep in hand beyond the one being processed: enough for
        :data:`BATCH_ROUND_TRIPS` round trips and :data:`BATCH_SECONDS`, at least
        ``prefetch``, at most :data:`MAX_IN_HAND`. Long blocks keep ``prefetch``;
        shorter ones (a busy server has long round trips) keep more, and so travel
        several per frame."""
        if not self.prefetch:
            return 0
        block, round_trip = self.block_seconds, self.round_trip_seconds
        if block is None or round_trip is None:
            return self.prefetch
        wanted_seconds = max(BATCH_ROUND_TRIPS * round_trip, BATCH_SECONDS)
        covered = math.ceil(wanted_seconds / max(block, 1e-7))
        return max(self.prefetch, min(MAX_IN_HAND, covered))

    def to_ask(self) -> int:
        """How many blocks to ask for now (0: do not ask): when the hand is down to
        half of :meth:`ahead` (at least ``prefetch``), enough to fill it again."""
        if self.asked or self.no_more_blocks:
            return 0
        ahead = self.ahead()
        if len(self.blocks) > max(self.prefetch, ahead // 2):
            return 0
        return min(ahead + 1 - len(self.blocks), MAX_BATCH_BLOCKS)

    def must_wait(self) -> bool:
        """Whether the worker has nothing to start and must wait for the answer."""
        return bool(self.asked) and not self.blocks
