"""Which workers a run starts: pools shared by tasks, and workers of a task's own.

Workers started by the same launcher with the same resources form one *pool*: each
serves whichever task of the pool the hand-out picks (see
:class:`~luigi_daisy.handout.HandOut`), sets a task up the first time it gets a block
of it, and keeps it set up. A task whose process function takes no argument (a worker
loop that makes its own ``Client``) keeps workers of its own.

A run has one budget of workers, ``total_workers``; a task's ``num_workers`` is its
cap: how many workers may hold its blocks at once, and so how many a pool needs for it.
Pure arithmetic: no processes are started here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field

from .errors import ConfigError

#: the id of the pool of a run whose tasks all share one launcher; with several
#: launchers the pools are ``pool-1``, ``pool-2``, ... in the order of their first task.
#: A pool of one task is known by that task's id.
POOL = "pool"


def usable_cpus() -> int:
    """The number of CPUs this process may run on (its affinity, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


#: how a pool worker's next task is chosen (see :class:`~luigi_daisy.handout.HandOut`,
#: which implements them; imported here without it, off a run's start-up path)
POOL_POLICIES = ("downstream", "most_ready")


def check_pool_policy(policy: object, key: str = "pool_policy") -> None:
    """Refuse a pool policy the hand-out does not know."""
    if policy not in POOL_POLICIES:
        raise ConfigError(f"{key}={policy!r} is not a pool policy; use one of "
                          f"{', '.join(map(repr, POOL_POLICIES))}")


def check_total_workers(total_workers: object, key: str = "total_workers") -> None:
    """Refuse a budget that is not a positive whole number (None: the default)."""
    if total_workers is None:
        return
    if isinstance(total_workers, bool) or not isinstance(total_workers, int) \
            or total_workers < 1:
        raise ConfigError(f"{key}={total_workers!r} must be a whole number of workers of "
                          f"at least 1 (or None for the default)")


@dataclass
class WorkerPlan:
    """Where a run's workers belong.

    Attributes
    ----------
    pools:
        Pool id to the tasks its workers serve, in the run's order.
    own:
        Tasks whose workers serve them alone (worker loops).
    home_of:
        Task id to the home of the workers that serve it: its pool's id, or itself.
    """

    pools: dict[str, tuple[str, ...]] = field(default_factory=dict)
    own: list[str] = field(default_factory=list)
    home_of: dict[str, str] = field(default_factory=dict)

    def tasks_of(self, home: str) -> tuple[str, ...]:
        """The tasks the workers of ``home`` serve."""
        return self.pools.get(home, (home,))

    @property
    def homes(self) -> list[str]:
        """Every home: tasks with workers of their own, then the pools."""
        return [*self.own, *self.pools]


def plan_workers(task_ids: Iterable[str], shares_workers: Callable[[str], bool],
                 launcher_key: Callable[[str], Hashable]) -> WorkerPlan:
    """Group the tasks into pools by launcher; tasks for which ``shares_workers`` is
    False keep workers of their own."""
    plan = WorkerPlan()
    groups: dict[Hashable, list[str]] = {}
    for task_id in task_ids:
        if shares_workers(task_id):
            groups.setdefault(launcher_key(task_id), []).append(task_id)
        else:
            plan.own.append(task_id)
            plan.home_of[task_id] = task_id
    for number, tasks in enumerate(groups.values(), start=1):
        if len(tasks) == 1:  # a pool of one task is known by the task's id (its logs too)
            pool_id = tasks[0]
        else:
            pool_id = POOL if len(groups) == 1 else f"{POOL}-{number}"
            while pool_id in groups_of_tasks(groups):  # a task named like a pool
                pool_id = f"{pool_id}-"
        plan.pools[pool_id] = tuple(tasks)
        for task_id in tasks:
            plan.home_of[task_id] = pool_id
    return plan


def groups_of_tasks(groups: Mapping[Hashable, list[str]]) -> set[str]:
    """Every task id of the groups."""
    return {task_id for tasks in groups.values() for task_id in tasks}


def pool_sizes(plan: WorkerPlan, caps: Mapping[str, int], active: Iterable[str],
               total_workers: int | None) -> dict[str, int]:
    """How many workers each home needs now.

    ``active`` are the tasks with blocks to do (not done, not followed). A task with
    workers of its own gets its cap; each pool gets the sum of its active tasks' caps,
    all within ``total_workers`` (None: no budget) shared in proportion to those sums,
    and at least one worker for a home with an active task.
    """
    active = set(active)
    wanted = {home: sum(caps[task_id] for task_id in plan.tasks_of(home)
                        if task_id in active)
              for home in plan.homes}
    if total_workers is None:
        return wanted
    sizes = {home: min(count, 1) for home, count in wanted.items()}
    budget = total_workers - sum(sizes.values())
    # hand out the rest one worker at a time, to the home furthest below its wish
    while budget > 0:
        short = [home for home in wanted if sizes[home] < wanted[home]]
        if not short:
            break
        home = min(short, key=lambda other: (sizes[other] / wanted[other], other))
        sizes[home] += 1
        budget -= 1
    return sizes
