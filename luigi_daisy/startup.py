"""What a run says about its workers' start: once how many were submitted, once how many
connected, and which jobs wait in the queue too long (with the batch system's reason)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class StartupReport:
    """Logs the start of a run's workers without repeating itself.

    Parameters
    ----------
    launcher:
        The run's launcher; one with ``pending_jobs(longer_than)`` (the batch
        launchers) gets its long-pending jobs reported.
    server:
        The block server (its ``connected_workers``).
    workers:
        The run's started workers per home (a pool, or a task with workers of its own).
    pending_report_after:
        Seconds after which pending jobs are reported, and after which the connected
        count is logged even if not every worker has connected.
    tasks:
        How many tasks the workers serve (default: the homes with workers).
    """

    def __init__(self, launcher, server, workers: Mapping[str, list],
                 pending_report_after: float, tasks: int | None = None) -> None:
        self.launcher = launcher
        self.server = server
        self.pending_report_after = pending_report_after
        self.started_at = time.monotonic()
        self.started = sum(len(handles) for handles in workers.values())
        self.connected_logged = self.started == 0
        self.most_connected = 0
        self.reported_pending: set[str] = set()
        self.name = getattr(launcher, "name", type(launcher).__name__)
        self.tasks_started = (tasks if tasks is not None
                              else sum(1 for handles in workers.values() if handles))
        self.handles = [handle for handles in workers.values() for handle in handles]
        # a batch job's id arrives when its submission returned (off the loop): the
        # line waits for the ids, so that it can name them
        self.started_logged = not self.started
        self._log_started(final=False)

    def _log_started(self, final: bool) -> None:
        """Log how many workers started, with their job ids, once every submission
        returned (``final``: now, with the ids known so far)."""
        if self.started_logged:
            return
        if not final and any(getattr(handle, "job_id", "") is None
                             and handle.exit_code() is None for handle in self.handles):
            return  # a submission has not returned yet
        self.started_logged = True
        ids = [handle.job_id for handle in self.handles
               if getattr(handle, "job_id", None) is not None]
        id_text = f" (job ids {ids[0]} to {ids[-1]})" if ids else ""
        logger.info("started %d workers for %d tasks with the %s launcher%s",
                    self.started, self.tasks_started, self.name, id_text)

    def update(self, now: float) -> None:
        """Log the started workers and the connected count once, and pending jobs
        once each."""
        self._log_started(final=False)
        waited = now - self.started_at
        if not self.connected_logged:
            connected = len(self.server.connected_workers)
            self.most_connected = max(self.most_connected, connected)
            if connected >= self.started or waited >= self.pending_report_after:
                self._log_connected(connected, waited)
        pending_jobs = getattr(self.launcher, "pending_jobs", None)
        if pending_jobs is None:
            return
        fresh = [job for job in pending_jobs(self.pending_report_after)
                 if job.job_id not in self.reported_pending]
        if fresh:
            self.reported_pending.update(job.job_id for job in fresh)
            logger.warning(
                "%d worker jobs still pending after %g s: %s", len(fresh),
                self.pending_report_after,
                ", ".join(f"{job.job_id} ({job.job_name}: {job.reason or 'no reason given'})"
                          for job in fresh[:20]) + (" ..." if len(fresh) > 20 else ""))

    def finish(self) -> None:
        """Log the started workers and the connected count now if the run ended before
        they were logged."""
        self._log_started(final=True)
        if not self.connected_logged:
            self._log_connected(self.most_connected, time.monotonic() - self.started_at)

    def _log_connected(self, connected: int, waited: float) -> None:
        self.connected_logged = True
        logger.info("%d of %d workers connected %.1f s after the start", connected,
                    self.started, waited)
