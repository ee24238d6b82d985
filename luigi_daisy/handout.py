"""The hand-out: who holds which block, as a sans-I/O state machine.

The block server turns bytes into events and carries out instructions; everything in
between is decided here. No sockets, threads or clocks: the time comes in with every
event, workers are opaque hashable keys (the server's connections, or integers in
tests), and user code (check functions) runs outside, answered by an event. Modelled on
dask's ``WorkerState.handle_stimulus``: :meth:`HandOut.handle` takes one event and
returns the instructions it causes.

The rules it keeps:

- **A worker processes its hand in the order it was sent.** Its *head*, the oldest
  block it has not reported, is the one running; the others in hand are not started.
  The worker's result of a block is written to the socket before its next block starts
  (see :class:`~luigi_daisy.client.Client`), so a block whose function returned is
  never run again because its worker died afterwards.
- **Only the block that was running is charged.** A worker lost (closed without
  ``Bye``) or stopped for a timeout fails its head, which is retried (at least once:
  ``worker_lost``); the rest of its hand goes back first in line, unstarted and free.
  A worker that says ``Bye`` gives its whole hand back free.
- **A timeout counts from the moment the block started**: when it was handed to a
  worker with an empty hand, or when the result of the block before it arrived.
- **Blocks in hand never keep another worker waiting**: beyond the one block a worker
  needs next, a worker gets more only while its hand holds less than its share of the
  ready blocks (ready blocks over the task's started workers).
- **Check functions run beside the hand-out**: a pre check (is the block done
  already?) and a post check (did the block really succeed?) are instructions; their
  answers are events. A block under a check belongs to no worker.
- **A block is recorded done only after its function returned** and its post check
  (if any) passed; failed-for-good blocks are recorded failed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from .blocks import Block, BlockStatus
from .errors import ProtocolError
from .log_limits import clip
from .protocol import BlockResult
from .scheduler import BlockScheduler, ReleaseOutcome

_SUCCESS = int(BlockStatus.SUCCESS)
_FAILED = int(BlockStatus.FAILED)


# ----------------------------------------------------------------------------- events

@dataclass(frozen=True, slots=True)
class WorkerJoined:
    """A worker the run started proved the token and was welcomed."""

    worker: Hashable
    task_id: str
    worker_id: int


@dataclass(frozen=True, slots=True)
class Reported:
    """A worker's ``Report``: results of blocks it held, in the order they finished,
    and a request for ``want`` more blocks (0: none)."""

    worker: Hashable
    results: tuple[BlockResult, ...] = ()
    want: int = 0


@dataclass(frozen=True, slots=True)
class WorkerCannotWork:
    """A worker cannot process any block of its task (its setup failed): block
    ``index`` of ``task_id`` fails for good and the task stops. However it names the
    block, the worker is told there are no more blocks."""

    worker: Hashable
    task_id: object
    index: int
    error: str


@dataclass(frozen=True, slots=True)
class WorkerLeft:
    """A worker said ``Bye``: whatever it still holds was never started."""

    worker: Hashable


@dataclass(frozen=True, slots=True)
class WorkerLost:
    """A worker's connection closed without ``Bye`` (it died, or was stopped)."""

    worker: Hashable


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: look for blocks running past their task's timeout."""


@dataclass(frozen=True, slots=True)
class PreCheckAnswered:
    """The answer of a task's pre check for a block of :class:`RunPreCheck`."""

    block: Block
    done: bool


@dataclass(frozen=True, slots=True)
class PostCheckAnswered:
    """The answer of a task's post check for a block of :class:`RunPostCheck`: None
    when it passed, else why the block failed."""

    block: Block
    worker_id: int | None
    failure: str | None


@dataclass(frozen=True, slots=True)
class BlocksBecameReady:
    """Blocks became ready outside this machine (another run finished their
    dependencies): serve the requests that wait."""


@dataclass(frozen=True, slots=True)
class RunEnding:
    """The run ends: workers closed from now on were not lost, their blocks go back
    without warnings or charges, and requests that wait are told the task is done
    where it is."""


Event = (WorkerJoined | Reported | WorkerCannotWork | WorkerLeft | WorkerLost | Tick
         | PreCheckAnswered | PostCheckAnswered | BlocksBecameReady | RunEnding)


# ------------------------------------------------------------------------ instructions

@dataclass(frozen=True, slots=True)
class SendBlocks:
    """Send these blocks to the worker, to be processed in this order."""

    worker: Hashable
    blocks: tuple[Block, ...]


@dataclass(frozen=True, slots=True)
class SendNoMoreBlocks:
    """Tell the worker its task has no more blocks for it."""

    worker: Hashable


@dataclass(frozen=True, slots=True)
class RecordDone:
    """Record block ``index`` of ``task_id`` as done (its function returned, its checks
    passed, or its pre check found it done)."""

    task_id: str
    index: int


@dataclass(frozen=True, slots=True)
class RecordFailed:
    """Record block ``index`` of ``task_id`` as failed for good."""

    task_id: str
    index: int
    error: str | None
    #: the worker whose attempt failed last (None: not known)
    worker_id: int | None = None


@dataclass(frozen=True, slots=True)
class StopWorker:
    """Close the worker's connection and end its process (it held a block past the
    task's timeout)."""

    worker: Hashable
    task_id: str
    worker_id: int


@dataclass(frozen=True, slots=True)
class RunPreCheck:
    """Ask the task's pre check whether ``block`` is done already; answer with
    :class:`PreCheckAnswered`."""

    block: Block


@dataclass(frozen=True, slots=True)
class RunPostCheck:
    """Ask the task's post check whether ``block`` really succeeded; answer with
    :class:`PostCheckAnswered`."""

    block: Block
    worker_id: int | None


@dataclass(frozen=True, slots=True)
class Warn:
    """Something the run's user should hear of; ``kind`` groups repeated warnings."""

    kind: str
    text: str


Instruction = (SendBlocks | SendNoMoreBlocks | RecordDone | RecordFailed | StopWorker
               | RunPreCheck | RunPostCheck | Warn)


# ------------------------------------------------------------------------------ state

def _task_of(block: Block) -> str:
    """The task id of a block handed out by the scheduler (never None there)."""
    return cast(str, block.task_id)


#: the pool's choices of task (see :class:`HandOut`)
POOL_POLICIES = ("downstream", "most_ready")


class WorkerHand:
    """What the hand-out knows of one connected worker.

    ``task_id`` is the worker's *home*: the task it was started for, or the pool it
    belongs to; ``tasks`` are the tasks it may serve (its own, or the pool's).
    """

    __slots__ = ("key", "task_id", "worker_id", "tasks", "hand", "held", "head_since",
                 "wants", "stopped")

    def __init__(self, key: Hashable, task_id: str, worker_id: int,
                 tasks: tuple[str, ...] = ()) -> None:
        self.key = key
        self.task_id = task_id
        self.worker_id = worker_id
        self.tasks = tasks or (task_id,)
        #: blocks sent and not reported, by ``(task id, index)``, in the order they
        #: were sent: the first runs
        self.hand: dict[tuple[str, int], Block] = {}
        #: blocks in hand per task
        self.held: dict[str, int] = {}
        #: when the first block of the hand started
        self.head_since = 0.0
        #: blocks asked for by the request that waits for its answer (0: none waits)
        self.wants = 0
        #: stopped for a timeout; its blocks went back already
        self.stopped = False

    def head(self) -> Block | None:
        """The block running now (the oldest in hand), if any."""
        return next(iter(self.hand.values()), None)

    def __repr__(self) -> str:
        return (f"WorkerHand(worker {self.worker_id} of {self.task_id!r}, "
                f"hand={list(self.hand)}, wants={self.wants})")


class HandOut:
    """Who holds which block: events in, instructions out.

    Parameters
    ----------
    scheduler:
        The scheduler whose blocks are handed out. The hand-out is the only caller of
        its ``acquire``, ``release`` and ``return_unstarted`` while it runs.
    pools:
        Pools of workers by pool id: the tasks the pool's workers serve, whichever of
        them the hand-out picks. A worker whose home is a task id serves that task
        only (a task not in a pool, or a worker loop of its own).
    policy:
        How a pool worker's next block is chosen among the tasks with ready blocks
        that are below their cap (``num_workers``: how many workers may hold blocks
        of the task at once). ``"downstream"`` (default): the most downstream task,
        which finishes objects early and keeps intermediate results small; but a task
        with no worker whose downstream tasks have nothing ready comes before a more
        downstream task that does not depend on it, so no task that others wait on
        starves. ``"most_ready"``: the task with the most ready blocks.
    """

    def __init__(self, scheduler: BlockScheduler,
                 pools: Mapping[str, Iterable[str]] | None = None,
                 policy: str = "downstream") -> None:
        if policy not in POOL_POLICIES:
            raise ValueError(f"pool policy {policy!r} is not one of {POOL_POLICIES}")
        self.scheduler = scheduler
        self.task_states = scheduler.task_states
        self.policy = policy
        task_ids = list(scheduler.tasks)
        self._timeouts = {task_id: task.timeout for task_id, task in scheduler.tasks.items()}
        self._pre_checked = {task_id: task.pre_check is not None
                             for task_id, task in scheduler.tasks.items()}
        self._post_checked = {task_id: task.post_check is not None
                              for task_id, task in scheduler.tasks.items()}
        self._caps = {task_id: task.num_workers for task_id, task in scheduler.tasks.items()}
        self._depth = _depths(scheduler.tasks)
        self._downstream: dict[str, list[str]] = {task_id: [] for task_id in task_ids}
        for task_id, task in scheduler.tasks.items():
            for upstream in task.upstream_tasks:
                if upstream.task_id in self._downstream:
                    self._downstream[upstream.task_id].append(task_id)
        self._descendants = _descendants(self._downstream)
        #: the tasks of each pool, most downstream first (the policy's order of ties)
        self.pools: dict[str, tuple[str, ...]] = {
            pool_id: tuple(sorted(tasks, key=lambda task_id: -self._depth[task_id]))
            for pool_id, tasks in (pools or {}).items()}
        homes = [*task_ids, *self.pools]
        #: homes (task or pool) whose workers may serve each task
        self._homes_of: dict[str, list[str]] = {task_id: [task_id] for task_id in task_ids}
        for pool_id, tasks in self.pools.items():
            for task_id in tasks:
                if pool_id != task_id:  # a pool of one task is known by the task's id
                    self._homes_of[task_id].append(pool_id)
        #: connected workers by key
        self.workers: dict[Hashable, WorkerHand] = {}
        #: ids of the workers the run started and has not seen exit, per home
        self.expected: dict[str, set[int]] = {home: set() for home in homes}
        #: ``(home, worker_id) -> key`` of the connected workers
        self.connected: dict[tuple[str, int], Hashable] = {}
        # parked requests in arrival order (a dict holds each worker once), per home: of
        # workers holding no block, and of workers asking for more in hand
        self.waiting: dict[str, dict[WorkerHand, None]] = {home: {} for home in homes}
        self.waiting_more: dict[str, dict[WorkerHand, None]] = {home: {} for home in homes}
        #: workers holding blocks of each task now
        self.serving: dict[str, int] = {task_id: 0 for task_id in task_ids}
        #: the task of the block each worker ran last, by ``(home, worker_id)``: the one
        #: charged when the worker's process exits in error
        self.last_task: dict[tuple[str, int], str] = {}
        #: blocks whose pre check found them not done, ready to hand out
        self.checked: dict[str, deque[Block]] = {t: deque() for t in task_ids}
        #: pre checks asked for and not answered, per task
        self.pre_checks: dict[str, int] = {t: 0 for t in task_ids}
        #: ids of the workers that failed blocks, per task (for their log files)
        self.failed_workers: dict[str, set[int]] = {t: set() for t in task_ids}
        #: ``(task_id, daisy block number) -> worker id`` of the blocks failed for good
        self.failed_by: dict[tuple[str, int], int | None] = {}
        #: results of blocks their worker did not hold (ignored)
        self.ignored_results = 0
        #: blocks handed out, and the frames that carried them
        self.blocks_handed_out = 0
        self.block_frames = 0
        self.ending = False
        self._out: list[Instruction] = []
        self._now = 0.0
        self._handlers: dict[type, Callable[[Any], None]] = {
            WorkerJoined: self._joined, Reported: self._reported,
            WorkerCannotWork: self._cannot_work, WorkerLeft: self._left,
            WorkerLost: self._lost, Tick: self._tick,
            PreCheckAnswered: self._pre_check_answered,
            PostCheckAnswered: self._post_check_answered,
            BlocksBecameReady: self._blocks_became_ready, RunEnding: self._run_ending,
        }

    # ------------------------------------------------------------------ queries
    def expect_worker(self, task_id: str, worker_id: int) -> None:
        """Welcome ``worker_id`` of ``task_id`` (a task or a pool) from now on (the run
        started it)."""
        self.expected[task_id].add(worker_id)

    def forget_worker(self, task_id: str, worker_id: int) -> None:
        """Welcome ``worker_id`` no more (its process is gone)."""
        self.expected[task_id].discard(worker_id)

    def is_home(self, task_id: str) -> bool:
        """Whether workers may say they belong to ``task_id`` (a task or a pool)."""
        return task_id in self.expected

    def is_expected(self, task_id: str, worker_id: int) -> bool:
        """Whether the run started ``worker_id`` of ``task_id`` and has not seen it exit."""
        return worker_id in self.expected[task_id]

    def is_connected(self, task_id: str, worker_id: int) -> bool:
        """Whether ``worker_id`` of ``task_id`` is connected now."""
        return (task_id, worker_id) in self.connected

    def held_by(self, worker: Hashable) -> list[int]:
        """Indices of the blocks ``worker`` holds, in the order it processes them."""
        hand = self.workers.get(worker)
        return [block.index for block in hand.hand.values()] if hand is not None else []

    def held_keys(self, worker: Hashable) -> list[tuple[str, int]]:
        """``(task id, index)`` of the blocks ``worker`` holds, in the order it
        processes them."""
        hand = self.workers.get(worker)
        return list(hand.hand) if hand is not None else []

    def waits(self, worker: Hashable) -> int:
        """Blocks the waiting request of ``worker`` asked for (0: none waits)."""
        hand = self.workers.get(worker)
        return hand.wants if hand is not None else 0

    def workers_on(self, task_id: str) -> int:
        """Workers holding blocks of ``task_id`` now."""
        return self.serving[task_id]

    # ------------------------------------------------------------------ events
    def handle(self, event: Event, now: float) -> list[Instruction]:
        """Take one event at time ``now``; return what the server must do, in order.

        Raises
        ------
        ProtocolError
            When the event breaks the protocol (a second request while one waits);
            nothing changed then, and the server closes that worker's connection.
        """
        self._now = now
        out = self._out = []
        self._handlers[type(event)](event)
        return out

    def _joined(self, event: WorkerJoined) -> None:
        hand = WorkerHand(event.worker, event.task_id, event.worker_id,
                          self.pools.get(event.task_id, ()))
        self.workers[event.worker] = hand
        self.connected[(event.task_id, event.worker_id)] = event.worker

    def _reported(self, event: Reported) -> None:
        hand = self.workers.get(event.worker)
        if hand is None or hand.stopped:
            return
        if event.want and hand.wants:
            raise ProtocolError(
                "a request for blocks while an earlier one of this connection still waits "
                "for its answer; ask again only after the answer")
        for result in event.results:
            self._take_result(hand, result)
        home = hand.task_id
        if event.want:
            self._request(hand, event.want)
        elif not hand.hand and hand in self.waiting_more[home]:
            del self.waiting_more[home][hand]  # holds nothing now: first in its own right
            self.waiting[home][hand] = None
        if event.results:
            self._serve_waiting()

    def _find(self, hand: WorkerHand, index: int) -> tuple[str, int] | None:
        """The key of the first block with ``index`` in ``hand`` (a worker processes its
        hand in order, so a result is for the earliest block of that index)."""
        for key in hand.hand:
            if key[1] == index:
                return key
        return None

    def _hold(self, hand: WorkerHand, block: Block) -> None:
        task_id = _task_of(block)
        if not hand.hand:
            hand.head_since = self._now
        hand.hand[(task_id, block.index)] = block
        count = hand.held.get(task_id, 0)
        if not count:
            self.serving[task_id] += 1
        hand.held[task_id] = count + 1

    def _unhold(self, hand: WorkerHand, key: tuple[str, int]) -> Block:
        if next(iter(hand.hand)) == key:
            hand.head_since = self._now  # the next block in hand starts now
        block = hand.hand.pop(key)
        task_id = key[0]
        self.last_task[(hand.task_id, hand.worker_id)] = task_id
        count = hand.held[task_id] - 1
        if count:
            hand.held[task_id] = count
        else:
            del hand.held[task_id]
            self.serving[task_id] -= 1
        return block

    def _empty(self, hand: WorkerHand) -> list[Block]:
        """Take every block out of ``hand``, in order."""
        held = list(hand.hand.values())
        if held:
            self.last_task[(hand.task_id, hand.worker_id)] = _task_of(held[0])
        for task_id in hand.held:
            self.serving[task_id] -= 1
        hand.hand.clear()
        hand.held.clear()
        return held

    def _take_result(self, hand: WorkerHand, result: BlockResult) -> None:
        key = self._find(hand, result.index)
        if key is None:
            self.ignored_results += 1
            self._warn("ignored results",
                       f"worker {hand.worker_id} of {hand.task_id!r} reported block index "
                       f"{result.index}, which it does not hold; ignored")
            return
        block = self._unhold(hand, key)
        status, error = result.status, result.error
        if status == _SUCCESS and self._post_checked[key[0]]:
            self._out.append(RunPostCheck(block, hand.worker_id))
            return
        if status != _SUCCESS and status != _FAILED:
            error = error or f"released with status {BlockStatus(status).name}"
            status = _FAILED
        self._release(block, BlockStatus(status), error, hand.worker_id)

    def _cannot_work(self, event: WorkerCannotWork) -> None:
        hand = self.workers.get(event.worker)
        if hand is None or hand.stopped:
            return
        key = (event.task_id, event.index) if event.task_id in hand.tasks else None
        if key is None or key not in hand.hand:
            self.ignored_results += 1
            self._warn("ignored results",
                       f"worker {hand.worker_id} of {hand.task_id!r} reported that it cannot "
                       f"work on block index {event.index} of {clip(repr(event.task_id))}, "
                       f"which it does not hold; ignored")
        else:
            task_id = key[0]
            block = self._unhold(hand, key)
            if not self.task_states[task_id].stop_reason:
                self._warn("workers that cannot work",
                           f"worker {hand.worker_id} cannot process any block of "
                           f"{task_id!r}; stopping the task")
            self._release(block, BlockStatus.FAILED, event.error, hand.worker_id, fatal=True)
        self._unpark(hand)
        self._out.append(SendNoMoreBlocks(hand.key))
        self._serve_waiting()

    def _left(self, event: WorkerLeft) -> None:
        hand = self._remove(event.worker)
        if hand is None or hand.stopped:
            return
        if self._give_back_unstarted(self._empty(hand)):
            self._serve_waiting()

    def _lost(self, event: WorkerLost) -> None:
        hand = self._remove(event.worker)
        if hand is None or hand.stopped or not hand.hand:
            return
        held = self._empty(hand)
        if self.ending:
            self._give_back_unstarted(held)
            return
        head, rest = held[0], held[1:]
        unstarted = f"; the {len(rest)} blocks in its hand go back unstarted" if rest else ""
        self._warn("lost workers",
                   f"worker {hand.worker_id} of {hand.task_id!r} was lost while processing "
                   f"block {head.block_id[1]}{self._of_task(hand, head)}; retrying it"
                   f"{unstarted}")
        self._give_back_unstarted(rest)
        self._release(head, BlockStatus.FAILED,
                      f"worker {hand.worker_id} was lost while processing the block",
                      hand.worker_id, worker_lost=True)
        self._serve_waiting()

    @staticmethod
    def _of_task(hand: WorkerHand, block: Block) -> str:
        """`` of 'task'`` for a pool worker's block (an own worker's home says it)."""
        return "" if block.task_id == hand.task_id else f" of {block.task_id!r}"

    def _tick(self, event: Tick) -> None:
        now = self._now
        reclaimed = False
        for hand in list(self.workers.values()):
            head = hand.head()
            if hand.stopped or head is None:
                continue
            task_id = _task_of(head)
            timeout = self._timeouts[task_id]
            if timeout is None or now - hand.head_since <= timeout:
                continue
            held = self._empty(hand)
            hand.stopped = True
            self._unpark(hand)
            self._warn("timeouts",
                       f"block {head.block_id[1]} of {task_id!r} exceeded its timeout "
                       f"of {timeout}s; stopping worker {hand.worker_id}")
            self.task_states[task_id].timeout_reclaim_count += 1
            self._give_back_unstarted(held[1:])
            self._release(head, BlockStatus.FAILED,
                          f"timeout: the block took longer than {timeout} s",
                          hand.worker_id, worker_lost=True)
            self._out.append(StopWorker(hand.key, hand.task_id, hand.worker_id))
            reclaimed = True
        if reclaimed:
            self._serve_waiting()

    def _pre_check_answered(self, event: PreCheckAnswered) -> None:
        block = event.block
        task_id = _task_of(block)
        self.pre_checks[task_id] -= 1
        if event.done:
            block.status = BlockStatus.SUCCESS
            self.scheduler.release(block, BlockStatus.SUCCESS, self._now, skipped=True)
            self._out.append(RecordDone(task_id, block.index))
        elif self.task_states[task_id].stop_reason:
            self.scheduler.return_unstarted(block)  # counted orphaned: the task stopped
        else:
            self.checked[task_id].append(block)
        self._serve_waiting()

    def _post_check_answered(self, event: PostCheckAnswered) -> None:
        if event.failure is None:
            self._release(event.block, BlockStatus.SUCCESS, None, event.worker_id)
        else:
            self._release(event.block, BlockStatus.FAILED, event.failure, event.worker_id)
        self._serve_waiting()

    def _blocks_became_ready(self, event: BlocksBecameReady) -> None:
        self._serve_waiting()

    def _run_ending(self, event: RunEnding) -> None:
        self.ending = True
        self._serve_waiting()

    # ------------------------------------------------------------------ blocks
    def _warn(self, kind: str, text: str) -> None:
        self._out.append(Warn(kind, text))

    def _remove(self, worker: Hashable) -> WorkerHand | None:
        hand = self.workers.pop(worker, None)
        if hand is None:
            return None
        key = (hand.task_id, hand.worker_id)
        if self.connected.get(key) is worker:
            del self.connected[key]
        self._unpark(hand)
        return hand

    def _unpark(self, hand: WorkerHand) -> None:
        self.waiting[hand.task_id].pop(hand, None)
        self.waiting_more[hand.task_id].pop(hand, None)
        hand.wants = 0

    def _give_back_unstarted(self, blocks: list[Block]) -> bool:
        """Blocks handed out and never started go back first in line, in the order they
        were handed out, at no cost."""
        for block in reversed(blocks):
            self.scheduler.return_unstarted(block)
        return bool(blocks)

    def _release(self, block: Block, status: BlockStatus, error: str | None,
                 worker_id: int | None, worker_lost: bool = False,
                 fatal: bool = False) -> None:
        block.status = status
        block.error = error
        task_id = _task_of(block)
        if status == BlockStatus.FAILED and worker_id is not None:
            self.failed_workers[task_id].add(worker_id)
        outcome = self.scheduler.release(block, status, self._now, worker_lost=worker_lost,
                                         fatal=fatal)
        if outcome is ReleaseOutcome.COMPLETED:
            self._out.append(RecordDone(task_id, block.index))
        elif outcome is ReleaseOutcome.FAILED:
            self._out.append(RecordFailed(task_id, block.index, error, worker_id))
            self.failed_by[(task_id, block.block_id[1])] = worker_id

    def _available(self, task_id: str) -> int:
        """Blocks of ``task_id`` that could be handed out now (ready or pre-checked)."""
        if self.task_states[task_id].stop_reason:
            return 0
        return self.task_states[task_id].ready_count + len(self.checked[task_id])

    def _next_block(self, task_id: str) -> Block | None:
        """A block to hand out now: one whose pre check found it not done, or, for a
        task without a pre check, the scheduler's next ready block."""
        if self.task_states[task_id].stop_reason:
            return None
        checked = self.checked[task_id]
        if checked:
            return checked.popleft()
        if self._pre_checked[task_id]:
            return None
        return self.scheduler.acquire(task_id, self._now)

    def _start_pre_checks(self, task_id: str, wanted: int) -> None:
        """Have up to ``wanted`` blocks of ``task_id`` pre-checked at a time."""
        in_flight = self.pre_checks[task_id]
        while in_flight < wanted:
            block = self.scheduler.acquire(task_id, self._now)
            if block is None:
                break
            self._out.append(RunPreCheck(block))
            in_flight += 1
        self.pre_checks[task_id] = in_flight

    def _workers_for(self, task_id: str) -> int:
        """Started workers that may serve ``task_id`` (its own, and its pool's)."""
        return max(sum(len(self.expected[home]) for home in self._homes_of[task_id]), 1)

    def _may_hand_extra(self, hand: WorkerHand, task_id: str) -> bool:
        """Whether a worker may take a block of ``task_id`` beyond the one it needs next:
        only while its hand holds less than its share of the ready blocks (ready blocks
        over the workers that may serve the task), so workers that start later, or ask
        later, find theirs."""
        return len(hand.hand) * self._workers_for(task_id) < self._available(task_id)

    def _below_cap(self, hand: WorkerHand, task_id: str) -> bool:
        """Whether ``hand`` may hold blocks of ``task_id``: it holds some already, or
        fewer workers than the task's cap (``num_workers``) do."""
        return task_id in hand.held or self.serving[task_id] < self._caps[task_id]

    def _choose(self, hand: WorkerHand) -> str | None:
        """The task ``hand`` takes its next block from: its own task, or the pool
        policy's pick among the pool's tasks with blocks to hand out, below their cap."""
        tasks = hand.tasks
        if hand.task_id not in self.pools:
            return tasks[0]  # a worker of the task's own (its cap sized it)
        candidates = [task_id for task_id in tasks
                      if self._available(task_id) and self._below_cap(hand, task_id)]
        if not candidates:
            return None
        if self.policy == "most_ready":
            return max(candidates, key=self._available)
        deepest = candidates[0]  # candidates come most downstream first
        for task_id in candidates[1:]:
            # a task that others wait on, passed over for one that does not depend on it
            # (which may have blocks to do for ever), gets this worker
            if deepest not in self._descendants[task_id] and self._starving(task_id):
                return task_id
        return deepest

    def _starving(self, task_id: str) -> bool:
        """A task no worker holds blocks of, while a task downstream of it has nothing
        ready: it waits on this one."""
        if self.serving[task_id]:
            return False
        return any(not self.task_states[other].is_done() and not self._available(other)
                   for other in self._downstream[task_id])

    def _take_blocks(self, hand: WorkerHand, want: int, first_is_free: bool) -> list[Block]:
        """Up to ``want`` blocks for ``hand``, now held by it. Beyond the first one
        (when ``first_is_free``), blocks are taken only while :meth:`_may_hand_extra`
        says so. A pool worker's blocks come from the task :meth:`_choose` picks, one
        block at a time."""
        blocks: list[Block] = []
        while len(blocks) < want:
            task_id = self._choose(hand)
            if task_id is None:
                break
            if (blocks or not first_is_free) and not self._may_hand_extra(hand, task_id):
                break
            block = self._next_block(task_id)
            if block is None:
                if not blocks and self._pre_checked[task_id]:
                    self._start_pre_checks(task_id, want)
                break
            self._hold(hand, block)
            blocks.append(block)
        return blocks

    def _send(self, hand: WorkerHand, blocks: list[Block]) -> None:
        self.blocks_handed_out += len(blocks)
        self.block_frames += 1
        self._out.append(SendBlocks(hand.key, tuple(blocks)))

    def _home_done(self, home: str) -> bool:
        """Whether every task a home's workers serve is done."""
        tasks = self.pools.get(home)
        if tasks is None:
            return self.task_states[home].is_done()
        return all(self.task_states[task_id].is_done() for task_id in tasks)

    def _request(self, hand: WorkerHand, want: int) -> None:
        """Answer a request for ``want`` blocks now, or park it until a block is ready."""
        home = hand.task_id
        first_is_free = not hand.hand
        blocks = [] if self.ending else self._take_blocks(hand, want, first_is_free)
        if blocks:
            self._send(hand, blocks)
        elif self.ending or self._home_done(home):
            self._out.append(SendNoMoreBlocks(hand.key))
        else:
            hand.wants = want
            if first_is_free:
                self.waiting[home][hand] = None
            else:
                self.waiting_more[home][hand] = None

    def _serve_waiting(self) -> None:
        """Give ready blocks to parked requests, first to workers holding no block,
        then to workers asking for more in hand; tell them when their tasks are done
        (or the run ends)."""
        for task_id, checked in self.checked.items():
            if checked and self.task_states[task_id].stop_reason:
                # pre-checked blocks of a task that stopped will never be handed out
                self._give_back_unstarted(list(checked))
                checked.clear()
        for home, waiting in self.waiting.items():
            if waiting and not self.ending:
                for hand in list(waiting):
                    blocks = self._take_blocks(hand, hand.wants, True)
                    if not blocks:
                        break  # they hold nothing either: the next would find nothing
                    del waiting[hand]
                    hand.wants = 0
                    self._send(hand, blocks)
            more = self.waiting_more[home]
            if more and not self.ending:
                # each of them holds a block: none may take more unless ready > workers
                for hand in list(more):
                    blocks = self._take_blocks(hand, hand.wants, False)
                    if blocks:
                        del more[hand]
                        hand.wants = 0
                        self._send(hand, blocks)
                    elif home not in self.pools:
                        break  # a pool's workers hold blocks of different tasks
            if (waiting or more) and (self.ending or self._home_done(home)):
                for hand in (*waiting, *more):
                    hand.wants = 0
                    self._out.append(SendNoMoreBlocks(hand.key))
                waiting.clear()
                more.clear()


def _descendants(downstream: Mapping[str, list[str]]) -> dict[str, frozenset[str]]:
    """Every task downstream of each task, directly or not."""
    found: dict[str, frozenset[str]] = {}

    def below(task_id: str) -> frozenset[str]:
        known = found.get(task_id)
        if known is None:
            known = found[task_id] = frozenset(downstream[task_id]).union(
                *map(below, downstream[task_id]))
        return known

    for task_id in downstream:
        below(task_id)
    return found


def _depths(tasks: Mapping[str, Any]) -> dict[str, int]:
    """How far downstream each task is: 0 for a task with no upstream task in the run,
    else one more than its deepest upstream task."""
    depths: dict[str, int] = {}

    def depth(task_id: str) -> int:
        found = depths.get(task_id)
        if found is None:
            upstream = [other.task_id for other in tasks[task_id].upstream_tasks
                        if other.task_id in tasks]
            found = depths[task_id] = 1 + max(map(depth, upstream), default=-1)
        return found

    for task_id in tasks:
        depth(task_id)
    return depths
