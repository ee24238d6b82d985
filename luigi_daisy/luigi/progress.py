"""What a pipelined run tells its user: luigid's task hooks, the terminal, the summary.

The task whose ``run()`` drives the run reports with its own hooks (progress percentage,
status message, tracking URL). The other tasks of the run are ordinary nodes of Luigi's
DAG that Luigi will run (as a no-op) once their upstream task is DONE; until then they
are PENDING in luigid, and the run sets their progress and status message through the
same scheduler connection, so luigid shows how far their blocks are.
"""

from __future__ import annotations

import html
import logging
import sys
from collections.abc import Mapping

from ..run import WorkerRun
from ..scheduler import TaskState
from ..summary import error_line
from ..tracking import run_state

logger = logging.getLogger(__name__)

#: failed blocks named in a status message
LISTED_FAILURES = 5


def progress_percentage(state: TaskState) -> int:
    """Share of a task's blocks that completed (failed and orphaned blocks are not)."""
    if not state.total_block_count:
        return 100
    return int(100 * state.completed_count / state.total_block_count)


def luigid_text(text: str) -> str:
    """``text`` as luigid's page must receive it: that page puts a task's status message
    into the page with jQuery's ``.html()`` every 500 ms, so markup in an error line
    would run there. (The tracking URL and the progress go through templates that
    escape, or are numbers: they are sent as they are.)"""
    return html.escape(text, quote=False)


def status_line(task_id: str, task: Mapping) -> str:
    """``task: done/total blocks done, failed, rate, workers`` for a status message."""
    workers = task.get("workers")
    on_it = "" if workers is None else f", {workers} worker{'s' if workers != 1 else ''} now"
    return (f"{task_id}: {task['completed']}/{task['total']} blocks done "
            f"({task['skipped']} skipped), {task['failed']} failed, "
            f"{task['orphaned']} orphaned, {task['blocks_per_second']} blocks/s{on_it}")


def failure_lines(state: TaskState, logs: list[str]) -> list[str]:
    """The failed blocks of a task with their error lines, and where the rest is."""
    lines = []
    if getattr(state, "stop_reason", None):
        lines.append(f"  stopped: {error_line(state.stop_reason)}")
    for index, error in sorted(state.failed_blocks.items())[:LISTED_FAILURES]:
        lines.append(f"  block {index}: {error_line(error)}")
    hidden = len(state.failed_blocks) - LISTED_FAILURES
    if hidden > 0:
        lines.append(f"  ... and {hidden} more failed blocks")
    if logs:
        lines.append(f"  worker logs: {', '.join(logs)}")
    return lines


class LuigidReporter:
    """Reports a pipelined run to luigid and to the terminal.

    Parameters
    ----------
    task:
        The Luigi task whose ``run()`` drives the pipelined run.
    closure:
        Every Luigi task of the run, ``task`` included.
    scheduler:
        Luigi's scheduler connection (None outside a Luigi run).
    """

    def __init__(self, task, closure, scheduler=None, luigi_worker: str | None = None) -> None:
        self.task = task
        self.others = [other for other in closure if other.task_id != task.task_id]
        self.scheduler = scheduler
        self.luigi_worker = luigi_worker
        self.tracking_url: str | None = None

    def _message(self, task_id: str, counts: Mapping, state: TaskState,
                 logs: list[str]) -> str:
        lines = [status_line(task_id, counts)]
        if task_id != self.task.task_id:
            lines.append(f"  (its blocks run in the pipelined run of {self.task.task_id})")
        if self.tracking_url:
            lines.append(f"  live: {self.tracking_url}")
        return "\n".join(lines + failure_lines(state, logs))

    def _link_others(self, run: WorkerRun) -> None:
        """Give the other tasks of the run (PENDING in Luigi) the run's tracking URL, as
        the worker that scheduled them would: same status, same retry policy."""
        if self.scheduler is None or self.luigi_worker is None:
            return
        from luigi.worker import _get_retry_policy_dict

        for other in self.others:
            if other.task_id in run.followed:
                continue
            try:
                self.scheduler.add_task(
                    task_id=other.task_id, status="PENDING", runnable=True,
                    worker=self.luigi_worker, tracking_url=self.tracking_url,
                    family=other.get_task_family(), module=other.task_module,
                    params=other.to_str_params(),
                    param_visibilities=other._get_param_visibilities(),
                    priority=other.priority, resources=other.process_resources(),
                    retry_policy_dict=_get_retry_policy_dict(other))
            except Exception:
                logger.exception("could not report %s to the Luigi scheduler", other.task_id)

    def report(self, run: WorkerRun) -> None:
        """Send the current counters of every task of the run."""
        if self.tracking_url is None and run.tracking is not None and run.tracking.url:
            self.tracking_url = run.tracking.url
            print(f"luigi_daisy: follow {', '.join(run.tasks)} at {self.tracking_url}",
                  file=sys.stderr, flush=True)
            if self.task.set_tracking_url is not None:
                self.task.set_tracking_url(self.tracking_url)
            self._link_others(run)
        tasks = run_state(run)["tasks"]
        logs = run.worker_logs() if run.server is not None else {}
        states = run.scheduler.task_states
        own = self.task.task_id
        if self.task.set_progress_percentage is not None:
            self.task.set_progress_percentage(progress_percentage(states[own]))
        if self.task.set_status_message is not None:
            self.task.set_status_message(luigid_text("\n".join(
                self._message(task_id, tasks[task_id], states[task_id], logs.get(task_id, []))
                for task_id in tasks)))
        if self.scheduler is None:
            return
        for other in self.others:
            if other.task_id in run.followed:
                continue  # the run that claimed it reports it
            try:
                self.scheduler.set_task_progress_percentage(
                    other.task_id, progress_percentage(states[other.task_id]))
                self.scheduler.set_task_status_message(other.task_id, luigid_text(
                    self._message(other.task_id, tasks[other.task_id],
                                  states[other.task_id], logs.get(other.task_id, []))))
            except Exception:
                logger.exception("could not report %s to the Luigi scheduler", other.task_id)
