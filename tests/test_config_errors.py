"""Bad settings get one clear error before anything starts (issue 19, section 5).

The ``luigi`` cases run the real ``luigi`` command in ``tmp_path`` with a copy of the
repository's ``luigi.cfg`` (whose ``[retcode]`` section makes a configuration error exit
35) with one value changed, or a bad value on the command line. Each must exit 35 with a
message naming the key, the value and what is allowed, and must leave nothing behind: no
ledger folder, no worker logs, no submitted job. The ``run_blockwise`` cases call the
Python API with a bad argument and check the ``ConfigError`` and that no ledger, lock or
log was made.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_exit_codes import REPO, run_luigi, shipped_retcodes

import luigi_daisy as daisy
from luigi_daisy import Roi
from luigi_daisy.errors import ConfigError, LauncherError
from luigi_daisy.launchers.command import CommandLauncher

pytestmark = pytest.mark.timeout(120)

TASKS_MODULE = textwrap.dedent('''
    from luigi_daisy import BlockwiseTask, Roi


    class Tiny(BlockwiseTask):
        """Two blocks that do nothing."""

        def total_roi(self):
            return Roi((0,), (8,))

        def read_roi(self):
            return Roi((0,), (4,))

        def write_roi(self):
            return Roi((0,), (4,))

        def process_block(self, block):
            pass


    class After(Tiny):
        """Reads Tiny's blocks."""

        def requires(self):
            return Tiny()
''')

# a submit command that records each call (and would run the worker, were it reached)
SUBMIT = 'sh -c "touch submitted; echo 1" {worker_command}'
COMMAND_LAUNCHER = "launcher = command\ncancel_command = true {job_id}\n"

# (lines added to [luigi_daisy], the words the message must hold)
SECTION_CASES = {
    "num_workers=-1": ("num_workers = -1", ["num_workers", "'-1'", "1 or more"]),
    "num_workers=0": ("num_workers = 0", ["num_workers", "'0'", "1 or more"]),
    "prefetch=100": ("prefetch = 100", ["prefetch", "100", "from 0 to 8"]),
    "prefetch=-1": ("prefetch = -1", ["prefetch", "-1", "from 0 to 8"]),
    "max_retries=-1": ("max_retries = -1", ["max_retries", "'-1'", "0 or more"]),
    "timeout=abc": ("timeout = abc", ["timeout", "'abc'", "seconds above 0"]),
    "timeout=0": ("timeout = 0", ["timeout", "'0.0'", "seconds above 0"]),
    "timeout=-5": ("timeout = -5", ["timeout", "'-5.0'", "seconds above 0"]),
    "fit=nope": ("fit = nope", ["fit", "'nope'", "valid, overhang or shrink"]),
    "launcher=foo": ("launcher = foo", ["launcher", "'foo'", "local, slurm, lsf or command"]),
    "read_write_conflict=maybe": ("read_write_conflict = maybe",
                                  ["read_write_conflict", "'maybe'", "true or false"]),
    "pipelining=perhaps": ("pipelining = perhaps", ["pipelining", "'perhaps'",
                                                    "true or false"]),
    "start_method=clone": ("start_method = clone", ["start_method", "'clone'",
                                                    "spawn or fork"]),
    "cpus_per_worker=0": ("cpus_per_worker = 0", ["cpus_per_worker", "'0'", "1 or more"]),
    "gpus_per_worker=-1": ("gpus_per_worker = -1", ["gpus_per_worker", "'-1'", "0 or more"]),
    "memory_per_worker=lots": ("memory_per_worker = lots",
                               ["memory_per_worker", "'lots'", "16G"]),
    "walltime=soon": ("walltime = soon", ["walltime", "'soon'", "01:30:00"]),
    "worker_death_timeout=-1": ("worker_death_timeout = -1",
                                ["worker_death_timeout", "-1", "1 or more"]),
    "worker_death_timeout=0": ("worker_death_timeout = 0",
                               ["worker_death_timeout", "'0.0'", "1 or more"]),
    "job_poll_interval=0": ("job_poll_interval = 0", ["job_poll_interval", "0", "1 or more"]),
    "job_poll_interval=0.5": ("job_poll_interval = 0.5",
                              ["job_poll_interval", "0.5", "1 or more"]),
    "pending_report_after=-1": ("pending_report_after = -1",
                                ["pending_report_after", "-1", "0 or more"]),
    "host": ("host = no-such-host.invalid", ["host", "'no-such-host.invalid'",
                                             "does not resolve", "0.0.0.0"]),
    "block_map_host": ("block_map_host = no-such-host.invalid",
                       ["block_map_host", "'no-such-host.invalid'", "does not resolve"]),
    "host not of this machine": ("host = 192.0.2.1",
                                 ["host", "'192.0.2.1'", "not an address of this machine",
                                  "127.0.0.1", "0.0.0.0"]),
    "block_map_host not of this machine": (
        "block_map_host = 192.0.2.1",
        ["block_map_host", "'192.0.2.1'", "not an address of this machine", "127.0.0.1"]),
    "ledger_dir is a file": ("ledger_dir = a_file", ["ledger_dir", "'a_file'",
                                                     "is a file, not a folder"]),
    "log_dir inside a file": ("log_dir = a_file/logs", ["log_dir", "'a_file/logs'",
                                                        "inside 'a_file'"]),
    "unknown placeholder": (f"{COMMAND_LAUNCHER}submit_command = {SUBMIT} {{bogus}}",
                            ["submit_command", "{bogus}", "unknown placeholder",
                             "{worker_command}"]),
    "job_id_pattern": (f"{COMMAND_LAUNCHER}submit_command = {SUBMIT}\n"
                       f"job_id_pattern = Job <(\\d+>",
                       ["job_id_pattern", "'Job <(\\\\d+>'", "not a regular expression"]),
    "command without submit_command": (COMMAND_LAUNCHER, ["submit_command",
                                                          "launcher = command"]),
}


def with_lines(lines: str):
    return lambda text: text.replace("[luigi_daisy]\n", f"[luigi_daisy]\n{lines}\n", 1)


def assert_refused_before_anything(folder: Path, result, words: list[str]) -> None:
    assert result.returncode == shipped_retcodes()["scheduling_error"] == 35, \
        result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if "ConfigError: " in line]
    assert lines, result.stderr[-4000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    # refused while Luigi schedules the task, not while it builds or runs it
    assert "error in complete() method" in result.stderr, result.stderr[-4000:]
    for left in ("luigi_daisy_ledgers", "daisy_logs", "submitted"):
        assert not (folder / left).exists(), f"{left} exists: the run went ahead"


@pytest.mark.parametrize("case", sorted(SECTION_CASES))
def test_a_bad_value_in_the_section_exits_35_before_anything_starts(tmp_path, case):
    lines, words = SECTION_CASES[case]
    (tmp_path / "config_tasks.py").write_text(TASKS_MODULE)
    (tmp_path / "a_file").write_text("not a folder\n")
    result = run_luigi(tmp_path, "--module", "config_tasks", "Tiny",
                       config_text=with_lines(lines))
    assert_refused_before_anything(tmp_path, result, words)


@pytest.mark.parametrize("key, mode", [("ledger_dir", 0o775), ("ledger_dir", 0o777),
                                       ("log_dir", 0o775), ("log_dir", 0o757)])
def test_a_folder_others_can_write_exits_35_before_anything_starts(tmp_path, key, mode):
    # before: a ledger_dir was refused when its lock was taken, a log_dir once the
    # lock, the ledger and the server existed: the task failed (exit 40), not 35
    (tmp_path / "config_tasks.py").write_text(TASKS_MODULE)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    os.chown(shared, -1, SHARED_GID)  # a group others are in, not the user's own
    result = run_luigi(tmp_path, "--module", "config_tasks", "Tiny",
                       config_text=with_lines(f"{key} = shared"))
    what = "ledger folder" if key == "ledger_dir" else "log folder"
    assert_refused_before_anything(tmp_path, result, [
        f"{key}='shared'", f"{what} shared is writable by", "not sticky",
        "chmod go-w shared", "chmod +t shared"])
    assert not list(shared.iterdir()), "a lock, ledger or log was made in the folder"
    shared.chmod(mode | 0o1000)  # sticky: accepted, as /tmp is
    result = run_luigi(tmp_path, "--module", "config_tasks", "Tiny",
                       config_text=with_lines(f"{key} = shared"))
    assert result.returncode == 0, result.stderr[-4000:]


IN_A_WORKER = textwrap.dedent('''
    import luigi
    from luigi_daisy import Block, Roi
    from luigi_daisy.errors import ConfigError
    from luigi_daisy.luigi.task import _BlockFunction
    from config_tasks import Tiny

    task = Tiny()
    # what a worker does with its task: setup, outputs checked, blocks processed
    _BlockFunction(task)(Block(Roi((0,), (8,)), Roi((0,), (4,)), Roi((0,), (4,))))
    print("worker: ok")
    try:
        task.complete()
    except ConfigError as error:
        print(f"scheduling: {error}")
''')


def test_a_worker_on_another_node_does_not_refuse_the_run_s_host(tmp_path):
    # host names an interface of the machine the run starts on; a worker on another
    # node (here: any address this machine lacks) rebuilds its task and reads the
    # settings, and must not refuse them; scheduling on this machine does
    (tmp_path / "config_tasks.py").write_text(TASKS_MODULE)
    (tmp_path / "in_a_worker.py").write_text(IN_A_WORKER)
    (tmp_path / "luigi.cfg").write_text(with_lines("host = 192.0.2.1")(
        (REPO / "luigi.cfg").read_text()))
    env = dict(os.environ, LUIGI_CONFIG_PATH=str(tmp_path / "luigi.cfg"),
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO),
                                           os.environ.get("PYTHONPATH", "")]))
    finished = subprocess.run([sys.executable, "in_a_worker.py"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60, check=False)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert finished.stdout.splitlines() == [
        "worker: ok", "scheduling: [luigi_daisy] host='192.0.2.1': 192.0.2.1 is not an "
        "address of this machine, so nothing can listen on it; give an interface of this "
        "machine to listen on: 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or "
        "a name or address of this machine"]


@pytest.mark.parametrize("arguments, words", [
    (["--timeout", "abc"], ["timeout = 'abc'", "--timeout", "seconds above 0"]),
    (["--fit", "nope"], ["fit = 'nope'", "--fit", "valid, overhang or shrink"]),
    (["--Tiny-num-workers", "0"], ["num_workers = '0'", "--Tiny-num-workers", "1 or more"]),
    (["--Tiny-read-write-conflict", "maybe"], ["read_write_conflict = 'maybe'",
                                               "--Tiny-read-write-conflict", "true or false"]),
], ids=["--timeout abc", "--fit nope", "--Tiny-num-workers 0", "--Tiny-read-write-conflict"])
def test_a_bad_value_on_the_command_line_exits_35(tmp_path, arguments, words):
    (tmp_path / "config_tasks.py").write_text(TASKS_MODULE)
    result = run_luigi(tmp_path, "--module", "config_tasks", "Tiny", *arguments)
    assert_refused_before_anything(tmp_path, result, words)


def test_a_bad_value_of_an_upstream_family_exits_35_before_either_task_runs(tmp_path):
    (tmp_path / "config_tasks.py").write_text(TASKS_MODULE)
    result = run_luigi(tmp_path, "--module", "config_tasks", "After",
                       config_text=lambda text: text + "\n[Tiny]\nnum_workers = 0\n")
    assert_refused_before_anything(tmp_path, result, ["Tiny__", "num_workers = '0'",
                                                      "[Tiny]", "1 or more"])


def test_good_values_still_run(tmp_path):
    """The checks refuse only what is wrong: the same task with good values runs."""
    (tmp_path / "config_tasks.py").write_text(TASKS_MODULE)
    result = run_luigi(tmp_path, "--module", "config_tasks", "After", config_text=with_lines(
        "num_workers = 2\ntimeout = 30\nworker_death_timeout = 30\nmemory_per_worker = 1G\n"
        "walltime = 01:00:00\njob_poll_interval = 1\nprefetch = 8\nhost = localhost"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list((tmp_path / "luigi_daisy_ledgers").glob("*.ledger"))) == 2


# ---------------------------------------------------------------------- run_blockwise
def noop(block) -> None:
    pass


def one_task(ledger: Path | None = None) -> daisy.Task:
    return daisy.Task("config", total_roi=Roi((0,), (8,)), read_roi=Roi((0,), (4,)),
                      write_roi=Roi((0,), (4,)), process_function=noop, ledger=ledger)


@pytest.mark.parametrize("value", [-1, 0, 0.5, float("nan"), float("inf")])
def test_run_blockwise_refuses_a_worker_death_timeout_out_of_range(tmp_path, value):
    with pytest.raises(ConfigError, match=r"worker_death_timeout=.*1 or more"):
        daisy.run_blockwise([one_task()], ledger_dir=tmp_path / "ledgers", progress=False,
                            log_dir=tmp_path / "logs", worker_death_timeout=value)
    assert not (tmp_path / "ledgers").exists() and not (tmp_path / "logs").exists()


def test_run_blockwise_refuses_a_host_that_does_not_resolve(tmp_path):
    with pytest.raises(ConfigError, match=r"host='no-such-host\.invalid' does not resolve"):
        daisy.run_blockwise([one_task()], ledger_dir=tmp_path / "ledgers", progress=False,
                            log_dir=tmp_path / "logs", host="no-such-host.invalid")
    assert not (tmp_path / "ledgers").exists() and not (tmp_path / "logs").exists()


def test_run_blockwise_refuses_a_block_map_host_that_does_not_resolve(tmp_path):
    with pytest.raises(ConfigError,
                       match=r"block_map_host='no-such-host\.invalid' does not resolve"):
        daisy.run_blockwise([one_task()], ledger_dir=tmp_path / "ledgers", progress=False,
                            log_dir=tmp_path / "logs", tracking=True,
                            block_map_host="no-such-host.invalid")
    assert not (tmp_path / "ledgers").exists() and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("key", ["host", "block_map_host"])
def test_run_blockwise_refuses_a_host_that_is_not_of_this_machine(tmp_path, key):
    # before: host=192.0.2.1 failed with a raw OSError once the ledger and the lock
    # existed; block_map_host=192.0.2.1 once the workers had started too
    with pytest.raises(ConfigError, match=rf"^{key}='192\.0\.2\.1': 192\.0\.2\.1 is not "
                                          rf"an address of this machine.*127\.0\.0\.1"):
        daisy.run_blockwise([one_task()], ledger_dir=tmp_path / "ledgers", progress=False,
                            log_dir=tmp_path / "logs", tracking=True, **{key: "192.0.2.1"})
    assert not (tmp_path / "ledgers").exists() and not (tmp_path / "logs").exists()


#: a group other users are in ("nogroup"): the user's own private group may write
SHARED_GID = 65534


def shared_folder(path: Path, mode: int = 0o775) -> Path:
    """An existing folder its group (one others are in) can write, not sticky."""
    path.mkdir()
    path.chmod(mode)
    os.chown(path, -1, SHARED_GID)
    return path


def assert_unsafe(raised: pytest.ExceptionInfo, key: str, what: str, folder: Path) -> None:
    message = str(raised.value)
    assert message.startswith(f"{key}='{folder}': {what} {folder} is writable by its group"), \
        message
    assert f"chmod go-w {folder}" in message and f"chmod +t {folder}" in message


@pytest.mark.parametrize("multiprocessing", [True, False])
def test_run_blockwise_refuses_a_ledger_dir_others_can_write(tmp_path, multiprocessing):
    # before: an UnsafePathError when the lock was taken
    ledgers = shared_folder(tmp_path / "ledgers")
    with pytest.raises(ConfigError) as raised:
        daisy.run_blockwise([one_task()], ledger_dir=ledgers, progress=False,
                            log_dir=tmp_path / "logs", multiprocessing=multiprocessing)
    assert_unsafe(raised, "ledger_dir", "ledger folder", ledgers)
    with pytest.raises(ConfigError) as raised:
        daisy.run_blockwise([one_task(ledgers)], progress=False, log_dir=tmp_path / "logs",
                            multiprocessing=multiprocessing)
    assert_unsafe(raised, "the ledger of task 'config' (Task(ledger=...))", "ledger folder",
                  ledgers)
    assert not list(ledgers.iterdir()) and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("given", ["log_dir", "launcher"])
def test_run_blockwise_refuses_a_log_dir_others_can_write(tmp_path, given):
    # before: an UnsafePathError once the lock, the ledger and the server existed
    logs = shared_folder(tmp_path / "logs")
    if given == "log_dir":
        options: dict = {"log_dir": logs}
    else:
        options = {"launcher": CommandLauncher(
            submit_command=f"sh -c 'touch {tmp_path}/submitted; echo 1' {{worker_command}}",
            cancel_command="true {job_id}", log_dir=logs, poll_interval=1.0)}
    with pytest.raises(ConfigError) as raised:
        daisy.run_blockwise([one_task()], ledger_dir=tmp_path / "ledgers", progress=False,
                            **options)
    assert_unsafe(raised, "log_dir", "log folder", logs)
    assert not (tmp_path / "ledgers").exists() and not list(logs.iterdir())
    assert not (tmp_path / "submitted").exists()


def test_run_blockwise_refuses_a_ledger_dir_that_is_a_file(tmp_path):
    (tmp_path / "a_file").write_text("not a folder\n")
    with pytest.raises(ConfigError, match=r"ledger_dir='.*a_file' is a file, not a folder"):
        daisy.run_blockwise([one_task()], ledger_dir=tmp_path / "a_file", progress=False,
                            log_dir=tmp_path / "logs")
    with pytest.raises(ConfigError, match=r"ledger of task 'config'.*inside"):
        daisy.run_blockwise([one_task(tmp_path / "a_file" / "sub")], progress=False,
                            log_dir=tmp_path / "logs")
    assert not (tmp_path / "logs").exists()


def test_run_blockwise_refuses_a_bad_start_method_before_taking_the_ledger(tmp_path):
    with pytest.raises(daisy.TaskDefinitionError, match="start_method"):
        daisy.run_blockwise([one_task()], ledger_dir=tmp_path / "ledgers", progress=False,
                            log_dir=tmp_path / "logs", start_method="clone")
    assert not (tmp_path / "ledgers").exists()


def test_run_blockwise_with_good_values_runs(tmp_path):
    result = daisy.run_blockwise([one_task()], ledger_dir=tmp_path / "ledgers",
                                 progress=False, log_dir=tmp_path / "logs",
                                 worker_death_timeout=30, host="localhost")
    assert result


def test_command_launcher_refuses_an_unknown_placeholder_when_built(tmp_path):
    with pytest.raises(LauncherError, match=r"cancel_command .*unknown placeholder.*\{signal\}"):
        CommandLauncher(submit_command="sh -c {worker_command}",
                        cancel_command="kill -{signal} {job_id}", log_dir=tmp_path)
    with pytest.raises(LauncherError, match=r"status_command .*unknown placeholder.*\{stdout\}"):
        CommandLauncher(submit_command="sh -c {worker_command}", cancel_command="kill {job_id}",
                        status_command="test -e {stdout}", log_dir=tmp_path)
