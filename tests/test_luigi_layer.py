"""The Luigi layer: ``BlockwiseTask`` inside Luigi, in-process and through the ``luigi``
command.

In-process tests call ``luigi.build([...], local_scheduler=True, workers=1)``; Luigi reads
its configuration once per process, so they set ``[luigi_daisy]`` values (and a ledger
folder under ``tmp_path``) with ``get_config().set`` and restore them afterwards. Tasks
read their parameter defaults from the configuration when they are created, so every
task here is created after the settings it needs.

Process calls are counted through files: a recording task appends one line per call
(``O_APPEND``, one ``write``) from its worker processes. The example pipeline
(``examples/pipeline.py``) writes one line per processed block to its ``events_file``.

CLI tests start ``luigi`` in ``tmp_path`` with their own ``luigi.cfg`` (through
``LUIGI_CONFIG_PATH``), each in a session of its own so that the whole process group
(Luigi's worker processes and the block workers) can be stopped.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import luigi
import numpy as np
import pytest
import zarr
from luigi.execution_summary import LuigiStatusCode

from luigi_daisy import BlockwiseRunError, BlockwiseTask, LedgerTarget, Roi
from luigi_daisy.ledger import Ledger
from luigi_daisy.luigi import ConfigError
from luigi_daisy.luigi.config import settings

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))
import pipeline as example  # noqa: E402  (examples/pipeline.py)

RUN_DEADLINE = 90.0        # seconds a `luigi` command may take
BLOCK = 10                 # world size of a block of the 1D recording tasks
SIZE, BLOCK_SIZE = 32, 8   # the example pipeline: 4 x 4 x 4 blocks per task
EXAMPLE_BLOCKS = (SIZE // BLOCK_SIZE) ** 3
BLOCKWISE_PARAMETERS = ("num_workers", "max_retries", "timeout", "fit", "read_write_conflict")


# --------------------------------------------------------------------------- helpers
def append_line(path: Path, line: str) -> None:
    """Append one line with a single write (atomic between processes with O_APPEND)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(descriptor, (line + "\n").encode())
    finally:
        os.close(descriptor)


def read_lines(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def luigi_settings(tmp_path, monkeypatch):
    """Set Luigi configuration values for one test; restore them afterwards.

    ``[luigi_daisy] ledger_dir`` and ``log_dir`` point into ``tmp_path``, which is also
    the working directory. Call the fixture's value as ``set(section, key, value)``.
    """
    config = luigi.configuration.get_config()
    saved: dict[tuple[str, str], str | None] = {}
    sections_added: set[str] = set()

    def set_value(section: str, key: str, value) -> None:
        if not config.has_section(section):
            sections_added.add(section)
        if (section, key) not in saved:
            saved[(section, key)] = (config.get(section, key)
                                     if config.has_option(section, key) else None)
        config.set(section, key, str(value))

    monkeypatch.chdir(tmp_path)
    set_value("luigi_daisy", "ledger_dir", str(tmp_path / "ledgers"))
    set_value("luigi_daisy", "log_dir", str(tmp_path / "logs"))
    try:
        yield set_value
    finally:
        for (section, key), value in saved.items():
            if value is None:
                config.remove_option(section, key)
            else:
                config.set(section, key, value)
        for section in sections_added:
            if config.has_section(section) and not config.options(section):
                config.remove_section(section)


def build(*tasks, detailed: bool = False):
    return luigi.build(list(tasks), local_scheduler=True, workers=1,
                       detailed_summary=detailed)


def luigi_command() -> list[str]:
    beside = Path(sys.executable).parent / "luigi"
    return [str(beside)] if beside.exists() else ["luigi"]


def luigi_env(tmp_path: Path, extra_path: Path | None = None) -> dict:
    env = dict(os.environ)
    paths = [str(EXAMPLES), str(REPO)] + ([str(extra_path)] if extra_path else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    env["LUIGI_CONFIG_PATH"] = str(tmp_path / "luigi.cfg")
    return env


def write_config(tmp_path: Path, sections: dict[str, dict]) -> None:
    text = "".join(f"[{name}]\n" + "".join(f"{key} = {value}\n" for key, value in
                                           values.items()) + "\n"
                   for name, values in sections.items())
    (tmp_path / "luigi.cfg").write_text(text)


TIMED_LOGGING = """\
[loggers]
keys=root,luigi
[handlers]
keys=stderr
[formatters]
keys=timed
[logger_root]
level=WARNING
handlers=stderr
[logger_luigi]
level=INFO
handlers=stderr
qualname=luigi-interface
propagate=0
[handler_stderr]
class=StreamHandler
args=(sys.stderr,)
formatter=timed
[formatter_timed]
format=%(created).6f %(levelname)s: %(message)s
"""


def example_config(tmp_path: Path, timed_log: bool = False, **stage) -> None:
    """luigi.cfg for the example pipeline: events of both stages in tmp_path/events.log;
    with ``timed_log``, Luigi's log lines begin with their time."""
    stage_settings = {"events_file": str(tmp_path / "events.log"), **stage}
    sections = {
        "luigi_daisy": {"num_workers": 2, "ledger_dir": "ledgers", "log_dir": "logs"},
        "Smooth": stage_settings, "Threshold": stage_settings}
    if timed_log:
        (tmp_path / "logging.ini").write_text(TIMED_LOGGING)
        sections["core"] = {"logging_conf_file": str(tmp_path / "logging.ini")}
    write_config(tmp_path, sections)


def running_window(output: str, family: str) -> tuple[float, float]:
    """First start and last end of the ``family`` tasks in a timed Luigi log."""
    starts, ends = [], []
    for line in output.splitlines():
        match = re.match(rf"(\d+\.\d+) INFO: .* (running|done) +{family}\(", line)
        if match:
            (starts if match.group(2) == "running" else ends).append(float(match.group(1)))
    assert starts and ends, f"no {family} ran:\n{output[-3000:]}"
    return min(starts), max(ends)


def stop_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group of ``process`` (whatever is left of it) and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def start_luigi(tmp_path: Path, args: list[str], log_name: str,
                extra_path: Path | None = None) -> subprocess.Popen:
    log = open(tmp_path / log_name, "wb")  # noqa: SIM115 - closed with the process
    try:
        return subprocess.Popen(luigi_command() + args, cwd=tmp_path,
                                env=luigi_env(tmp_path, extra_path), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def finish_luigi(tmp_path: Path, process: subprocess.Popen, log_name: str,
                 deadline: float = RUN_DEADLINE) -> tuple[int, str]:
    try:
        returncode = process.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        stop_group(process)
        pytest.fail(f"luigi did not finish in {deadline} s:\n"
                    f"{(tmp_path / log_name).read_text()[-5000:]}")
    finally:
        stop_group(process)  # block workers left behind, if any
    return returncode, (tmp_path / log_name).read_text()


def run_luigi(tmp_path: Path, args: list[str], log_name: str = "luigi.log",
              extra_path: Path | None = None) -> tuple[int, str]:
    process = start_luigi(tmp_path, args, log_name, extra_path)
    return finish_luigi(tmp_path, process, log_name)


def example_args(task: str = "AllReports") -> list[str]:
    return ["--module", "pipeline", task, "--size", str(SIZE), "--block-size",
            str(BLOCK_SIZE), "--local-scheduler", "--retcode-task-failed", "3"]


def events_by_task(path: Path) -> dict[str, list[tuple[int, float, float]]]:
    """``task_id -> [(block, start, end), ...]`` from an example events file."""
    events: dict[str, list] = {}
    for _family, task_id, block, start, end, _pid in read_lines(path):
        events.setdefault(task_id, []).append((int(block), float(start), float(end)))
    return events


def check_example_outputs(workdir: Path, levels=(0.5, 0.7), reports: bool = True) -> None:
    """The arrays equal the whole-volume computation, and every report is there."""
    raw = zarr.open_array(str(workdir / "raw.zarr"), mode="r")[:]
    for level in levels:
        smoothed, mask = example.whole_volume(raw, level)
        np.testing.assert_array_equal(
            zarr.open_array(str(workdir / "smoothed.zarr"), mode="r")[:], smoothed)
        np.testing.assert_array_equal(
            zarr.open_array(str(workdir / f"mask_{level:g}.zarr"), mode="r")[:], mask)
        assert (workdir / f"report_{level:g}.json").exists() == reports


def check_each_block_once(events: dict, tasks: int) -> None:
    assert len(events) == tasks, sorted(events)
    for task_id, blocks in events.items():
        counts = Counter(block for block, _, _ in blocks)
        assert sorted(counts) == list(range(EXAMPLE_BLOCKS)), task_id
        assert set(counts.values()) == {1}, (task_id, counts.most_common(3))


# --------------------------------------------------------------------------- test tasks
class Recording(BlockwiseTask):
    """1D task of ``blocks`` blocks of BLOCK; appends ``family begin start end pid setup``
    to ``folder/calls.txt`` per processed block and ``family pid`` to ``folder/setup.txt``
    per ``setup_worker``; a block whose ``folder/fail_<family>_<begin>`` exists raises."""

    folder = luigi.Parameter()
    blocks = luigi.IntParameter(default=8)

    def total_roi(self):
        return Roi((0,), (self.blocks * BLOCK,))

    def read_roi(self):
        return Roi((0,), (BLOCK,))

    def write_roi(self):
        return Roi((0,), (BLOCK,))

    def setup_worker(self):
        self.setup_pid = os.getpid()
        append_line(Path(self.folder) / "setup.txt",
                    f"{self.get_task_family()} {os.getpid()} {time.time():.6f}")

    def process_block(self, block):
        started = time.time()
        begin = int(block.write_roi.begin[0])
        family = self.get_task_family()
        set_up = getattr(self, "setup_pid", None) == os.getpid()
        if (Path(self.folder) / f"fail_{family}_{begin}").exists():
            raise RuntimeError(f"injected failure in block {begin} of {family}")
        append_line(Path(self.folder) / "calls.txt",
                    f"{family} {begin} {started:.6f} {time.time():.6f} {os.getpid()} "
                    f"{int(set_up)}")


class Simple(Recording):
    """A recording task without dependencies."""


class Checked(Recording):
    """Blocks whose ``folder/done_<begin>`` exists are done already."""

    def check_block(self, block):
        return (Path(self.folder) / f"done_{int(block.write_roi.begin[0])}").exists()


class Huge(BlockwiseTask):
    """10^6 blocks of one voxel; processing any of them leaves a file behind."""

    folder = luigi.Parameter()

    def total_roi(self):
        return Roi((0, 0, 0), (100, 100, 100))

    def read_roi(self):
        return Roi((0, 0, 0), (1, 1, 1))

    def write_roi(self):
        return Roi((0, 0, 0), (1, 1, 1))

    def process_block(self, block):
        append_line(Path(self.folder) / "huge_calls.txt", str(block.index))


class ChainA(Recording):
    """Upstream of ChainB."""


class ChainB(Recording):
    """Reads ChainA with BLOCK of context on both sides."""

    def requires(self):
        return ChainA(folder=self.folder, blocks=self.blocks)

    def total_roi(self):
        return Roi((-BLOCK,), ((self.blocks + 2) * BLOCK,))

    def read_roi(self):
        return Roi((0,), (3 * BLOCK,))

    def write_roi(self):
        return Roi((BLOCK,), (BLOCK,))


class InputFile(luigi.ExternalTask):
    """Input that something outside Luigi provides."""

    path = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(self.path)


class ExtA(Recording):
    """Blockwise task reading an external input."""

    def requires(self):
        return InputFile(path=str(Path(self.folder) / "input.txt"))


class ExtB(ChainB):
    """Blockwise task downstream of ExtA."""

    def requires(self):
        return ExtA(folder=self.folder, blocks=self.blocks)


class ExtReport(luigi.Task):
    """An ordinary task consuming ExtB's output: records when it ran."""

    folder = luigi.Parameter()

    def requires(self):
        return ExtB(folder=self.folder, blocks=4)

    def output(self):
        return luigi.LocalTarget(str(Path(self.folder) / "report.txt"))

    def run(self):
        assert self.input().exists()
        with self.output().open("w") as file:
            file.write(f"{time.time():.6f}\n")


FAILURES: list[tuple[str, BaseException]] = []


@Recording.event_handler(luigi.Event.FAILURE)
def _remember_failure(task, exception):
    FAILURES.append((task.task_id, exception))


def calls(folder: Path) -> list[tuple[str, int, float, float, int, int]]:
    return [(family, int(begin), float(start), float(end), int(pid), int(set_up))
            for family, begin, start, end, pid, set_up in read_lines(folder / "calls.txt")]


# --------------------------------------------------------------------------- parameters
def test_parameters_are_insignificant_and_default_from_the_section(tmp_path, luigi_settings):
    values = {"num_workers": "3", "max_retries": "5", "timeout": "7.5", "fit": "shrink",
              "read_write_conflict": "false"}
    for key, value in values.items():
        luigi_settings("luigi_daisy", key, value)
    task = Simple(folder=str(tmp_path), blocks=5)
    assert (task.num_workers, task.max_retries, task.timeout, task.fit,
            task.read_write_conflict) == (3, 5, 7.5, "shrink", False)
    core = task.daisy_task()
    assert (core.num_workers, core.max_retries, core.timeout, core.fit,
            core.read_write_conflict) == (3, 5, 7.5, "shrink", False)

    params = dict(Simple.get_params())
    for name in BLOCKWISE_PARAMETERS:
        assert params[name].significant is False, name
    significant = task.to_str_params(only_significant=True)
    assert not set(BLOCKWISE_PARAMETERS) & set(significant)

    # explicit values win, and the task is the same task (same id, same ledger)
    other = Simple(folder=str(tmp_path), blocks=5, num_workers=1, max_retries=0,
                   fit="valid", read_write_conflict=True)
    assert (other.num_workers, other.max_retries, other.fit, other.read_write_conflict) == (
        1, 0, "valid", True)
    assert other.task_id == task.task_id
    assert other.ledger_file() == task.ledger_file()


def test_unknown_keys_of_the_section_are_refused_by_name(tmp_path, luigi_settings):
    luigi_settings("luigi_daisy", "num_workerz", "2")
    luigi_settings("luigi_daisy", "ledger_folder", "x")
    with pytest.raises(ConfigError) as error:
        settings()
    assert "num_workerz" in str(error.value) and "ledger_folder" in str(error.value)
    assert "num_workers" in str(error.value)  # the known keys are listed

    task = Simple(folder=str(tmp_path), blocks=2)
    with pytest.raises(ConfigError, match="num_workerz"):
        task.complete()
    assert build(task) is False
    assert not (tmp_path / "calls.txt").exists()


# --------------------------------------------------------------------------- worker hooks
def test_setup_worker_runs_once_per_worker_process_before_its_first_block(
        tmp_path, luigi_settings):
    task = Simple(folder=str(tmp_path), blocks=24, num_workers=2)
    assert build(task) is True
    processed = calls(tmp_path)
    assert sorted(begin for _, begin, *_ in processed) == [k * BLOCK for k in range(24)]
    assert all(set_up == 1 for *_, set_up in processed), "a block ran before setup_worker"
    setups = [int(pid) for _family, pid, _time in read_lines(tmp_path / "setup.txt")]
    assert len(setups) == len(set(setups)) <= 2, setups
    assert {pid for _, _, _, _, pid, _ in processed} <= set(setups)
    assert os.getpid() not in setups  # setup runs in the worker processes
    assert task.complete()


def test_check_block_skips_blocks_already_done(tmp_path, luigi_settings):
    done = {k * BLOCK for k in range(0, 10, 3)}
    for begin in done:
        (tmp_path / f"done_{begin}").touch()
    task = Checked(folder=str(tmp_path), blocks=10)
    assert build(task) is True
    processed = [begin for _, begin, *_ in calls(tmp_path)]
    assert sorted(processed) == sorted(set(range(0, 10 * BLOCK, BLOCK)) - done)
    assert task.complete()


# --------------------------------------------------------------------------- completion
def test_output_is_the_ledger_target_and_complete_reads_the_manifest_only(tmp_path, luigi_settings,
                                                               monkeypatch):
    task = Huge(folder=str(tmp_path))
    assert isinstance(task.output(), LedgerTarget)
    assert Path(task.output().path) == Path(task.ledger_file())
    assert not task.complete()

    geometry = task.geometry()
    assert geometry["num_blocks"] == 10 ** 6
    ledger = Ledger(task.ledger_file(), task.task_id, geometry)
    for index in range(geometry["num_blocks"]):
        ledger.record_done(index)
    ledger.flush()
    ledger.close()

    # complete() reads the manifest alone: with every chunk of done blocks replaced by
    # garbage it still answers (and the chunks are put back for the run below)
    chunks = {chunk: chunk.read_bytes() for chunk in Path(task.ledger_file()).glob("done-*")}
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(b"garbage")
    assert task.complete()
    for chunk, data in chunks.items():
        chunk.write_bytes(data)

    assert build(task) is True
    assert not (tmp_path / "huge_calls.txt").exists()


def test_a_failed_run_raises_with_the_execution_summary(tmp_path, luigi_settings):
    (tmp_path / f"fail_Simple_{3 * BLOCK}").touch()
    task = Simple(folder=str(tmp_path), blocks=6, max_retries=0)
    FAILURES.clear()
    result = build(task, detailed=True)
    assert result.status == LuigiStatusCode.FAILED
    assert build(task) is False
    failures = [error for task_id, error in FAILURES if task_id == task.task_id]
    assert failures and all(isinstance(error, BlockwiseRunError) for error in failures)
    message = str(failures[0])
    assert "Execution Summary" in message
    assert "failed    ✗: 1" in message
    assert f"injected failure in block {3 * BLOCK}" in message
    assert not task.complete()


def test_the_luigi_command_exits_with_the_task_failed_code(tmp_path):
    module = tmp_path / "modules"
    module.mkdir()
    (module / "broken_blocks.py").write_text(textwrap.dedent('''
        from luigi_daisy import BlockwiseTask, Roi

        class BrokenBlocks(BlockwiseTask):
            def total_roi(self):
                return Roi((0,), (40,))

            def read_roi(self):
                return Roi((0,), (10,))

            def write_roi(self):
                return Roi((0,), (10,))

            def process_block(self, block):
                if block.write_roi.begin[0] == 20:
                    raise RuntimeError("block 20 is broken")
        '''))
    write_config(tmp_path, {"luigi_daisy": {"max_retries": 0, "ledger_dir": "ledgers",
                                            "log_dir": "logs"}})
    returncode, output = run_luigi(
        tmp_path, ["--module", "broken_blocks", "BrokenBlocks", "--local-scheduler",
                   "--retcode-task-failed", "3"], extra_path=module)
    assert returncode == 3, output[-3000:]
    assert "Execution Summary" in output and "block 20 is broken" in output


def test_rerun_resumes_with_the_failed_blocks_and_those_depending_on_them(
        tmp_path, luigi_settings):
    failing = 3 * BLOCK
    marker = tmp_path / f"fail_ChainA_{failing}"
    marker.touch()
    # ChainB reads ChainA and writes itself: no read/write conflicts between its blocks,
    # so exactly the blocks that read the failed block depend on it
    task = ChainB(folder=str(tmp_path), blocks=8, max_retries=0, read_write_conflict=False)
    assert build(task) is False
    first = calls(tmp_path)
    # ChainB block at `begin` reads [begin - BLOCK, begin + 2 BLOCK): it needs ChainA's
    # failed block when that range meets [failing, failing + BLOCK)
    dependent = {begin for begin in range(0, 8 * BLOCK, BLOCK)
                 if begin - BLOCK < failing + BLOCK and failing < begin + 2 * BLOCK}
    assert dependent == {failing - BLOCK, failing, failing + BLOCK}
    assert sorted(begin for family, begin, *_ in first if family == "ChainA") == sorted(
        set(range(0, 8 * BLOCK, BLOCK)) - {failing})
    assert sorted(begin for family, begin, *_ in first if family == "ChainB") == sorted(
        set(range(0, 8 * BLOCK, BLOCK)) - dependent)

    marker.unlink()
    assert build(ChainB(folder=str(tmp_path), blocks=8, max_retries=0,
                        read_write_conflict=False)) is True
    second = calls(tmp_path)[len(first):]
    assert sorted((family, begin) for family, begin, *_ in second) == sorted(
        [("ChainA", failing)] + [("ChainB", begin) for begin in dependent])
    assert task.complete() and ChainA(folder=str(tmp_path), blocks=8).complete()


# --------------------------------------------------------------------------- ordinary edges
def test_edges_to_ordinary_tasks_stay_ordinary(tmp_path, luigi_settings):
    report = ExtReport(folder=str(tmp_path))
    result = build(report, detailed=True)
    assert result.status not in (LuigiStatusCode.SUCCESS, LuigiStatusCode.FAILED)
    assert not (tmp_path / "calls.txt").exists()  # neither blockwise task ran
    assert not (tmp_path / "report.txt").exists()

    (tmp_path / "input.txt").write_text("here\n")
    assert build(ExtReport(folder=str(tmp_path))) is True
    processed = calls(tmp_path)
    assert Counter(family for family, *_ in processed) == {"ExtA": 4, "ExtB": 4}
    report_time = float((tmp_path / "report.txt").read_text())
    assert report_time >= max(end for _, _, _, end, _, _ in processed)


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_missing_external_input_is_summarised_as_missing(tmp_path, luigi_settings,
                                                           pipelining):
    """Luigi's run status says the input is missing, as for plain Luigi tasks (with
    pipelining, the hidden upstream blockwise task must not change that)."""
    luigi_settings("luigi_daisy", "pipelining", str(pipelining).lower())
    result = build(ExtReport(folder=str(tmp_path)), detailed=True)
    assert result.status == LuigiStatusCode.MISSING_EXT
    assert not (tmp_path / "calls.txt").exists()


# --------------------------------------------------------------------------- pipelining
@pytest.mark.parametrize("pipelining", [True, False])
def test_pipelining_starts_downstream_blocks_before_upstream_ends(
        tmp_path, luigi_settings, pipelining):
    events = tmp_path / "events.log"
    luigi_settings("luigi_daisy", "pipelining", str(pipelining).lower())
    luigi_settings("luigi_daisy", "num_workers", "2")
    for family in ("Smooth", "Threshold"):
        luigi_settings(family, "events_file", str(events))
        luigi_settings(family, "block_seconds", "0.01")
    workdir = tmp_path / "data"
    task = example.Threshold(workdir=str(workdir), size=SIZE, block_size=BLOCK_SIZE,
                             level=0.5)
    assert build(task) is True
    smooth_id = task.requires().task_id
    by_task = events_by_task(events)
    check_each_block_once(by_task, 2)
    upstream_last_end = max(end for _, _, end in by_task[smooth_id])
    downstream_first_start = min(start for _, start, _ in by_task[task.task_id])
    if pipelining:
        assert downstream_first_start < upstream_last_end
    else:
        assert downstream_first_start >= upstream_last_end
    check_example_outputs(workdir, levels=(0.5,), reports=False)
    assert task.complete() and task.requires().complete()


@pytest.mark.parametrize("workers", [1, 4])
def test_the_luigi_command_runs_a_diamond(tmp_path, workers):
    example_config(tmp_path)
    returncode, output = run_luigi(tmp_path, example_args() + ["--workers", str(workers)])
    assert returncode == 0, output[-5000:]
    by_task = events_by_task(tmp_path / "events.log")
    check_each_block_once(by_task, 3)  # Smooth and two Thresholds
    check_example_outputs(tmp_path / "pipeline_data")

    # a finished pipeline runs again as a no-op
    lines = len(read_lines(tmp_path / "events.log"))
    returncode, output = run_luigi(tmp_path, example_args() + ["--workers", str(workers)],
                                   log_name="rerun.log")
    assert returncode == 0, output[-5000:]
    assert len(read_lines(tmp_path / "events.log")) == lines
    assert "ran successfully" not in output  # nothing ran: everything was complete


def test_two_luigi_commands_at_once_process_each_block_once(tmp_path):
    """Two identical commands started together (``--no-lock``: Luigi would otherwise
    refuse to run a command that is already running) share the work: each block of
    each task is processed once, by one of them, and neither waits for ever."""
    example_config(tmp_path, timed_log=True, block_seconds=0.05)
    args = example_args() + ["--workers", "2", "--no-lock"]
    first = start_luigi(tmp_path, args, "first.log")
    try:
        second = start_luigi(tmp_path, args, "second.log")
    except BaseException:
        stop_group(first)
        raise
    outcomes = [finish_luigi(tmp_path, first, "first.log"),
                finish_luigi(tmp_path, second, "second.log")]
    for returncode, output in outcomes:
        assert returncode == 0, output[-5000:]
    # both worked at the same time: Smooth's run() drives each command's pipelined run
    # (Threshold's blocks inside it; Luigi's own Threshold afterwards is a no-op), and
    # the command that did not claim a task followed it through its ledger meanwhile
    (first_start, first_end), (second_start, second_end) = (
        running_window(output, "Smooth") for _, output in outcomes)
    assert first_start < second_end and second_start < first_end
    check_each_block_once(events_by_task(tmp_path / "events.log"), 3)
    check_example_outputs(tmp_path / "pipeline_data")
