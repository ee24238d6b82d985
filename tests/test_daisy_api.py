"""daisy's API to the letter (issue 9, section 2): block ids, Server / SerialServer,
DependencyGraph, daisy.logging, Scheduler(count_all_orphans=), CREATED blocks, and the
refusal of ledgers written before block ids followed daisy's numbering.

Block ids are checked against a reference written here from daisy 1.x's definition, not
from the package's code: ``block_index = (write_roi.offset - total_roi.offset) //
write_roi.shape`` and ``cantor(c) = c[0] if len(c) == 1 else pyramide_volume(len(c),
sum(c)) + cantor(c[:-1])``, ``pyramide_volume(d, e) = 0 if e == 0 else C(e + d - 1, d)``.
"""

from __future__ import annotations

import itertools
import math
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest

import luigi_daisy as daisy
from luigi_daisy import Block, BlockStatus, Roi
from luigi_daisy.errors import GeometryError, LedgerError, SchedulerError

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------- reference
def pyramide_volume(dims: int, edge: int) -> int:
    return 0 if edge == 0 else math.comb(edge + dims - 1, dims)


def reference_cantor(position: tuple[int, ...]) -> int:
    if len(position) == 1:
        return position[0]
    return pyramide_volume(len(position), sum(position)) + reference_cantor(position[:-1])


def reference_id(total_roi: Roi, write_roi: Roi) -> int:
    """daisy 1.x's block number of a (not shrunk) write ROI."""
    return reference_cantor(tuple(
        (int(begin) - int(total)) // int(step) for begin, total, step in
        zip(write_roi.begin, total_roi.begin, write_roi.shape)))


def noop(block) -> None:
    pass


def drain(scheduler, task_id: str) -> list[Block]:
    """Acquire and release (as successes) every block of one task, in order."""
    blocks = []
    while (block := scheduler.acquire_block(task_id)) is not None:
        blocks.append(block)
        block.status = BlockStatus.SUCCESS
        scheduler.release_block(block)
    return blocks


#: (total_roi, read_roi, write_roi): 1D, 2D and 3D grids with offsets, with and without
#: context, with write shapes that differ per axis
GEOMETRIES = [
    (Roi((7,), (50,)), Roi((0,), (5,)), Roi((0,), (5,))),
    (Roi((-13,), (61,)), Roi((0,), (9,)), Roi((3,), (2,))),
    (Roi((4, -8), (40, 36)), Roi((0, 0), (6, 4)), Roi((0, 0), (6, 4))),
    (Roi((4, -8), (40, 36)), Roi((0, 0), (8, 10)), Roi((1, 3), (3, 4))),
    (Roi((10, 0, -5), (24, 30, 21)), Roi((0, 0, 0), (4, 6, 3)), Roi((0, 0, 0), (4, 6, 3))),
    (Roi((10, 0, -5), (24, 30, 21)), Roi((0, 0, 0), (6, 9, 5)), Roi((2, 3, 1), (2, 3, 2))),
]


# ---------------------------------------------------------------------------- block ids
def test_hand_checked_numbers():
    tutorial = Block(Roi((0, 0), (512, 512)), Roi((128, 128), (64, 64)),
                     Roi((128, 128), (64, 64)))
    assert tutorial.block_id == (None, 12)
    # daisy's test_scheduler: 1D total (0, 4), read 3, write (1, 1): ids 1 and 2
    first = Block(Roi((0,), (4,)), Roi((0,), (3,)), Roi((1,), (1,)))
    second = Block(Roi((0,), (4,)), Roi((1,), (3,)), Roi((2,), (1,)))
    assert (first.block_id[1], second.block_id[1]) == (1, 2)
    # 3D position (1, 1, 1): 1 + C(3, 2) + C(5, 3) = 14
    cube = Block(Roi((0, 0, 0), (8, 8, 8)), Roi((2, 2, 2), (2, 2, 2)), Roi((2, 2, 2), (2, 2, 2)))
    assert cube.block_id[1] == 14
    assert reference_cantor((2, 2)) == 12 and reference_cantor((1, 1, 1)) == 14


@pytest.mark.parametrize("fit", ["valid", "overhang", "shrink"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0].dims}d-{g[1]}-{g[2]}")
def test_scheduler_blocks_carry_daisys_ids(geometry, fit):
    total_roi, read_roi, write_roi = geometry
    task = daisy.Task("ids", total_roi, read_roi, write_roi, process_function=noop, fit=fit,
                      read_write_conflict=True)
    blocks = drain(daisy.Scheduler([task]), "ids")
    assert len(blocks) == task.grid.num_blocks > 1
    context = write_roi.begin - read_roi.begin
    numbers = []
    for block in blocks:
        # shrink crops the last blocks: daisy numbers them before cropping
        full_write = Roi(block.read_roi.begin + context, write_roi.shape)
        numbers.append(block.block_id[1])
        assert block.block_id == ("ids", reference_id(total_roi, full_write))
        standalone = Block(total_roi, Roi(block.read_roi.begin, read_roi.shape), full_write,
                           task_id="ids")
        assert standalone.block_id == block.block_id
        assert standalone == block and hash(standalone) == hash(block)
    assert len(set(numbers)) == len(numbers)


def test_explicit_block_id_wins_and_equality_follows_block_id():
    total_roi = Roi((0,), (20,))
    block = Block(total_roi, Roi((5,), (5,)), Roi((5,), (5,)), block_id=99, task_id="t")
    assert block.block_id == ("t", 99)
    same_id = Block(total_roi, Roi((10,), (5,)), Roi((10,), (5,)), block_id=99, task_id="t")
    assert block == same_id and len({block, same_id}) == 1
    assert block != Block(total_roi, Roi((5,), (5,)), Roi((5,), (5,)), task_id="t")
    assert block != Block(total_roi, Roi((5,), (5,)), Roi((5,), (5,)), block_id=99,
                          task_id="other")


def test_blocks_survive_pickling_with_their_ids():
    import pickle
    task = daisy.Task("p", Roi((0, 0), (30, 30)), Roi((0, 0), (10, 10)), Roi((0, 0), (10, 10)),
                      process_function=noop)
    scheduler = daisy.Scheduler([task])
    block = scheduler.acquire_block("p")
    copy = pickle.loads(pickle.dumps(block))
    assert copy.block_id == block.block_id and copy.write_roi == block.write_roi


def _record_block(folder: Path):
    def process(block) -> None:
        (folder / uuid.uuid4().hex).write_text(
            f"{block.block_id[0]} {block.block_id[1]} "
            f"{' '.join(map(str, block.write_roi.begin))}")
    return process


@pytest.mark.usefixtures("no_stray_processes")
def test_ids_seen_inside_worker_processes(tmp_path):
    folder = tmp_path / "seen"
    folder.mkdir()
    total_roi = Roi((3, -6, 10), (20, 24, 18))
    read_roi = Roi((0, 0, 0), (6, 8, 6))
    write_roi = Roi((1, 2, 1), (4, 4, 4))
    task = daisy.Task("workers", total_roi, read_roi, write_roi,
                      process_function=_record_block(folder), num_workers=2, fit="overhang")
    result = daisy.run_blockwise([task], progress=False, log_dir=tmp_path / "logs")
    assert result["workers"].completed_count == task.grid.num_blocks
    seen = {}
    for path in folder.iterdir():
        task_id, number, *begin = path.read_text().split()
        seen[int(number)] = Roi(tuple(map(int, begin)), write_roi.shape)
        assert task_id == "workers"
    assert len(seen) == task.grid.num_blocks
    for number, write in seen.items():
        assert number == reference_id(total_roi, write)


def test_failed_blocks_are_reported_with_daisys_ids(tmp_path, capsys):
    total_roi = Roi((0, 0), (512, 512))
    block_roi = Roi((0, 0), (64, 64))

    def fail_one(block) -> None:
        if block.write_roi.begin == (128, 128):
            raise ValueError("this block fails")

    task = daisy.Task("tutorial", total_roi, block_roi, block_roi, process_function=fail_one,
                      max_retries=0)
    result = daisy.SerialServer().run_blockwise([task], progress=False)
    assert result["tutorial"].failed_count == 1
    assert set(result["tutorial"].failed_blocks) == {12}
    assert "      12: ValueError: this block fails" in capsys.readouterr().out


# ---------------------------------------------------------------------------- scheduler
def test_acquired_blocks_are_created_with_and_without_check_functions():
    roi = Roi((0,), (40,))
    plain = daisy.Task("plain", roi, Roi((0,), (10,)), Roi((0,), (10,)), process_function=noop)
    checked = daisy.Task("checked", roi, Roi((0,), (10,)), Roi((0,), (10,)),
                         process_function=noop, check_function=lambda block: False)
    for task in (plain, checked):
        scheduler = daisy.Scheduler([task])
        block = scheduler.acquire_block(task.task_id)
        assert block.status is BlockStatus.CREATED


def test_levels_in_daisys_order_and_positions_in_product_order():
    # 3D, context of one write shape on every side: periods (2, 2, 2)
    total_roi = Roi((0, 0, 0), (12, 12, 12))
    task = daisy.Task("cube", total_roi, Roi((0, 0, 0), (6, 6, 6)), Roi((2, 2, 2), (2, 2, 2)),
                      process_function=noop)
    scheduler = daisy.Scheduler([task])
    order = []
    while True:
        level = []
        while (block := scheduler.acquire_block("cube")) is not None:
            level.append(block)
        if not level:
            break
        order.append([tuple((int(b) - 2) // 2 for b in block.write_roi.begin)
                      for block in level])
        for block in level:
            block.status = BlockStatus.SUCCESS
            scheduler.release_block(block)
    # daisy: level offsets are itertools.product(...) reversed; levels run one by one
    patterns = list(reversed(list(itertools.product(range(2), repeat=3))))
    assert len(order) == len(patterns)
    assert order[0] == list(itertools.product(range(1, 4, 2), repeat=3))
    for positions, pattern in zip(order, patterns):
        assert {tuple(k % 2 for k in position) for position in positions} == {pattern}


@pytest.mark.parametrize("count_all_orphans", [True, False])
def test_count_all_orphans_is_accepted_and_counts_stay_exact(count_all_orphans):
    task = daisy.Task("orphans", Roi((0, 0), (25, 25)), Roi((0, 0), (7, 7)),
                      Roi((3, 3), (1, 1)), process_function=noop, max_retries=0)
    scheduler = daisy.Scheduler([task], count_all_orphans=count_all_orphans)
    assert scheduler.count_all_orphans is count_all_orphans
    first = scheduler.acquire_block("orphans")
    first.status = BlockStatus.FAILED
    scheduler.release_block(first)
    drain(scheduler, "orphans")
    state = scheduler.task_states["orphans"]
    assert state.failed_count == 1 and state.orphaned_count > 0
    assert (state.completed_count + state.failed_count + state.orphaned_count
            == state.total_block_count)
    assert state.is_done()


def test_count_all_orphans_must_be_a_bool():
    task = daisy.Task("t", Roi((0,), (10,)), Roi((0,), (5,)), Roi((0,), (5,)),
                      process_function=noop)
    with pytest.raises(TypeError, match="count_all_orphans"):
        daisy.Scheduler([task], {"t": [0]})


# ---------------------------------------------------------------------------- graph
def _conflict(a: Block, b: Block) -> bool:
    return (a.read_roi.intersects(b.write_roi) or b.read_roi.intersects(a.write_roi))


@pytest.mark.parametrize("fit", ["valid", "overhang", "shrink"])
def test_blockwise_graph_matches_brute_force(fit):
    total_roi = Roi((2, -3), (23, 19))
    read_roi, write_roi = Roi((0, 0), (7, 5)), Roi((2, 1), (3, 2))
    graph = daisy.BlockwiseDependencyGraph("g", read_roi, write_roi, True, fit,
                                           total_read_roi=total_roi)
    everything = list(graph.enumerate_all_dependencies())
    blocks = [block for block, _ in everything]
    assert len(blocks) == len(set(blocks)) == graph.num_blocks
    level = {block: number for number in range(graph.num_levels)
             for block in graph.level_blocks(number)}
    for block, upstream in everything:
        expected = {other for other in blocks
                    if other != block and _conflict(block, other) and level[other] < level[block]}
        assert set(upstream) == expected
        assert [b.block_id[1] for b in upstream] == sorted(b.block_id[1] for b in upstream)
        for other in upstream:
            assert block in graph.downstream(other)
    roots = list(graph.root_gen())
    assert len(roots) == graph.num_roots() and all(not graph.upstream(b) for b in roots)
    sub_roi = Roi((9, 2), (5, 4))
    for read in (False, True):
        expected = {block for block in blocks
                    if (block.read_roi if read else block.write_roi).intersects(sub_roi)}
        assert set(graph.get_subgraph_blocks(sub_roi, read_roi=read)) == expected


def test_dependency_graph_across_tasks_matches_brute_force():
    first = daisy.Task("first", Roi((0, 0), (30, 30)), Roi((0, 0), (8, 8)),
                       Roi((2, 2), (4, 4)), process_function=noop)
    second = daisy.Task("second", Roi((3, 5), (22, 20)), Roi((0, 0), (6, 6)),
                        Roi((1, 1), (4, 4)), process_function=noop, upstream_tasks=[first],
                        read_write_conflict=False)
    graph = daisy.DependencyGraph([second])
    assert set(graph.task_ids) == {"first", "second"}
    assert graph.root_tasks() == ["first"]
    assert set(graph.roots()) == {"first"}
    first_blocks = [b for b, _ in graph.task_dependency_graphs["first"]
                    .enumerate_all_dependencies()]
    second_blocks = [b for b, _ in graph.task_dependency_graphs["second"]
                     .enumerate_all_dependencies()]
    assert len(second_blocks) == graph.num_blocks("second")
    for block in second_blocks:
        expected = {b for b in first_blocks if b.write_roi.intersects(block.read_roi)}
        assert set(graph.upstream(block)) == expected and expected
    for block in first_blocks:
        downstream = set(graph.downstream(block))
        assert {b for b in downstream if b.task_id == "second"} == {
            b for b in second_blocks if b.read_roi.intersects(block.write_roi)}
    assert daisy.Scheduler([second]).dependency_graph.num_blocks("first") == len(first_blocks)


def test_dependency_graph_refuses_a_block_of_another_grid():
    graph = daisy.BlockwiseDependencyGraph("g", Roi((0,), (4,)), Roi((0,), (4,)), True,
                                           "valid", total_read_roi=Roi((0,), (40,)))
    with pytest.raises(GeometryError, match="not a block of task 'g'"):
        graph.upstream(Block(Roi((0,), (40,)), Roi((2,), (4,)), Roi((2,), (4,))))


def test_dependency_graph_of_ten_million_blocks_answers_lazily():
    # 2 tasks of 3163 x 3163 (10^7) blocks each, with conflicts and a block-level link
    side = 3163
    upstream = daisy.Task("up", Roi((0, 0), (side * 4 + 4, side * 4 + 4)),
                          Roi((0, 0), (8, 8)), Roi((2, 2), (4, 4)), process_function=noop)
    downstream = daisy.Task("down", Roi((0, 0), (side * 4 + 4, side * 4 + 4)),
                            Roi((0, 0), (8, 8)), Roi((2, 2), (4, 4)), process_function=noop,
                            upstream_tasks=[upstream])
    tracemalloc.start()
    try:
        graph = daisy.Scheduler([downstream]).dependency_graph
        assert graph.num_blocks("up") == graph.num_blocks("down") == side * side
        # grid position (1580, 1580): pattern (0, 0), daisy's last level
        middle = Roi((2 + 4 * 1580, 2 + 4 * 1580), (4, 4))
        block = Block(downstream.total_roi, middle.grow(2, 2), middle, task_id="down")
        needs = graph.upstream(block)
        up_block = Block(upstream.total_roi, middle.grow(2, 2), middle, task_id="up")
        needed_by = graph.downstream(up_block)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 9 upstream blocks of "up" plus its 8 conflicting neighbours in "down"
    assert len([b for b in needs if b.task_id == "up"]) == 9
    assert len([b for b in needs if b.task_id == "down"]) == 8
    assert len([b for b in needed_by if b.task_id == "down"]) == 9
    assert peak < 20 * 2**20, f"answering took {peak / 2**20:.1f} MiB: blocks were built"


@pytest.mark.parametrize("grid_shape", [(10**8,), (10**4, 10**4)])
def test_a_scheduler_of_a_hundred_million_blocks_starts_without_listing_them(grid_shape):
    # the iterator over blocks that depend on nothing must stay lazy along every axis
    total = Roi((0,) * len(grid_shape), grid_shape)
    unit = Roi((0,) * len(grid_shape), (1,) * len(grid_shape))
    task = daisy.Task("huge", total, unit, unit, process_function=noop,
                      read_write_conflict=False)
    tracemalloc.start()
    try:
        scheduler = daisy.BlockScheduler([task])
        first = [scheduler.acquire("huge").index for _ in range(3)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first == [0, 1, 2]
    assert peak < 20 * 2**20, f"starting took {peak / 2**20:.1f} MiB: blocks were listed"


# ---------------------------------------------------------------------------- servers
def _write_marker(folder: Path):
    def process(block) -> None:
        (folder / str(block.block_id[1])).write_text("done")
        if block.block_id[1] == 3:
            raise RuntimeError("block 3 fails")
    return process


@pytest.mark.usefixtures("no_stray_processes")
@pytest.mark.parametrize("server_class", ["Server", "SerialServer"])
def test_servers_run_blockwise_and_fail_blocks_that_raise(tmp_path, server_class):
    folder = tmp_path / "done"
    folder.mkdir()
    task = daisy.Task("serve", Roi((0,), (60,)), Roi((0,), (10,)), Roi((0,), (10,)),
                      process_function=_write_marker(folder), num_workers=2, max_retries=0)
    server = getattr(daisy, server_class)()
    result = server.run_blockwise([task], progress=False)
    assert isinstance(result, daisy.RunResult)
    state = result["serve"]
    assert state.total_block_count == 6 and state.completed_count == 5
    assert state.failed_count == 1 and set(state.failed_blocks) == {3}
    assert state.is_done() and not result
    assert sorted(int(path.name) for path in folder.iterdir()) == list(range(6))


def test_servers_accept_daisys_constructor_arguments():
    event = threading.Event()
    server = daisy.Server(stop_event=event, host="127.0.0.1")
    assert server.stop_event is event and server.host == "127.0.0.1"
    assert daisy.Server(None, None).host == "127.0.0.1"
    task = daisy.Task("t", Roi((0,), (10,)), Roi((0,), (5,)), Roi((0,), (5,)),
                      process_function=noop)
    for server in (daisy.Server(), daisy.SerialServer()):
        with pytest.raises(SchedulerError, match="builds its own scheduler"):
            server.run_blockwise([task], scheduler=daisy.Scheduler([task]))


def _slow_until_stopped(folder: Path):
    def process(block) -> None:
        (folder / str(block.block_id[1])).write_text("started")
        deadline = time.monotonic() + 30
        while not (folder / "stop").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return process


@pytest.mark.usefixtures("no_stray_processes")
def test_server_stop_event_ends_the_run(tmp_path):
    folder = tmp_path / "started"
    folder.mkdir()
    event = threading.Event()
    task = daisy.Task("stoppable", Roi((0,), (1000,)), Roi((0,), (10,)), Roi((0,), (10,)),
                      process_function=_slow_until_stopped(folder), num_workers=1)

    def stop_when_a_block_started() -> None:
        deadline = time.monotonic() + 60
        while not any(folder.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.02)
        event.set()

    watcher = threading.Thread(target=stop_when_a_block_started)
    watcher.start()
    try:
        result = daisy.Server(stop_event=event).run_blockwise([task], progress=False)
    finally:
        (folder / "stop").write_text("")
        watcher.join(60)
    assert result["stoppable"].completed_count < 100 and not result


# ---------------------------------------------------------------------------- logging
@pytest.fixture
def log_basedir():
    """Restore daisy.logging's folder after the test."""
    before = daisy.logging.get_log_basedir()
    yield
    daisy.logging.set_log_basedir(before)


def test_logging_module_names(log_basedir, tmp_path):
    import logging as standard_logging
    assert standard_logging.getLogger is not None and standard_logging.__name__ == "logging"
    assert daisy.logging.get_log_basedir() == Path("daisy_logs")
    daisy.logging.set_log_basedir(tmp_path / "logs")
    assert daisy.logging.get_log_basedir() == tmp_path / "logs"
    assert daisy.logging.get_worker_log_basename(3) == tmp_path / "logs" / "worker_3"
    assert (daisy.logging.get_worker_log_basename(3, "task")
            == tmp_path / "logs" / "task" / "worker_3")
    daisy.logging.set_log_basedir(None)
    assert daisy.logging.get_log_basedir() is None
    assert daisy.logging.get_worker_log_basename(3, "task") is None


@pytest.mark.usefixtures("no_stray_processes")
def test_run_takes_its_log_folder_from_daisy_logging(log_basedir, tmp_path):
    def speak(block) -> None:
        print(f"block {block.block_id[1]} speaks")

    task = daisy.Task("speaker", Roi((0,), (20,)), Roi((0,), (10,)), Roi((0,), (10,)),
                      process_function=speak, num_workers=1)
    daisy.logging.set_log_basedir(tmp_path / "from_module")
    daisy.run_blockwise([task], progress=False)
    out = (tmp_path / "from_module" / "speaker" / "worker_0.out").read_text()
    assert "block 0 speaks" in out and "block 1 speaks" in out
    assert not (tmp_path / "daisy_logs").exists()
    # an explicit log_dir still wins
    daisy.run_blockwise([task], progress=False, log_dir=tmp_path / "explicit")
    assert "block 1 speaks" in (tmp_path / "explicit" / "speaker" / "worker_0.out").read_text()


def test_no_log_files_without_a_basedir(tmp_path):
    script = (
        "import luigi_daisy as daisy\n"
        "daisy.logging.set_log_basedir(None)\n"
        "task = daisy.Task('quiet', daisy.Roi((0,), (20,)), daisy.Roi((0,), (10,)),\n"
        "                  daisy.Roi((0,), (10,)), num_workers=1,\n"
        "                  process_function=lambda b: print('worker', b.block_id[1]))\n"
        "assert daisy.run_blockwise([task], progress=False)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert "worker 0" in completed.stdout and "worker 1" in completed.stdout
    assert list(tmp_path.iterdir()) == []


def test_redirect_stdouterr(tmp_path):
    script = (
        "import os, sys\n"
        "from luigi_daisy.logging import redirect_stdouterr\n"
        f"redirect_stdouterr({str(tmp_path / 'deep' / 'worker_7')!r})\n"
        "print('to out')\n"
        "print('to err', file=sys.stderr)\n"
        "os.system('echo from a subprocess')\n"
        f"redirect_stdouterr({str(tmp_path / 'deep' / 'worker_7')!r}, mode='a')\n"
        "print('appended')\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "" and completed.stderr == ""
    out = (tmp_path / "deep" / "worker_7.out").read_text()
    assert out == "to out\nfrom a subprocess\nappended\n"
    assert (tmp_path / "deep" / "worker_7.err").read_text() == "to err\n"


# ---------------------------------------------------------------------------- ledger
def test_a_ledger_of_the_old_numbering_is_refused(tmp_path):
    from luigi_daisy import _sqlite_ledger
    from luigi_daisy.ledger import Ledger, ledger_path, legacy_path, read_ledger_summary

    task = daisy.Task("old", Roi((0,), (40,)), Roi((0,), (10,)), Roi((0,), (10,)),
                      process_function=noop)
    record = ledger_path(tmp_path, "old")
    # an SQLite ledger (the previous version's code), as it is converted on first open
    path = legacy_path(record)
    with _sqlite_ledger.Ledger(path, "old", task.grid.describe()) as old:
        for index in range(4):
            old.record_done(index)
    # what a ledger written before daisy's numbering holds: format 2, no block_key
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE meta SET value = '2' WHERE key = 'format'")
        connection.execute("DELETE FROM meta WHERE key = 'block_key'")
    connection.close()
    with pytest.raises(LedgerError) as refused:
        daisy.run_blockwise([task], multiprocessing=False, progress=False,
                            ledger_dir=tmp_path)
    message = str(refused.value)
    assert str(path) in message and "format 2" in message
    assert "daisy's (Cantor) numbering" in message
    assert "delete the file" in message and "fresh=True" in message
    with pytest.raises(LedgerError, match="numbering"):
        read_ledger_summary(path)
    with pytest.raises(LedgerError, match="numbering"):
        Ledger(record, "old", task.grid.describe())
    assert path.is_file() and not (record / "manifest.json").exists(), "converted anyway"
    # fresh=True gets past it, and the new ledger records what its keys are
    result = daisy.run_blockwise([task], multiprocessing=False, progress=False,
                                 ledger_dir=tmp_path, fresh=True)
    assert result["old"].completed_count == 4 and result["old"].skipped_count == 0
    assert not path.exists()
    summary = read_ledger_summary(record)
    assert summary["done"] == 4
