"""Workers as real SLURM batch jobs on a single-node SLURM on 127.0.0.1.

The module starts its own SLURM (``tests/slurm/cluster.py``: own munge, ports, state,
logs) and stops it by pid. Missing SLURM programs are installed with apt-get (as root).
Where that fails, or SLURM cannot start, the tests are skipped with the reason, unless
``LUIGI_DAISY_REQUIRE_SLURM=1`` (set by ``.ci/run``): then they fail. After every test
``squeue`` lists no job at all: the run under test must have ended or cancelled each of
its jobs, and waited for SLURM to confirm it.

Workers report what they did through files in ``tmp_path`` (one file per event); every
wait has a deadline.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import luigi_daisy as daisy
from luigi_daisy import Roi
from luigi_daisy.launchers.slurm import SlurmLauncher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm.cluster import (  # noqa: E402
    SlurmCluster,
    SlurmUnavailable,
    install_packages,
    missing_programs,
)

pytestmark = pytest.mark.timeout(180)

REPOSITORY = Path(__file__).resolve().parent.parent
REQUIRED = os.environ.get("LUIGI_DAISY_REQUIRE_SLURM") == "1"
#: squeue is asked this often by the launchers in these tests
POLL = 1.0


@pytest.fixture(scope="module")
def slurm():
    """A running single-node SLURM for this module; ``SLURM_CONF`` points at it."""
    missing = missing_programs()
    if missing:
        # Debian's packages, installed here when this runs as root (as .ci/run does)
        reason = install_packages()
        if reason is not None:
            message = (f"SLURM is not installed ({', '.join(missing)} missing) and could not "
                       f"be installed: {reason}")
            if REQUIRED:
                pytest.fail(message)
            pytest.skip(message)
    cluster = SlurmCluster()
    try:
        cluster.start()
    except SlurmUnavailable as error:
        if REQUIRED:
            pytest.fail(f"SLURM did not start: {error}")
        pytest.skip(f"SLURM did not start: {error}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.environment["SLURM_CONF"]
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        cluster.stop()


@pytest.fixture
def cluster(slurm, tmp_path, monkeypatch):
    """The module's SLURM, in ``tmp_path``; afterwards squeue must list no job."""
    monkeypatch.chdir(tmp_path)
    yield slurm
    left = slurm.job_ids()
    if left:
        slurm.run(["scancel", *left], check=False)
        slurm.wait_until_no_jobs(30)
    assert not left, f"jobs outlived the test: {left}"


def launcher(tmp_path: Path, **options) -> SlurmLauncher:
    return SlurmLauncher(log_dir=tmp_path / "logs", poll_interval=POLL, **options)


def record(folder: Path, name: str, text: str = "") -> None:
    """Leave ``folder/name.<unique>`` holding ``text``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.{uuid.uuid4().hex}").write_text(text)


def records(folder: Path, prefix: str) -> list[str]:
    """Contents of the records whose name starts with ``prefix.``."""
    if not folder.exists():
        return []
    return [path.read_text() for path in folder.iterdir() if path.name.startswith(prefix + ".")]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def job_records(cluster: SlurmCluster, name_prefix: str) -> dict[str, dict[str, str]]:
    """``scontrol show job`` of every job (any state) whose name starts with the prefix."""
    output = cluster.run(["squeue", "-h", "-t", "all", "-o", "%i|%j"]).stdout
    jobs = {}
    for line in output.split():
        job_id, _, name = line.partition("|")
        if name.startswith(name_prefix):
            jobs[job_id] = cluster.show_job(job_id)
    return jobs


# ---------------------------------------------------------------------------- daisy-style
def write_block(folder: str, block) -> None:
    """Write the block's id into the zarr array and tell what the worker could see."""
    import zarr
    array = zarr.open_array(f"{folder}/out.zarr", mode="r+")
    write = block.write_roi
    array[write.begin[0]:write.end[0]] = block.block_id[1] + 1
    context = os.environ["LUIGI_DAISY_CONTEXT"]
    token = dict(item.split("=", 1) for item in context.split(":"))["token"]
    with open("/proc/self/cmdline", "rb") as cmdline:
        on_command_line = token.encode() in cmdline.read()
    record(Path(folder) / "events", f"block{block.block_id[1]}",
           f"{os.environ['SLURM_JOB_ID']} {token} {on_command_line}")


def test_daisy_task_runs_on_slurm_jobs_and_keeps_the_token_off_command_lines(cluster,
                                                                             tmp_path):
    import zarr
    zarr.create_array(str(tmp_path / "out.zarr"), shape=(400,), chunks=(20,), dtype="i8",
                      fill_value=0)
    task = daisy.Task("smooth", total_roi=Roi((0,), (400,)), read_roi=Roi((0,), (20,)),
                      write_roi=Roi((0,), (20,)),
                      process_function=functools.partial(write_block, str(tmp_path)),
                      num_workers=3)
    result = daisy.run_blockwise([task], launcher=launcher(tmp_path), progress=False,
                                 ledger_dir=tmp_path / "ledgers")
    assert result["smooth"].succeeded and result["smooth"].completed_count == 20
    array = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[:]
    assert [int(array[20 * index]) for index in range(20)] == list(range(1, 21))

    events = [path.read_text().split() for path in (tmp_path / "events").iterdir()]
    assert len(events) == 20
    job_ids = {job_id for job_id, _, _ in events}
    tokens = {token for _, token, _ in events}
    assert len(tokens) == 1 and len(next(iter(tokens))) >= 32
    assert {on_command_line for _, _, on_command_line in events} == {"False"}  # ps
    jobs = job_records(cluster, "smooth.worker")
    assert job_ids <= set(jobs) and len(jobs) == 3
    token = tokens.pop()
    for job_id, fields in jobs.items():
        assert fields["JobState"] == "COMPLETED", fields
        assert fields["BatchFlag"] == "1"  # a batch job, not an srun step
        shown = cluster.run(["scontrol", "show", "job", job_id]).stdout
        assert token not in shown
    listed = cluster.run(["squeue", "-h", "-t", "all", "-o", "%i %j %o"]).stdout
    assert token not in listed


# ---------------------------------------------------------------------------- resources
def test_resources_reach_the_job_record(cluster, tmp_path):
    task = daisy.Task("resources", total_roi=Roi((0,), (40,)), read_roi=Roi((0,), (20,)),
                      write_roi=Roi((0,), (20,)),
                      process_function=functools.partial(record_job, str(tmp_path)),
                      num_workers=1)
    result = daisy.run_blockwise(
        [task], progress=False, ledger_dir=tmp_path / "ledgers",
        launcher=launcher(tmp_path, queue="other", account="imaging", walltime="00:07:00",
                          cpus_per_worker=2, gpus_per_worker=1, memory_per_worker="300M",
                          job_extra="--comment=luigi_daisy_resources --nice=5"))
    assert result["resources"].succeeded
    (job_id, fields), = job_records(cluster, "resources.worker").items()
    assert fields["Partition"] == "other"
    assert fields["Account"] == "imaging"
    assert fields["TimeLimit"] == "00:07:00"
    assert fields["NumCPUs"] == "2"
    assert fields["MinMemoryNode"] == "300M"
    assert fields["TresPerTask"] == "gres:gpu:1"
    assert fields["Comment"] == "luigi_daisy_resources"
    assert fields["Nice"] == "5"
    assert fields["JobName"] == "resources.worker0"
    assert set(records(tmp_path / "events", "job")) == {job_id}


def record_job(folder: str, block) -> None:
    record(Path(folder) / "events", "job", os.environ["SLURM_JOB_ID"])


# ---------------------------------------------------------------------------- scancel
def hold_first_block(folder: str, block) -> None:
    """Block 0's first attempt holds on until its job is cancelled; the rest is quick."""
    folder = Path(folder)
    job_id = os.environ["SLURM_JOB_ID"]
    record(folder / "events", f"block{block.block_id[1]}", job_id)
    if block.block_id[1] == 0 and not (folder / "held").exists():
        (folder / "held.tmp").write_text(job_id)
        (folder / "held.tmp").rename(folder / "held")
        time.sleep(150)


def test_job_cancelled_mid_block_its_block_is_retried_and_the_run_completes(cluster,
                                                                            tmp_path):
    import threading
    task = daisy.Task("cancelled", total_roi=Roi((0,), (100,)), read_roi=Roi((0,), (10,)),
                      write_roi=Roi((0,), (10,)),
                      process_function=functools.partial(hold_first_block, str(tmp_path)),
                      # one worker: only a replacement of the cancelled job can finish
                      num_workers=1, max_retries=0)
    outcome = {}

    def run() -> None:
        outcome["result"] = daisy.run_blockwise([task], launcher=launcher(tmp_path),
                                                progress=False,
                                                ledger_dir=tmp_path / "ledgers")

    thread = threading.Thread(target=run)
    thread.start()
    held = wait_for(lambda: (tmp_path / "held").exists() and (tmp_path / "held").read_text(),
                    60, "block 0 to be held by a job")
    cluster.run(["scancel", held])
    thread.join(120)
    assert not thread.is_alive()
    result = outcome["result"]["cancelled"]
    assert result.succeeded and result.completed_count == 10
    first_block_jobs = records(tmp_path / "events", "block0")
    assert len(first_block_jobs) == 2 and held in first_block_jobs
    assert cluster.show_job(held)["JobState"] == "CANCELLED"
    assert result.worker_restart_count == 1  # the cancelled job was replaced


# ---------------------------------------------------------------------------- failing jobs
def test_jobs_failing_at_once_are_restarted_to_the_limit_then_named(cluster, tmp_path,
                                                                    capsys):
    task = daisy.Task("doomed", total_roi=Roi((0,), (40,)), read_roi=Roi((0,), (10,)),
                      write_roi=Roi((0,), (10,)), process_function=functools.partial(
                          record_job, str(tmp_path)),
                      num_workers=1, max_worker_restarts=2)
    # a job whose interpreter cannot start fails before it ever connects
    result = daisy.run_blockwise([task], progress=False, ledger_dir=tmp_path / "ledgers",
                                 launcher=launcher(tmp_path, python="/bin/false"))
    assert not result["doomed"].succeeded
    assert result["doomed"].worker_restart_count == 2
    jobs = job_records(cluster, "doomed.worker")
    assert len(jobs) == 3
    assert {fields["JobState"] for fields in jobs.values()} == {"FAILED"}
    printed = capsys.readouterr().out
    assert "the run stopped early" in printed
    for job_id, fields in jobs.items():
        assert f"slurm job {job_id} " in printed
        assert fields["StdErr"] in printed


# ---------------------------------------------------------------------------- run ends
RUN_SCRIPT = """\
import logging, os, sys, time
from pathlib import Path
import luigi_daisy as daisy
from luigi_daisy import Roi
from luigi_daisy.launchers.slurm import SlurmLauncher

folder = Path(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr)

def hold(block):
    (folder / "events").mkdir(exist_ok=True)
    (folder / "events" / f"started.{block.block_id[1]}.{os.environ['SLURM_JOB_ID']}").touch()
    time.sleep(600)

task = daisy.Task(sys.argv[4], total_roi=Roi((0,), (20,)), read_roi=Roi((0,), (10,)),
                  write_roi=Roi((0,), (10,)), process_function=hold,
                  num_workers=int(sys.argv[3]))
daisy.run_blockwise([task], progress=False, ledger_dir=folder / "ledgers",
                    launcher=SlurmLauncher(log_dir=folder / "logs", poll_interval=1.0),
                    worker_death_timeout=float(sys.argv[2]))
"""


def start_stuck_run(tmp_path: Path, name: str, death_timeout: float, workers: int):
    """A run whose two blocks never finish, and extra workers waiting for blocks."""
    script = tmp_path / "stuck_run.py"
    script.write_text(RUN_SCRIPT)
    log = open(tmp_path / "run.log", "w")  # noqa: SIM115 - closed by the caller
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPOSITORY), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path),
                                str(death_timeout), str(workers), name], cwd=tmp_path,
                               env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(list((tmp_path / "events").glob("started.*"))) == 2
                 if (tmp_path / "events").exists() else False, 60,
                 "both blocks to be started by jobs")
        wait_for(lambda: re.search(rf"{workers} of {workers} workers connected",
                                   (tmp_path / "run.log").read_text()), 30,
                 "every worker to connect")
    except BaseException:
        process.kill()
        process.wait(10)
        log.close()
        print((tmp_path / "run.log").read_text())
        raise
    return process, log


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM],
                         ids=["ctrl_c", "sigterm"])
def test_ctrl_c_cancels_every_job_and_waits_for_slurm(cluster, tmp_path, stop_signal):
    name = f"stopped{int(stop_signal)}"
    process, log = start_stuck_run(tmp_path, name, death_timeout=60, workers=3)
    jobs = list(job_records(cluster, f"{name}.worker"))
    assert len(jobs) == 3
    process.send_signal(stop_signal)
    try:
        process.wait(60)
    finally:
        log.close()
    # the run returned only after SLURM said every job had ended
    assert cluster.job_ids() == [], (tmp_path / "run.log").read_text()
    assert {cluster.show_job(job)["JobState"] for job in jobs} == {"CANCELLED"}
    # Ctrl-C ends Python by SIGINT; SIGTERM ends the run with code 143 after cleanup
    assert process.returncode == (-signal.SIGINT if stop_signal == signal.SIGINT else 143)


def test_sigkilled_run_jobs_end_within_worker_death_timeout(cluster, tmp_path):
    death_timeout = 5.0
    process, log = start_stuck_run(tmp_path, "killed", death_timeout=death_timeout,
                                   workers=3)
    jobs = list(job_records(cluster, "killed.worker"))
    assert len(jobs) == 3
    process.kill()
    killed_at = time.monotonic()
    process.wait(10)
    log.close()
    left = cluster.wait_until_no_jobs(death_timeout + 20, jobs)
    gone_after = time.monotonic() - killed_at
    assert not left, f"jobs {left} still queued {gone_after:.1f} s after the run died"
    assert gone_after < death_timeout + 20
    # two workers were in the middle of a block: their watchdogs ended them; the one
    # waiting for a block saw the connection close
    logs = [path.read_text() for path in (tmp_path / "logs" / "killed").glob("*.err")]
    assert len(logs) == 3
    assert sum("luigi_daisy worker exits: the block server closed the connection" in text
               for text in logs) == 2, logs
    assert sum("ServerUnreachableError" in text for text in logs) == 1, logs


# ---------------------------------------------------------------------------- pending jobs
def test_jobs_pending_too_long_are_reported_with_their_reason(cluster, tmp_path, caplog):
    task = daisy.Task("late", total_roi=Roi((0,), (20,)), read_roi=Roi((0,), (10,)),
                      write_roi=Roi((0,), (10,)),
                      process_function=functools.partial(record_job, str(tmp_path)),
                      num_workers=1)
    with caplog.at_level("INFO", logger="luigi_daisy"):
        # SLURM holds the job back for 3 s: it stays PENDING with reason BeginTime
        result = daisy.run_blockwise(
            [task], progress=False, ledger_dir=tmp_path / "ledgers",
            launcher=launcher(tmp_path, job_extra="--begin=now+3"),
            pending_report_after=0.5)
    assert result["late"].succeeded
    (job_id,) = job_records(cluster, "late.worker")
    pending = [record.getMessage() for record in caplog.records
               if "still pending" in record.getMessage()]
    assert len(pending) == 1, pending
    assert f"{job_id} (late.worker0: BeginTime)" in pending[0]
    started = [record.getMessage() for record in caplog.records
               if "workers for 1 tasks with the slurm launcher" in record.getMessage()]
    connected = [record.getMessage() for record in caplog.records
                 if "workers connected" in record.getMessage()]
    assert len(started) == 1 and f"job ids {job_id} to {job_id}" in started[0]
    assert len(connected) == 1


# ---------------------------------------------------------------------------- Luigi
CHAIN_MODULE = '''\
import os
import time
from pathlib import Path

import luigi
from luigi_daisy import BlockwiseTask, Roi


def note(folder, name):
    path = Path(folder) / "events"
    path.mkdir(exist_ok=True)
    (path / f"{name}.{os.environ['SLURM_JOB_ID']}").touch()


class Raw(BlockwiseTask):
    folder = luigi.Parameter()

    def total_roi(self):
        return Roi((0,), (200,))

    def read_roi(self):
        return Roi((0,), (20,))

    def write_roi(self):
        return Roi((0,), (20,))

    def process_block(self, block):
        time.sleep(0.3)  # Raw's jobs run for a few seconds
        note(self.folder, f"Raw-{block.block_id[1]}")


class Smoothed(BlockwiseTask):
    folder = luigi.Parameter()

    def requires(self):
        return Raw(folder=self.folder)

    def total_roi(self):
        return Roi((0,), (200,))

    def read_roi(self):
        return Roi((0,), (20,))

    def write_roi(self):
        return Roi((0,), (20,))

    def process_block(self, block):
        # pipelined: the upstream block this one reads is done already
        done = os.listdir(Path(self.folder) / "events")
        assert any(name.startswith(f"Raw-{block.block_id[1]}.") for name in done), done
        note(self.folder, f"Smoothed-{block.block_id[1]}")
'''


def test_two_stage_luigi_chain_runs_pipelined_on_slurm(cluster, tmp_path):
    (tmp_path / "slurm_chain.py").write_text(CHAIN_MODULE)
    (tmp_path / "luigi.cfg").write_text(textwrap.dedent(f"""\
        [luigi_daisy]
        launcher = slurm
        job_poll_interval = {POLL}
        num_workers = 2
        ledger_dir = {tmp_path / "ledgers"}
        log_dir = {tmp_path / "logs"}
        memory_per_worker = 150M

        [Smoothed]
        queue = other
        """))
    env = dict(os.environ, LUIGI_CONFIG_PATH=str(tmp_path / "luigi.cfg"),
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPOSITORY),
                                           os.environ.get("PYTHONPATH", "")]))
    luigi_program = Path(sys.executable).parent / "luigi"
    completed = subprocess.run(
        [str(luigi_program) if luigi_program.exists() else "luigi", "--module",
         "slurm_chain", "Smoothed", "--folder", str(tmp_path), "--local-scheduler",
         "--retcode-task-failed", "3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert completed.returncode == 0, completed.stderr[-4000:]
    events = os.listdir(tmp_path / "events")
    for stage in ("Raw", "Smoothed"):
        assert sorted(int(name.split(".")[0].split("-")[1]) for name in events
                      if name.startswith(stage + "-")) == list(range(10))
    raw_jobs = job_records(cluster, "Raw_")
    smoothed_jobs = job_records(cluster, "Smoothed_")
    assert len(raw_jobs) == 2 and len(smoothed_jobs) == 2
    assert {fields["Partition"] for fields in raw_jobs.values()} == {"main"}
    assert {fields["Partition"] for fields in smoothed_jobs.values()} == {"other"}
    assert {fields["MinMemoryNode"] for fields in {**raw_jobs, **smoothed_jobs}.values()} \
        == {"150M"}
    jobs_that_worked = {name.split(".")[1] for name in events}
    assert jobs_that_worked <= set(raw_jobs) | set(smoothed_jobs)
    # one pipelined run: Smoothed's jobs were submitted while Raw's still ran (Luigi's
    # plain ordering would submit them only after Raw's last job had ended)
    first_raw_end = min(fields["EndTime"] for fields in raw_jobs.values())
    last_smoothed_submit = max(fields["SubmitTime"] for fields in smoothed_jobs.values())
    assert last_smoothed_submit < first_raw_end


# ---------------------------------------------------------------------------- refusals
def test_a_refused_submission_is_a_clear_error_and_leaves_no_job(cluster, tmp_path):
    task = daisy.Task("refused", total_roi=Roi((0,), (20,)), read_roi=Roi((0,), (10,)),
                      write_roi=Roi((0,), (10,)),
                      process_function=functools.partial(record_job, str(tmp_path)),
                      num_workers=2)
    with pytest.raises(daisy.LauncherError, match="invalid partition") as raised:
        daisy.run_blockwise([task], progress=False, ledger_dir=tmp_path / "ledgers",
                            launcher=launcher(tmp_path, queue="no_such_partition"))
    assert "sbatch" in str(raised.value) and "--partition=no_such_partition" in str(
        raised.value)


def test_inherited_allocation_variables_do_not_reach_sbatch(cluster, tmp_path, monkeypatch):
    """A run inside an allocation: its SLURM_MEM_PER_CPU must not reach the job, where
    it would sit beside the job's own SLURM_MEM_PER_NODE (srun refuses the pair)."""
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "100")
    monkeypatch.setenv("SLURM_JOB_ID", "999999")
    task = daisy.Task("nested", total_roi=Roi((0,), (20,)), read_roi=Roi((0,), (10,)),
                      write_roi=Roi((0,), (10,)),
                      process_function=functools.partial(record_memory_variables,
                                                         str(tmp_path)),
                      num_workers=1)
    result = daisy.run_blockwise([task], progress=False, ledger_dir=tmp_path / "ledgers",
                                 launcher=launcher(tmp_path, memory_per_worker="120M"))
    assert result["nested"].succeeded
    (job_id, fields), = job_records(cluster, "nested.worker").items()
    assert fields["MinMemoryNode"] == "120M"
    assert set(records(tmp_path / "events", "memory")) == {f"{job_id} None 120"}


def record_memory_variables(folder: str, block) -> None:
    record(Path(folder) / "events", "memory",
           f"{os.environ['SLURM_JOB_ID']} {os.environ.get('SLURM_MEM_PER_CPU')} "
           f"{os.environ.get('SLURM_MEM_PER_NODE')}")
