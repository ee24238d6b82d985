"""Workers are fresh processes (``python -m luigi_daisy.worker``) unless asked to fork.

Covers issue 9, section 1: a parent that started threads (dask under a funlib.persistence
``Array``, a thread pool) before the run; daisy's tutorial map and reduce cells (a funlib
``Array`` and a ``multiprocessing.Array`` in closures); lambdas, closures and ``__main__``
functions; the error for a function that cannot travel; ``start_method="fork"``; the
``[luigi_daisy] start_method`` key; workers that exit 0; the payload file; and forked
workers that must not hold the server's sockets.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import luigi
import numpy as np
import pytest

import luigi_daisy as daisy
from luigi_daisy.errors import ConfigError
from luigi_daisy.luigi.config import settings
from luigi_daisy.context import Context
from luigi_daisy.errors import PayloadError, UnserialisableFunctionError
from luigi_daisy.launchers.base import Launcher, WorkerHandle, WorkerSpec
from luigi_daisy.payload import (
    PAYLOAD_FILE_VARIABLE,
    FunctionTarget,
    WorkerPayload,
    read_payload_file,
    write_payload_file,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_stray_processes")]

REPO = Path(__file__).resolve().parents[1]
WAIT = 60.0  # seconds a test waits for a condition before it fails

#: started (and used) before any run: its threads exist when workers are created
POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-pool")


def line_task(task_id: str, blocks: int, process, block_size: int = 10, **options):
    total = daisy.Roi((0,), (blocks * block_size,))
    block = daisy.Roi((0,), (block_size,))
    return daisy.Task(task_id, total, block, block, process, **options)


def wait_for(condition, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def run(tasks, **options):
    options.setdefault("progress", False)
    return daisy.run_blockwise(tasks, **options)


# --------------------------------------------------------------------------- threads
def test_funlib_array_read_before_the_run_is_read_again_by_a_fresh_worker():
    """Reproduced by hand at HEAD (fork): the worker hung on its first read, logs empty."""
    from funlib.persistence import Array

    data = np.arange(400, dtype=np.float32).reshape(20, 20)
    array = Array(data, offset=(0, 0), voxel_size=(1, 1))
    assert array[daisy.Roi((0, 0), (10, 10))].sum() == data[:10, :10].sum()  # dask runs

    def process(block):
        read = array[block.write_roi]
        begin = block.write_roi.begin
        assert np.array_equal(read, data[begin[0]:begin[0] + 10, begin[1]:begin[1] + 10])

    total, block = daisy.Roi((0, 0), (20, 20)), daisy.Roi((0, 0), (10, 10))
    task = daisy.Task("persistence", total, block, block, process, num_workers=1,
                      max_retries=0)
    result = run([task])
    assert result["persistence"].completed_count == 4
    assert result


def square_with_pool(block):
    """Uses the module's thread pool (already running in the parent)."""
    values = np.arange(block.write_roi.begin[0], block.write_roi.end[0])
    squares = POOL.submit(np.square, values).result(timeout=WAIT)
    out = Path(f"squares_{block.index}.npy")
    np.save(out, squares)


def test_a_thread_pool_started_before_the_run_works_in_the_workers():
    assert POOL.submit(sum, [1, 2]).result() == 3  # the pool has live threads now
    result = run([line_task("pool", 6, square_with_pool, num_workers=2, max_retries=0)])
    assert result
    for index in range(6):
        expected = np.arange(index * 10, index * 10 + 10) ** 2
        assert np.array_equal(np.load(f"squares_{index}.npy"), expected)


# --------------------------------------------------------------------------- tutorial
def test_tutorial_map_cell(tmp_path):
    """daisy's tutorial "Map" cell (smaller): funlib Arrays built here, read and written
    by the workers through the process function's globals/closure."""
    import zarr
    from funlib.persistence import Array

    shape = 16 * 1024
    block_shape = 1024

    a = Array(np.arange(shape, dtype=np.int64), offset=(0,), voxel_size=(1,))
    b = zarr.open_array(str(tmp_path / "b.zarr"), mode="w", shape=(shape,),
                        chunks=(block_shape,), dtype=np.int64)
    b = Array(b, offset=(0,), voxel_size=(1,))

    def process_fn_daisy(block):
        a_sub = a[block.read_roi]
        b_sub = np.empty_like(a_sub)
        with np.nditer([a_sub, b_sub], op_flags=[["readonly"], ["readwrite"]]) as it:
            with it:
                for x, y in it:
                    y[...] = x**2
        b[block.write_roi] = b_sub

    total_roi = daisy.Roi((0,), shape)
    block_roi = daisy.Roi((0,), (block_shape,))
    task = daisy.Task(total_roi=total_roi, read_roi=block_roi, write_roi=block_roi,
                      process_function=process_fn_daisy, num_workers=8, task_id="square")
    assert run([task])
    assert np.array_equal(b[total_roi], np.arange(shape, dtype=np.int64) ** 2)


def test_tutorial_reduce_cell(tmp_path):
    """daisy's tutorial "Reduce" cell: a ``multiprocessing.Array`` (made in the default,
    fork, context, lock included) in a closure, written by fresh workers."""
    import zarr
    from funlib.persistence import Array

    shape = 16 * 1024
    values = np.arange(shape, dtype=np.int64) ** 2
    b = zarr.open_array(str(tmp_path / "b.zarr"), mode="w", shape=(shape,),
                        chunks=(1024,), dtype=np.int64)
    b[:] = values
    b = Array(b, offset=(0,), voxel_size=(1,))

    reduce_shape = shape / 16
    c = multiprocessing.Array("Q", range(int(shape / reduce_shape)))

    def process_fn_sum_reduce(block):
        b_sub = b[block.write_roi]
        s = np.sum(b_sub)
        idx = (block.write_roi.offset / block.write_roi.shape)[0]
        c[idx] = s

    # Python 3.11 cannot pickle a fork-context lock for a spawned child; the run moves
    # it onto a named semaphore first
    assert c.get_lock()._is_fork_ctx
    total_roi = daisy.Roi((0,), shape)
    block_roi = daisy.Roi((0,), reduce_shape)
    task1 = daisy.Task(total_roi=total_roi, read_roi=block_roi, write_roi=block_roi,
                       process_function=process_fn_sum_reduce, num_workers=8,
                       task_id="sum_reduce")
    assert run([task1])
    assert c[:] == [int(part.sum()) for part in values.reshape(16, -1)]
    assert not c.get_lock()._is_fork_ctx
    with c.get_lock():  # the lock still works here after it moved to a named semaphore
        c[0] = 0


def test_a_multiprocessing_lock_is_shared_by_the_workers(tmp_path):
    """A spawn-context lock and counter travel as to multiprocessing's spawn children:
    increments under the lock from 4 workers are not lost."""
    context = multiprocessing.get_context("spawn")
    counter = context.Value("q", 0)

    def count(block):
        for _ in range(200):
            with counter.get_lock():
                counter.value += 1

    assert run([line_task("count", 8, count, num_workers=4)])
    assert counter.value == 8 * 200


# --------------------------------------------------------------------------- functions
def test_lambdas_and_closures_travel(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    suffix = ".done"
    task = line_task("lambda", 5, lambda block: (out / f"{block.index}{suffix}").touch(),
                     num_workers=2)
    assert run([task])
    assert sorted(path.name for path in out.iterdir()) == [f"{i}.done" for i in range(5)]


def test_main_functions_travel(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import os
        import luigi_daisy as daisy

        def process(block):
            with open(f"main_{block.index}", "w") as out:
                out.write(str(os.getpid()))

        if __name__ == "__main__":
            total, block = daisy.Roi((0,), (40,)), daisy.Roi((0,), (10,))
            result = daisy.run_blockwise(
                [daisy.Task("main", total, block, block, process, num_workers=2)],
                progress=False)
            print("SUCCEEDED" if result else "FAILED")
    """))
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), environment.get("PYTHONPATH", "")])
    completed = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=WAIT)
    assert "SUCCEEDED" in completed.stdout, completed.stdout + completed.stderr
    pids = {(tmp_path / f"main_{index}").read_text() for index in range(4)}
    assert str(os.getpid()) not in pids and len(pids) <= 2


def test_init_callback_fn_is_called_once_in_the_run_as_in_daisy_1():
    """daisy 1.x calls ``init_callback_fn(context)`` once, in the server's process, when
    the task starts (daisy 2.0 refuses the argument); workers still get their closures."""
    calls = []
    marker = Path("init_marker")

    def init(context):
        calls.append(dict(context))
        marker.write_text(context["port"])

    def process(block):
        assert marker.exists()

    assert run([line_task("init", 4, process, num_workers=2, init_callback_fn=init)])
    assert len(calls) == 1
    assert calls[0]["task_id"] == "init" and int(calls[0]["port"]) > 0


def test_a_function_that_cannot_travel_is_refused_before_the_run(tmp_path):
    lock = threading.Lock()

    def process(block):
        with lock:
            pass

    log_dir = tmp_path / "logs"
    with pytest.raises(UnserialisableFunctionError) as error:
        run([line_task("locked", 4, process)], log_dir=log_dir)
    message = str(error.value)
    assert "'locked'" in message
    assert "closure variable 'lock'" in message and "_thread.lock" in message
    assert "start_method='fork'" in message and "importable" in message
    assert not log_dir.exists()  # no worker was started


def test_fork_still_runs_what_cannot_travel(tmp_path):
    lock = threading.Lock()
    out = tmp_path / "forked"
    out.mkdir()

    def process(block):
        with lock:
            (out / str(block.index)).write_text(Path("/proc/self/cmdline").read_text())

    assert run([line_task("forked", 4, process, num_workers=2)], start_method="fork")
    assert len(list(out.iterdir())) == 4
    assert all("luigi_daisy.worker" not in path.read_text() for path in out.iterdir())


def test_an_unknown_start_method_is_refused():
    with pytest.raises(daisy.TaskDefinitionError, match="start_method"):
        run([line_task("bad", 2, lambda block: None)], start_method="forkserver")


# --------------------------------------------------------------------------- exit 0
def test_workers_that_exit_0_are_not_replaced(tmp_path):
    """Two user worker loops each take one block and return: the run does not start
    them again (daisy 1.x); it stops, naming the task, with 2 blocks done."""

    def one_block_and_stop():
        client = daisy.Client()
        with client.acquire_block() as block:
            if block is None:
                return
        client.close()

    log_dir = tmp_path / "logs"
    result = run([line_task("stops", 10, one_block_and_stop, num_workers=2)],
                 log_dir=log_dir)
    assert not result
    assert result["stops"].completed_count == 2
    assert result["stops"].worker_restart_count == 0
    assert sorted(path.name for path in (log_dir / "stops").glob("*.err")) == [
        "worker_0.err", "worker_1.err"]


def test_workers_that_fail_are_still_restarted(tmp_path):
    def crash_once(block):
        marker = tmp_path / f"crashed_{block.index}"
        if not marker.exists():
            marker.touch()
            os._exit(3)

    result = run([line_task("crashes", 3, crash_once, num_workers=1)], log_dir=tmp_path)
    assert result
    assert result["crashes"].worker_restart_count == 3


# --------------------------------------------------------------------------- payload
def test_payload_file_is_private_and_refused_when_it_is_not(tmp_path):
    payload = WorkerPayload(FunctionTarget(lambda block: block), "t")
    path = write_payload_file(payload, tmp_path / "payloads")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_payload_file(path).target.process_function()(7) == 7
    second = write_payload_file(payload, tmp_path / "payloads")
    assert second != path
    path.chmod(0o644)
    with pytest.raises(PayloadError, match="mode 644"):
        read_payload_file(path)


class _FilePayloadWorker(WorkerHandle):
    def __init__(self, spec: WorkerSpec, process: subprocess.Popen) -> None:
        self.task_id, self.worker_id = spec.task_id, spec.worker_id
        self.stdout_path, self.stderr_path = spec.stdout_path, spec.stderr_path
        self.process = process

    def exit_code(self):
        return self.process.poll()

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()

    def describe(self):
        return f"pid {self.process.pid}"


class FilePayloadLauncher(Launcher):
    """A launcher that hands the payload over as a cluster job would: in a file."""

    def __init__(self, folder: Path) -> None:
        self.log_dir = folder / "logs"
        self.folder = folder / "payloads"
        self.workers: list[_FilePayloadWorker] = []
        self.files: dict[int, Path] = {}

    def start(self, spec: WorkerSpec) -> WorkerHandle:
        key = id(spec.payload)
        if key not in self.files:
            self.files[key] = write_payload_file(spec.payload, self.folder)
        spec.stdout_path.parent.mkdir(parents=True, exist_ok=True)
        environment = dict(os.environ, **spec.environment)
        environment[PAYLOAD_FILE_VARIABLE] = str(self.files[key])
        with open(spec.stdout_path, "ab") as out, open(spec.stderr_path, "ab") as err:
            process = subprocess.Popen(self.worker_command(), env=environment, stdout=out,
                                       stderr=err, stdin=subprocess.DEVNULL)
        worker = _FilePayloadWorker(spec, process)
        self.workers.append(worker)
        return worker

    def poll(self) -> None:
        for worker in self.workers:
            worker.exit_code()

    def stop_all(self, timeout: float) -> list[str]:
        for worker in self.workers:
            worker.kill()
        alive = []
        for worker in self.workers:
            try:
                worker.process.wait(timeout)
            except subprocess.TimeoutExpired:
                alive.append(worker.describe())
        return alive


def test_workers_read_their_payload_from_a_file(tmp_path):
    out = tmp_path / "from_file"
    out.mkdir()
    launcher = FilePayloadLauncher(tmp_path)
    task = line_task("file", 4, lambda block: (out / str(block.index)).touch(),
                     num_workers=2)
    assert run([task], launcher=launcher)
    assert len(list(out.iterdir())) == 4
    (payload_file,) = launcher.files.values()
    assert stat.S_IMODE(payload_file.stat().st_mode) == 0o600


def test_neither_payload_nor_context_is_on_the_command_line(tmp_path):
    pid_file, go_file = tmp_path / "pid", tmp_path / "go"

    def wait_for_go(block):
        pid_file.write_text(str(os.getpid()))
        deadline = time.monotonic() + WAIT
        while not go_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault(
        "result", run([line_task("cmdline", 1, wait_for_go)])))
    runner.start()
    try:
        pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), "the worker"))
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        environment = Path(f"/proc/{pid}/environ").read_bytes()
    finally:
        go_file.touch()
        runner.join(WAIT)
    assert command[1:4] == [b"-m", b"luigi_daisy.worker", b"--payload-fd"]
    assert len(command) == 5 and command[4].isdigit()
    assert b"LUIGI_DAISY_CONTEXT=" in environment
    assert outcome["result"]


# --------------------------------------------------------------------------- sockets
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_connection_closed_by_the_server_is_seen_closed_while_workers_live(
        tmp_path, start_method):
    """A raw connection opened before a worker is (re)started, then closed by the
    server over a bad frame, reads EOF although that worker is alive."""
    port_file, crash_file = tmp_path / "port", tmp_path / "crash"
    alive_file, go_file = tmp_path / "alive", tmp_path / "go"

    def until(path):
        deadline = time.monotonic() + WAIT
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    def process(block):
        if not port_file.exists():  # first worker: tell the port, then crash on demand
            port_file.write_text(Context.from_env()["port"])
            until(crash_file)
            os._exit(3)
        alive_file.write_text(str(os.getpid()))
        until(go_file)

    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("result", run(
        [line_task("sockets", 1, process)], start_method=start_method, log_dir=tmp_path)))
    runner.start()
    try:
        port = int(wait_for(lambda: port_file.exists() and port_file.read_text(), "port"))
        peer = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        assert peer.recv(4096)  # the server's Challenge: the connection is registered
        crash_file.touch()  # the replacement worker starts while `peer` is open
        wait_for(alive_file.exists, "the replacement worker")
        peer.sendall(b"\xff\xff\xff\xff" + b"\x00" * 16)  # a frame over the size limit
        peer.settimeout(10.0)
        received = b""
        try:
            while chunk := peer.recv(4096):
                received += chunk
        except TimeoutError:
            pytest.fail("the connection the server closed stayed open: a worker holds it")
        finally:
            peer.close()
    finally:
        go_file.touch()
        runner.join(WAIT)
    assert outcome["result"]


# --------------------------------------------------------------------------- Luigi
class CommandLineRecorder(daisy.BlockwiseTask):
    """Writes the command line of the process that ran each block."""

    out_dir = luigi.Parameter()

    def total_roi(self):
        return daisy.Roi((0,), (30,))

    def read_roi(self):
        return daisy.Roi((0,), (10,))

    def write_roi(self):
        return daisy.Roi((0,), (10,))

    def process_block(self, block):
        command = Path("/proc/self/cmdline").read_bytes().replace(b"\0", b" ")
        (Path(self.out_dir) / str(block.index)).write_bytes(command)


@pytest.fixture
def luigi_section(tmp_path):
    """Set ``[luigi_daisy]`` keys in-process for one test; remove them afterwards."""
    config = luigi.configuration.get_config()
    added = not config.has_section("luigi_daisy")
    saved = dict(config.items("luigi_daisy")) if not added else {}
    if added:
        config.add_section("luigi_daisy")

    def set_key(key: str, value: str) -> None:
        config.set("luigi_daisy", key, value)

    set_key("ledger_dir", str(tmp_path / "ledgers"))
    set_key("log_dir", str(tmp_path / "logs"))
    try:
        yield set_key
    finally:
        if added:
            config.remove_section("luigi_daisy")
        else:
            for key in list(config.options("luigi_daisy")):
                if key not in saved:
                    config.remove_option("luigi_daisy", key)
            for key, value in saved.items():
                config.set("luigi_daisy", key, value)


@pytest.mark.parametrize("start_method", [None, "spawn", "fork"])
def test_the_start_method_key_of_luigi_daisy(tmp_path, luigi_section, start_method):
    if start_method is not None:
        luigi_section("start_method", start_method)
    out = tmp_path / f"out_{start_method}"
    out.mkdir()
    assert luigi.build([CommandLineRecorder(out_dir=str(out))], local_scheduler=True,
                       workers=1)
    commands = [path.read_text() for path in out.iterdir()]
    assert len(commands) == 3
    fresh = [" -m luigi_daisy.worker " in command for command in commands]
    assert all(fresh) if start_method != "fork" else not any(fresh)


def test_an_unknown_key_next_to_start_method_is_refused(tmp_path, luigi_section):
    luigi_section("start_method", "spawn")
    luigi_section("start_methods", "fork")
    with pytest.raises(ConfigError, match="start_methods"):
        settings()


def test_a_blockwise_task_defined_in_main_travels_by_value(tmp_path):
    script = tmp_path / "pipeline_script.py"
    script.write_text(textwrap.dedent("""
        import os
        import luigi
        import luigi_daisy as daisy

        class Squares(daisy.BlockwiseTask):
            out_dir = luigi.Parameter()

            def total_roi(self):
                return daisy.Roi((0,), (40,))

            def read_roi(self):
                return daisy.Roi((0,), (10,))

            write_roi = read_roi

            def setup_worker(self):
                self.pid = os.getpid()

            def process_block(self, block):
                with open(os.path.join(self.out_dir, str(block.index)), "w") as out:
                    out.write(str(self.pid))

        if __name__ == "__main__":
            ok = luigi.build([Squares(out_dir="out")], local_scheduler=True, workers=1)
            print("SUCCEEDED" if ok else "FAILED")
    """))
    (tmp_path / "out").mkdir()
    (tmp_path / "luigi.cfg").write_text(
        "[luigi_daisy]\nledger_dir = ledgers\nlog_dir = logs\nnum_workers = 2\n")
    environment = dict(os.environ, LUIGI_CONFIG_PATH=str(tmp_path / "luigi.cfg"))
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), environment.get("PYTHONPATH", "")])
    completed = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=WAIT)
    assert "SUCCEEDED" in completed.stdout, completed.stdout + completed.stderr
    assert len(list((tmp_path / "out").iterdir())) == 4
