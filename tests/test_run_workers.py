"""``run_blockwise`` with worker processes (the default): daisy's tutorial scenarios.

Every test runs a real block server on 127.0.0.1 and real worker processes (forked, or
scripts started with ``subprocess``). Workers report what they did through files in
``tmp_path`` (one file per event, so concurrent writers never share a file); the tests
read those files and the run's counters and execution summary afterwards. No test waits
a fixed time: runs end when their blocks are done, and every wait has a deadline.
"""

from __future__ import annotations

import inspect
import io
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import zarr
from numpy.lib.stride_tricks import sliding_window_view

import luigi_daisy as daisy
from luigi_daisy import Roi
from luigi_daisy.client import Client

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_stray_processes")]

FAILURE_RATE = 0.2
SCRIPT_TIMEOUT = 60.0


# ---------------------------------------------------------------------------- helpers
def run(tasks, tmp_path: Path, **options) -> daisy.RunResult:
    """``run_blockwise`` with worker processes, logs in ``tmp_path/logs``."""
    return daisy.run_blockwise(tasks, progress=False, log_dir=tmp_path / "logs", **options)


def record(folder: Path, name: str, text: str = "") -> None:
    """Leave a file ``folder/name.<unique>`` holding ``text`` (one file per event)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.{uuid.uuid4().hex}").write_text(text)


def recorded(folder: Path) -> Counter:
    """How often each name was recorded in ``folder``."""
    if not folder.exists():
        return Counter()
    return Counter(path.name.rsplit(".", 1)[0] for path in folder.iterdir())


def recorded_texts(folder: Path) -> dict[str, list[str]]:
    """The texts recorded under each name."""
    texts: dict[str, list[str]] = {}
    for path in folder.iterdir():
        texts.setdefault(path.name.rsplit(".", 1)[0], []).append(path.read_text())
    return texts


def next_attempt(folder: Path, index: int) -> int:
    """Claim and return the number of this attempt at block ``index`` (0 for the first)."""
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(100):
        try:
            os.close(os.open(folder / f"{index}_{attempt}", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        return attempt
    raise AssertionError(f"block {index} was attempted 100 times")


def unlucky(seed: str, key) -> bool:
    """Deterministic 20% coin, the same in every process and every run."""
    return random.Random(f"{seed}:{key}").random() < FAILURE_RATE


def line_task(task_id: str, num_blocks: int, process_function, block_size: int = 10,
              **options) -> daisy.Task:
    """A 1D task of ``num_blocks`` independent blocks."""
    options.setdefault("read_write_conflict", False)
    return daisy.Task(
        task_id, total_roi=Roi((0,), (num_blocks * block_size,)),
        read_roi=Roi((0,), (block_size,)), write_roi=Roi((0,), (block_size,)),
        process_function=process_function, **options)


def task_section(summary: str, task_id: str) -> str:
    """The part of the execution summary that describes one task."""
    match = re.search(rf"Task {re.escape(task_id)}:(.*?)(?=\n\s*Task \S+:|\Z)", summary,
                      re.DOTALL)
    assert match, f"no section for task {task_id!r} in the summary:\n{summary}"
    return match.group(1)


def summary_counts(summary: str, task_id: str) -> dict[str, int]:
    """Numbers the execution summary reports for one task."""
    section = task_section(summary, task_id)
    patterns = {"num_blocks": r"num blocks\s*:\s*(\d+)", "completed": r"completed\W*:\s*(\d+)",
                "failed": r"failed\W*:\s*(\d+)", "orphaned": r"orphaned\W*:\s*(\d+)"}
    counts = {}
    for name, pattern in patterns.items():
        match = re.search(pattern, section)
        assert match, f"summary of task {task_id!r} has no {name!r} count:\n{section}"
        counts[name] = int(match.group(1))
    return counts


def assert_counts(state: daisy.TaskState, total: int, completed: int, failed: int = 0,
                  orphaned: int = 0) -> None:
    actual = (state.total_block_count, state.completed_count, state.failed_count,
              state.orphaned_count, state.processing_count)
    assert actual == (total, completed, failed, orphaned, 0), state


def to_slices(roi: Roi, origin=(0, 0)) -> tuple[slice, ...]:
    """numpy slices of ``roi`` in an array whose first element sits at ``origin``."""
    return tuple(slice(begin - offset, end - offset)
                 for begin, end, offset in zip(roi.begin, roi.end, origin))


def run_script(script: Path, *args: str, cwd: Path, timeout: float = SCRIPT_TIMEOUT,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a Python script in its own session; kill the whole session on the way out."""
    process = subprocess.Popen([sys.executable, str(script), *args], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{script.name} did not finish in {timeout} s\n{stdout}\n{stderr}")
    finally:
        try:  # workers the script may have left behind share its session
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


# ---------------------------------------------------------------------------- default run
def test_multiprocessing_is_the_default_and_workers_log_to_their_files(tmp_path, capfd):
    assert inspect.signature(daisy.run_blockwise).parameters["multiprocessing"].default is True
    blocks = tmp_path / "blocks"

    def process(block):
        record(blocks, f"{block.task_id}_{block.index}", str(os.getpid()))
        print(f"stdout of block {block.index}", flush=True)
        logging.getLogger("tutorial").warning("stderr of block %s", block.index)

    alpha = line_task("alpha", 12, process, num_workers=2)
    beta = line_task("beta", 12, process, num_workers=1, upstream_tasks=[alpha])
    result = daisy.run_blockwise([beta], progress=False, log_dir=tmp_path / "logs")
    summary = capfd.readouterr().out

    assert result and result.succeeded
    assert_counts(result["alpha"], 12, 12)
    assert_counts(result["beta"], 12, 12)
    assert "Execution Summary" in summary
    assert summary_counts(summary, "alpha") == dict(num_blocks=12, completed=12, failed=0,
                                                    orphaned=0)
    assert summary_counts(summary, "beta")["completed"] == 12

    texts = recorded_texts(blocks)
    assert set(texts) == {f"{task}_{index}" for task in ("alpha", "beta") for index in range(12)}
    assert all(len(pids) == 1 for pids in texts.values())
    pids = {task: {int(texts[f"{task}_{index}"][0]) for index in range(12)}
            for task in ("alpha", "beta")}
    assert os.getpid() not in pids["alpha"] | pids["beta"]
    # one pool of at most total_workers (the CPUs this process may use) serves both tasks
    assert len(pids["alpha"] | pids["beta"]) <= min(len(os.sched_getaffinity(0)), 3)

    folder = tmp_path / "logs" / "pool"
    names = sorted(path.name for path in folder.iterdir())
    ids = sorted({int(re.fullmatch(r"worker_(\d+)\.(out|err)", name).group(1))
                  for name in names})
    assert len(pids["alpha"] | pids["beta"]) <= len(ids) <= min(len(os.sched_getaffinity(0)),
                                                                 3), names
    assert names == sorted(f"worker_{i}.{suffix}" for i in ids for suffix in ("out", "err"))
    out = "".join((folder / f"worker_{i}.out").read_text() for i in ids)
    err = "".join((folder / f"worker_{i}.err").read_text() for i in ids)
    assert sorted(map(int, re.findall(r"stdout of block (\d+)", out))) == sorted(
        list(range(12)) * 2)
    assert sorted(map(int, re.findall(r"stderr of block (\d+)", err))) == sorted(
        list(range(12)) * 2)
    assert not (tmp_path / "logs" / "alpha").exists()
    assert not (tmp_path / "daisy_logs").exists()


def test_default_log_dir_is_daisy_logs_in_the_working_directory(tmp_path):
    task = line_task("defaults", 4, lambda block: None)
    result = daisy.run_blockwise([task], progress=False)
    assert result
    assert (tmp_path / "daisy_logs" / "defaults" / "worker_0.out").is_file()
    assert (tmp_path / "daisy_logs" / "defaults" / "worker_0.err").is_file()


def test_runs_when_sys_stdout_has_no_file_descriptor(tmp_path):
    """Scripts, notebooks and test runners often capture ``sys.stdout`` in a stream
    without a file descriptor; the workers must still run and log to their files."""
    done = tmp_path / "done"
    task = line_task("captured", 6, lambda block: record(done, str(block.index)),
                     max_worker_restarts=1)
    captured = io.StringIO()
    with redirect_stdout(captured):
        result = run([task], tmp_path)
    assert result, captured.getvalue()
    assert recorded(done) == Counter({str(index): 1 for index in range(6)})
    assert "Execution Summary" in captured.getvalue()


def test_init_callback_is_called_once_per_task_with_the_context(tmp_path):
    calls = tmp_path / "init_calls"

    def init_callback(context):
        record(calls, context["task_id"], f"{context['hostname']}:{context['port']}")

    first = line_task("first", 6, lambda block: None, num_workers=2,
                      init_callback_fn=init_callback)
    second = line_task("second", 6, lambda block: None, num_workers=2,
                       init_callback_fn=init_callback, upstream_tasks=[first])
    result = run([second], tmp_path)
    assert result
    assert recorded(calls) == Counter({"first": 1, "second": 1})
    for addresses in recorded_texts(calls).values():
        assert re.fullmatch(r"127\.0\.0\.1:\d+", addresses[0])


# ---------------------------------------------------------------------------- chaining
def test_chained_tasks_run_concurrently_on_one_pool_of_workers(tmp_path):
    times = tmp_path / "times"
    num_blocks = 30

    def timed(block):
        start = time.time()
        time.sleep(0.03)
        record(times, f"{block.task_id}_{block.index}", f"{start} {time.time()} {os.getpid()}")

    upstream = line_task("upstream", num_blocks, timed, num_workers=2)
    downstream = line_task("downstream", num_blocks, timed, num_workers=1,
                           upstream_tasks=[upstream])
    result = run([downstream], tmp_path)
    assert result
    assert_counts(result["upstream"], num_blocks, num_blocks)
    assert_counts(result["downstream"], num_blocks, num_blocks)

    spans = {name: tuple(float(value) for value in texts[0].split())
             for name, texts in recorded_texts(times).items()}
    assert len(spans) == 2 * num_blocks
    up = [spans[f"upstream_{index}"] for index in range(num_blocks)]
    down = [spans[f"downstream_{index}"] for index in range(num_blocks)]
    # each downstream block reads exactly its upstream block: it starts after that one ended
    for index in range(num_blocks):
        assert down[index][0] >= up[index][1], index
    # ... but long before the upstream task is done
    assert min(start for start, _, _ in down) < max(end for _, end, _ in up)
    # one pool, within the budget, serves both
    assert len({pid for *_, pid in up} | {pid for *_, pid in down}) <= min(
        len(os.sched_getaffinity(0)), 3)


# ---------------------------------------------------------------------------- tutorial
def test_tutorial_random_failures_with_retries(tmp_path, capfd):
    """The tutorial's task that fails 20% of the time, with retries: the blocks unlucky
    on every attempt fail, the others complete, and the summary points to the logs."""
    attempts = tmp_path / "attempts"
    done = tmp_path / "done"
    num_blocks, max_retries, seed = 60, 1, "tutorial"

    def process_with_failures(block):
        attempt = next_attempt(attempts, block.index)
        if unlucky(seed, (block.index, attempt)):
            raise RuntimeError(f"random failure in block {block.index} attempt {attempt}")
        record(done, str(block.index))

    outcomes = {}
    for index in range(num_blocks):
        tries = 0
        while tries <= max_retries and unlucky(seed, (index, tries)):
            tries += 1
        outcomes[index] = tries  # == max_retries + 1: failed for good
    expected_failed = {index for index, tries in outcomes.items() if tries > max_retries}
    expected_attempts = sum(min(tries + 1, max_retries + 1) for tries in outcomes.values())
    assert expected_failed and len(expected_failed) < num_blocks  # the seed is interesting

    task = line_task("random_failures", num_blocks, process_with_failures, num_workers=2,
                     max_retries=max_retries)
    result = run([task], tmp_path)
    summary = capfd.readouterr().out

    assert not result
    state = result["random_failures"]
    assert_counts(state, num_blocks, num_blocks - len(expected_failed), len(expected_failed))
    assert set(state.failed_blocks) == expected_failed
    assert recorded(done) == Counter({str(index): 1 for index in range(num_blocks)
                                      if index not in expected_failed})
    assert sum(1 for _ in attempts.iterdir()) == expected_attempts

    assert summary_counts(summary, "random_failures") == dict(
        num_blocks=num_blocks, completed=num_blocks - len(expected_failed),
        failed=len(expected_failed), orphaned=0)
    section = task_section(summary, "random_failures")
    for index in expected_failed:
        assert re.search(rf"\b{index}: RuntimeError: random failure in block {index} ",
                         section), section
    logs = re.findall(r"\S+worker_\d+\.err", section)
    assert logs, section
    tracebacks = "".join(Path(path).read_text() for path in logs)
    for index in expected_failed:
        assert f"random failure in block {index} attempt {max_retries}" in tracebacks
    assert "Traceback (most recent call last)" in tracebacks


WORKER_SCRIPT = """\
import os
import sys
from pathlib import Path

import luigi_daisy as daisy

out = Path(sys.argv[1])
client = daisy.Client()
while True:
    with client.acquire_block() as block:
        if block is None:
            break
        (out / f"{block.task_id}_{block.index}_{os.getpid()}").write_text(str(block.write_roi))
"""


def test_tutorial_subprocess_worker_with_its_own_client_loop(tmp_path):
    script = tmp_path / "tutorial_worker.py"
    script.write_text(WORKER_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()

    def start_worker():
        subprocess.run([sys.executable, str(script), str(out)], check=True,
                       timeout=SCRIPT_TIMEOUT)

    task = line_task("subprocess_worker", 16, start_worker, num_workers=2,
                     max_worker_restarts=2)
    result = run([task], tmp_path)
    errors = "".join(path.read_text() for path in (tmp_path / "logs").rglob("*.err"))
    assert result, errors
    assert_counts(result["subprocess_worker"], 16, 16)
    names = [path.name.rsplit("_", 1)[0] for path in out.iterdir()]
    assert sorted(names) == sorted(f"subprocess_worker_{index}" for index in range(16))
    for path in out.iterdir():
        index = int(path.name.split("_")[2])
        assert path.read_text() == str(Roi((index * 10,), (10,)))


CONTEXT_SCRIPT = """\
import os
import sys
from pathlib import Path

from luigi_daisy.client import Client

out = Path(sys.argv[1])
variable = sys.argv[2]
client = Client()
while True:
    with client.acquire_block() as block:
        if block is None:
            break
        (out / f"{block.task_id}_{block.index}_{variable}").touch()
client.close()
"""


@pytest.mark.parametrize("variable", ["LUIGI_DAISY_CONTEXT", "DAISY_CONTEXT"])
def test_client_reads_its_context_from_either_environment_variable(tmp_path, variable):
    script = tmp_path / "context_worker.py"
    script.write_text(CONTEXT_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()

    def start_worker():
        assert "LUIGI_DAISY_CONTEXT" in os.environ and "DAISY_CONTEXT" in os.environ
        env = {name: value for name, value in os.environ.items()
               if name not in ("LUIGI_DAISY_CONTEXT", "DAISY_CONTEXT")}
        env[variable] = os.environ[variable]
        subprocess.run([sys.executable, str(script), str(out), variable], env=env,
                       check=True, timeout=SCRIPT_TIMEOUT)

    task = line_task("context", 8, start_worker, num_workers=1)
    result = run([task], tmp_path)
    assert result
    assert sorted(path.name for path in out.iterdir()) == sorted(
        f"context_{index}_{variable}" for index in range(8))


def test_exception_inside_acquire_block_fails_that_block_and_the_worker_goes_on(
        tmp_path, capfd):
    done = tmp_path / "done"
    finished_loops = tmp_path / "finished_loops"
    failing = {3, 7, 11}

    def own_loop():
        client = Client()
        while True:
            with client.acquire_block() as block:
                if block is None:
                    break
                if block.index in failing:
                    raise ValueError(f"bad block {block.index}")
                record(done, str(block.index))
        client.close()
        record(finished_loops, str(os.getpid()))

    task = line_task("own_loop", 20, own_loop, num_workers=2, max_retries=0)
    result = run([task], tmp_path)
    summary = capfd.readouterr().out

    state = result["own_loop"]
    assert_counts(state, 20, 17, 3)
    assert set(state.failed_blocks) == failing
    for index in failing:
        assert f"ValueError: bad block {index}" in state.failed_blocks[index]
        assert re.search(rf"\b{index}: ValueError: bad block {index}", summary), summary
    assert recorded(done) == Counter({str(index): 1 for index in range(20)
                                      if index not in failing})
    assert sum(recorded(finished_loops).values()) == 2, "both workers finished their loop"
    assert state.worker_failure_count == 0 and state.worker_restart_count == 0
    logs = re.findall(r"\S+worker_\d+\.err", task_section(summary, "own_loop"))
    assert logs and "bad block" in "".join(Path(path).read_text() for path in logs)


def test_tutorial_two_task_chain_over_zarr(tmp_path):
    """Double an image block by block, then sum 5x5 neighbourhoods of the doubled image
    in a second task whose blocks read across the first task's blocks."""
    rng = np.random.default_rng(1)
    raw_data = rng.integers(0, 100, size=(68, 68), dtype=np.int64)
    raw = zarr.open_array(tmp_path / "raw.zarr", mode="w", shape=(68, 68), chunks=(17, 17),
                          dtype="int64")
    raw[:] = raw_data
    doubled = zarr.open_array(tmp_path / "doubled.zarr", mode="w", shape=(68, 68),
                              chunks=(17, 17), dtype="int64")
    # the box sums cover world coordinates 2..65, stored from index 0
    boxed = zarr.open_array(tmp_path / "boxed.zarr", mode="w", shape=(64, 64),
                            chunks=(16, 16), dtype="int64")

    def double(block):
        doubled[to_slices(block.write_roi)] = raw[to_slices(block.write_roi)] * 2

    def box_sum(block):
        data = np.asarray(doubled[to_slices(block.read_roi)])
        boxed[to_slices(block.write_roi, origin=(2, 2))] = \
            sliding_window_view(data, (5, 5)).sum(axis=(-2, -1))

    double_task = daisy.Task(
        "double", total_roi=Roi((0, 0), (68, 68)), read_roi=Roi((0, 0), (17, 17)),
        write_roi=Roi((0, 0), (17, 17)), process_function=double, read_write_conflict=False,
        num_workers=2)
    box_task = daisy.Task(
        "box_sum", total_roi=Roi((0, 0), (68, 68)), read_roi=Roi((0, 0), (20, 20)),
        write_roi=Roi((2, 2), (16, 16)), process_function=box_sum, read_write_conflict=False,
        num_workers=2, upstream_tasks=[double_task])
    result = run([box_task], tmp_path)

    assert result
    assert_counts(result["double"], 16, 16)
    assert_counts(result["box_sum"], 16, 16)
    np.testing.assert_array_equal(doubled[:], raw_data * 2)
    np.testing.assert_array_equal(
        boxed[:], sliding_window_view(raw_data * 2, (5, 5)).sum(axis=(-2, -1)))


def test_tutorial_map_and_reduce_over_zarr(tmp_path):
    shape, size = (64, 64), 16
    rows, columns = np.indices(shape)
    expected = (rows * 3 + columns * 7) % 11
    values = zarr.open_array(tmp_path / "values.zarr", mode="w", shape=shape,
                             chunks=(size, size), dtype="int64")
    sums = zarr.open_array(tmp_path / "sums.zarr", mode="w", shape=(4, 4), chunks=(1, 1),
                           dtype="int64", fill_value=-1)

    def map_block(block):
        begin, end = block.write_roi.begin, block.write_roi.end
        block_rows, block_columns = np.indices(tuple(end - begin))
        values[to_slices(block.write_roi)] = \
            ((block_rows + begin[0]) * 3 + (block_columns + begin[1]) * 7) % 11

    def reduce_block(block):
        position = tuple(begin // size for begin in block.write_roi.begin)
        sums[position] = int(np.asarray(values[to_slices(block.read_roi)]).sum())

    template = Roi((0, 0), (size, size))
    map_task = daisy.Task("map", total_roi=Roi((0, 0), shape), read_roi=template,
                          write_roi=template, process_function=map_block,
                          read_write_conflict=False, num_workers=2)
    reduce_task = daisy.Task("reduce", total_roi=Roi((0, 0), shape), read_roi=template,
                             write_roi=template, process_function=reduce_block,
                             read_write_conflict=False, num_workers=2,
                             upstream_tasks=[map_task])
    result = run([reduce_task], tmp_path)

    assert result
    assert_counts(result["map"], 16, 16)
    assert_counts(result["reduce"], 16, 16)
    np.testing.assert_array_equal(values[:], expected)
    np.testing.assert_array_equal(sums[:], expected.reshape(4, size, 4, size).sum(axis=(1, 3)))
    assert int(np.asarray(sums[:]).sum()) == int(expected.sum())


# ---------------------------------------------------------------------------- __main__
MAIN_SCRIPT = """\
import sys
from pathlib import Path

import luigi_daisy as daisy
from luigi_daisy import Roi

out = Path(sys.argv[1])


def top_level(block):
    (out / f"top_level_{block.index}").touch()


def make_writer(prefix):
    def write(block):
        (out / f"{prefix}_{block.index}").touch()
    return write


def line(task_id, process_function, **options):
    return daisy.Task(task_id, total_roi=Roi((0,), (80,)), read_roi=Roi((0,), (10,)),
                      write_roi=Roi((0,), (10,)), process_function=process_function,
                      read_write_conflict=False, num_workers=2, **options)


if __name__ == "__main__":
    first = line("top_level", top_level)
    second = line("lambda", lambda block: (out / f"lambda_{block.index}").touch(),
                  upstream_tasks=[first])
    third = line("closure", make_writer("closure"), upstream_tasks=[second])
    result = daisy.run_blockwise([third], progress=False, log_dir=out.parent / "logs")
    sys.exit(0 if result else 1)
"""


def test_main_script_functions_lambdas_and_closures_reach_the_workers(tmp_path):
    script = tmp_path / "pipeline.py"
    script.write_text(MAIN_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    completed = run_script(script, str(out), cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Execution Summary" in completed.stdout
    assert sorted(path.name for path in out.iterdir()) == sorted(
        f"{prefix}_{index}" for prefix in ("top_level", "lambda", "closure")
        for index in range(8))
    # the three tasks share one pool of workers, which unpickled all three functions
    assert sorted(path.name for path in (tmp_path / "logs").iterdir()) == ["pool"]
