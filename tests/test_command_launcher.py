"""The command launcher end to end, with LSF-shaped templates around tiny fake ``bsub``,
``bkill`` and ``bjobs`` shell scripts in ``tmp_path``: ``bsub`` starts the worker command
in the background (its own session) and prints ``Job <pid> is submitted to queue <q>.``.
Workers are real ``python -m luigi_daisy.worker`` processes talking to a real server."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

import luigi_daisy as daisy
from luigi_daisy import Roi
from luigi_daisy.launchers.batch import EXIT_UNKNOWN
from luigi_daisy.launchers.command import CommandLauncher

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_stray_processes")]

FAKE_BSUB = """\
#!/bin/sh
# bsub -J NAME -o OUT -e ERR [-q QUEUE] COMMAND...: COMMAND runs in the background;
# while the file "busy" exists next to it, it refuses every job
if [ -e "$(dirname "$0")/busy" ]; then
  echo "Request aborted: the batch system is busy. Job not submitted." >&2
  exit 255
fi
while [ $# -gt 0 ]; do
  case "$1" in
    -J) name=$2; shift 2;;
    -o) out=$2; shift 2;;
    -e) err=$2; shift 2;;
    -q) queue=$2; shift 2;;
    *) break;;
  esac
done
setsid "$@" </dev/null >>"$out" 2>>"$err" &
echo "$!" > "$(dirname "$0")/jobs/$!"
echo "Job <$!> is submitted to queue <${queue:-normal}>."
"""

FAKE_BKILL = """\
#!/bin/sh
# bkill JOB: SIGTERM to the job's process group
kill -TERM -- "-$1" 2>/dev/null || kill -TERM "$1" 2>/dev/null
"""

FAKE_BJOBS = """\
#!/bin/sh
# exits 0 while job $1 runs (a zombie has ended)
state=$(ps -o stat= -p "$1") || exit 1
case "$state" in Z*) exit 1;; esac
exit 0
"""


@pytest.fixture
def fake_lsf(tmp_path):
    """The fake commands; afterwards every job they started must be gone."""
    folder = tmp_path / "fake_lsf"
    (folder / "jobs").mkdir(parents=True)
    for name, text in (("bsub", FAKE_BSUB), ("bkill", FAKE_BKILL), ("bjobs", FAKE_BJOBS)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    yield folder
    alive = []
    for pid_file in (folder / "jobs").iterdir():
        pid = int(pid_file.name)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            alive.append(pid)
            os.killpg(pid, signal.SIGKILL)
    assert not alive, f"jobs outlived the run: {alive}"


def lsf_shaped(folder: Path, tmp_path: Path, status: bool = True) -> CommandLauncher:
    return CommandLauncher(
        submit_command=f"{folder}/bsub -J {{job_name}} -o {{stdout}} -e {{stderr}} -q short "
                       f"{{worker_command}}",
        cancel_command=f"{folder}/bkill {{job_id}}",
        job_id_pattern=r"Job <(\d+)> is submitted",
        status_command=f"{folder}/bjobs {{job_id}}" if status else None,
        log_dir=tmp_path / "logs", poll_interval=1.0)


def note(folder: str, block) -> None:
    path = Path(folder) / "events"
    path.mkdir(exist_ok=True)
    (path / f"block{block.block_id[1]}.{os.getpid()}.{uuid.uuid4().hex}").touch()


@pytest.mark.parametrize("status", [True, False], ids=["status_command", "exit_files"])
def test_lsf_shaped_templates_run_a_task(fake_lsf, tmp_path, status):
    task = daisy.Task("templated", total_roi=Roi((0,), (100,)), read_roi=Roi((0,), (10,)),
                      write_roi=Roi((0,), (10,)),
                      process_function=functools.partial(note, str(tmp_path)),
                      num_workers=2)
    launcher = lsf_shaped(fake_lsf, tmp_path, status)
    result = daisy.run_blockwise([task], launcher=launcher, progress=False,
                                 ledger_dir=tmp_path / "ledgers")
    assert result["templated"].succeeded
    assert sorted(name.split(".")[0] for name in os.listdir(tmp_path / "events")) == \
        sorted(f"block{index}" for index in range(10))
    job_ids = {job.job_id for job in launcher.jobs.values()}
    assert job_ids == {path.name for path in (fake_lsf / "jobs").iterdir()}
    assert len(job_ids) == 2
    assert {job.exit_code() for job in launcher.jobs.values()} == {0}
    assert {job.job_name for job in launcher.jobs.values()} == {"templated.worker0",
                                                               "templated.worker1"}


def hold_first_block(folder: str, block) -> None:
    note(folder, block)
    if block.block_id[1] == 0 and not (Path(folder) / "held").exists():
        # the job is the worker's parent (the wrapper that records its exit code)
        (Path(folder) / "held.tmp").write_text(str(os.getppid()))
        (Path(folder) / "held.tmp").rename(Path(folder) / "held")
        time.sleep(100)


def test_job_killed_from_outside_is_replaced_and_its_block_retried(fake_lsf, tmp_path):
    task = daisy.Task("killed", total_roi=Roi((0,), (60,)), read_roi=Roi((0,), (10,)),
                      write_roi=Roi((0,), (10,)),
                      process_function=functools.partial(hold_first_block, str(tmp_path)),
                      num_workers=1, max_retries=0)
    launcher = lsf_shaped(fake_lsf, tmp_path)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=daisy.run_blockwise(
        [task], launcher=launcher, progress=False, ledger_dir=tmp_path / "ledgers")))
    thread.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "held").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    held = (tmp_path / "held").read_text()
    # the cluster ends the job (wall time, preemption): nothing records an exit code
    subprocess.run([str(fake_lsf / "bkill"), held], check=True, timeout=10)
    thread.join(90)
    assert not thread.is_alive()
    state = outcome["result"]["killed"]
    assert state.succeeded and state.worker_restart_count == 1
    assert len([name for name in os.listdir(tmp_path / "events")
                if name.startswith("block0.")]) == 2
    # status_command said the job was gone; no exit code was recorded
    assert launcher.jobs[held].exit_code() == EXIT_UNKNOWN
    assert sorted(job.exit_code() for job in launcher.jobs.values()) == [EXIT_UNKNOWN, 0]
    assert len(launcher.jobs) == 2


def test_cancel_at_the_end_of_a_failed_run(fake_lsf, tmp_path):
    """A run that stops early (its task fails) cancels jobs still running."""
    def stuck(block) -> None:
        time.sleep(100)

    failing = daisy.Task("failing", total_roi=Roi((0,), (10,)), read_roi=Roi((0,), (10,)),
                         write_roi=Roi((0,), (10,)), process_function=stuck,
                         num_workers=1, timeout=1.0, max_retries=0, max_worker_restarts=0)
    launcher = lsf_shaped(fake_lsf, tmp_path)
    started = time.monotonic()
    result = daisy.run_blockwise([failing], launcher=launcher, progress=False,
                                 ledger_dir=tmp_path / "ledgers")
    assert not result["failing"].succeeded
    assert time.monotonic() - started < 60
    assert all(job.finished for job in launcher.jobs.values())


def test_a_refused_replacement_ends_the_run_with_a_report_not_a_crash(fake_lsf, tmp_path,
                                                                      capsys):
    task = daisy.Task("busy", total_roi=Roi((0,), (60,)), read_roi=Roi((0,), (10,)),
                      write_roi=Roi((0,), (10,)),
                      process_function=functools.partial(hold_first_block, str(tmp_path)),
                      num_workers=1, max_retries=0)
    launcher = lsf_shaped(fake_lsf, tmp_path)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=daisy.run_blockwise(
        [task], launcher=launcher, progress=False, ledger_dir=tmp_path / "ledgers")))
    thread.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "held").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    (fake_lsf / "busy").touch()
    subprocess.run([str(fake_lsf / "bkill"), (tmp_path / "held").read_text()], check=True,
                   timeout=10)
    thread.join(90)
    assert not thread.is_alive()
    state = outcome["result"]["busy"]
    assert not state.succeeded and state.worker_restart_count == 1
    printed = capsys.readouterr().out
    assert "a replacement was refused" in printed and "the batch system is busy" in printed
    assert len(launcher.jobs) == 1
