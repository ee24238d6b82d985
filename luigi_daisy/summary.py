"""The execution summary printed at the end of a run, in daisy's words."""

from __future__ import annotations

from collections.abc import Mapping

from .scheduler import TaskState

#: at most this many failed blocks are listed per task
MAX_LISTED_FAILURES = 20


class RunResult(dict):
    """Mapping ``task_id -> TaskState`` returned by ``run_blockwise``.

    Its truth value is True exactly when every block of every task succeeded, so both
    ``if run_blockwise(tasks):`` and ``result["task"].failed_count`` work.
    """

    def __bool__(self) -> bool:
        return all(state.succeeded for state in self.values())

    @property
    def succeeded(self) -> bool:
        """True when every block of every task succeeded."""
        return bool(self)


#: how a recorded failure names the worker log that holds the rest of its output
LOG_PREFIX = "[worker log: "


def with_log(error: str | None, log: str | None) -> str | None:
    """``error`` as a record keeps it: followed by the worker log that holds the rest
    (:func:`split_log` takes it apart again)."""
    if log is None:
        return error
    return f"{(error or '').rstrip()}\n{LOG_PREFIX}{log}]"


def split_log(text: str | None) -> tuple[str | None, str | None]:
    """``(error, log)`` of a recorded failure (``log`` None when none was recorded)."""
    if not text:
        return text, None
    head, newline, last = text.rstrip().rpartition("\n")
    if last.startswith(LOG_PREFIX) and last.endswith("]"):
        return (head if newline else ""), last[len(LOG_PREFIX):-1]
    return text, None


def error_line(text: str | None) -> str:
    """The line that says what went wrong: the last one of a traceback."""
    text = split_log(text)[0]
    if not text:
        return "(no error text)"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no error text)"


_error_line = error_line


def format_summary(states: Mapping[str, TaskState],
                   worker_logs: Mapping[str, list[str]] | None = None) -> str:
    """daisy's execution summary: per task, blocks done, skipped, failed and orphaned.

    ``worker_logs`` maps a task id to the log files that hold its workers' tracebacks.
    """
    lines = ["", "Execution Summary", "-----------------", ""]
    for task_id, state in states.items():
        lines += [
            f"  Task {task_id}:",
            "",
            f"    num blocks : {state.total_block_count}",
            f"    completed ✔: {state.completed_count} (skipped {state.skipped_count})",
            f"    failed    ✗: {state.failed_count}",
            f"    orphaned  ∅: {state.orphaned_count}",
            "",
        ]
        if state.succeeded:
            lines += ["    all blocks processed successfully", ""]
            continue
        stop_reason = getattr(state, "stop_reason", None)
        if stop_reason:
            lines.append(f"    stopped: {error_line(stop_reason)}")
        if state.failed_blocks:
            lines.append("    failed blocks (block id: last error):")
            for number, error in sorted(state.failed_blocks.items())[:MAX_LISTED_FAILURES]:
                lines.append(f"      {number}: {error_line(error)}")
            hidden = len(state.failed_blocks) - MAX_LISTED_FAILURES
            if hidden > 0:
                lines.append(f"      ... and {hidden} more")
        logs = (worker_logs or {}).get(task_id)
        if logs:
            lines.append("    tracebacks are in the worker logs:")
            lines += [f"      {path}" for path in logs]
        not_run = (state.total_block_count - state.completed_count - state.failed_count
                   - state.orphaned_count)
        if not_run > 0:
            lines.append(f"    {not_run} blocks were never run")
        if stop_reason and state.failed_blocks:
            lines += ["    the task was stopped after its first failure, which every block "
                      "would repeat; fix that error before running it again", ""]
        else:
            lines += ["    some blocks failed or were orphaned", ""]
    return "\n".join(lines)
