"""One pool of workers per run: workers serve whichever task the hand-out picks.

The first part drives the hand-out state machine without sockets (the pool's choice of
task, caps, no starvation, and hypothesis for the caps' invariant); the second runs
real pipelines with real worker processes, which report what they did through files
(one file per event), and checks the budget, the caps, exactly once, one set-up per
task per worker, conflicts and block-level dependencies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import luigi_daisy as daisy
from luigi_daisy import Roi
from luigi_daisy.errors import ConfigError
from luigi_daisy.handout import (
    POOL_POLICIES,
    HandOut,
    Reported,
    SendBlocks,
    SendNoMoreBlocks,
    WorkerJoined,
    WorkerLost,
)
from luigi_daisy.pools import POOL, WorkerPlan, plan_workers, pool_sizes
from luigi_daisy.pools import POOL_POLICIES as RUN_POOL_POLICIES
from luigi_daisy.protocol import BlockResult
from luigi_daisy.scheduler import BlockScheduler

SUCCESS = 2
REPO = Path(__file__).resolve().parents[1]
WAIT = 120.0


def chain(num_blocks: int, names: str = "abc", caps: dict | None = None,
          conflicts: bool = False, process_function=None) -> list[daisy.Task]:
    """Tasks ``names[0] -> names[1] -> ...``: block i of each reads block i of the one
    before it."""
    tasks: list[daisy.Task] = []
    for name in names:
        tasks.append(daisy.Task(
            name, total_roi=Roi((0,), (num_blocks,)), read_roi=Roi((0,), (1,)),
            write_roi=Roi((0,), (1,)), read_write_conflict=conflicts,
            process_function=process_function or (lambda block: None),
            num_workers=(caps or {}).get(name, 2), upstream_tasks=tasks[-1:]))
    return tasks


def sent_blocks(instructions) -> list[tuple[str, int]]:
    return [(block.task_id, block.index) for instruction in instructions
            if type(instruction) is SendBlocks for block in instruction.blocks]


def pool_handout(tasks, policy="downstream", done=None) -> HandOut:
    scheduler = BlockScheduler(tasks, done or {})
    return HandOut(scheduler, {POOL: [task.task_id for task in tasks]}, policy)


def join(handout: HandOut, *workers: int) -> None:
    for worker in workers:
        handout.expect_worker(POOL, worker)
        handout.handle(WorkerJoined(worker, POOL, worker), 0.0)


def report(handout: HandOut, worker: int, finished=(), want: int = 1):
    results = tuple(BlockResult(index, SUCCESS, None) for _, index in finished)
    return handout.handle(Reported(worker, results, want), 0.0)


# ---------------------------------------------------------------------- the hand-out
def test_the_run_and_the_hand_out_know_the_same_policies():
    assert RUN_POOL_POLICIES == POOL_POLICIES


def test_a_pool_worker_serves_the_most_downstream_task_with_ready_blocks():
    handout = pool_handout(chain(4))
    join(handout, 0)
    first = sent_blocks(report(handout, 0))
    assert first == [("a", 0)]  # only a has ready blocks
    second = sent_blocks(report(handout, 0, first))
    assert second == [("b", 0)], "b's block 0 became ready and b is downstream of a"
    third = sent_blocks(report(handout, 0, second))
    assert third == [("c", 0)]
    assert sent_blocks(report(handout, 0, third)) == [("a", 1)]


def test_most_ready_serves_the_task_with_the_most_ready_blocks():
    handout = pool_handout(chain(4), policy="most_ready")
    join(handout, 0)
    first = sent_blocks(report(handout, 0))
    second = sent_blocks(report(handout, 0, first))
    assert second == [("a", 1)], "a has 3 ready blocks, b one"


def test_a_task_at_its_cap_is_not_handed_to_another_worker():
    handout = pool_handout(chain(6, "a", caps={"a": 1}))
    join(handout, 0, 1)
    assert sent_blocks(report(handout, 0)) == [("a", 0)]
    assert report(handout, 1) == [], "a's cap is 1 and worker 0 holds its block: parked"
    assert handout.workers_on("a") == 1
    # worker 0 finishes and asks again: it keeps the task (its cap allows the holder)
    assert sent_blocks(report(handout, 0, [("a", 0)])) == [("a", 1)]
    assert handout.waiting[POOL], "worker 1 still waits"
    # worker 0 is lost: its block goes back and worker 1 gets a block of a at once
    instructions = handout.handle(WorkerLost(0), 1.0)
    assert sent_blocks(instructions) == [("a", 1)]
    assert handout.workers_on("a") == 1


def test_a_task_that_others_wait_on_is_not_starved_by_a_more_downstream_one():
    """e (two tasks downstream of done ones) has many ready blocks; a has ready blocks
    and b waits for them. Downstream-first alone would keep every worker on e."""
    upstream = chain(3, "cd")
    e_task = daisy.Task("e", total_roi=Roi((0,), (3,)), read_roi=Roi((0,), (1,)),
                        write_roi=Roi((0,), (1,)), read_write_conflict=False,
                        process_function=lambda block: None, upstream_tasks=[upstream[1]])
    ab = chain(3, "ab")
    scheduler = BlockScheduler([*upstream, e_task, *ab],
                               {"c": [0, 1, 2], "d": [0, 1, 2]})
    handout = HandOut(scheduler, {POOL: ["a", "b", "e"]})
    join(handout, 0, 1)
    assert sent_blocks(report(handout, 0)) == [("a", 0)], "a starves: b waits on it"
    assert sent_blocks(report(handout, 1)) == [("e", 0)], "then the most downstream"


def test_pool_workers_are_told_no_more_blocks_only_when_every_task_of_the_pool_is_done():
    handout = pool_handout(chain(1, "ab"))
    join(handout, 0, 1)
    first = sent_blocks(report(handout, 0))
    assert report(handout, 1) == []  # b waits for a: parked, not dismissed
    after_a = report(handout, 0, first)
    assert sent_blocks(after_a) in ([("b", 0)],), after_a
    # worker 1 was parked; b's only block went to worker 0: worker 1 keeps waiting
    done = report(handout, 0, [("b", 0)])
    assert [type(instruction) for instruction in done].count(SendNoMoreBlocks) == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.booleans()),
                      min_size=1, max_size=120),
       caps=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
       policy=st.sampled_from(POOL_POLICIES))
def test_no_task_is_ever_held_by_more_workers_than_its_cap(steps, caps, policy):
    """Three pool workers ask for 1 to 3 blocks, finish the head of their hand or die,
    in any order: no task is held by more workers than its cap, ``workers_on`` counts
    the hands that hold its blocks, and no block is held twice."""
    tasks = chain(5, "abc", caps=dict(zip("abc", caps)))
    handout = pool_handout(tasks, policy)
    join(handout, 0, 1, 2)
    alive = {0, 1, 2}
    for worker, want, dies in steps:
        if worker not in alive:
            continue
        hand = handout.workers[worker]
        if dies:
            handout.handle(WorkerLost(worker), 0.0)
            alive.discard(worker)
        elif hand.wants == 0:
            finished = [next(iter(hand.hand))] if hand.hand else []
            report(handout, worker, finished, want)
        held = [key for other in handout.workers.values() for key in other.hand]
        assert len(held) == len(set(held)), "a block held by two workers"
        for task_id, cap in zip("abc", caps):
            holders = sum(1 for other in handout.workers.values() if task_id in other.held)
            assert holders == handout.workers_on(task_id) <= cap


# ---------------------------------------------------------------------- the plan
def test_tasks_of_one_launcher_share_a_pool_and_worker_loops_keep_their_own():
    plan = plan_workers(["a", "loop", "b"], lambda task_id: task_id != "loop",
                        lambda task_id: "local")
    assert plan.pools == {POOL: ("a", "b")}
    assert plan.own == ["loop"]
    assert plan.home_of == {"a": POOL, "b": POOL, "loop": "loop"}
    several = plan_workers(["a", "b", "c"], lambda task_id: True,
                           lambda task_id: "gpu" if task_id == "b" else "cpu")
    assert several.pools == {"pool-1": ("a", "c"), "b": ("b",)}, "one task: its own id"


def test_the_budget_is_shared_and_every_home_with_work_gets_a_worker():
    plan = WorkerPlan(pools={POOL: ("a", "b")}, own=["loop"],
                      home_of={"a": POOL, "b": POOL, "loop": "loop"})
    caps = {"a": 4, "b": 2, "loop": 3}
    assert pool_sizes(plan, caps, ["a", "b", "loop"], None) == {POOL: 6, "loop": 3}
    assert pool_sizes(plan, caps, ["a", "b", "loop"], 2) == {POOL: 1, "loop": 1}
    assert sum(pool_sizes(plan, caps, ["a", "b", "loop"], 5).values()) == 5
    assert pool_sizes(plan, caps, ["b"], 8) == {POOL: 2, "loop": 0}


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_a_bad_total_workers_is_refused_before_the_run(value, tmp_path):
    with pytest.raises(ConfigError, match="total_workers"):
        daisy.run_blockwise(chain(1, "a"), total_workers=value, progress=False,
                            log_dir=tmp_path / "logs")


def test_an_unknown_pool_policy_is_refused_before_the_run(tmp_path):
    with pytest.raises(ConfigError, match="pool_policy='busiest'.*downstream"):
        daisy.run_blockwise(chain(1, "a"), pool_policy="busiest", progress=False,
                            log_dir=tmp_path / "logs")


# ---------------------------------------------------------------------- real runs
def record(folder: Path, name: str, text: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.{uuid.uuid4().hex}").write_text(text)


class Recorder:
    """A process function that records each block's task, index, pid and the times it
    started and ended; and, once per worker process, that it was set up."""

    def __init__(self, folder: Path, seconds: float = 0.0) -> None:
        self.folder = folder
        self.seconds = seconds
        self.ready = False

    def __call__(self, block) -> None:
        if not self.ready:
            self.ready = True
            record(self.folder / "setups", block.task_id, str(os.getpid()))
        started = time.time()
        if self.seconds:
            time.sleep(self.seconds)
        record(self.folder / "blocks", f"{block.task_id}_{block.index}",
               f"{os.getpid()} {started} {time.time()}")


def read_blocks(folder: Path) -> dict[tuple[str, int], list[tuple[int, float, float]]]:
    found: dict[tuple[str, int], list[tuple[int, float, float]]] = {}
    for path in (folder / "blocks").iterdir():
        task_id, index = path.name.rsplit(".", 1)[0].rsplit("_", 1)
        pid, started, ended = path.read_text().split()
        found.setdefault((task_id, int(index)), []).append((int(pid), float(started),
                                                            float(ended)))
    return found


def most_at_once(intervals) -> int:
    events = sorted([(start, 1) for start, _ in intervals]
                    + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


@pytest.mark.timeout(180)
def test_three_pipelined_tasks_share_two_workers_and_each_sets_a_task_up_once(tmp_path):
    tasks = chain(12, "abc", caps={"a": 2, "b": 2, "c": 2},
                  process_function=Recorder(tmp_path, 0.02))
    result = daisy.run_blockwise(tasks, total_workers=2, progress=False,
                                 log_dir=tmp_path / "logs")
    assert result.succeeded
    blocks = read_blocks(tmp_path)
    assert sorted(blocks) == [(task, index) for task in "abc" for index in range(12)]
    assert all(len(runs) == 1 for runs in blocks.values()), "every block runs once"
    runs = [run for found in blocks.values() for run in found]
    assert len({pid for pid, _, _ in runs}) <= 2
    assert most_at_once([(start, end) for _, start, end in runs]) <= 2
    setups = [(path.name.split(".")[0], path.read_text())
              for path in (tmp_path / "setups").iterdir()]
    assert len(setups) == len(set(setups)), f"a worker set a task up twice: {setups}"
    # block-level dependencies: block i of b starts after block i of a ended, and so on
    for upstream, downstream in ("ab", "bc"):
        for index in range(12):
            assert blocks[(downstream, index)][0][1] >= blocks[(upstream, index)][0][2]
    assert sorted(path.name for path in (tmp_path / "logs").iterdir()) == [POOL]


@pytest.mark.timeout(180)
def test_a_task_with_a_cap_of_one_never_has_two_workers(tmp_path):
    recorder = Recorder(tmp_path, 0.05)
    capped = daisy.Task("capped", total_roi=Roi((0,), (8,)), read_roi=Roi((0,), (1,)),
                        write_roi=Roi((0,), (1,)), read_write_conflict=False,
                        process_function=recorder, num_workers=1)
    wide = daisy.Task("wide", total_roi=Roi((0,), (8,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)), read_write_conflict=False,
                      process_function=recorder, num_workers=3)
    assert daisy.run_blockwise([capped, wide], total_workers=3, progress=False,
                               log_dir=tmp_path / "logs")
    blocks = read_blocks(tmp_path)
    capped_runs = [(start, end) for (task_id, _), runs in blocks.items()
                   if task_id == "capped" for _, start, end in runs]
    assert len(capped_runs) == 8
    assert most_at_once(capped_runs) == 1
    assert len({pid for runs in blocks.values() for pid, _, _ in runs}) <= 3


@pytest.mark.timeout(180)
def test_conflicting_neighbours_never_run_together_in_a_pool(tmp_path):
    recorder = Recorder(tmp_path, 0.03)
    task = daisy.Task("conflicts", total_roi=Roi((0,), (12,)), read_roi=Roi((0,), (3,)),
                      write_roi=Roi((1,), (1,)), read_write_conflict=True,
                      process_function=recorder, num_workers=3)
    after = daisy.Task("after", total_roi=Roi((1,), (10,)), read_roi=Roi((0,), (1,)),
                       write_roi=Roi((0,), (1,)), read_write_conflict=False,
                       process_function=recorder, num_workers=3, upstream_tasks=[task])
    assert daisy.run_blockwise([after], total_workers=3, progress=False,
                               log_dir=tmp_path / "logs")
    blocks = read_blocks(tmp_path)
    runs = {index: found[0] for (task_id, index), found in blocks.items()
            if task_id == "conflicts"}
    assert len(runs) == 10
    for index in range(9):  # blocks index and index + 1 read each other's writes
        (_, start, end), (_, next_start, next_end) = runs[index], runs[index + 1]
        assert end <= next_start or next_end <= start, f"blocks {index} and {index + 1}"


def worker_loop_script(folder: Path) -> str:
    return textwrap.dedent(f"""
        import os, sys, uuid
        from pathlib import Path
        import luigi_daisy as daisy
        from luigi_daisy import Roi

        FOLDER = Path({str(folder)!r})

        def note(task_id, index):
            target = FOLDER / "blocks"
            target.mkdir(parents=True, exist_ok=True)
            (target / f"{{task_id}}_{{index}}.{{uuid.uuid4().hex}}").write_text(str(os.getpid()))

        def loop():
            client = daisy.Client()
            while True:
                with client.acquire_block() as block:
                    if block is None:
                        break
                    note(block.task_id, block.index)

        def per_block(block):
            note(block.task_id, block.index)

        if __name__ == "__main__":
            own = daisy.Task("loop", total_roi=Roi((0,), (10,)), read_roi=Roi((0,), (1,)),
                             write_roi=Roi((0,), (1,)), read_write_conflict=False,
                             process_function=loop, num_workers=1)
            shared = daisy.Task("shared", total_roi=Roi((0,), (10,)), read_roi=Roi((0,), (1,)),
                                write_roi=Roi((0,), (1,)), read_write_conflict=False,
                                process_function=per_block, num_workers=2)
            other = daisy.Task("other", total_roi=Roi((0,), (10,)), read_roi=Roi((0,), (1,)),
                               write_roi=Roi((0,), (1,)), read_write_conflict=False,
                               process_function=per_block, num_workers=2)
            ok = daisy.run_blockwise([own, shared, other], total_workers=3, progress=False,
                                     log_dir=FOLDER / "logs")
            sys.exit(0 if ok else 1)
    """)


@pytest.mark.timeout(180)
def test_a_worker_loop_without_arguments_keeps_a_worker_of_its_own(tmp_path):
    script = tmp_path / "loops.py"
    script.write_text(worker_loop_script(tmp_path))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run([sys.executable, str(script)], cwd=tmp_path,
                               env=environment, capture_output=True, text=True,
                               timeout=WAIT)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    pids: dict[str, set[int]] = {}
    for path in (tmp_path / "blocks").iterdir():
        task_id = path.name.rsplit(".", 1)[0].rsplit("_", 1)[0]
        pids.setdefault(task_id, set()).add(int(path.read_text()))
    assert len(pids["loop"]) == 1
    assert not pids["loop"] & (pids["shared"] | pids["other"]), \
        "the worker loop's process served only its own task"
    assert len(pids["shared"] | pids["other"]) <= 2
    assert sorted(path.name for path in (tmp_path / "logs").iterdir()) == ["loop", POOL]


# ---------------------------------------------------------------------- Luigi
LUIGI_TASKS = '''
import os
import uuid
from pathlib import Path

import luigi

from luigi_daisy import Roi
from luigi_daisy.luigi import BlockwiseTask

FOLDER = Path(os.environ["POOL_TEST_FOLDER"])


def note(kind, name, text):
    folder = FOLDER / kind
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.{uuid.uuid4().hex}").write_text(text)


class Stage(BlockwiseTask):
    stage = luigi.IntParameter()

    def requires(self):
        return [Stage(stage=self.stage - 1)] if self.stage > 0 else []

    def total_roi(self):
        return Roi((0,), (16,))

    def read_roi(self):
        return Roi((0,), (2,))

    def write_roi(self):
        return Roi((0,), (2,))

    def setup_worker(self):
        note("setups", f"stage{self.stage}", str(os.getpid()))

    def process_block(self, block):
        note("blocks", f"stage{self.stage}_{block.index}", str(os.getpid()))
'''


@pytest.mark.timeout(240)
def test_a_blockwise_pipeline_takes_total_workers_from_luigi_cfg(tmp_path):
    (tmp_path / "pool_tasks.py").write_text(LUIGI_TASKS)
    (tmp_path / "luigi.cfg").write_text(textwrap.dedent(f"""
        [luigi_daisy]
        total_workers = 2
        num_workers = 3
        ledger_dir = {tmp_path / "ledgers"}
        log_dir = {tmp_path / "logs"}
    """))
    environment = dict(os.environ, POOL_TEST_FOLDER=str(tmp_path),
                       LUIGI_CONFIG_PATH=str(tmp_path / "luigi.cfg"),
                       PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO),
                                                   os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run(
        [sys.executable, "-m", "luigi", "--module", "pool_tasks", "Stage", "--stage", "2",
         "--local-scheduler", "--no-lock"], cwd=tmp_path, env=environment,
        capture_output=True, text=True, timeout=WAIT)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert ":)" in completed.stdout + completed.stderr
    block_pids: dict[str, list[int]] = {}
    for path in (tmp_path / "blocks").iterdir():
        block_pids.setdefault(path.name.rsplit(".", 1)[0], []).append(int(path.read_text()))
    assert sorted(block_pids) == sorted(f"stage{stage}_{index}" for stage in range(3)
                                        for index in range(8))
    assert all(len(pids) == 1 for pids in block_pids.values()), "every block runs once"
    assert len({pid for pids in block_pids.values() for pid in pids}) <= 2
    setups = [(path.name.split(".")[0], path.read_text())
              for path in (tmp_path / "setups").iterdir()]
    assert len(setups) == len(set(setups)), f"a worker set a task up twice: {setups}"
