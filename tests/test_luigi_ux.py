"""What a ``luigi`` run of blockwise tasks tells its user (issue 11).

Every test runs the real ``luigi`` command in ``tmp_path`` (its own ``luigi.cfg``
through ``LUIGI_CONFIG_PATH``, a session of its own so that the process group can be
stopped), with real block workers; the luigid tests use the real ``luigid`` fixture of
``test_luigid`` (own port, pid file and ``--state-path``). The tasks are two chained 1D
blockwise tasks, ``Up -> Down``, written as a module into ``tmp_path``: each processed
block appends ``family begin start end pid`` to ``calls.txt``; a file
``fail_<family>_<begin>`` fails that block, ``setup_fails_<family>`` makes
``setup_worker`` raise, and ``misaligned_<family>`` makes the output array that
``setup_worker`` creates have chunks the blocks' write ROIs do not align with.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import re
import select
import struct
import subprocess
import termios
import textwrap
import time
from pathlib import Path

import luigi
import pytest
from luigi.execution_summary import LuigiStatusCode
from test_luigi_layer import (  # noqa: F401 - the luigi_settings fixture
    luigi_command,
    luigi_env,
    luigi_settings,
    run_luigi,
    stop_group,
    write_config,
)
from test_luigid import luigid  # noqa: F401 - the luigid fixture

import luigi_daisy
from luigi_daisy.cli import find_records
from luigi_daisy.cli import main as luigi_daisy_main
from luigi_daisy.ledger import SUFFIX, read_ledger_summary

pytestmark = pytest.mark.timeout(150)

BLOCKS = 16
BLOCK = 10
RUN_DEADLINE = 90.0

TASKS_MODULE = '''
import fcntl
import os
import time

import luigi
import numpy as np

from luigi_daisy import BlockwiseTask, Coordinate, Roi, ZarrTarget, prepare_ds


class Step(BlockwiseTask):
    folder = luigi.Parameter()
    blocks = luigi.IntParameter(default=16)
    block_seconds = luigi.FloatParameter(default=0.0, significant=False)

    def marker(self, name):
        return os.path.exists(os.path.join(self.folder, f"{name}_{self.get_task_family()}"))

    def output(self):
        return {"blocks": self.ledger_target(),
                "array": ZarrTarget(os.path.join(self.folder,
                                                 f"{self.get_task_family()}.zarr"))}

    def total_roi(self):
        return Roi((0,), (10 * self.blocks,))

    def read_roi(self):
        return Roi((0,), (10,))

    def write_roi(self):
        return Roi((0,), (10,))

    def setup_worker(self):
        if self.marker("setup_fails"):
            raise RuntimeError(f"cannot load the model of {self.get_task_family()}")
        path = self.output()["array"].path
        chunk = 15 if self.marker("misaligned") else 10
        with open(f"{path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            prepare_ds(path, self.total_roi(), Coordinate(1), np.uint8,
                       chunk_shape=(chunk,), mode="a")

    def process_block(self, block):
        started = time.time()
        time.sleep(self.block_seconds)
        family = self.get_task_family()
        begin = block.write_roi.begin[0]
        if os.path.exists(os.path.join(self.folder, f"fail_{family}_{begin}")):
            raise ValueError(f"block {begin} of {family} is broken")
        line = f"{family} {begin} {started:.6f} {time.time():.6f} {os.getpid()}\\n"
        descriptor = os.open(os.path.join(self.folder, "calls.txt"),
                             os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(descriptor, line.encode())
        finally:
            os.close(descriptor)


class Up(Step):
    pass


class Down(Step):
    def requires(self):
        return Up(folder=self.folder, blocks=self.blocks)
'''


# --------------------------------------------------------------------------- helpers
def setup_module_dir(tmp_path: Path, **settings) -> Path:
    module = tmp_path / "modules"
    module.mkdir()
    (module / "ux_tasks.py").write_text(TASKS_MODULE)
    config = {"luigi_daisy": {"num_workers": 2, "ledger_dir": "ledgers", "log_dir": "logs",
                              **settings}}
    write_config(tmp_path, config)
    return module


def task_args(tmp_path: Path, task: str = "Down", *extra: str) -> list[str]:
    return ["--module", "ux_tasks", task, "--folder", str(tmp_path), "--blocks", str(BLOCKS),
            "--retcode-task-failed", "3", "--retcode-scheduling-error", "4", *extra]


def calls(tmp_path: Path) -> list[tuple[str, int, float, float]]:
    path = tmp_path / "calls.txt"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        family, begin, start, end, _pid = line.split()
        rows.append((family, int(begin), float(start), float(end)))
    return rows


def luigi_summary(output: str) -> str:
    """The text of Luigi's own execution summary."""
    parts = output.split("===== Luigi Execution Summary =====")
    assert len(parts) >= 3, output[-3000:]
    return parts[1]


def task_id_of(graph: dict, family: str) -> str:
    ids = [task_id for task_id, task in graph.items() if task["name"] == family]
    assert len(ids) == 1, (family, sorted(graph))
    return ids[0]


def wait_for(predicate, deadline: float, what: str):
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


# --------------------------------------------------------------------------- hidden tasks
def test_every_task_is_in_luigids_graph_and_luigis_summary_and_still_pipelines(
        tmp_path, luigid):
    module = setup_module_dir(tmp_path)
    write_config(tmp_path, {
        "luigi_daisy": {"num_workers": 2, "ledger_dir": "ledgers", "log_dir": "logs"},
        "Up": {"block_seconds": 0.1}, "Down": {"block_seconds": 0.02}})
    returncode, output = run_luigi(
        tmp_path, task_args(tmp_path, "Down", "--scheduler-host", "127.0.0.1",
                            "--scheduler-port", str(luigid.port)), extra_path=module)
    assert returncode == 0, output[-5000:]

    # luigid: both tasks, DONE, with the edge Down -> Up as requires() says
    graph = luigid.api("graph")
    up, down = task_id_of(graph, "Up"), task_id_of(graph, "Down")
    assert graph[up]["status"] == graph[down]["status"] == "DONE"
    assert up in graph[down]["deps"]
    assert luigid.api("dep_graph", task_id=down).keys() == {up, down}
    for task_id in (up, down):
        assert graph[task_id]["progress_percentage"] == 100
        assert f"{BLOCKS}/{BLOCKS} blocks" in graph[task_id]["status_message"]
        assert graph[task_id]["tracking_url"].startswith("http://127.0.0.1:")

    # Luigi's own summary: both ran successfully
    summary = luigi_summary(output)
    ran = summary.split("ran successfully:")[1]
    assert "2 ran successfully" in summary, summary
    assert "Up(" in ran and "Down(" in ran, summary

    # and the blocks pipelined: Down's first block started before Up's last ended
    processed = calls(tmp_path)
    assert sorted(begin for family, begin, *_ in processed if family == "Up") == list(
        range(0, BLOCKS * BLOCK, BLOCK))
    assert sorted(begin for family, begin, *_ in processed if family == "Down") == list(
        range(0, BLOCKS * BLOCK, BLOCK))
    up_last_end = max(end for family, _, _, end in processed if family == "Up")
    down_first_start = min(start for family, _, start, _ in processed if family == "Down")
    assert down_first_start < up_last_end

    # what the terminal shows: the tracking URL once, daisy's summary, no bar (no tty)
    assert len(re.findall(r"luigi_daisy: follow .* at http://127\.0\.0\.1:\d+/", output)) == 1
    assert "Execution Summary" in output and f"Task {up}:" in output
    assert f"Task {down}:" in output and "all blocks processed successfully" in output
    assert "blocks/s]" not in output and "\r" not in output

    # ledgers (with the arrays they describe) leave no SQLite -wal / -shm files behind
    records = find_records(tmp_path)
    assert len(records) == 2, records
    leftovers = [path.name for record in records for path in record.parent.iterdir()
                 if path.name.endswith(("-wal", "-shm"))]
    assert not leftovers, leftovers


def test_progress_bars_on_a_terminal_show_counters_that_match_the_bar(tmp_path):
    """Under a pseudo-terminal each task of the run gets a tqdm bar, and every frame's
    ``done=``/``failed=``/``orphaned=`` add up to the bar's count (they used to lag)."""
    module = setup_module_dir(tmp_path)
    write_config(tmp_path, {
        "luigi_daisy": {"num_workers": 2, "ledger_dir": "ledgers", "log_dir": "logs"},
        "Up": {"block_seconds": 0.03}, "Down": {"block_seconds": 0.03}})
    controller, terminal = pty.openpty()
    # a terminal of 40 rows and 200 columns (a fresh pty has none: tqdm would draw nothing)
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    process = subprocess.Popen(
        luigi_command() + task_args(tmp_path, "Down", "--local-scheduler"), cwd=tmp_path,
        env=luigi_env(tmp_path, module), stdin=subprocess.DEVNULL, stdout=terminal,
        stderr=terminal, start_new_session=True)
    os.close(terminal)
    chunks = []
    try:
        deadline = time.monotonic() + RUN_DEADLINE
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    data = os.read(controller, 1 << 16)
                except OSError:  # the terminal closed: every writer is gone
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
        returncode = process.wait(timeout=10)
    finally:
        stop_group(process)
        os.close(controller)
    output = b"".join(chunks).decode(errors="replace")
    assert returncode == 0, output[-5000:]
    frames = re.findall(r"(Up|Down)_\w+: +\d+%\|[^|]*\| (\d+)/(\d+) \[[^\]]*done=(\d+), "
                        r"skipped=(\d+), failed=(\d+), orphaned=(\d+)\]", output)
    assert {family for family, *_ in frames} == {"Up", "Down"}, output[-3000:]
    for family, count, total, done, _skipped, failed, orphaned in frames:
        assert int(total) == BLOCKS
        assert int(count) == int(done) + int(failed) + int(orphaned), (family, count, done)
    for family in ("Up", "Down"):
        assert (family, str(BLOCKS), str(BLOCKS), str(BLOCKS), "0", "0", "0") in frames


# --------------------------------------------------------------------------- failures
def test_a_failed_upstream_task_shows_its_failed_blocks_and_real_progress_in_luigid(
        tmp_path, luigid):
    module = setup_module_dir(tmp_path, max_retries=0)
    (tmp_path / f"fail_Up_{3 * BLOCK}").touch()
    returncode, output = run_luigi(
        tmp_path, task_args(tmp_path, "Down", "--scheduler-host", "127.0.0.1",
                            "--scheduler-port", str(luigid.port)), extra_path=module)
    assert returncode == 3, output[-5000:]

    graph = luigid.api("graph")
    up, down = task_id_of(graph, "Up"), task_id_of(graph, "Down")
    assert graph[up]["status"] == "FAILED"
    assert graph[down]["status"] == "PENDING"  # never run: its upstream task failed
    expected = int(100 * (BLOCKS - 1) / BLOCKS)
    assert graph[up]["progress_percentage"] == expected
    assert graph[down]["progress_percentage"] == expected  # the block reading it orphaned
    error = json.loads(luigid.api("fetch_error", task_id=up)["error"])  # Luigi's JSON text
    assert "failed blocks" in error and f"ValueError: block {3 * BLOCK} of Up is broken" in error
    assert re.search(r"logs/pool/worker_\d+\.err", error), error  # Up and Down's pool
    assert "failed    ✗: 1" in error
    message = graph[up]["status_message"]
    assert f"ValueError: block {3 * BLOCK} of Up is broken" in message and ".err" in message
    assert "1 orphaned" in graph[down]["status_message"], graph[down]["status_message"]

    summary = luigi_summary(output)
    assert re.search(r"\* 1 failed:\n\s+- 1 Up\(", summary), summary
    assert "Down(" in summary.split("1 failed:")[1]  # listed, as waiting for Up


def test_a_pulled_task_that_failed_is_reported_by_luigi_without_running_again(tmp_path):
    """Down's blocks run in Up's pipelined run; one fails. Luigi then runs Down (Up is
    DONE), which fails with that run's summary instead of processing the block again."""
    module = setup_module_dir(tmp_path, max_retries=0)
    (tmp_path / f"fail_Down_{5 * BLOCK}").touch()
    returncode, output = run_luigi(tmp_path, task_args(tmp_path, "Down", "--local-scheduler"),
                                   extra_path=module)
    assert returncode == 3, output[-5000:]
    summary = luigi_summary(output)
    assert re.search(r"\* 1 ran successfully:\n\s+- 1 Up\(", summary), summary
    assert re.search(r"\* 1 failed:\n\s+- 1 Down\(", summary), summary
    assert f"ValueError: block {5 * BLOCK} of Down is broken" in output
    # Down's blocks ran once each (the failed one included: its failure was recorded)
    down_blocks = sorted(begin for family, begin, *_ in calls(tmp_path) if family == "Down")
    assert down_blocks == sorted(set(range(0, BLOCKS * BLOCK, BLOCK)) - {5 * BLOCK})
    assert output.count("luigi_daisy: follow") == 1  # one pipelined run

    # the next command tries again, and succeeds
    (tmp_path / f"fail_Down_{5 * BLOCK}").unlink()
    returncode, output = run_luigi(tmp_path, task_args(tmp_path, "Down", "--local-scheduler"),
                                   log_name="rerun.log", extra_path=module)
    assert returncode == 0, output[-5000:]
    assert [begin for family, begin, *_ in calls(tmp_path)[len(down_blocks) + BLOCKS:]
            if family == "Down"] == [5 * BLOCK]


@pytest.mark.parametrize("cause", ["setup_fails", "misaligned"])
def test_an_error_every_block_would_repeat_stops_the_task_after_the_first(tmp_path, cause):
    """A ``setup_worker`` that raises, or an output it creates with chunks the write ROIs
    do not align with: one block fails, the task stops, no worker is replaced, the error
    is told once per summary and nobody is told to rerun."""
    module = setup_module_dir(tmp_path, max_retries=2)
    (tmp_path / f"{cause}_Up").touch()
    returncode, output = run_luigi(tmp_path, task_args(tmp_path, "Up", "--local-scheduler"),
                                   extra_path=module)
    assert returncode == 3, output[-5000:]
    assert not calls(tmp_path)
    assert "rerun to retry" not in output
    assert "stopped after its first failure" in output
    assert "failed    ✗: 1" in output and f"orphaned  ∅: {BLOCKS - 1}" in output
    error = ("RuntimeError: cannot load the model of Up" if cause == "setup_fails"
             else "DatasetError")
    # the summary printed by the run and the one in Luigi's failure report
    lines_with_error = [line for line in output.splitlines() if error in line]
    assert 1 <= len(lines_with_error) <= 4, lines_with_error
    worker_logs = list((tmp_path / "logs").rglob("worker_*.err"))
    assert len(worker_logs) <= 2, worker_logs  # the two first workers, none replaced
    (ledger,) = [record for record in find_records(tmp_path)
                 if record.name.startswith("Up_") and record.name.endswith(SUFFIX)]
    recorded = read_ledger_summary(ledger)
    assert recorded["done"] == 0 and recorded["failed"] == 1


def test_the_status_command_lists_the_failed_blocks(tmp_path, capsys):
    module = setup_module_dir(tmp_path, max_retries=0)
    for begin in (2 * BLOCK, 7 * BLOCK):
        (tmp_path / f"fail_Up_{begin}").touch()
    returncode, output = run_luigi(tmp_path, task_args(tmp_path, "Up", "--local-scheduler"),
                                   extra_path=module)
    assert returncode == 3, output[-5000:]
    # the records live with the arrays, below the run's folder
    assert luigi_daisy_main(["status", str(tmp_path)]) == 1
    plain = capsys.readouterr().out
    assert "14 done, 2 failed, 16 total" in plain
    assert luigi_daisy_main(["status", "--failed", str(tmp_path)]) == 1
    listed = capsys.readouterr().out
    assert listed == plain  # fewer failures than status lists without --failed
    for begin in (2 * BLOCK, 7 * BLOCK):
        assert re.search(rf"block {begin // BLOCK} \(write roi \[{begin}:{begin + BLOCK}\] "
                         rf"\(10,?\)\): ValueError: block {begin} of Up is broken", listed), listed


# --------------------------------------------------------------------------- silent mistakes
@pytest.mark.parametrize("section", ["luigi-daisy", "Luigi_Daisy", "luigi_diasy"])
def test_a_misspelled_section_is_reported(tmp_path, section):
    module = setup_module_dir(tmp_path)
    write_config(tmp_path, {section: {"num_workers": 2, "ledger_dir": "ledgers"}})
    returncode, output = run_luigi(tmp_path, task_args(tmp_path, "Up", "--local-scheduler"),
                                   extra_path=module)
    assert returncode != 0, output[-5000:]
    assert f"section [{section}], which Luigi ignores" in output, output[-5000:]
    assert "[luigi_daisy]" in output
    assert not calls(tmp_path)


def test_a_misspelled_key_gets_a_suggestion(tmp_path):
    module = setup_module_dir(tmp_path, num_wrokers=2)
    returncode, output = run_luigi(tmp_path, task_args(tmp_path, "Up", "--local-scheduler"),
                                   extra_path=module)
    assert returncode != 0, output[-5000:]
    assert "num_wrokers: did you mean num_workers?" in output, output[-5000:]


def test_valid_fit_warns_once_about_the_strip_no_block_writes(tmp_path, caplog, monkeypatch):
    """Total ROI 95 x 100, read 20, write 10 at offset 5: along axis 0 the blocks
    write [5, 85) of the total write ROI [5, 90), so [85, 90) is never processed."""
    monkeypatch.chdir(tmp_path)
    processed = []
    task = luigi_daisy.Task(
        "strip", total_roi=luigi_daisy.Roi((0, 0), (95, 100)),
        read_roi=luigi_daisy.Roi((0, 0), (20, 20)), write_roi=luigi_daisy.Roi((5, 5), (10, 10)),
        process_function=lambda block: processed.append(block.index), fit="valid")
    with caplog.at_level(logging.WARNING, logger="luigi_daisy"):
        assert luigi_daisy.run_blockwise([task], multiprocessing=False, progress=False)
    warnings = [record.getMessage() for record in caplog.records if "strip" in
                record.getMessage() and record.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "axis 0" in warnings[0] and "[85, 90)" in warnings[0]
    assert "fit='overhang'" in warnings[0] and "fit='shrink'" in warnings[0]
    assert len(processed) == 8 * 9

    caplog.clear()
    for fit in ("overhang", "shrink"):
        covered = luigi_daisy.Task(
            f"covered_{fit}", total_roi=luigi_daisy.Roi((0, 0), (95, 100)),
            read_roi=luigi_daisy.Roi((0, 0), (20, 20)),
            write_roi=luigi_daisy.Roi((5, 5), (10, 10)),
            process_function=lambda block: None, fit=fit)
        with caplog.at_level(logging.WARNING, logger="luigi_daisy"):
            luigi_daisy.run_blockwise([covered], multiprocessing=False, progress=False)
    assert not [record for record in caplog.records if "strip" in record.getMessage()]


def test_valid_fit_warning_reaches_the_luigi_command_output(tmp_path):
    module = setup_module_dir(tmp_path)
    (module / "ux_strip.py").write_text(textwrap.dedent('''
        from ux_tasks import Up

        class Strip(Up):
            def total_roi(self):
                return super().total_roi().grow((0,), (5,))
        '''))
    returncode, output = run_luigi(
        tmp_path, ["--module", "ux_strip", "Strip", "--folder", str(tmp_path), "--blocks",
                   str(BLOCKS), "--local-scheduler"], extra_path=module)
    assert returncode == 0, output[-5000:]
    assert len(re.findall(r"along axis 0: the strip \[160, 165\)", output)) == 1, output[-3000:]


# --------------------------------------------------------------------------- luigi.build
def test_luigi_build_prints_the_tracking_url_once_and_the_summary(
        tmp_path, monkeypatch, luigi_settings, capfd):
    module = setup_module_dir(tmp_path)
    monkeypatch.syspath_prepend(str(module))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(module), os.environ.get("PYTHONPATH", "")]))
    luigi_settings("luigi_daisy", "num_workers", "2")
    import ux_tasks

    down = ux_tasks.Down(folder=str(tmp_path), blocks=BLOCKS)
    result = luigi.build([down], local_scheduler=True, workers=1, detailed_summary=True)
    captured = capfd.readouterr()
    assert result.status == LuigiStatusCode.SUCCESS, captured.err[-3000:]
    assert "Up(" in result.summary_text and "Down(" in result.summary_text
    assert "2 ran successfully" in result.summary_text
    assert len(re.findall(r"luigi_daisy: follow .* at http://127\.0\.0\.1:\d+/",
                          captured.out + captured.err)) == 1
    assert "Execution Summary" in captured.out
    assert f"Task {down.requires().task_id}:" in captured.out
    assert f"Task {down.task_id}:" in captured.out
    assert "blocks/s" not in captured.err  # not a terminal: no bars


# --------------------------------------------------------------------------- ledger files
def test_a_ledger_leaves_no_wal_or_shm_files_once_closed_whoever_read_it(tmp_path):
    """Read-only connections (``complete()``, followers, ``luigi-daisy status``) of a
    WAL-mode file used to leave ``-wal`` and ``-shm`` beside every ledger."""
    from luigi_daisy.ledger import Ledger

    path = tmp_path / f"task{SUFFIX}"
    geometry = {"num_blocks": 4}
    writer = Ledger(path, "task", geometry)
    writer.record_done(1)
    writer.flush()
    follower = Ledger(path, "task", geometry, read_only=True)  # reads while it runs
    assert follower.done_count() == 1
    follower.close()
    writer.record_done(2)
    writer.close()
    assert read_ledger_summary(path)["done"] == 2  # complete() after the run
    reader = Ledger(path, "task", geometry, read_only=True)
    assert reader.done_count() == 2
    reader.close()
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [path.name]

    # a reader still open when the writer closes: the next writer's close tidies up
    writer = Ledger(path, "task", geometry)
    reader = Ledger(path, "task", geometry, read_only=True)
    assert reader.done_count() == 2
    writer.record_done(3)
    writer.close()
    reader.close()
    writer = Ledger(path, "task", geometry)
    writer.close()
    assert read_ledger_summary(path)["done"] == 3
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [path.name]
    # nor inside the record: its manifest and its bitmap chunk only
    assert [name for name in sorted(entry.name for entry in path.iterdir())
            if not name.startswith("done-")] == ["manifest.json"]
