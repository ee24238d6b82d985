"""``BlockwiseTask``: a Luigi task that runs a function over every block of a volume."""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import luigi
from funlib.geometry import Roi
from luigi.task import flatten

from ..blocks import Block, BlockGrid
from ..claims import Claims
from ..datasets import check_write_alignment
from ..errors import BlockwiseRunError, ConfigError, LauncherError, WorkerSetupError
from ..ledger import Ledger, LedgerSet, ledger_path, legacy_path
from ..run import WorkerRun, run_coroutine
from ..summary import format_summary
from ..task import Task
from .config import LAUNCHERS, SECTION, settings
from .launching import RESOURCE_PARAMETERS, launcher_for_closure, make_launcher
from .pipeline import RunOutcome, luigi_scheduler_of, scheduled_dependents
from .progress import LuigidReporter
from .targets import LedgerTarget, ZarrTarget, record_folder_of
from .values import LenientParse, check_run_machine, problem_of

logger = logging.getLogger(__name__)


def failure_message(task_id: str, state, summary: str) -> str:
    """Why a blockwise task failed, with the execution summary of its run."""
    if state.stop_reason and state.failed_blocks:
        return (f"{task_id} was stopped after its first failure, which every block would "
                f"repeat.\n{summary}")
    if state.stop_reason:
        return f"{task_id} was stopped: {state.stop_reason}.\n{summary}"
    return (f"{task_id}: {state.failed_count} blocks failed and {state.orphaned_count} were "
            f"orphaned; rerun to retry them (finished blocks are skipped).\n{summary}")


class _SectionDefault(LenientParse):
    """Mixin for a Luigi parameter whose default comes from ``[luigi_daisy]``.

    Lookup order: command line, the task's own section (``[Smooth] num_workers``), the
    ``[luigi_daisy]`` section, the default. (Luigi's own ``config_path`` does the same
    but warns that the shared section is deprecated.) A value that cannot be parsed is
    refused by ``BlockwiseTask.check_config``, while Luigi schedules the task.
    """

    def _value_iterator(self, task_name, param_name):
        values = list(super()._value_iterator(task_name, param_name))
        yield from values[:-1]
        yield (self._get_value_from_config(SECTION, param_name), None)
        yield values[-1]


class _IntParameter(_SectionDefault, luigi.IntParameter):
    pass


class _OptionalFloatParameter(_SectionDefault, luigi.OptionalFloatParameter):
    pass


class _ChoiceParameter(_SectionDefault, luigi.ChoiceParameter):
    pass


class _BoolParameter(_SectionDefault, luigi.BoolParameter):
    pass


class _Parameter(_SectionDefault, luigi.Parameter):
    pass


class _BlockFunction:
    """What a worker process runs per block: ``setup_worker`` once, then ``process_block``.

    A worker whose setup failed does not try again for every block (reloading a model a
    million times): its blocks fail at once with the setup's traceback, and after a few
    in a row the run replaces the worker with a fresh process.
    """

    def __init__(self, task: BlockwiseTask) -> None:
        self.task = task
        self.worker_ready = False
        self.setup_failure: str | None = None

    def __call__(self, block: Block) -> None:
        if self.setup_failure is not None:
            raise WorkerSetupError(f"setup_worker of {self.task.task_id} failed in this "
                                   f"worker:\n{self.setup_failure}")
        if not self.worker_ready:
            try:
                self.task.setup_worker()
                # outputs made by setup_worker exist only now: check them before writing
                self.task.check_outputs()
            except Exception as error:
                self.setup_failure = traceback.format_exc()
                # every block would fail the same way: the worker reports it once
                raise WorkerSetupError(
                    f"{self.task.task_id} cannot process any block: "
                    f"{type(error).__name__}: {error}") from error
            self.worker_ready = True
        self.task.process_block(block)


@dataclass
class BlockwiseTaskTarget:
    """What the fresh worker process of a ``BlockwiseTask`` runs: the task rebuilt from
    its module, task family and Luigi parameters (as strings), then ``setup_worker``
    once and ``process_block`` per block."""

    module: str
    family: str
    str_params: dict[str, str]

    def process_function(self) -> _BlockFunction:
        """Import the task's module, rebuild the task, wrap it for the worker loop."""
        importlib.import_module(self.module)
        task_class = luigi.task_register.Register.get_task_cls(self.family)
        return _BlockFunction(task_class.from_str_params(self.str_params))

    def describe(self) -> str:
        """``Family(params)``."""
        return f"{self.family}({self.str_params})"

    @classmethod
    def of(cls, task: BlockwiseTask) -> BlockwiseTaskTarget | None:
        """The target of ``task``, or None when a fresh process could not import its
        class (defined in ``__main__`` or inside a function): then the task object
        itself travels, pickled by value."""
        task_class = type(task)
        if task_class.__module__ == "__main__" or "<locals>" in task_class.__qualname__:
            return None
        return cls(task_class.__module__, task_class.get_task_family(), task.to_str_params())


class BlockwiseTask(luigi.Task):
    """A Luigi task processed block by block by worker processes.

    Subclasses define the geometry (``total_roi``, ``read_roi``, ``write_roi``) and
    ``process_block(block)``; optionally ``setup_worker()`` (once per worker process,
    before its first block) and ``check_block(block)`` (True skips a block already done).
    ``requires()`` is plain Luigi and so is the DAG Luigi sees; with ``pipelining`` on,
    the run of a blockwise task also processes the blockwise tasks Luigi scheduled after
    it, block by block as their inputs are written (see ``luigi_daisy.luigi.pipeline``).
    A ``setup_worker`` that raises stops the task after its first block.

    Completion is recorded in a ledger of finished blocks, so ``complete()`` is one
    query and a rerun resumes where the last one stopped.
    """

    num_workers = _IntParameter(
        default=1, significant=False,
        description="worker processes for this task")
    max_retries = _IntParameter(
        default=2, significant=False,
        description="how often a failed block is retried")
    timeout = _OptionalFloatParameter(
        default=None, significant=False,
        description="seconds a block may take before its worker is stopped and it is retried")
    fit = _ChoiceParameter(
        choices=["valid", "overhang", "shrink"], default="valid", significant=False,
        description="how blocks at the border are handled")
    read_write_conflict = _BoolParameter(
        default=True, significant=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="whether blocks that read each other's output may not run together")
    launcher = _ChoiceParameter(
        choices=list(LAUNCHERS), default="local", significant=False,
        description="how this task's workers are started: local, slurm, lsf or command")
    queue = _Parameter(default="", significant=False,
                       description="SLURM partition or LSF queue of the worker jobs")
    account = _Parameter(default="", significant=False,
                         description="SLURM account or LSF project of the worker jobs")
    walltime = _Parameter(default="", significant=False,
                          description="wall time per worker job (90, 01:30:00, 1-00:00:00)")
    cpus_per_worker = _IntParameter(default=1, significant=False,
                                    description="CPUs per worker job")
    gpus_per_worker = _IntParameter(default=0, significant=False,
                                    description="GPUs per worker job")
    memory_per_worker = _Parameter(default="", significant=False,
                                   description="memory per worker job, as in 16G")
    job_extra = _Parameter(default="", significant=False,
                           description="extra submit options, passed as written")

    # ------------------------------------------------------------------ to override
    def total_roi(self) -> Roi:
        """The region the task reads; blocks tile it."""
        raise NotImplementedError(f"{type(self).__name__} must define total_roi()")

    def read_roi(self) -> Roi:
        """Read ROI of one block (its shape and its offset relative to the write ROI)."""
        raise NotImplementedError(f"{type(self).__name__} must define read_roi()")

    def write_roi(self) -> Roi:
        """Write ROI of one block."""
        raise NotImplementedError(f"{type(self).__name__} must define write_roi()")

    def process_block(self, block: Block) -> None:
        """Process one block (runs in a worker process)."""
        raise NotImplementedError(f"{type(self).__name__} must define process_block(block)")

    def setup_worker(self) -> None:
        """Called once in each worker process before its first block."""

    check_block = None
    """Optional ``check_block(self, block) -> bool``: True skips a block already done."""

    # ------------------------------------------------------------------ description
    def daisy_task(self, upstream_tasks: list[Task] | None = None) -> Task:
        """The core ``Task`` this Luigi task runs."""
        check = self.check_block
        return Task(
            self.task_id, total_roi=self.total_roi(), read_roi=self.read_roi(),
            write_roi=self.write_roi(), process_function=_BlockFunction(self),
            check_function=check, read_write_conflict=self.read_write_conflict,
            num_workers=self.num_workers, max_retries=self.max_retries, fit=self.fit,
            timeout=self.timeout, upstream_tasks=upstream_tasks or [],
            ledger=self.ledger_folder())

    def geometry(self) -> dict:
        """Plain-data geometry, as recorded in the ledger."""
        return BlockGrid(self.total_roi(), self.read_roi(), self.write_roi(), self.fit,
                         name=self.task_id).describe()

    def ledger_folder(self) -> Path:
        """The folder of this task's record of done blocks: with the data it describes.

        Inside the first output the task declares when that is a local zarr array
        (``<array>/.luigi_daisy``), next to it when it is a local file or folder
        (``<its folder>/.luigi_daisy``), so that deleting the output deletes the record;
        ``ledger_dir`` of ``[luigi_daisy]`` when the task declares no other output than
        its ledger target (or a remote one). Override to put it elsewhere.
        """
        if self.__dict__.get("_finding_ledger_folder"):
            # output() is being asked for its first output: its ledger target is
            # built meanwhile and thrown away
            return Path(settings().ledger_dir)
        self.__dict__["_finding_ledger_folder"] = True
        try:
            outputs = flatten(self.output())
        finally:
            del self.__dict__["_finding_ledger_folder"]
        for target in outputs:
            if not isinstance(target, LedgerTarget):
                folder = record_folder_of(target)
                if folder is not None and not self._earlier_record_elsewhere(folder):
                    return folder
                break
        return Path(settings().ledger_dir)

    def _earlier_record_elsewhere(self, folder: Path) -> bool:
        """Whether an earlier version left this task's record in ``ledger_dir`` and
        ``folder`` holds none: it is used where it is (an SQLite one is converted on
        its first write), so that nothing done before the upgrade is lost."""
        here = ledger_path(folder, self.task_id)
        if here.exists() or legacy_path(here).exists():
            return False
        there = ledger_path(settings().ledger_dir, self.task_id)
        return there.exists() or legacy_path(there).exists()

    def ledger_file(self) -> Path:
        """Path of this task's ledger (in :meth:`ledger_folder`)."""
        return ledger_path(self.ledger_folder(), self.task_id)

    def output(self):
        """The ledger target: exists when every block is recorded as done."""
        return self.ledger_target()

    def ledger_target(self) -> LedgerTarget:
        """The target that records this task's finished blocks (in
        :meth:`ledger_folder`)."""
        return LedgerTarget(self.ledger_folder(), self.task_id, self.geometry())

    def missing_outputs(self) -> list:
        """The outputs, besides the ledger target, that do not exist."""
        return [target for target in flatten(self.output())
                if not isinstance(target, LedgerTarget) and not target.exists()]

    def record_generation(self) -> str | None:
        """The generation of this task's record: a new one each time the record starts
        afresh, so a downstream record can tell whether the data it read was
        recomputed since. None when there is no record, or it carries none."""
        summary = self.ledger_target().summary()
        origin = (summary or {}).get("origin") or {}
        return origin.get("generation")

    def ledger_origin(self, generation: str) -> dict:
        """What the record keeps of this task: how to rebuild it (``luigi-daisy
        rerun-block``), its generation, and the generation of each blockwise upstream
        task's record it reads (``luigi-daisy reset --downstream`` and staleness)."""
        return {"kind": "luigi", "family": self.get_task_family(),
                "module": type(self).__module__, "params": self.to_str_params(),
                "generation": generation,
                "upstream": {upstream.task_id: upstream.record_generation()
                             for upstream in self.blockwise_requires()}}

    def stale_reason(self, summary: dict | None) -> str | None:
        """Why the record ``summary`` (of this task's ledger) may not be trusted any
        more, or None: it records done blocks while an output is missing, or the
        record of a blockwise task it reads started afresh since."""
        if summary is None or summary["done"] == 0:
            return None
        missing = self.missing_outputs()
        if missing:
            return f"its output {missing[0]} is missing"
        recorded = ((summary.get("origin") or {}).get("upstream") or {})
        for upstream in self.blockwise_requires():
            before = recorded.get(upstream.task_id)
            now = upstream.record_generation()
            if before is not None and now is not None and before != now:
                return (f"the task it reads, {upstream.task_id}, was computed afresh "
                        f"since (its record {upstream.ledger_file()} is a new one)")
        return None

    def check_config(self) -> None:
        """Refuse a parameter or ``[luigi_daisy]`` value that is not allowed, before
        anything starts: ``complete()`` calls this first, so Luigi refuses the task
        while scheduling it (``[retcode] scheduling_error``, 35 in the shipped
        ``luigi.cfg``), and so does ``run()``.

        Raises
        ------
        ConfigError
            Naming the task, the key, the value, where it was set and what is allowed.
        """
        config = settings()
        if self.__dict__.get("_checked_with") is config:
            return
        check_run_machine(config, SECTION)
        family = self.get_task_family()
        # a subclass's own parameters are its business
        for name in BlockwiseTask.get_param_names(include_significant=True):
            flag = f"--{family}-{name.replace('_', '-')}"
            problem = problem_of(name, getattr(self, name),
                                 f"from {flag}, [{family}], [{SECTION}] or {family}(...)")
            if problem is not None:
                problem = problem.replace(
                    "on the command line",
                    f"on the command line: --{name.replace('_', '-')} / {flag}")
                raise ConfigError(f"{self.task_id}: {problem}")
        if self.launcher != "local":
            # a batch launcher is built without side effects: its resources and (for
            # command) templates and job_id_pattern are checked here, not at submission
            resources = {name: getattr(self, name) for name in RESOURCE_PARAMETERS}
            try:
                make_launcher(self.launcher, resources, config)
            except LauncherError as error:
                raise ConfigError(f"{self.task_id} (launcher = {self.launcher}): "
                                  f"{error}") from None
        self.__dict__["_checked_with"] = config

    def complete(self) -> bool:
        """Whether the record says every block is done and can be trusted, after
        :meth:`check_config`: one ledger query, the other outputs the task declares
        exist, and every blockwise task it reads is complete with the record this one
        was computed from (not one that started afresh since)."""
        self.check_config()
        target = self.ledger_target()
        summary = target.summary()
        if summary is None or summary["done"] < target.geometry["num_blocks"]:
            return False
        if self.stale_reason(summary) is not None:
            return False
        return all(upstream.complete() for upstream in self.blockwise_requires())

    # ------------------------------------------------------------------ the DAG
    def blockwise_requires(self) -> list[BlockwiseTask]:
        """The ``BlockwiseTask``s among this task's requirements."""
        return [task for task in flatten(self.requires()) if isinstance(task, BlockwiseTask)]

    def upstream_closure(self) -> list[BlockwiseTask]:
        """This task and every incomplete blockwise task upstream of it, upstream first.

        Luigi runs a task only once its requirements are complete, so inside a Luigi
        run this is the task alone; called directly, ``run()`` brings its upstream
        blockwise tasks along.
        """
        ordered: list[BlockwiseTask] = []
        seen: set[str] = set()

        def visit(task: BlockwiseTask) -> None:
            if task.task_id in seen:
                return
            seen.add(task.task_id)
            for upstream in task.blockwise_requires():
                if not upstream.complete():
                    visit(upstream)
            ordered.append(task)

        visit(self)
        return ordered

    def _can_start_with(self, members: dict[str, BlockwiseTask]) -> bool:
        """Whether every requirement outside the blockwise tasks in ``members`` is
        complete (a blockwise requirement may join the run itself)."""
        for upstream in flatten(self.requires()):
            if upstream.task_id in members:
                continue
            if isinstance(upstream, BlockwiseTask):
                if not upstream.complete() and not upstream._can_start_with(members):
                    return False
            elif not upstream.complete():
                return False
        return True

    def pipelined_closure(self, downstream: list[BlockwiseTask] = ()) -> list[BlockwiseTask]:
        """The tasks of this task's run, upstream first.

        This task with its incomplete blockwise upstream tasks, plus (with
        ``pipelining``) every task of ``downstream`` (blockwise tasks Luigi would run
        after this one) that reads a task of the run through blockwise edges only and
        whose other requirements are complete, with its own incomplete blockwise
        upstream tasks. Luigi runs those later as no-ops: their blocks ran here, each as
        soon as the blocks it reads were written.
        """
        members = {task.task_id: task for task in self.upstream_closure()}
        if settings().pipelining:
            waiting = [task for task in downstream
                       if task.task_id not in members and not task.complete()]
            grown = True
            while grown:
                grown = False
                for task in list(waiting):
                    reads_member = any(upstream.task_id in members
                                       for upstream in task.blockwise_requires())
                    if reads_member and task._can_start_with(members):
                        for joining in task.upstream_closure():
                            members.setdefault(joining.task_id, joining)
                        waiting.remove(task)
                        grown = True
        ordered: list[BlockwiseTask] = []
        placed: set[str] = set()

        def place(task: BlockwiseTask) -> None:
            if task.task_id in placed:
                return
            placed.add(task.task_id)
            for upstream in task.blockwise_requires():
                if upstream.task_id in members:
                    place(members[upstream.task_id])
            ordered.append(task)

        for task in members.values():
            place(task)
        return ordered

    # ------------------------------------------------------------------ running
    def run(self) -> None:
        """Run this task's pipelined closure; raise with the execution summary if blocks
        of this task failed.

        Prints the tracking URL once, shows a progress bar per task on a terminal and
        prints daisy's execution summary at the end.
        """
        self.check_config()
        config = settings()
        scheduler, luigi_worker = luigi_scheduler_of(self)
        earlier_failure = RunOutcome(self.ledger_file()).failure_for(luigi_worker)
        if earlier_failure is not None and not self.complete():
            # its blocks failed in an upstream task's pipelined run of this command
            raise BlockwiseRunError(earlier_failure)
        downstream = []
        if config.pipelining:
            # a task that failed in an earlier pipelined run of this command is not
            # tried again here: Luigi runs it to report that failure
            downstream = [task for task in scheduled_dependents(scheduler, luigi_worker,
                                                                 self.task_id)
                          if isinstance(task, BlockwiseTask) and RunOutcome(
                              task.ledger_file()).failure_for(luigi_worker) is None]
        closure = [task for task in self.pipelined_closure(downstream)
                   if task.task_id == self.task_id or not task.complete()]
        if self.complete() and len(closure) == 1:
            logger.info("%s: every block is done already", self.task_id)
            return
        for task in closure:
            task.check_config()
        core_tasks: dict[str, Task] = {}
        for task in closure:
            upstream = [core_tasks[other.task_id] for other in task.blockwise_requires()
                        if other.task_id in core_tasks]
            core_tasks[task.task_id] = task.daisy_task(upstream)
        claims = Claims()
        claimed = []
        try:
            for task in closure:
                if claims.claim(task.task_id, task.ledger_file(), task.geometry()):
                    claimed.append(core_tasks[task.task_id])
                    RunOutcome(task.ledger_file()).clear()
                else:
                    logger.info("task %s is being run by another process; following it",
                                task.task_id)
        except BaseException:
            claims.release()
            raise
        followed = claims.followed
        reporter = LuigidReporter(self, closure, scheduler, luigi_worker)
        try:
            ledgers = self._open_ledgers([task for task in closure
                                          if task.task_id not in followed])
            try:
                for task in closure:
                    if task.task_id not in followed:
                        task.check_outputs()
                targets = {task.task_id: BlockwiseTaskTarget.of(task) for task in closure}
                run = WorkerRun(list(core_tasks.values()),
                                launcher_for_closure(closure, config), ledgers,
                                progress=sys.stderr.isatty(), followed=followed,
                                observers=[reporter.report], tracking=True,
                                targets={task_id: target for task_id, target
                                         in targets.items() if target is not None},
                                host=config.host,
                                advertise_host=config.advertise_host or None,
                                worker_death_timeout=config.worker_death_timeout,
                                pending_report_after=config.pending_report_after,
                                prefetch=config.prefetch,
                                total_workers=config.total_workers,
                                pool_policy=config.pool_policy,
                                block_map_host=config.block_map_host)
                result = run_coroutine(run.run)
            finally:
                ledgers.close()
            summary = format_summary(result, run.worker_logs())
            print(summary, flush=True)
            for task in closure:
                if task.task_id != self.task_id and task.task_id not in followed:
                    state = result[task.task_id]
                    RunOutcome(task.ledger_file()).write(
                        luigi_worker, state.succeeded, failure_message(task.task_id, state,
                                                                       summary))
        finally:
            claims.release()
        if not result[self.task_id].succeeded:
            stopped = (f"\nThe run stopped early: {run.failure_report}"
                       if run.failure_report else "")
            raise BlockwiseRunError(failure_message(self.task_id, result[self.task_id],
                                                    summary) + stopped)

    @staticmethod
    def _open_ledgers(tasks: list[BlockwiseTask]) -> LedgerSet:
        """Open the records of ``tasks`` (claimed by this run, upstream first), each
        with its origin; a stale record (:meth:`stale_reason`) starts afresh, with one
        warning that says why."""
        ledgers = LedgerSet({})
        try:
            for task in tasks:
                target = task.ledger_target()
                summary = target.summary()
                reason = task.stale_reason(summary)
                if reason is not None:
                    logger.warning(
                        "%s: its record of done blocks (%s) says %d blocks are done, but "
                        "%s; the task starts afresh and computes every block again",
                        task.task_id, target.path, summary["done"], reason)
                generation = ((summary or {}).get("origin") or {}).get("generation")
                if reason is not None or generation is None:
                    generation = uuid.uuid4().hex
                ledgers.add(task.task_id, Ledger(
                    target.path, task.task_id, task.geometry(), fresh=reason is not None,
                    origin=task.ledger_origin(generation)))
        except BaseException:
            ledgers.close()
            raise
        return ledgers

    def check_outputs(self) -> None:
        """Refuse outputs whose chunks the blocks' write ROIs do not align with."""
        for target in flatten(self.output()):
            if isinstance(target, ZarrTarget) and target.exists():
                grid = BlockGrid(self.total_roi(), self.read_roi(), self.write_roi(), self.fit,
                                 name=self.task_id)
                check_write_alignment(target.open("r"), self.write_roi(), grid.total_write_roi,
                                      self.task_id)
