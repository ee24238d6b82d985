"""Pipelined runs of chained blockwise tasks inside a Luigi DAG.

Luigi's DAG is the one ``requires()`` gives, so Luigi starts a blockwise task once its
upstream tasks are complete, and every task shows in luigid's graph and in Luigi's
execution summary. Its ``run()`` runs its *pipelined closure* in one scheduler with
block-level dependencies: itself, plus the blockwise tasks that Luigi scheduled after it
on this worker (asked from Luigi's scheduler, :func:`scheduled_dependents`) and that read
it through blockwise edges only. Their blocks start as soon as the blocks they read are
written; Luigi runs those tasks afterwards, as no-ops, or to report the failure their
blocks met (:class:`RunOutcome`).

Each task of the closure is claimed with an exclusive OS file lock next to its ledger; a
task claimed by another live run (another Luigi worker process, another ``luigi``
command) is followed through its ledger instead, and taken over when that run's lock
frees. The lock and the follower (:mod:`luigi_daisy.claims`) are the same that
``run_blockwise`` takes, so a Luigi run and a script's run of one task coordinate too.
"""

from __future__ import annotations

import logging
from pathlib import Path

# the claims live with the ledger (run_blockwise takes them too); re-exported here
from ..claims import LedgerFollower, TaskLock  # noqa: F401
from ..errors import UnsafePathError
from ..safe_files import read_own, replace_file

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- Luigi's side
def luigi_scheduler_of(task) -> tuple[object | None, str | None]:
    """The Luigi scheduler connection running ``task`` and the Luigi worker's id.

    Luigi hands a running task its status hooks (``set_status_message``, ...), bound to
    a reporter that holds both; outside a Luigi run there is neither.
    """
    reporter = getattr(getattr(task, "set_status_message", None), "__self__", None)
    return getattr(reporter, "_scheduler", None), getattr(reporter, "_worker_id", None)


def scheduled_dependents(scheduler, worker_id: str | None, task_id: str) -> list:
    """Tasks that depend on ``task_id`` (directly or not) and that Luigi will run later
    on this worker: PENDING in Luigi's scheduler with this worker able to run them.

    They are rebuilt from their family and parameters (the tasks of this process's
    Luigi DAG; a family not imported here is skipped).
    """
    import luigi.task_register

    if scheduler is None or worker_id is None:
        return []
    try:
        graph = scheduler.inverse_dep_graph(task_id=task_id, include_done=False)
    except Exception:
        logger.exception("could not ask the Luigi scheduler for the tasks after %s", task_id)
        return []
    dependents = []
    for dependent_id, node in (graph or {}).items():
        if dependent_id == task_id or node.get("status") != "PENDING":
            continue
        if worker_id not in (node.get("workers") or ()):
            continue
        try:
            family = luigi.task_register.Register.get_task_cls(node["name"])
            dependent = family.from_str_params(node.get("params") or {})
        except Exception:  # noqa: BLE001 - not a task this process can rebuild
            continue
        if dependent.task_id == dependent_id:
            dependents.append(dependent)
    return dependents


class RunOutcome:
    """How a blockwise task ended in the pipelined run of another task.

    Luigi runs a task whose blocks were processed in an upstream task's pipelined run
    later (its upstream task must be DONE first). If they failed there, that later
    ``run()`` reports the same failure instead of processing the failed blocks again
    within the same ``luigi`` command (one message, not one per attempt). The record
    is a small JSON file beside the task's ledger, keyed by the Luigi worker id.
    """

    def __init__(self, ledger_file: Path) -> None:
        self.path = Path(f"{ledger_file}.outcome.json")

    def write(self, worker_id: str | None, succeeded: bool, message: str) -> None:
        """Record the outcome (atomically: a fresh temporary file beside it, renamed)."""
        import json

        replace_file(self.path, json.dumps({"luigi_worker": worker_id,
                                            "succeeded": succeeded,
                                            "message": message}).encode())

    def failure_for(self, worker_id: str | None) -> str | None:
        """The failure message recorded by this Luigi worker, if there is one."""
        import json

        if worker_id is None:
            return None
        try:
            text = read_own(self.path, "pipelined run's outcome")
            if text is None:
                return None
            record = json.loads(text)
        except (OSError, ValueError, UnsafePathError):
            return None
        if record.get("luigi_worker") != worker_id or record.get("succeeded"):
            return None
        return record.get("message")

    def clear(self) -> None:
        """Forget the outcome (a new run of the task starts)."""
        self.path.unlink(missing_ok=True)
