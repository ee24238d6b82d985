"""Batch launchers without a batch system: command building, output parsing (canned
text from SLURM's and LSF's documented formats), resources, templates, configuration
keys, and the worker's watchdog over real sockets."""

from __future__ import annotations

import configparser
import socket
import threading
import time
from pathlib import Path

import pytest

from luigi_daisy.errors import LauncherError
from luigi_daisy.launchers.base import WorkerSpec
from luigi_daisy.launchers.batch import (
    EXIT_CANCELLED,
    EXIT_UNKNOWN,
    parse_memory_mb,
    parse_walltime_seconds,
)
from luigi_daisy.launchers.command import CommandLauncher, fill
from luigi_daisy.launchers.lsf import LsfLauncher, parse_bjobs, parse_bsub
from luigi_daisy.launchers.lsf import format_walltime as lsf_walltime
from luigi_daisy.launchers.slurm import SlurmLauncher, parse_squeue
from luigi_daisy.launchers.slurm import format_walltime as slurm_walltime
from luigi_daisy.payload import FunctionTarget, WorkerPayload
from luigi_daisy.watchdog import EXIT_SERVER_GONE, Watchdog

pytestmark = pytest.mark.timeout(60)

REPOSITORY = Path(__file__).resolve().parent.parent


def noop(block) -> None:
    """A process function for specs."""


def spec(tmp_path: Path, task_id: str = "Smooth_1_abc", worker_id: int = 3) -> WorkerSpec:
    return WorkerSpec(task_id=task_id, worker_id=worker_id,
                      environment={"LUIGI_DAISY_CONTEXT": "token=secret"},
                      payload=WorkerPayload(FunctionTarget(noop), task_id),
                      stdout_path=tmp_path / "worker_3.out",
                      stderr_path=tmp_path / "worker_3.err", job_name="ignored")


# ---------------------------------------------------------------------------- resources
@pytest.mark.parametrize("text, seconds", [
    ("90", 5400), ("1:30", 90), ("01:30:00", 5400), ("2-00", 172800),
    ("1-02:03", 93780), ("1-02:03:04", 93784)])
def test_walltime_in_slurm_notation(text, seconds):
    assert parse_walltime_seconds(text) == seconds


@pytest.mark.parametrize("text, megabytes", [("16G", 16384), ("500M", 500), ("2048", 2048),
                                             ("1T", 1048576), ("16GB", 16384), ("512K", 1)])
def test_memory_sizes(text, megabytes):
    assert parse_memory_mb(text) == megabytes


@pytest.mark.parametrize("bad", ["sixteen", "16 Gigs", "-1G", "1.5G"])
def test_bad_memory_is_refused_with_the_key(bad):
    with pytest.raises(LauncherError, match="memory_per_worker"):
        SlurmLauncher(memory_per_worker=bad)


@pytest.mark.parametrize("bad", ["1h", "12:00:00:00", "tomorrow"])
def test_bad_walltime_is_refused_with_the_key(bad):
    with pytest.raises(LauncherError, match="walltime"):
        LsfLauncher(walltime=bad)


def test_bad_cpu_and_gpu_counts_are_refused():
    with pytest.raises(LauncherError, match="cpus_per_worker"):
        SlurmLauncher(cpus_per_worker=0)
    with pytest.raises(LauncherError, match="gpus_per_worker"):
        SlurmLauncher(gpus_per_worker=-1)


def test_walltime_formats_per_batch_system():
    assert slurm_walltime(93784) == "1-02:03:04"
    assert lsf_walltime(93784) == "26:04"  # LSF counts whole minutes, rounded up
    assert lsf_walltime(60) == "0:01"


# ---------------------------------------------------------------------------- SLURM
def test_sbatch_command_carries_every_resource_and_no_secret(tmp_path):
    launcher = SlurmLauncher(queue="gpu", account="lab", walltime="01:30:00",
                             cpus_per_worker=4, gpus_per_worker=1, memory_per_worker="16G",
                             job_extra="--qos=high --constraint='a100 80gb'",
                             python="/opt/env/bin/python")
    command = launcher.submit_command(spec(tmp_path), "Smooth_1_abc.worker3")
    assert command[:2] == ["sbatch", "--parsable"]
    for expected in ["--job-name=Smooth_1_abc.worker3", f"--output={tmp_path}/worker_3.out",
                     f"--error={tmp_path}/worker_3.err", "--partition=gpu", "--account=lab",
                     "--time=0-01:30:00", "--cpus-per-task=4", "--gpus-per-task=1",
                     "--mem=16384M", "--qos=high", "--constraint=a100 80gb", "--ntasks=1",
                     "--no-requeue", "--export=ALL"]:
        assert expected in command
    assert command[-1] == "--wrap=exec /opt/env/bin/python -m luigi_daisy.worker"
    assert "srun" not in " ".join(command)
    assert "secret" not in " ".join(command)


def test_sbatch_leaves_out_resources_not_asked_for(tmp_path):
    command = SlurmLauncher().submit_command(spec(tmp_path), "name")
    assert not any(word.startswith(("--partition", "--account", "--time", "--mem",
                                    "--gpus")) for word in command)


def test_job_names_name_the_task_and_the_worker(tmp_path):
    launcher = SlurmLauncher()
    assert launcher.job_name(spec(tmp_path, "Smooth_1_abc", 7)) == "Smooth_1_abc.worker7"
    assert launcher.job_name(spec(tmp_path, "odd task/id:x", 7)) == "odd_task_id_x.worker7"


def test_sbatch_parsable_output():
    launcher = SlurmLauncher()
    assert launcher.parse_job_id("4242\n") == "4242"
    assert launcher.parse_job_id("4242;cluster2\n") == "4242"
    with pytest.raises(LauncherError, match="not a job id"):
        launcher.parse_job_id("sbatch: error: Batch job submission failed\n")


SQUEUE = """\
101|PENDING|0|Resources
102|RUNNING|0|None
103|COMPLETED|0|None
104|FAILED|768|NonZeroExitCode
105|CANCELLED|15|None
106|CANCELLED|0|None
107|TIMEOUT|0|TimeLimit
108|NODE_FAIL|0|NodeDown
109|COMPLETING|0|None
110|OUT_OF_MEMORY|9|OutOfMemory
"""


def test_squeue_states_and_exit_codes():
    statuses = parse_squeue(SQUEUE)
    assert statuses["101"].state == "PENDING" and statuses["101"].reason == "Resources"
    assert statuses["101"].exit_code is None
    assert statuses["102"].exit_code is None
    assert statuses["103"].exit_code == 0
    assert statuses["104"].exit_code == 3  # the wait status 768 is exit code 3
    assert statuses["105"].exit_code == -15  # ended by SIGTERM (scancel)
    assert statuses["106"].exit_code == EXIT_CANCELLED  # cancelled while pending
    assert statuses["107"].exit_code == EXIT_UNKNOWN
    assert statuses["108"].exit_code == EXIT_UNKNOWN
    assert statuses["109"].exit_code is None  # still completing: not gone yet
    assert statuses["110"].exit_code == -9


def test_scancel_in_batches():
    commands = SlurmLauncher().cancel_commands([str(job) for job in range(1, 1201)])
    assert [command[0] for command in commands] == ["scancel"] * 3
    assert sum(len(command) - 1 for command in commands) == 1200


# ---------------------------------------------------------------------------- LSF
def test_bsub_command(tmp_path):
    launcher = LsfLauncher(queue="gpu", account="proj", walltime="90", cpus_per_worker=4,
                           gpus_per_worker=2, memory_per_worker="16G",
                           job_extra='-R "select[avx512]"', python="/opt/env/bin/python")
    command = launcher.submit_command(spec(tmp_path), "Smooth.worker3")
    assert command[:3] == ["bsub", "-J", "Smooth.worker3"]
    pairs = {command[index]: command[index + 1] for index in range(len(command) - 1)}
    assert pairs["-q"] == "gpu" and pairs["-P"] == "proj" and pairs["-W"] == "1:30"
    assert pairs["-n"] == "4" and pairs["-gpu"] == "num=2" and pairs["-M"] == "16384MB"
    assert pairs["-o"] == str(tmp_path / "worker_3.out")
    assert "rusage[mem=16384MB]" in command and "select[avx512]" in command
    assert command[-3:] == ["/opt/env/bin/python", "-m", "luigi_daisy.worker"]
    assert "secret" not in " ".join(command)


def test_bsub_output():
    assert parse_bsub("Job <1234> is submitted to queue <normal>.\n") == "1234"
    assert parse_bsub("Job <77> is submitted to default queue <short>.\n") == "77"
    with pytest.raises(LauncherError, match="is submitted"):
        parse_bsub("Request aborted by esub. Job not submitted.\n")


BJOBS = """\
1234|RUN|-|-
1235|PEND|-|New job is waiting for scheduling;
1236|DONE|-|-
1237|EXIT|1|-
1238|EXIT|130|-
1239|EXIT|-|-
1240|PSUSP|-|The job was suspended by the user while pending;
Job <1241> is not found
"""


def test_bjobs_states_exit_codes_and_reasons():
    statuses = parse_bjobs(BJOBS)
    assert set(statuses) == {str(job) for job in range(1234, 1241)}
    assert statuses["1234"].exit_code is None and statuses["1234"].state == "RUN"
    assert statuses["1235"].reason == "New job is waiting for scheduling;"
    assert statuses["1236"].exit_code == 0
    assert statuses["1237"].exit_code == 1
    assert statuses["1238"].exit_code == 130
    assert statuses["1239"].exit_code == EXIT_UNKNOWN  # EXIT without a code still failed
    assert statuses["1240"].exit_code is None


# ---------------------------------------------------------------------------- templates
def test_templates_fill_words_without_a_shell(tmp_path):
    command = fill("qsub -N {job_name} -o {stdout} -V -- {worker_command}",
                   {"job_name": "a b", "stdout": "/x/out", "worker_command": ["py", "-m", "w"]},
                   "submit_command")
    assert command == ["qsub", "-N", "a b", "-o", "/x/out", "-V", "--", "py", "-m", "w"]
    inside = fill("sbatch --wrap='exec {worker_command}'",
                  {"worker_command": ["/p y", "-m", "w"]}, "submit_command")
    assert inside == ["sbatch", "--wrap=exec '/p y' -m w"]


def test_template_errors_name_the_key():
    with pytest.raises(LauncherError, match=r"submit_command.*\{jobname\}"):
        fill("qsub {jobname} {worker_command}", {"worker_command": ["w"]}, "submit_command")
    with pytest.raises(LauncherError, match="worker_command"):
        CommandLauncher(submit_command="qsub run.sh", cancel_command="qdel {job_id}")
    with pytest.raises(LauncherError, match="job_id"):
        CommandLauncher(submit_command="qsub {worker_command}", cancel_command="qdel")
    with pytest.raises(LauncherError, match=r"no \{job_extra\}"):
        CommandLauncher(submit_command="qsub {worker_command}", cancel_command="qdel {job_id}",
                        job_extra="-p 5")
    with pytest.raises(LauncherError, match="no group"):
        CommandLauncher(submit_command="qsub {worker_command}", cancel_command="qdel {job_id}",
                        job_id_pattern=r"\d+")
    with pytest.raises(LauncherError, match="not a regular expression"):
        CommandLauncher(submit_command="qsub {worker_command}", cancel_command="qdel {job_id}",
                        job_id_pattern="(")


def test_command_launcher_fills_resources_and_reads_job_ids(tmp_path):
    launcher = CommandLauncher(
        submit_command="qsub -N {job_name} -q {queue} -l walltime={walltime_minutes} "
                       "-l mem={memory_mb}mb -l ncpus={cpus} -o {stdout} -e {stderr} -V "
                       "{job_extra} -- {worker_command}",
        cancel_command="qdel {job_id}", job_id_pattern=r"^(?P<job_id>\d+)\.server",
        queue="batch", walltime="01:30:00", memory_per_worker="2G", cpus_per_worker=2,
        job_extra="-W group_list=lab -p 5")
    command = launcher.submit_command(spec(tmp_path), "Smooth.worker3")
    assert command[:5] == ["qsub", "-N", "Smooth.worker3", "-q", "batch"]
    assert "walltime=90" in command and "mem=2048mb" in command and "ncpus=2" in command
    extra = command.index("-W")
    assert command[extra:extra + 5] == ["-W", "group_list=lab", "-p", "5", "--"]
    assert command[command.index("--") + 1] == "/bin/sh"  # records the exit code
    assert command[-3:] == [*launcher.worker_command()][-3:]
    assert launcher.parse_job_id("8812.server.example\n") == "8812"
    assert launcher.cancel_commands(["8812"]) == [["qdel", "8812"]]
    with pytest.raises(LauncherError, match="finds no job id"):
        launcher.parse_job_id("qsub: Unknown queue\n")


# ---------------------------------------------------------------------------- config
def test_luigi_cfg_lists_every_key_of_the_section():
    """luigi.cfg's commented key list and the known keys stay in step."""
    from luigi_daisy.luigi.config import KNOWN_KEYS
    listed = set()
    in_section = False
    for line in (REPOSITORY / "luigi.cfg").read_text().splitlines():
        if line.startswith("["):
            in_section = line.strip() == "[luigi_daisy]"
        elif in_section and line.startswith("# ") and " =" in line:
            key = line[2:].split(" =", 1)[0].strip()
            if key.isidentifier():
                listed.add(key)
    assert listed == set(KNOWN_KEYS)
    parser = configparser.ConfigParser()
    parser.read(REPOSITORY / "luigi.cfg")  # the file itself parses
    assert parser.has_section("luigi_daisy")


# ---------------------------------------------------------------------------- watchdog
class Recorder:
    """Stands in for ``os._exit``: records the code and when it was called."""

    def __init__(self) -> None:
        self.called = threading.Event()
        self.code = None

    def __call__(self, code: int) -> None:
        self.code = code
        self.called.set()


def test_watchdog_exits_when_no_connection_is_made():
    recorder = Recorder()
    watchdog = Watchdog(timeout=1.0, exit=recorder).start()
    started = time.monotonic()
    assert recorder.called.wait(10)
    assert recorder.code == EXIT_SERVER_GONE
    assert 0.9 <= time.monotonic() - started < 5
    watchdog.stop()


def test_watchdog_exits_when_the_server_closes_while_the_worker_is_busy():
    """The worker reads nothing (a long block runs): the close is still seen."""
    recorder = Recorder()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
        watchdog = Watchdog(timeout=3.0, exit=recorder).start()
        watchdog.watch(client)
        server_side.sendall(b"a frame nobody reads")
        closed_at = time.monotonic()
        server_side.close()
        assert recorder.called.wait(10)
        assert time.monotonic() - closed_at < 3.0 + 1.0
        watchdog.stop()
        client.close()


def test_watchdog_leaves_a_live_connection_and_a_closed_one_alone():
    recorder = Recorder()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
        watchdog = Watchdog(timeout=1.0, exit=recorder).start()
        watchdog.watch(client)
        # three timeouts pass with the server alive: no exit
        assert not recorder.called.wait(3.0)
        watchdog.unwatch(client)
        client.close()
        server_side.close()
        assert not recorder.called.wait(2.0)
        watchdog.stop()


# ---------------------------------------------------------------------------- addresses
def test_workers_are_told_the_machine_name_unless_the_server_is_on_loopback():
    from luigi_daisy.run import default_advertise_host
    assert default_advertise_host("127.0.0.1") == "127.0.0.1"
    assert default_advertise_host("::1") == "::1"
    assert default_advertise_host("localhost") == "localhost"
    assert default_advertise_host("0.0.0.0") == socket.gethostname()
    assert default_advertise_host("10.1.2.3") == socket.gethostname()


def test_tasks_with_the_same_resources_share_a_launcher(tmp_path):
    """One squeue per poll for all tasks that ask for the same jobs."""
    from types import SimpleNamespace

    from luigi_daisy.launchers.per_task import PerTaskLauncher
    from luigi_daisy.luigi.launching import RESOURCE_PARAMETERS, launcher_for_closure
    config = SimpleNamespace(log_dir=str(tmp_path), job_poll_interval=1.0,
                             start_method="spawn")
    plain = dict.fromkeys(RESOURCE_PARAMETERS, "")
    plain.update(cpus_per_worker=1, gpus_per_worker=0)
    tasks = [SimpleNamespace(task_id=name, launcher="slurm", **dict(plain, **extra))
             for name, extra in (("a", {}), ("b", {}), ("c", {"queue": "gpu"}))]
    launcher = launcher_for_closure(tasks, config)
    assert isinstance(launcher, PerTaskLauncher)
    assert launcher.launchers["a"] is launcher.launchers["b"]
    assert launcher.launchers["c"] is not launcher.launchers["a"]
    assert launcher.launchers["c"].queue == "gpu"
    assert len(launcher.distinct) == 2
    single = launcher_for_closure(tasks[:2], config)
    assert single is not None and not isinstance(single, PerTaskLauncher)
