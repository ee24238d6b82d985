"""``run_blockwise``: run tasks to completion and print daisy's execution summary.

A run starts its workers before it imports asyncio and tornado and builds its block
server (:meth:`WorkerRun.start_workers`): a fresh worker takes tens of milliseconds
to boot, and the server is ready by the time it connects. So this module imports
neither at its top.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .blocks import BlockStatus, uncovered_strips
from .checks import (
    check_folder,
    check_folder_not_shared,
    check_host,
    check_seconds,
    check_worker_death_timeout,
)
from .claims import Claims
from .context import (
    DAISY_ENV_VARIABLE,
    DEFAULT_PREFETCH,
    ENV_VARIABLE,
    MAX_PREFETCH,
    Context,
    new_token,
)
from .errors import (
    ConfigError,
    LauncherError,
    LedgerError,
    TaskDefinitionError,
    UnserialisableFunctionError,
    WorkerSetupError,
)
from .launchers.base import Launcher, WorkerHandle, WorkerSpec
from .launchers.local import LocalLauncher
from .ledger import Ledger, LedgerSet
from .listening import bind_listening_sockets, is_loopback
from .payload import FunctionTarget, PoolTarget, WorkerPayload
from .pools import (
    check_pool_policy,
    check_total_workers,
    plan_workers,
    pool_sizes,
    usable_cpus,
)
from .progress import ProgressBars
from .scheduler import BlockScheduler, ReleaseOutcome
from .startup import StartupReport
from .summary import RunResult, format_summary
from .task import Task, collect_tasks
from .worker import EXIT_RESTART_ME, process_one_block, takes_block

if TYPE_CHECKING:
    from .server import BlockServer, ServerLimits

logger = logging.getLogger(__name__)

#: seconds between two looks at workers, timeouts and progress
MONITOR_INTERVAL = 0.05
#: seconds between two looks at whether the run is done, and, once it is, at whether
#: its workers have exited (a look costs a comparison per task, a poll per worker)
END_CHECK_INTERVAL = 0.01
#: seconds a finished run waits for its workers to exit before killing them
SHUTDOWN_GRACE = 10.0
#: seconds between two progress reports to observers
PROGRESS_INTERVAL = 1.0
#: seconds the end of a run waits for the launcher to confirm every worker (job) gone
STOP_TIMEOUT = 60.0
#: seconds between two looks at the ledgers of followed tasks in an in-process run
FOLLOW_INTERVAL = 0.1


def warn_uncovered(tasks: Iterable[Task]) -> None:
    """Warn, once per task and run, where ``fit="valid"`` leaves voxels unprocessed."""
    for task in tasks:
        for axis, begin, end in uncovered_strips(task.grid):
            logger.warning(
                "task %r: with fit='valid' its blocks do not tile the total ROI %s along "
                "axis %d: the strip [%d, %d) of that axis (world units) is written by no "
                "block. fit='overhang' or fit='shrink' would cover it; or make the total "
                "ROI's extent minus the context a multiple of the write shape %d.",
                task.task_id, task.grid.total_roi, axis, begin, end,
                task.grid.write_shape[axis])


def run_in_process(tasks: list[Task], ledgers: LedgerSet, progress: bool = True,
                   followed: Mapping[str, FollowedTask] | None = None) -> RunResult:
    """Run every block of ``tasks`` in the calling process, one at a time.

    Tasks in ``followed`` are processed by another run: this one waits for their
    blocks (read from that run's ledger) where its own blocks need them, and takes a
    task over when that run is gone. The ledgers are written from their writer thread.
    """
    followed = dict(followed or {})
    for task in tasks:
        if task.process_function is None or not takes_block(task.process_function):
            raise TaskDefinitionError(
                f"task {task.task_id!r}: multiprocessing=False runs process_function(block) "
                f"in this process, so it must take the block as its argument; a worker "
                f"function without arguments needs multiprocessing=True")
    warn_uncovered(tasks)
    done_blocks = ledgers.done_blocks()
    for task_id, follower in followed.items():
        done_blocks[task_id] = follower.initial_done()
    scheduler = BlockScheduler(tasks, done_blocks)
    for task_id in followed:
        scheduler.follow(task_id)
    for task in tasks:
        if task.init_callback_fn is not None:
            task.init_callback_fn(Context(task_id=task.task_id, worker_id="0"))
    bars = ProgressBars(scheduler.task_states, enabled=progress)
    ledgers.start_writer()
    failed = True
    try:
        while ledgers.failure is None:  # else the ledgers cannot be written: finish raises
            progressed = True
            while progressed and ledgers.failure is None:
                progressed = False
                for task in tasks:
                    if task.task_id in followed:
                        continue  # another run processes it
                    while ledgers.failure is None and _process_next_block(scheduler, task,
                                                                          ledgers):
                        progressed = True
                        bars.update()
            if all(scheduler.task_states[task_id].is_done() for task_id in followed):
                break
            if not _follow_in_process(scheduler, followed, ledgers):
                time.sleep(FOLLOW_INTERVAL)
        failed = False
    finally:
        bars.close()
        try:
            # every record durable before the run returns (Luigi reads complete() next)
            ledgers.finish(patience=0 if failed else None)
        except LedgerError as error:
            if not failed:
                raise
            logger.error("%s", error)
    return RunResult(scheduler.task_states)


def _follow_in_process(scheduler: BlockScheduler, followed: dict[str, FollowedTask],
                       ledgers: LedgerSet) -> bool:
    """Take in the blocks other runs finished; take over tasks whose run is gone.
    True when something changed."""
    may_claim = {task_id: not scheduler.task_states[task_id].is_done()
                 for task_id in followed}
    released, taken = _take_in_looks(scheduler, followed, ledgers,
                                     _look_at_followed(followed, may_claim))
    for task_id in taken:
        if not scheduler.task_states[task_id].is_done():
            logger.warning("the run processing task %r is gone; taking it over", task_id)
    return released or bool(taken)


def _process_next_block(scheduler: BlockScheduler, task: Task, ledgers: LedgerSet) -> bool:
    """Acquire, check, process and release one block of ``task``; False if none is ready."""
    block = scheduler.acquire(task.task_id)
    if block is None:
        return False
    if task.is_done_already(block):
        scheduler.release(block, BlockStatus.SUCCESS, skipped=True)
        ledgers.record_done(task.task_id, block.index)
        return True
    error = process_one_block(task.process_function, block)
    if block.status == BlockStatus.SUCCESS:
        failure = task.post_check_failure(block)
        if failure is not None:
            block.status = BlockStatus.FAILED
            block.error = failure
    outcome = scheduler.release(block, block.status,
                                fatal=isinstance(error, WorkerSetupError))
    if outcome is ReleaseOutcome.COMPLETED:
        ledgers.record_done(task.task_id, block.index)
    elif outcome is ReleaseOutcome.FAILED:
        ledgers.record_failed(task.task_id, block.index, block.error)
    return True


class FollowedTask(Protocol):
    """A task of the run whose blocks another run processes (see ``luigi_daisy.luigi``)."""

    task_id: str

    def initial_done(self) -> list[int]:
        """Blocks the other run has finished so far."""

    def new_done(self) -> list[int]:
        """Blocks the other run finished since the last call."""

    def try_claim(self) -> Ledger | None:
        """Take the task over if the other run is gone; return its ledger then."""


@dataclass
class FollowedLook:
    """What one look at a followed task's ledger found."""

    #: blocks the other run finished since the last look
    done: list[int]
    #: the task's ledger, when its lock was free (the other run is gone) and taken
    claimed: Ledger | None = None
    #: blocks found finished once the task was claimed
    done_after_claim: list[int] = field(default_factory=list)


def _look_at_followed(followers: Mapping[str, FollowedTask],
                      may_claim: Mapping[str, bool]) -> dict[str, FollowedLook]:
    """Read what the followed runs finished, and claim the tasks whose run is gone
    (on the follow thread: these read and lock files)."""
    found = {}
    for task_id, follower in followers.items():
        look = FollowedLook(follower.new_done())
        if may_claim[task_id]:
            look.claimed = follower.try_claim()
            if look.claimed is not None:
                look.done_after_claim = follower.new_done()
        found[task_id] = look
    return found


def _take_in_looks(scheduler: BlockScheduler, followed: dict[str, FollowedTask],
                   ledgers: LedgerSet, found: Mapping[str, FollowedLook]
                   ) -> tuple[bool, list[str]]:
    """Apply what looks at followed ledgers found: blocks finished elsewhere release
    the blocks that wait for them; a claimed task is taken over (out of ``followed``,
    its ledger one of ``ledgers``). Returns whether any block was new, and the ids of
    the tasks taken over."""
    released = False
    taken = []
    for task_id, look in found.items():
        if task_id not in followed:
            continue
        for index in look.done:
            released = scheduler.complete_external(task_id, index) or released
        if look.claimed is None:
            continue
        for index in look.done_after_claim:
            scheduler.complete_external(task_id, index)
        del followed[task_id]
        scheduler.take_over(task_id)
        ledgers.add(task_id, look.claimed)
        taken.append(task_id)
    return released, taken


class WorkerRun:
    """One multiprocessing run: a block server, a pool of worker processes, progress.

    Workers started by the same launcher serve whichever task the hand-out picks (one
    pool per launcher, see :mod:`luigi_daisy.pools`); a task whose process function is
    a worker loop of its own (no argument) keeps workers of its own.

    Parameters
    ----------
    tasks:
        Tasks with their upstream tasks, upstream first.
    launcher:
        Starts worker processes (see :mod:`luigi_daisy.launchers.base`).
    ledgers:
        Ledgers of the tasks this run processes (the server writes them).
    host:
        Interface the block server listens on.
    progress:
        Show a progress bar per task.
    followed:
        Tasks whose blocks another run processes: their finished blocks are read from
        that run's ledger and release the blocks here that wait for them; when that
        run is gone, this one takes the task over.
    observers:
        Called with this run about once a second and once at the end (progress
        reports).
    tracking:
        Serve the run's live block map over HTTP (``tracking.url``, which carries the
        page's secret token); the scheduler then keeps each block's state (one byte
        per block).
    block_map_host:
        Interface the block map listens on (loopback unless told otherwise, whatever
        ``host`` is); on every interface (``0.0.0.0``) its URL names ``advertise_host``.
    server_limits:
        Bounds on the block server's connections, handshakes and buffered bytes
        (:class:`~luigi_daisy.server.ServerLimits`; its defaults when None).
    stop_event:
        An event (``threading.Event``, ``multiprocessing.Event``) that, once set, ends
        the run with its blocks as they are (daisy's ``Server(stop_event)``).
    targets:
        What the workers of a task run, per task id, when it is not the task's
        ``process_function`` carried by value (a Luigi task rebuilt from its parameters).
    advertise_host:
        The address workers are told to reach the server at (cluster nodes); default:
        ``host``, or this machine's name when ``host`` is not loopback.
    worker_death_timeout:
        Seconds after which a worker whose server is gone exits on its own.
    pending_report_after:
        Seconds after which a worker job still pending is reported (id and reason).
    total_workers:
        The run's budget of workers; a task's ``num_workers`` is its cap. None: the
        CPUs this process may use when every worker is a local process, else no
        budget beyond the tasks' caps.
    pool_policy:
        How a pool worker's next task is chosen (see
        :class:`~luigi_daisy.handout.HandOut`): ``"downstream"`` or ``"most_ready"``.
    """

    def __init__(self, tasks: list[Task], launcher: Launcher, ledgers: LedgerSet,
                 host: str = "127.0.0.1", progress: bool = True,
                 followed: Mapping[str, FollowedTask] | None = None,
                 observers: list[Callable[[WorkerRun], None]] | None = None,
                 tracking: bool = False, server_limits: ServerLimits | None = None,
                 stop_event: Any = None, targets: Mapping[str, object] | None = None,
                 advertise_host: str | None = None, worker_death_timeout: float = 60.0,
                 pending_report_after: float = 60.0,
                 prefetch: int = DEFAULT_PREFETCH,
                 block_map_host: str = "127.0.0.1", total_workers: int | None = None,
                 pool_policy: str = "downstream") -> None:
        check_prefetch(prefetch)
        check_worker_death_timeout(worker_death_timeout)
        check_total_workers(total_workers)
        check_pool_policy(pool_policy)
        for task in tasks:
            if task.process_function is None:
                raise TaskDefinitionError(
                    f"task {task.task_id!r} has no process_function to run on its workers")
        self.tasks = {task.task_id: task for task in tasks}
        warn_uncovered(task for task_id, task in self.tasks.items()
                       if task_id not in (followed or {}))
        self.launcher = launcher
        self.host = host
        self.advertise_host = advertise_host or default_advertise_host(host)
        self.block_map_host = block_map_host
        self.worker_death_timeout = worker_death_timeout
        self.pending_report_after = pending_report_after
        self.prefetch = prefetch
        self.startup: StartupReport | None = None
        self.failure_report: str | None = None
        self.progress = progress
        self.ledgers = ledgers
        self.followed = dict(followed or {})
        self.observers = list(observers or [])
        self.server_limits = server_limits
        self.stop_event = stop_event
        done_blocks = ledgers.done_blocks()
        for task_id, follower in self.followed.items():
            done_blocks[task_id] = follower.initial_done()
        self.scheduler = BlockScheduler(tasks, done_blocks, block_map=tracking)
        for task_id in self.followed:
            self.scheduler.follow(task_id)
        self.server: BlockServer | None = None
        self.tracking = None
        if tracking:
            from .tracking import TrackingPage  # tornado.web: only for the block map
            self.tracking = TrackingPage(self)
        self.started_at = time.monotonic()
        targets = dict(targets or {})
        task_targets = {task.task_id: targets.get(task.task_id)
                        or FunctionTarget(task.process_function) for task in tasks}
        self.plan = plan_workers(
            self.tasks, lambda task_id: _shares_workers(task_targets[task_id]),
            lambda task_id: id(launcher.for_task(task_id)))
        self.pool_policy = pool_policy
        if total_workers is None and all(
                isinstance(launcher.for_task(task_id), LocalLauncher) for task_id in self.tasks):
            total_workers = usable_cpus()
        self.total_workers = total_workers
        #: the launcher of each home (a task with workers of its own, or a pool)
        self.launchers: dict[str, Launcher] = {
            home: launcher.for_task(self.plan.tasks_of(home)[0]) for home in self.plan.homes}
        self.payloads = {task_id: WorkerPayload(task_targets[task_id], task_id)
                         for task_id in self.plan.own}
        for pool_id, pool_tasks in self.plan.pools.items():
            if len(pool_tasks) == 1:  # its workers run the task's own target
                self.payloads[pool_id] = WorkerPayload(task_targets[pool_id], pool_id)
                continue
            self.payloads[pool_id] = WorkerPayload(
                PoolTarget({task_id: task_targets[task_id] for task_id in pool_tasks}),
                pool_id)
        #: started workers that have not exited, per home
        self.workers: dict[str, list[WorkerHandle]] = {home: [] for home in self.plan.homes}
        self.stopped_by_choice: dict[str, int] = {home: 0 for home in self.plan.homes}
        self.log_files: dict[int, tuple[str, str]] = {}
        #: the home of each worker id started
        self.worker_tasks: dict[int, str] = {}
        #: how workers of each home ended, for the report of a run that stalls
        self.ended_workers: dict[str, list[str]] = {home: [] for home in self.plan.homes}
        self._initialised: set[str] = set()  # tasks whose init_callback_fn ran
        self._next_worker_id = 0
        self._replacements: set[int] = set()  # ids of workers started as replacements
        # the look at the followed tasks' ledgers in progress, on its own thread
        self._follow_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._follow_look: concurrent.futures.Future | None = None
        # bound by start_workers, adopted by the server in _run
        self._listening: list[socket.socket] = []
        self._port: int | None = None
        self._token: str | None = None
        self._expected_early: list[tuple[str, int]] = []  # started before the server

    # ------------------------------------------------------------------ workers
    def start_workers(self) -> None:
        """Bind the block server's port and start the workers of every task that has
        blocks to do, before the event loop, tornado and the server exist.

        A fresh worker takes tens of milliseconds to boot; the server is built
        meanwhile (:meth:`run` adopts the bound sockets) and the workers' connections
        wait in the listen backlog until it accepts them. :meth:`run` calls this when
        nobody did. Whoever calls it must make sure :meth:`run` follows, or stop the
        launcher's workers.
        """
        if self._listening:
            return
        for home, payload in self.payloads.items():  # followed tasks too: may be taken over
            self._prepare(home, payload)
        self._token = new_token()
        self._listening = bind_listening_sockets(self.host)
        self._port = self._listening[0].getsockname()[1]
        for task_id in self._active_tasks():
            self._start_task(task_id)

    def _prepare(self, home: str, payload: WorkerPayload) -> None:
        """Check that a home's payload reaches its workers; for a pool that cannot,
        name the task whose function cannot travel."""
        launcher = self.launchers[home]
        try:
            launcher.prepare(payload)
        except UnserialisableFunctionError:
            if not isinstance(payload.target, PoolTarget):
                raise
            for task_id, target in payload.target.targets.items():
                WorkerPayload(target, task_id).to_bytes()
            raise

    def _active_tasks(self) -> list[str]:
        """Tasks with blocks to do that this run processes (not followed)."""
        return [task_id for task_id, state in self.scheduler.task_states.items()
                if task_id not in self.followed and not state.is_done()]

    def _wanted_workers(self) -> dict[str, int]:
        """How many workers each home should have now (see :func:`pool_sizes`)."""
        return pool_sizes(self.plan, {task_id: task.num_workers
                                      for task_id, task in self.tasks.items()},
                          self._active_tasks(), self.total_workers)

    def close_listening(self) -> None:
        """Close the sockets :meth:`start_workers` bound, when no server adopted them
        (the run failed before it built one)."""
        if self.server is None:
            for sock in self._listening:
                sock.close()

    def _context(self, task_id: str, worker_id: int, restartable: bool = True) -> Context:
        return Context(hostname=self.advertise_host, port=str(self._port),
                       task_id=task_id, worker_id=str(worker_id),
                       restartable=str(int(restartable)),
                       worker_death_timeout=f"{self.worker_death_timeout:g}",
                       prefetch=str(self.prefetch), token=self._token)

    def _start_worker(self, task_id: str, restartable: bool = True) -> None:
        """Start a worker of ``task_id``'s home (a pool, or the task itself)."""
        task_id = self.plan.home_of.get(task_id, task_id)
        launcher = self.launchers[task_id]
        worker_id = self._next_worker_id
        self._next_worker_id += 1
        if self.server is not None:
            self.server.expect_worker(task_id, worker_id)
        else:
            self._expected_early.append((task_id, worker_id))
        encoded = self._context(task_id, worker_id, restartable).to_env()
        environment = {ENV_VARIABLE: encoded, DAISY_ENV_VARIABLE: encoded}
        if os.environ.get("PYTHONPATH"):
            environment["PYTHONPATH"] = os.environ["PYTHONPATH"]
        stdout_path, stderr_path = launcher.log_paths(task_id, worker_id)
        worker = launcher.start(WorkerSpec(
            task_id=task_id, worker_id=worker_id, environment=environment,
            payload=self.payloads[task_id], stdout_path=stdout_path,
            stderr_path=stderr_path, job_name=f"luigi_daisy-{task_id}-worker-{worker_id}",
            private_fds=self._private_fds()))
        if worker.stderr_path is not None:  # None: daisy.logging.set_log_basedir(None)
            self.log_files[worker_id] = (str(worker.stdout_path), str(worker.stderr_path))
        self.worker_tasks[worker_id] = task_id
        self.workers[task_id].append(worker)

    def _private_fds(self) -> tuple[int, ...]:
        """Descriptors of the run's sockets: the block server's listener and
        connections, the tracking page's listener. No worker may keep them."""
        fds = [sock.fileno() for sock in (self.server.sockets() if self.server is not None
                                          else self._listening)]
        if self.tracking is not None:
            fds.extend(sock.fileno() for sock in self.tracking.sockets())
        return tuple(fd for fd in fds if fd >= 0)

    def _kill_worker(self, task_id: str, worker_id: int | None) -> None:
        for worker in self.workers[task_id]:
            if worker.worker_id == worker_id:
                worker.kill()

    def _check_workers(self) -> None:
        """Replace workers that exited while their tasks still have blocks to do.

        A worker that exits with code 0 has chosen to stop (a worker loop that returned)
        and is not replaced, as in daisy 1.x; any other exit counts against the
        ``max_worker_restarts`` of the task whose block it ran last.
        """
        self.launcher.poll()
        for home, workers in self.workers.items():
            for worker in list(workers):
                exit_code = worker.exit_code()
                if exit_code is None:
                    continue
                workers.remove(worker)
                self.server.forget_worker(home, worker.worker_id)
                # a job that died without closing its connection (node failure) gives
                # its blocks back now, not when keepalive notices
                self.server.drop_worker(home, worker.worker_id)
                self._worker_ended(home, worker, exit_code)

    def _open_tasks(self, home: str) -> list[str]:
        """The tasks of ``home`` a new worker could still work on."""
        return [task_id for task_id in self.plan.tasks_of(home)
                if not self.scheduler.task_states[task_id].is_done()
                and not self.scheduler.task_states[task_id].stop_reason]

    def _worker_ended(self, home: str, worker: WorkerHandle, exit_code: int) -> None:
        open_tasks = self._open_tasks(home)
        if not open_tasks:
            return  # nothing left for a new worker (a stopped task hands out none)
        refused = worker.start_error()
        if refused is not None:  # the batch system refused the job: it never ran
            what = ("a replacement" if worker.worker_id in self._replacements
                    else f"worker {worker.worker_id}")
            logger.error("could not start %s for %r: %s", what, home, refused)
            self.ended_workers[home].append(f"{what} was refused: {refused}")
            return
        if exit_code == 0:
            self.stopped_by_choice[home] += 1
            logger.info("worker %s of %r exited with code 0 while blocks remain: "
                        "it chose to stop and is not replaced", worker.worker_id, home)
            return
        self.ended_workers[home].append(f"{worker.describe()} exited with code {exit_code}")
        # the task charged: the one whose block the worker ran last
        task_id = self.server.handout.last_task.get((home, worker.worker_id))
        if task_id not in open_tasks:
            task_id = open_tasks[0]
        state = self.scheduler.task_states[task_id]
        if exit_code == EXIT_RESTART_ME:
            logger.warning("worker %s of %r failed several blocks in a row; replacing "
                           "it with a fresh process (see %s)", worker.worker_id,
                           home, worker.stderr_path)
        else:
            state.worker_failure_count += 1
            logger.warning("worker %s of %r exited with code %s; see %s",
                           worker.worker_id, home, exit_code, worker.stderr_path)
        if state.worker_restart_count < self.tasks[task_id].max_worker_restarts:
            state.worker_restart_count += 1
            self._replace_worker(home)
        elif exit_code == EXIT_RESTART_ME:
            # out of restarts: the replacement keeps going however many blocks fail
            self._replace_worker(home, restartable=False)

    def _replace_worker(self, home: str, restartable: bool = True) -> None:
        """Start a replacement; a batch system that refuses it for now (a busy
        controller) costs the restart, not the run."""
        self._replacements.add(self._next_worker_id)
        try:
            self._start_worker(home, restartable)
        except LauncherError as error:
            logger.error("could not start a replacement worker for %r: %s", home, error)
            self.ended_workers[home].append(f"a replacement was refused: {error}")

    def _stalled(self) -> bool:
        """True when some unfinished task has no worker left to run it."""
        return any(not self.workers[self.plan.home_of[task_id]] and not state.is_done()
                   and task_id not in self.followed and not state.stop_reason
                   for task_id, state in self.scheduler.task_states.items())

    def _stall_report(self) -> str:
        """Which tasks have no workers left, and where their workers' errors are."""
        reports = []
        for home, workers in self.workers.items():
            stalled = [task_id for task_id in self.plan.tasks_of(home)
                       if not self.scheduler.task_states[task_id].is_done()
                       and task_id not in self.followed]
            if workers or not stalled:
                continue
            logs = [paths[1] for worker_id, paths in self.log_files.items()
                    if self.worker_tasks.get(worker_id) == home]
            stopped = self.stopped_by_choice[home]
            chose = (f"; {stopped} exited with code 0 (chose to stop, not replaced)"
                     if stopped else "")
            ended = self.ended_workers[home]
            ended_text = (f"; workers that ended: {'; '.join(ended[-10:])}"
                          f"{f' (and {len(ended) - 10} more)' if len(ended) > 10 else ''}"
                          if ended else "")
            restarts = ", ".join(
                f"{self.scheduler.task_states[task_id].worker_restart_count} restarts used "
                f"of {self.tasks[task_id].max_worker_restarts}"
                f"{f' by {task_id!r}' if len(stalled) > 1 else ''}" for task_id in stalled)
            names = (f"task {stalled[0]!r}" if len(stalled) == 1
                     else f"tasks {', '.join(map(repr, stalled))}")
            whose = "" if home in stalled else f" (pool {home!r})"
            reports.append(
                f"{names} has no workers left{whose} ({restarts}{chose}); their "
                f"errors are in {', '.join(logs[-3:]) or 'no log file'}{ended_text}")
        return "; ".join(reports)

    def _start_task(self, task_id: str) -> None:
        """Call the task's ``init_callback_fn`` (once per run) and start the workers its
        home lacks now."""
        task = self.tasks[task_id]
        if task.init_callback_fn is not None and task_id not in self._initialised:
            self._initialised.add(task_id)
            task.init_callback_fn(self._context(task_id, -1))
        home = self.plan.home_of[task_id]
        for _ in range(self._wanted_workers()[home] - len(self.workers[home])):
            self._start_worker(home)

    def workers_of(self, task_id: str) -> int:
        """Workers serving ``task_id`` now: its own processes, or its pool's workers
        holding its blocks."""
        home = self.plan.home_of[task_id]
        if home == task_id:
            return len(self.workers[home])
        return self.server.handout.workers_on(task_id) if self.server is not None else 0

    def _follow(self) -> None:
        """Take in what the last look at the followed tasks' ledgers found, and start
        the next look. The looks run on a thread of their own: a ledger read over a
        slow filesystem (NFS, Lustre) must not stall the loop that hands out blocks."""
        look = self._follow_look
        if look is not None:
            if not look.done():
                return
            self._follow_look = None
            self._take_in_followed(look.result())
        if not self.followed:
            return
        if self._follow_thread is None:
            self._follow_thread = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="luigi_daisy-follow")
        may_claim = {task_id: not self.scheduler.task_states[task_id].is_done()
                     for task_id in self.followed}
        self._follow_look = self._follow_thread.submit(
            _look_at_followed, dict(self.followed), may_claim)

    def _take_in_followed(self, found: Mapping[str, FollowedLook]) -> None:
        """Blocks finished by the runs this one follows release the blocks that wait
        for them (handed to the workers that wait); a task whose run is gone is taken
        over and gets workers."""
        released, taken = _take_in_looks(self.scheduler, self.followed, self.ledgers,
                                         found)
        if released:
            self.server.serve_waiting()
        for task_id in taken:
            if not self.scheduler.task_states[task_id].is_done():
                logger.warning("the run processing task %r is gone; taking it over", task_id)
                self._start_task(task_id)

    def _stop_following(self) -> None:
        """Wait for a look at the followed ledgers still running (a task it claimed is
        taken in: its ledger is then written like the others) and end the thread."""
        look, self._follow_look = self._follow_look, None
        if self._follow_thread is not None:
            self._follow_thread.shutdown(wait=True)
            self._follow_thread = None
        if look is not None and look.done() and look.exception() is None:
            _take_in_looks(self.scheduler, self.followed, self.ledgers, look.result())

    def _observe(self) -> None:
        for observer in self.observers:
            try:
                observer(self)
            except Exception:
                logger.exception("progress observer failed")

    # ------------------------------------------------------------------ run
    async def run(self) -> RunResult:
        """Serve blocks until every task is done or can no longer progress.

        However the run ends (done, stalled, Ctrl-C, SIGTERM when this is the main
        thread and SIGTERM has its default action), the launcher ends every worker and
        waits until they are gone.

        Raises
        ------
        UnserialisableFunctionError
            Before anything starts, when a task's process function cannot reach its
            workers.
        SystemExit
            With code 143 after SIGTERM, once every worker is gone.
        """
        import asyncio

        terminated = []
        restore = _cancel_on_sigterm(terminated)
        try:
            return await self._run()
        except asyncio.CancelledError:
            if terminated:
                logger.error("the run was stopped by SIGTERM; its workers are gone")
                raise SystemExit(128 + signal.SIGTERM) from None
            raise
        finally:
            restore()

    async def _run(self) -> RunResult:
        bars = None
        last_report = 0.0
        # commits happen on the ledgers' writer thread: this loop only appends records
        self.ledgers.start_writer()
        failed = True
        try:
            self.start_workers()
            from .server import BlockServer

            self.server = BlockServer(self.scheduler, host=self.host, token=self._token,
                                      on_worker_timeout=self._kill_worker,
                                      ledgers=self.ledgers, limits=self.server_limits,
                                      pools=self.plan.pools, pool_policy=self.pool_policy)
            self.server.failure_log = self._stderr_log
            self.server.start_listening(sockets=self._listening)
            for task_id, worker_id in self._expected_early:
                self.server.expect_worker(task_id, worker_id)
            if self.tracking is not None:
                self.tracking.start(self.block_map_host, self.advertise_host)
            self.startup = StartupReport(self.launcher, self.server, self.workers,
                                         self.pending_report_after,
                                         tasks=len(self._active_tasks()))
            while not self.scheduler.is_done():
                await self._sleep_unless_done(MONITOR_INTERVAL)
                self.server.reclaim_expired()
                now = time.monotonic()
                if self.ledgers.failure is not None:
                    break  # the ledgers cannot be written: stop (the end raises why)
                self._follow()
                self._check_workers()
                self.startup.update(now)
                if bars is None:  # drawn once the loop serves: tqdm is off the first block's path
                    bars = ProgressBars(self.scheduler.task_states, enabled=self.progress)
                bars.update()
                if now - last_report >= PROGRESS_INTERVAL:
                    last_report = now
                    self._observe()
                if self._stalled():
                    self.failure_report = self._stall_report()
                    logger.error("stopping the run: %s", self.failure_report)
                    break
                if self.stop_event is not None and self.stop_event.is_set():
                    logger.warning("stopping the run: its stop_event was set")
                    break
            self.startup.finish()
            self.server.end_run()
            await self._stop_workers()
            failed = False
        finally:
            self._end(bars, failed)
        return RunResult(self.scheduler.task_states)

    def _end(self, bars: ProgressBars | None, failed: bool) -> None:
        """End the run, however it ends: each step runs even when one before it fails,
        so that a ledger that cannot be written never leaves jobs queued, connections
        open or payload files behind. The ledgers are written last, after the jobs are
        gone; with an exception already on its way (``failed``) they get one attempt
        and their errors are logged, else the first error is raised once all ran
        (a :class:`~luigi_daisy.errors.LedgerError` that says what happened)."""
        errors: list[Exception] = []

        def stop_workers() -> None:
            not_gone = self.launcher.stop_all(STOP_TIMEOUT)  # cancels jobs, removes payloads
            if not_gone:
                logger.error("workers not confirmed gone after the run: %s",
                             ", ".join(not_gone))

        def close_server() -> None:
            if self.server is not None:
                self.server.close_all()
            else:  # the run ended before it built its server
                self.close_listening()

        def close_bars() -> None:
            shown = bars
            if shown is None and self.server is not None:  # ended before its first look
                shown = ProgressBars(self.scheduler.task_states, enabled=self.progress)
            if shown is not None:
                shown.close()

        # the hand-out hears first that the run ends (workers closed from now on were
        # not lost); workers are ended (jobs cancelled) before their connections close,
        # so a worker waiting for a block does not fail on the closed connection first
        steps = [self._stop_following, stop_workers, close_server, close_bars, self._observe]
        if self.server is not None:
            steps.insert(0, self.server.end_run)
        if self.tracking is not None:
            steps.append(self.tracking.stop)
        # every record durable before the run returns (Luigi reads complete() next)
        steps.append(lambda: self.ledgers.finish(patience=0 if failed else None))
        for step in steps:
            try:
                step()
            except Exception as error:  # noqa: BLE001 - every step must run; raised below
                errors.append(error)
        for error in errors[0 if failed else 1:]:
            if isinstance(error, LedgerError):
                logger.error("%s", error)
            else:
                logger.error("while ending the run: %r", error, exc_info=error)
        if errors and not failed:
            raise errors[0]

    async def _sleep_unless_done(self, seconds: float) -> None:
        """Sleep ``seconds``, or less once every task is done (the run's end is seen
        within ``END_CHECK_INTERVAL``, not a whole ``MONITOR_INTERVAL`` later)."""
        import asyncio

        deadline = time.monotonic() + seconds
        while not self.scheduler.is_done():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, END_CHECK_INTERVAL))

    async def _stop_workers(self) -> None:
        import asyncio

        deadline = time.monotonic() + SHUTDOWN_GRACE
        while time.monotonic() < deadline:
            self._reap()
            if not any(self.workers.values()):
                return
            if any(not state.is_done() for state in self.scheduler.task_states.values()):
                break
            await asyncio.sleep(END_CHECK_INTERVAL)
        self.launcher.stop_all(STOP_TIMEOUT)
        self._reap()

    def _reap(self) -> None:
        self.launcher.poll()
        for workers in self.workers.values():
            workers[:] = [worker for worker in workers if worker.exit_code() is None]

    def _stderr_log(self, task_id: str, worker_id: int | None) -> str | None:
        """The log file that holds what worker ``worker_id`` wrote to stderr (its
        tracebacks), as the block map shows it; None when not known."""
        paths = self.log_files.get(worker_id) if worker_id is not None else None
        return os.path.abspath(paths[1]) if paths else None

    def worker_logs(self) -> dict[str, list[str]]:
        """The ``.err`` files of the workers that failed blocks, per task."""
        return {task_id: [self.log_files[worker_id][1] for worker_id in sorted(worker_ids)
                          if worker_id in self.log_files]
                for task_id, worker_ids in self.server.failed_workers.items()}


def _cancel_on_sigterm(terminated: list) -> Callable[[], None]:
    """Make SIGTERM cancel the running task (so the run's cleanup runs), when this is
    the main thread and nobody else handles SIGTERM; return what undoes it."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None
    import asyncio

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_sigterm() -> None:
        terminated.append(True)
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    except (NotImplementedError, RuntimeError, ValueError):
        return lambda: None
    return lambda: loop.remove_signal_handler(signal.SIGTERM)


def _shares_workers(target: object) -> bool:
    """Whether a task's workers may serve other tasks too: not when its process function
    is a worker loop of its own (takes no block)."""
    return not isinstance(target, FunctionTarget) or takes_block(target.function)


def check_prefetch(prefetch: object) -> None:
    """Refuse a ``prefetch`` that is not an integer from 0 to ``MAX_PREFETCH``."""
    if type(prefetch) is not int or not 0 <= prefetch <= MAX_PREFETCH:
        raise ConfigError(
            f"prefetch={prefetch!r}: give the number of blocks a worker keeps in hand "
            f"beyond the one it processes, an integer from 0 to {MAX_PREFETCH}")


def default_advertise_host(host: str) -> str:
    """The address workers reach a server bound to ``host`` at: ``host`` itself when it
    is loopback, else this machine's name."""
    if is_loopback(host):
        return host
    return socket.gethostname()


def run_coroutine(coroutine_function):
    """Run a coroutine on a fresh event loop, in a thread if this one already has a loop."""
    import asyncio

    try:
        asyncio.get_running_loop()
        in_event_loop = True
    except RuntimeError:
        in_event_loop = False
    if not in_event_loop:
        return asyncio.run(coroutine_function())
    outcome = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine_function())
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller
            outcome["error"] = error

    thread = threading.Thread(target=target, name="luigi_daisy-run")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class _BlockMapAnnouncer:
    """Run observer that prints the URL of the run's block map, once."""

    def __init__(self) -> None:
        self.printed = False

    def __call__(self, run: WorkerRun) -> None:
        if not self.printed and run.tracking is not None and run.tracking.url:
            self.printed = True
            print(f"live block map: {run.tracking.url}", flush=True)


def _record_origins(ledgers: LedgerSet, tasks: list[Task]) -> None:
    """Write into each ledger of a daisy-style run what it is and which tasks it reads
    (``luigi-daisy reset --downstream`` follows that); a ledger that says so already is
    left as it is."""
    for task in tasks:
        ledger = ledgers.ledgers.get(task.task_id)
        if ledger is None:
            continue
        origin = {"kind": "daisy",
                  "upstream": {upstream.task_id: None for upstream in task.upstream_tasks}}
        if ledger.origin == origin:
            continue
        ledger.close()
        ledgers.ledgers[task.task_id] = Ledger(ledger.path, task.task_id, ledger.geometry,
                                               origin=origin)


def run_blockwise(tasks: Task | Iterable[Task], multiprocessing: bool = True,
                  progress: bool = True, return_states: bool = True,
                  log_dir: str | os.PathLike | None = None,
                  host: str = "127.0.0.1",
                  ledger_dir: str | os.PathLike | None = None,
                  fresh: bool = False,
                  server_limits: ServerLimits | None = None,
                  stop_event: Any = None, tracking: bool = False,
                  start_method: str = "spawn",
                  launcher: Launcher | None = None, advertise_host: str | None = None,
                  worker_death_timeout: float = 60.0,
                  pending_report_after: float = 60.0,
                  prefetch: int = DEFAULT_PREFETCH,
                  block_map_host: str = "127.0.0.1", total_workers: int | None = None,
                  pool_policy: str = "downstream") -> RunResult:
    """Run blockwise tasks (and their upstream tasks) to completion.

    Parameters
    ----------
    tasks:
        A task or a list of tasks; upstream tasks are pulled in.
    multiprocessing:
        Run the blocks on worker processes (default), or every block in the
        calling process (which claims and follows tasks the same way, waiting for the
        blocks of a followed task that its own blocks read).
    progress:
        Show a progress bar per task.
    return_states:
        Accepted for daisy 2 compatibility; the result is always the mapping.
    log_dir:
        Folder for the workers' logs, ``<log_dir>/<task_id>/worker_<id>.out|.err``;
        None (the default) takes it from :func:`luigi_daisy.logging.get_log_basedir`
        (``./daisy_logs`` unless ``set_log_basedir`` changed it; None there: no files).
    host:
        Interface the block server listens on. On every interface, loopback included,
        each worker proves the run's secret token, which it gets in its environment.
    ledger_dir:
        Ledger folder for the tasks that do not name their own (``Task(ledger=...)``):
        finished blocks are recorded there and skipped when the run is repeated.
        Each task with a ledger is claimed with a lock beside it (the same that
        ``BlockwiseTask`` takes): a task another live run holds is followed, not run
        twice (its finished blocks release the blocks here that read them), and taken
        over when that run is gone. The locks are released at the end.
    fresh:
        Forget what the tasks' ledgers hold and process every block again.
    server_limits:
        Bounds on the block server: connections open at once (default 4096), seconds
        to authenticate (10) and bytes of partial frames buffered across connections
        (64 MiB); see :class:`~luigi_daisy.server.ServerLimits`.
    stop_event:
        With worker processes: an event that, once set, ends the run (blocks not
        finished count as not run).
    tracking:
        Serve a live block map of the run on a free port of ``block_map_host`` and
        print its URL (with ``multiprocessing=True``). The URL carries a secret token
        made for this run (``?token=...``): without it, or the cookie the page sets
        when opened with it, every request is refused (403), and so is a request whose
        ``Host`` header names another machine. The page serves GET only.
    start_method:
        ``"spawn"`` (default): every worker is a fresh Python process,
        ``python -m luigi_daisy.worker``, that receives the process function pickled
        with cloudpickle (functions from ``__main__``, lambdas and closures travel;
        ``multiprocessing.Array`` and its locks travel as to multiprocessing's spawn
        children). A function that cannot be pickled is refused before the run starts
        (:class:`~luigi_daisy.errors.UnserialisableFunctionError`).
        ``"fork"``: workers are forks of this process, as in daisy 1.x. Hazard: a
        process that has started threads (dask, zarr 3's event loop thread, CUDA, a
        thread pool) hands its forks the locks those threads held at the fork, and no
        one ever releases them: a worker can hang on its first read, with no error.
    launcher:
        Starts the workers (a :class:`~luigi_daisy.launchers.base.Launcher`); default:
        ``LocalLauncher(log_dir, start_method)``. Cluster jobs:
        :class:`~luigi_daisy.launchers.slurm.SlurmLauncher`,
        :class:`~luigi_daisy.launchers.lsf.LsfLauncher`,
        :class:`~luigi_daisy.launchers.command.CommandLauncher`.
    advertise_host:
        Address the workers reach the server at; default ``host`` when it is loopback,
        else this machine's name.
    worker_death_timeout:
        Seconds after which a worker whose run is gone (killed) exits on its own; at
        least 1.
    pending_report_after:
        Seconds after which worker jobs still pending are logged with their reason.
    prefetch:
        Blocks a worker keeps in hand beyond the one it processes (0 to 8; default 1),
        so that it never waits for its next block. A block in hand counts as
        processing (conflicts, timeouts, a lost worker's blocks); a hand holds no
        more than its worker's share of the task's ready blocks.
        Workers whose blocks are shorter than a second, or than two round trips
        to the server, keep that much work in hand (up to 32 blocks) and move blocks
        several per frame. 0: a worker holds only the block it processes.
    block_map_host:
        Interface the block map (``tracking=True``) listens on: loopback by default,
        even when ``host`` is every interface; ``"0.0.0.0"`` serves it to the network,
        its URL then naming ``advertise_host`` (or this machine's name).
    total_workers:
        The run's budget of worker processes. Workers started by the same launcher
        form one pool that serves whichever task has blocks ready (the hand-out picks;
        see ``pool_policy``), and a task's ``num_workers`` caps how many of them hold
        its blocks at once. Each worker sets a task up once, the first time it gets a
        block of it. A task whose process function takes no argument (a worker loop
        of its own) keeps workers of its own, within the same budget. Default: the
        CPUs this process may use, when the workers are local processes; no budget
        but the tasks' caps with a cluster launcher.
    pool_policy:
        How a pool worker's next task is chosen: ``"downstream"`` (default), the most
        downstream task with ready blocks (objects finish early, intermediate results
        stay small), but first a task that no worker holds blocks of while a task
        downstream of it has nothing ready (no task that others wait on starves); or
        ``"most_ready"``, the task with the most ready blocks.

    Returns
    -------
    RunResult
        ``task_id -> TaskState``; true exactly when every block succeeded.

    Raises
    ------
    ConfigError
        Before anything starts, for a ``worker_death_timeout`` below 1 s, a
        ``pending_report_after`` below 0, a ``host`` (or ``block_map_host``) that is
        not an address of this machine, a ledger folder that is a file, an existing
        ledger or log folder that its group or others can write and that is not sticky,
        a ``prefetch`` out of range, a ``total_workers`` below 1 or an unknown
        ``pool_policy``.
    LedgerError
        When a ledger cannot be used or written; its class says why
        (:class:`~luigi_daisy.errors.LedgerDamagedError`,
        :class:`~luigi_daisy.errors.LedgerDiskFullError`,
        :class:`~luigi_daisy.errors.LedgerReadOnlyError`). A run whose ledger writes
        fail keeps serving and retries them; it stops (workers ended, jobs cancelled,
        finished records kept) only after ``ledger.STORAGE_PATIENCE`` seconds of
        failures, or when it ends and its last writes still fail.
    """
    check_prefetch(prefetch)
    check_worker_death_timeout(worker_death_timeout)
    check_seconds(pending_report_after, "pending_report_after")
    check_total_workers(total_workers)
    check_pool_policy(pool_policy)
    ordered = collect_tasks(tasks)
    check_folder(ledger_dir, "ledger_dir")
    check_folder_not_shared(ledger_dir, "ledger_dir", "ledger folder")
    for task in ordered:
        key = f"the ledger of task {task.task_id!r} (Task(ledger=...))"
        check_folder(task.ledger, key)
        check_folder_not_shared(task.ledger, key, "ledger folder")
    if multiprocessing:
        check_host(host)
        if tracking:
            check_host(block_map_host, "block_map_host")
        if launcher is None:  # built now: a bad start_method is refused before anything
            launcher = LocalLauncher(log_dir, start_method=start_method)
        check_folder_not_shared(getattr(launcher, "log_dir", None), "log_dir", "log folder")
    claims = Claims.take(ordered, ledger_dir)
    try:
        ledgers = LedgerSet.open([task for task in ordered if task.task_id not in claims.followed],
                                 ledger_dir, fresh=fresh)
        try:
            _record_origins(ledgers, ordered)
            if not multiprocessing:
                result = run_in_process(ordered, ledgers, progress=progress,
                                        followed=claims.followed)
                print(format_summary(result))
                return result
            observers = [_BlockMapAnnouncer()] if tracking else []
            run = WorkerRun(ordered, launcher, ledgers, host=host, progress=progress,
                            followed=claims.followed, observers=observers,
                            tracking=tracking, server_limits=server_limits,
                            stop_event=stop_event, advertise_host=advertise_host,
                            worker_death_timeout=worker_death_timeout,
                            pending_report_after=pending_report_after, prefetch=prefetch,
                            block_map_host=block_map_host, total_workers=total_workers,
                            pool_policy=pool_policy)
            try:
                run.start_workers()  # before the event loop: they boot while it starts
                result = run_coroutine(run.run)
            except BaseException:
                run.launcher.stop_all(STOP_TIMEOUT)  # when the run never got to stop them
                run.close_listening()
                raise
        finally:
            ledgers.close()
    finally:
        claims.release()
    print(format_summary(result, run.worker_logs()))
    if run.failure_report:
        print(f"the run stopped early: {run.failure_report}")
    return result
