"""Progress of a pipelined run, reported to luigid through Luigi's task hooks.

The task whose ``run()`` drives the run reports with its own hooks (progress percentage,
status message, tracking URL). Upstream tasks pulled into the run are hidden from
Luigi's DAG (see ``BlockwiseTask.deps``); they are reported through the same scheduler
connection the hooks use, so luigid shows them running with their progress and done
when their blocks are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from luigi.scheduler import DONE, FAILED, RUNNING

from ..run import WorkerRun
from ..scheduler import TaskState
from ..tracking import run_state

logger = logging.getLogger(__name__)


def progress_percentage(state: TaskState) -> int:
    """Share of a task's blocks that are finished (done, skipped, failed or orphaned)."""
    if not state.total_block_count:
        return 100
    finished = state.completed_count + state.failed_count + state.orphaned_count
    return int(100 * finished / state.total_block_count)


def status_line(task_id: str, task: Mapping) -> str:
    """``task: done/total blocks done, failed, rate`` for a status message."""
    return (f"{task_id}: {task['completed']}/{task['total']} blocks done "
            f"({task['skipped']} skipped), {task['failed']} failed, "
            f"{task['orphaned']} orphaned, {task['blocks_per_second']} blocks/s")


class LuigidReporter:
    """Reports a pipelined run to luigid.

    Parameters
    ----------
    task:
        The Luigi task whose ``run()`` drives the pipelined run.
    closure:
        Every Luigi task of the run, ``task`` included.
    """

    def __init__(self, task, closure) -> None:
        self.task = task
        self.hidden = [other for other in closure if other.task_id != task.task_id]
        self.tracking_url_sent = False
        self.tracking_url: str | None = None
        #: hidden tasks this run processes (not those it follows): it reports those
        self.claimed: set[str] = set()
        self.hidden_started: set[str] = set()

    def _scheduler(self):
        """The scheduler connection behind Luigi's hooks, and this worker's id."""
        reporter = getattr(self.task.set_status_message, "__self__", None)
        scheduler = getattr(reporter, "_scheduler", None)
        return scheduler, getattr(reporter, "_worker_id", None)

    def report(self, run: WorkerRun) -> None:
        """Send the current counters of every task of the run."""
        state = run_state(run)
        tasks = state["tasks"]
        message = "\n".join(status_line(task_id, counts) for task_id, counts in tasks.items())
        own = run.scheduler.task_states[self.task.task_id]
        if self.task.set_progress_percentage is not None:
            self.task.set_progress_percentage(progress_percentage(own))
        if self.task.set_status_message is not None:
            self.task.set_status_message(message)
        if (not self.tracking_url_sent and run.tracking is not None
                and run.tracking.url is not None and self.task.set_tracking_url is not None):
            self.task.set_tracking_url(run.tracking.url)
            self.tracking_url_sent = True
        scheduler, worker_id = self._scheduler()
        if scheduler is None:
            return
        self.tracking_url = run.tracking.url if run.tracking is not None else None
        self.claimed = {task.task_id for task in self.hidden if task.task_id not in run.followed}
        for hidden in self.hidden:
            if hidden.task_id not in self.claimed:
                continue  # the run that claimed it reports it
            task_state = run.scheduler.task_states[hidden.task_id]
            try:
                if hidden.task_id not in self.hidden_started:
                    self._announce(scheduler, worker_id, hidden, RUNNING, self.tracking_url)
                    self.hidden_started.add(hidden.task_id)
                scheduler.set_task_progress_percentage(hidden.task_id,
                                                       progress_percentage(task_state))
                scheduler.set_task_status_message(
                    hidden.task_id, status_line(hidden.task_id, tasks[hidden.task_id]))
            except Exception:  # noqa: BLE001 - reporting must never stop the run
                logger.exception("could not report %s to the Luigi scheduler", hidden.task_id)

    def finish(self, result: Mapping[str, TaskState]) -> None:
        """Mark the hidden tasks this run processed as done (or failed) in luigid."""
        scheduler, worker_id = self._scheduler()
        if scheduler is None:
            return
        for hidden in self.hidden:
            if hidden.task_id not in self.claimed:
                continue
            state = result[hidden.task_id]
            try:
                self._announce(scheduler, worker_id, hidden,
                               DONE if state.succeeded else FAILED, self.tracking_url)
                scheduler.set_task_progress_percentage(hidden.task_id,
                                                       progress_percentage(state))
            except Exception:  # noqa: BLE001
                logger.exception("could not report %s to the Luigi scheduler", hidden.task_id)

    @staticmethod
    def _announce(scheduler, worker_id, task, status: str, tracking_url: str | None) -> None:
        scheduler.add_task(
            task_id=task.task_id, status=status, runnable=False, worker=worker_id,
            family=task.get_task_family(), module=task.task_module,
            params=task.to_str_params(), param_visibilities=task._get_param_visibilities(),
            priority=task.priority, tracking_url=tracking_url)
