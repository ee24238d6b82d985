"""Progress bars: one tqdm bar per task with completed / failed / orphaned counts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from .scheduler import TaskState


class ProgressBars:
    """One bar per task, refreshed from the tasks' ``TaskState`` counters.

    Parameters
    ----------
    states:
        The run's task states, in the order the bars should appear.
    enabled:
        False draws nothing (the counters are still read by whoever asks).
    file:
        Where the bars are drawn (tqdm's default, standard error, when None).
    """

    def __init__(self, states: Mapping[str, TaskState], enabled: bool = True,
                 file: TextIO | None = None) -> None:
        self.states = states
        self.bars = {}
        if not enabled:
            return
        from tqdm import tqdm  # here: a run without bars starts without it

        # tqdm's monitor thread would be running when worker processes are forked
        tqdm.monitor_interval = 0
        for position, (task_id, state) in enumerate(states.items()):
            self.bars[task_id] = tqdm(
                total=state.total_block_count, desc=task_id, unit="blocks",
                position=position, leave=True, dynamic_ncols=True, mininterval=0.2,
                file=file)

    def update(self) -> None:
        """Bring every bar up to its task's counters."""
        for task_id, bar in self.bars.items():
            state = self.states[task_id]
            finished = state.completed_count + state.failed_count + state.orphaned_count
            if finished != bar.n:
                # the counters first: update() draws the bar, with the postfix set here
                bar.set_postfix(
                    {"done": state.completed_count, "skipped": state.skipped_count,
                     "failed": state.failed_count, "orphaned": state.orphaned_count},
                    refresh=False)
                bar.update(finished - bar.n)

    def close(self) -> None:
        """Draw the final counts and release the terminal."""
        self.update()
        for bar in self.bars.values():
            bar.refresh()
            bar.close()
