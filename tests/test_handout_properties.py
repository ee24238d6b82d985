"""The hand-out state machine without sockets: hypothesis drives random workers (batch
sizes, requests, results, failures, deaths, goodbyes, hangs past the timeout, check
functions) against a model of what each worker is doing, and checks the exactly-once
rules after every event:

- a block whose function returned (and whose post check, if any, passed) is never
  handed out again, and is recorded done exactly once;
- a block is charged a retry only when it failed, or when its worker died or was
  stopped while it was running (the head of its hand), never for a block in hand;
- no block is held by two workers, or by a worker and a check, at once;
- at the end every block is done, failed for good after its retries, or orphaned.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import luigi_daisy as daisy
from luigi_daisy import Roi
from luigi_daisy.errors import ProtocolError
from luigi_daisy.handout import (
    BlocksBecameReady,
    HandOut,
    PostCheckAnswered,
    PreCheckAnswered,
    RecordDone,
    RecordFailed,
    Reported,
    RunPostCheck,
    RunPreCheck,
    SendBlocks,
    SendNoMoreBlocks,
    StopWorker,
    Tick,
    Warn,
    WorkerCannotWork,
    WorkerJoined,
    WorkerLeft,
    WorkerLost,
)
from luigi_daisy.protocol import BlockResult
from luigi_daisy.scheduler import BlockScheduler

SUCCESS, FAILED = 2, 3
TIMEOUT = 10.0
TASK = "t"


def make_task(num_blocks: int, conflicts: bool, max_retries: int, pre: bool,
              post: bool) -> daisy.Task:
    never_called = lambda block: True  # noqa: E731 - the test answers every check itself
    check = (never_called if pre else None, never_called if post else None)
    if conflicts:  # each block reads its neighbours' writes
        geometry = dict(total_roi=Roi((0,), (num_blocks + 2,)), read_roi=Roi((0,), (3,)),
                        write_roi=Roi((1,), (1,)), read_write_conflict=True)
    else:
        geometry = dict(total_roi=Roi((0,), (num_blocks,)), read_roi=Roi((0,), (1,)),
                        write_roi=Roi((0,), (1,)), read_write_conflict=False)
    return daisy.Task(TASK, process_function=lambda block: None, max_retries=max_retries,
                      timeout=TIMEOUT, check_function=check if pre or post else None,
                      **geometry)


class Model:
    """What the simulated workers and the checks are doing, and what happened."""

    def __init__(self, handout: HandOut, max_retries: int) -> None:
        self.handout = handout
        self.max_retries = max_retries
        self.now = 0.0
        self.next_key = 0
        #: key -> {"hand": [indices, in order], "wants": n, "since": head start}
        self.workers: dict[int, dict] = {}
        self.pre_checks: list = []
        self.post_checks: list = []
        self.charges: Counter = Counter()
        self.accepted: set[int] = set()   # function returned and checks passed
        self.done: Counter = Counter()
        self.failed: Counter = Counter()
        #: workers whose running block is past the timeout at the current tick
        self.overdue: set[int] = set()

    # --------------------------------------------------------------- driving
    def feed(self, event) -> None:
        self.carry_out(self.handout.handle(event, self.now))
        self.check_invariants()

    def carry_out(self, instructions) -> None:
        for instruction in instructions:
            kind = type(instruction)
            if kind is SendBlocks:
                worker = self.workers[instruction.worker]
                assert 0 < len(instruction.blocks) <= worker["wants"], (
                    "blocks only to a worker that asked, at most what it asked for")
                if not worker["hand"]:
                    worker["since"] = self.now
                for block in instruction.blocks:
                    assert block.index not in self.accepted, "a finished block handed out again"
                    assert self.done[block.index] == 0 and self.failed[block.index] == 0
                    assert not any(block.index in other["hand"]
                                   for other in self.workers.values()), "held twice"
                    worker["hand"].append(block.index)
                worker["wants"] = 0
            elif kind is SendNoMoreBlocks:
                if instruction.worker in self.workers:
                    self.workers[instruction.worker]["wants"] = 0
            elif kind is RecordDone:
                self.done[instruction.index] += 1
                assert self.done[instruction.index] == 1, "recorded done twice"
            elif kind is RecordFailed:
                self.failed[instruction.index] += 1
                assert self.failed[instruction.index] == 1
                assert self.charges[instruction.index] == self.max_retries + 1, (
                    "failed for good before its retries were spent")
            elif kind is StopWorker:
                assert instruction.worker in self.overdue, "stopped a worker within time"
                self.overdue.remove(instruction.worker)
                self.workers.pop(instruction.worker)
                # the server closes the connection: the loss then changes nothing
                assert self.handout.handle(WorkerLost(instruction.worker), self.now) == []
            elif kind is RunPreCheck:
                self.pre_checks.append(instruction.block)
            elif kind is RunPostCheck:
                self.post_checks.append(instruction.block)
            else:
                assert kind is Warn

    def check_invariants(self) -> None:
        handout = self.handout
        progress = handout.scheduler._progress[TASK]
        assert not self.overdue, f"workers past the timeout not stopped: {self.overdue}"
        held = [index for worker in self.workers.values() for index in worker["hand"]]
        checking = [block.index for block in self.pre_checks + self.post_checks]
        checked = [block.index for block in handout.checked[TASK]]
        in_flight = held + checking + checked
        assert len(in_flight) == len(set(in_flight)), "a block in two places at once"
        assert sorted(progress.processing) == sorted(in_flight)
        for index, charged in self.charges.items():
            if not self.failed[index] and not self.done[index]:
                assert progress.retries.get(index, 0) == charged, (
                    f"block {index}: charged {progress.retries.get(index, 0)} times, "
                    f"failed or was running when its worker died {charged} times")
        for index, retries in progress.retries.items():
            assert self.charges[index] == retries, f"block {index} charged while in hand"

    # --------------------------------------------------------------- worker acts
    def join(self) -> None:
        key = self.next_key
        self.next_key += 1
        self.handout.expect_worker(TASK, key)
        self.workers[key] = {"hand": [], "wants": 0, "since": 0.0}
        self.feed(WorkerJoined(key, TASK, key))

    def request(self, key: int, want: int) -> None:
        self.workers[key]["wants"] = want
        self.feed(Reported(key, (), want))

    def finish_head(self, key: int, succeeded: bool, want: int) -> None:
        worker = self.workers[key]
        index = worker["hand"].pop(0)
        worker["since"] = self.now
        if succeeded:
            if not self.handout._post_checked[TASK]:
                self.accepted.add(index)
        else:
            self.charges[index] += 1
        if want:
            worker["wants"] = want
        self.feed(Reported(key, (BlockResult(index, SUCCESS if succeeded else FAILED),), want))

    def die(self, key: int) -> None:
        worker = self.workers.pop(key)
        if worker["hand"]:
            self.charges[worker["hand"][0]] += 1  # it was running
        self.feed(WorkerLost(key))

    def leave(self, key: int) -> None:
        self.workers.pop(key)  # between blocks: nothing in its hand was started
        self.feed(WorkerLeft(key))

    def answer_pre_check(self, position: int, done: bool) -> None:
        block = self.pre_checks.pop(position)
        if done:
            self.accepted.add(block.index)
        self.feed(PreCheckAnswered(block, done))

    def answer_post_check(self, position: int, passed: bool) -> None:
        block = self.post_checks.pop(position)
        if passed:
            self.accepted.add(block.index)
        else:
            self.charges[block.index] += 1
        self.feed(PostCheckAnswered(block, 0, None if passed else "post check returned False"))

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for key, worker in self.workers.items():
            if worker["hand"] and self.now - worker["since"] > TIMEOUT:
                self.overdue.add(key)
                self.charges[worker["hand"][0]] += 1  # it was running, too long
        self.feed(Tick())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_workers_do_each_block_exactly_once(data):
    num_blocks = data.draw(st.integers(1, 12), label="blocks")
    max_retries = data.draw(st.integers(1, 3), label="max_retries")
    conflicts = data.draw(st.booleans(), label="conflicts")
    pre, post = data.draw(st.booleans(), label="pre check"), data.draw(st.booleans(),
                                                                        label="post check")
    scheduler = BlockScheduler([make_task(num_blocks, conflicts, max_retries, pre, post)])
    model = Model(HandOut(scheduler), max_retries)
    for _ in range(data.draw(st.integers(0, 80), label="steps")):
        idle = [key for key, worker in model.workers.items() if not worker["wants"]]
        busy = [key for key, worker in model.workers.items() if worker["hand"]]
        action = data.draw(st.sampled_from(
            ["join", "request", "finish", "fail", "die", "leave", "tick", "pre", "post"]))
        if action == "join" and len(model.workers) < 4:
            model.join()
        elif action == "request" and idle:
            model.request(data.draw(st.sampled_from(idle)), data.draw(st.integers(1, 8)))
        elif action in ("finish", "fail") and busy:
            key = data.draw(st.sampled_from(busy))
            want = 0 if model.workers[key]["wants"] else data.draw(st.integers(0, 8))
            model.finish_head(key, action == "finish", want)
        elif action == "die" and model.workers:
            model.die(data.draw(st.sampled_from(sorted(model.workers))))
        elif action == "leave" and model.workers:
            model.leave(data.draw(st.sampled_from(sorted(model.workers))))
        elif action == "tick":
            model.tick(data.draw(st.sampled_from([0.5, 4.0, 11.0])))
        elif action == "pre" and model.pre_checks:
            model.answer_pre_check(data.draw(st.integers(0, len(model.pre_checks) - 1)),
                                   data.draw(st.booleans()))
        elif action == "post" and model.post_checks:
            model.answer_post_check(data.draw(st.integers(0, len(model.post_checks) - 1)),
                                    data.draw(st.booleans()))

    # drain: the workers left finish their hands and go; checks pass; one worker of
    # one block at a time does the rest
    for key in sorted(model.workers):
        while model.workers[key]["hand"]:
            model.finish_head(key, True, 0)
        model.leave(key)
    model.join()
    key = model.next_key - 1
    for _ in range(20 * num_blocks * (max_retries + 2)):
        while model.pre_checks or model.post_checks:
            if model.pre_checks:
                model.answer_pre_check(0, False)
            else:
                model.answer_post_check(0, True)
        worker = model.workers[key]
        if worker["hand"]:
            model.finish_head(key, True, 0)
        elif scheduler.is_done():
            break
        elif not worker["wants"]:
            model.request(key, 1)
    assert scheduler.is_done()
    orphaned = scheduler._progress[TASK].orphaned
    for index in range(num_blocks):
        outcomes = (model.done[index], model.failed[index], int(index in orphaned))
        assert sorted(outcomes) == [0, 0, 1], f"block {index}: done, failed, orphaned"
    state = scheduler.task_states[TASK]
    assert state.completed_count == sum(model.done.values())
    assert state.failed_count == sum(model.failed.values())


def test_a_second_request_while_one_waits_changes_nothing_and_is_refused():
    scheduler = BlockScheduler([make_task(1, False, 1, False, False)])
    model = Model(HandOut(scheduler), 1)
    model.join()
    model.join()
    model.request(0, 1)
    model.request(1, 1)  # parked: the only block is in worker 0's hand
    with pytest.raises(ProtocolError, match="still waits"):
        model.handout.handle(Reported(1, (), 1), model.now)
    assert model.handout.waits(1) == 1


def test_a_worker_stopped_for_a_timeout_gives_back_its_hand_and_is_charged_once():
    scheduler = BlockScheduler([make_task(8, False, 1, False, False)])
    model = Model(HandOut(scheduler), 1)
    model.join()
    model.request(0, 4)
    hand = list(model.workers[0]["hand"])
    assert len(hand) == 4
    model.tick(TIMEOUT)        # not past it yet
    assert 0 in model.workers
    model.tick(0.5)            # now past: the head is charged, the rest go back free
    assert 0 not in model.workers
    progress = scheduler._progress[TASK]
    assert progress.retries == {hand[0]: 1}
    assert list(progress.ready)[:3] == hand[1:], "unstarted blocks go back first in line"
    assert scheduler.task_states[TASK].timeout_reclaim_count == 1


def test_blocks_finished_by_another_run_reach_workers_that_wait():
    """A task downstream of a task another run processes (followed): its workers wait
    until blocks finished elsewhere make theirs ready."""
    upstream = make_task(4, False, 1, False, False)
    downstream = daisy.Task("down", total_roi=Roi((0,), (4,)), read_roi=Roi((0,), (1,)),
                            write_roi=Roi((0,), (1,)), process_function=lambda block: None,
                            read_write_conflict=False, upstream_tasks=[upstream])
    scheduler = BlockScheduler([downstream])
    scheduler.follow(TASK)
    handout = HandOut(scheduler)
    handout.expect_worker("down", 0)
    handout.handle(WorkerJoined("w", "down", 0), 0.0)
    assert handout.handle(Reported("w", (), 2), 0.0) == []  # nothing ready: parked
    for index in range(4):
        scheduler.complete_external(TASK, index)
    sent = handout.handle(BlocksBecameReady(), 0.1)
    assert [type(instruction) for instruction in sent] == [SendBlocks]
    assert len(sent[0].blocks) == 2


def test_a_task_stopped_with_pre_checked_blocks_waiting_ends():
    """Blocks whose pre check said 'not done' wait to be handed out; when the task
    stops (a worker that cannot work), they are given back and the task is done."""
    scheduler = BlockScheduler([make_task(4, False, 1, True, False)])
    handout = HandOut(scheduler)
    handout.expect_worker(TASK, 0)
    handout.handle(WorkerJoined("w", TASK, 0), 0.0)
    checks = handout.handle(Reported("w", (), 2), 0.0)
    assert [type(instruction) for instruction in checks] == [RunPreCheck, RunPreCheck]
    first = handout.handle(PreCheckAnswered(checks[0].block, False), 0.0)
    assert [type(instruction) for instruction in first] == [SendBlocks]
    handout.handle(PreCheckAnswered(checks[1].block, False), 0.0)  # waits in `checked`
    block = first[0].blocks[0]
    ended = handout.handle(WorkerCannotWork("w", TASK, block.index, "no model"), 0.0)
    assert RecordFailed in [type(instruction) for instruction in ended]
    handout.handle(WorkerLeft("w"), 0.0)
    state = scheduler.task_states[TASK]
    assert state.stop_reason and state.processing_count == 0 and scheduler.is_done()
    assert not handout.checked[TASK]
