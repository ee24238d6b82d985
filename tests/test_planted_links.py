"""Nothing a run writes can be redirected by a planted symbolic link, and nothing it
leaves or submits hands its user's secrets or shell to others.

Real runs: ``run_blockwise`` with the local launcher (spawn and fork) and the command
launcher around fake batch commands (shell scripts in ``tmp_path``), and a Luigi
pipeline. Folders that stand for shared project folders are made sticky and writable
by all (``chmod 1777``, as ``/tmp``), the one kind of shared folder a run accepts; the
"attacker's" links are planted there before the run, pointing at a victim file whose
content must not change.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import luigi_daisy as daisy
from luigi_daisy import Roi, UnsafePathError
from luigi_daisy.claims import TaskLock, lock_path
from luigi_daisy.errors import ConfigError
from luigi_daisy.launchers.command import CommandLauncher
from luigi_daisy.ledger import Ledger, LedgerError, ledger_path
from luigi_daisy.payload import STALE_AFTER, payload_folder

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_stray_processes")]

VICTIM_TEXT = "the victim's own content\n"
#: a group that is not this user's private group (nogroup)
SHARED_GID = 65534


def shared_folder(path: Path) -> Path:
    """A folder like a shared project folder that a run accepts: sticky, writable by all."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o1777)
    return path


def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text(VICTIM_TEXT)
    return path


def plant(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def note(folder: str, block) -> None:
    print(f"worker output for block {block.block_id[1]}")
    (Path(folder) / f"block{block.block_id[1]}").touch()


def small_task(tmp_path: Path, name: str = "t", workers: int = 1) -> daisy.Task:
    (tmp_path / "events").mkdir(exist_ok=True)
    return daisy.Task(name, total_roi=Roi((0,), (40,)), read_roi=Roi((0,), (10,)),
                      write_roi=Roi((0,), (10,)),
                      process_function=functools.partial(note, str(tmp_path / "events")),
                      num_workers=workers)


# ------------------------------------------------------------------ ledger folder
def test_a_planted_task_lock_link_is_refused_and_its_target_untouched(tmp_path):
    ledgers = shared_folder(tmp_path / "ledgers")
    target = victim(tmp_path)
    lock = lock_path(ledger_path(ledgers, "t"))
    plant(lock, target)
    with pytest.raises(UnsafePathError) as raised:
        daisy.run_blockwise([small_task(tmp_path)], multiprocessing=False, progress=False,
                            ledger_dir=ledgers)
    assert target.read_text() == VICTIM_TEXT
    assert str(lock) in str(raised.value) and "symbolic link" in str(raised.value)
    assert f"rm {lock}" in str(raised.value)


@pytest.mark.parametrize("suffix", ["", ".sqlite", ".sqlite-wal", ".sqlite-shm"])
def test_a_planted_ledger_link_is_refused_before_sqlite_opens_it(tmp_path, suffix):
    """The record, and an SQLite ledger of the previous version beside it (which a
    writer converts: SQLite opens it and its ``-wal`` and ``-shm``)."""
    ledgers = shared_folder(tmp_path / "ledgers")
    target = victim(tmp_path)
    link = Path(f"{ledger_path(ledgers, 't')}{suffix}")
    plant(link, target)
    with pytest.raises(UnsafePathError, match="symbolic link") as raised:
        daisy.run_blockwise([small_task(tmp_path)], multiprocessing=False, progress=False,
                            ledger_dir=ledgers)
    assert str(link) in str(raised.value)
    assert target.read_text() == VICTIM_TEXT


@pytest.mark.parametrize("name", ["manifest.json", "done-0-*.zz"])
def test_a_link_planted_inside_a_record_is_never_followed(tmp_path, name):
    """A file of the record replaced by a link: it is neither read through nor written
    through (a commit writes a new file and renames it over the name)."""
    ledgers = shared_folder(tmp_path / "ledgers")
    task = small_task(tmp_path)
    ledger = Ledger(ledger_path(ledgers, "t"), "t", task.grid.describe())
    ledger.record_done(0)
    ledger.close()
    target = victim(tmp_path)
    (planted,) = ledger_path(ledgers, "t").glob(name)  # chunk files carry a generation
    planted.unlink()
    plant(planted, target)
    with pytest.raises((UnsafePathError, LedgerError)) as raised:
        daisy.run_blockwise([task], multiprocessing=False, progress=False, ledger_dir=ledgers)
    assert str(planted) in str(raised.value) or "symbolic link" in str(raised.value)
    assert target.read_text() == VICTIM_TEXT
    assert not (tmp_path / "events" / "block1").exists(), "blocks ran"


@pytest.mark.parametrize("mode", [0o775, 0o777])
def test_a_ledger_folder_others_can_write_is_refused_unless_sticky(tmp_path, mode):
    ledgers = tmp_path / "ledgers"
    ledgers.mkdir()
    ledgers.chmod(mode)
    os.chown(ledgers, -1, SHARED_GID)  # a group others are in, not the user's own
    with pytest.raises(ConfigError) as raised:  # a setting: refused before anything
        daisy.run_blockwise([small_task(tmp_path)], multiprocessing=False, progress=False,
                            ledger_dir=ledgers)
    message = str(raised.value)
    assert f"ledger folder {ledgers} is writable by" in message
    assert f"chmod go-w {ledgers}" in message and f"chmod +t {ledgers}" in message
    assert not ledger_path(ledgers, "t").exists()
    # a folder opened up after the run's checks: its lock still refuses it
    with pytest.raises(UnsafePathError, match=f"ledger folder {ledgers} is writable by"):
        TaskLock(lock_path(ledger_path(ledgers, "t"))).try_acquire()
    assert not list(ledgers.iterdir())
    ledgers.chmod(mode | 0o1000)  # sticky: accepted
    assert daisy.run_blockwise([small_task(tmp_path)], multiprocessing=False,
                               progress=False, ledger_dir=ledgers)["t"].succeeded


# ------------------------------------------------------------------ local worker logs
@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_a_planted_worker_log_link_is_refused_and_its_target_untouched(tmp_path,
                                                                      start_method):
    logs = shared_folder(tmp_path / "logs")
    target = victim(tmp_path)
    err = logs / "t" / "worker_0.err"
    plant(err, target)
    (logs / "t").chmod(0o755)
    with pytest.raises(UnsafePathError) as raised:
        daisy.run_blockwise([small_task(tmp_path)], progress=False, log_dir=logs,
                            start_method=start_method, ledger_dir=tmp_path / "ledgers")
    assert str(err) in str(raised.value)
    assert target.read_text() == VICTIM_TEXT
    # once the link is gone the run writes its own file there
    err.unlink()
    assert daisy.run_blockwise([small_task(tmp_path)], progress=False, log_dir=logs,
                               start_method=start_method,
                               ledger_dir=tmp_path / "ledgers")["t"].succeeded
    assert not err.is_symlink() and err.stat().st_uid == os.getuid()
    assert target.read_text() == VICTIM_TEXT


def test_a_planted_task_log_folder_link_is_refused(tmp_path):
    logs = shared_folder(tmp_path / "logs")
    elsewhere = tmp_path / "attackers_folder"
    elsewhere.mkdir()
    plant(logs / "t", elsewhere)
    with pytest.raises(UnsafePathError, match="task log folder .* is a symbolic link"):
        daisy.run_blockwise([small_task(tmp_path)], progress=False, log_dir=logs,
                            ledger_dir=tmp_path / "ledgers")
    assert not list(elsewhere.iterdir())


def test_a_log_folder_others_can_write_is_refused(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o777)
    with pytest.raises(ConfigError, match=f"log folder {logs} is writable by"):
        daisy.run_blockwise([small_task(tmp_path)], progress=False, log_dir=logs,
                            ledger_dir=tmp_path / "ledgers")


# ------------------------------------------------------------------ command launcher
FAKE_QSUB = """\
#!/bin/sh
# qsub -N NAME -o OUT -e ERR -- COMMAND...: COMMAND runs in the background, in this
# folder; the job's record (its whole environment, as qsub -V keeps it) goes to records/
here=$(dirname "$0")
while [ $# -gt 0 ]; do
  case "$1" in
    -N) name=$2; shift 2;;
    -o) out=$2; shift 2;;
    -e) err=$2; shift 2;;
    --) shift; break;;
    *) break;;
  esac
done
cd "$here" || exit 1
setsid "$@" </dev/null >>"${out:-/dev/null}" 2>>"${err:-/dev/null}" &
env > "records/$!"
echo "$!" > "jobs/$!"
echo "$!.fakepbs"
"""

FAKE_QDEL = """\
#!/bin/sh
kill -TERM -- "-${1%.fakepbs}" 2>/dev/null || kill -TERM "${1%.fakepbs}" 2>/dev/null
exit 0
"""

FAKE_QSTAT = """\
#!/bin/sh
# exits 0 while job $1 runs (a zombie has ended)
state=$(ps -o stat= -p "${1%.fakepbs}") || exit 1
case "$state" in Z*) exit 1;; esac
exit 0
"""


@pytest.fixture
def fake_pbs(tmp_path):
    """The fake commands; afterwards every job they started must be gone."""
    folder = tmp_path / "fake_pbs"
    for sub in ("jobs", "records"):
        (folder / sub).mkdir(parents=True)
    for name, text in (("qsub", FAKE_QSUB), ("qdel", FAKE_QDEL), ("qstat", FAKE_QSTAT)):
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


def pbs_launcher(folder: Path, log_dir: Path, submit: str | None = None,
                 status: bool = True) -> CommandLauncher:
    return CommandLauncher(
        submit_command=submit or (f"{folder}/qsub -N {{job_name}} -o {{stdout}} "
                                  f"-e {{stderr}} -- {{worker_command}}"),
        cancel_command=f"{folder}/qdel {{job_id}}", job_id_pattern=r"^(\S+)",
        status_command=f"{folder}/qstat {{job_id}}" if status else None,
        log_dir=log_dir, poll_interval=1.0)


def test_a_planted_exit_file_link_does_not_receive_the_exit_code(fake_pbs, tmp_path):
    logs = shared_folder(tmp_path / "logs")
    target = victim(tmp_path)
    (logs / "t").mkdir()
    plant(logs / "t" / "worker_0.err.exit.tmp", target)
    launcher = pbs_launcher(fake_pbs, logs, status=False)  # exit files only
    result = daisy.run_blockwise([small_task(tmp_path)], launcher=launcher, progress=False,
                                 ledger_dir=tmp_path / "ledgers")
    assert result["t"].succeeded
    assert target.read_text() == VICTIM_TEXT
    assert (logs / "t" / "worker_0.err.exit").read_text() == "0\n"
    assert {job.exit_code() for job in launcher.jobs.values()} == {0}


def test_a_planted_batch_log_link_is_refused_before_submitting(fake_pbs, tmp_path):
    logs = shared_folder(tmp_path / "logs")
    target = victim(tmp_path)
    (logs / "t").mkdir()
    plant(logs / "t" / "worker_0.out", target)
    launcher = pbs_launcher(fake_pbs, logs)
    with pytest.raises(UnsafePathError, match="worker_0.out is a symbolic link"):
        daisy.run_blockwise([small_task(tmp_path)], launcher=launcher, progress=False,
                            ledger_dir=tmp_path / "ledgers")
    assert target.read_text() == VICTIM_TEXT
    assert not list((fake_pbs / "jobs").iterdir())


def test_placeholders_inside_a_shell_word_are_quoted(fake_pbs, tmp_path):
    logs = tmp_path / "logs$(touch pwned)"
    submit = (f'{fake_pbs}/qsub -N {{job_name}} -- sh -c '
              f'"{{worker_command}} >>{{stdout}} 2>>{{stderr}}"')
    launcher = pbs_launcher(fake_pbs, logs, submit=submit)
    result = daisy.run_blockwise([small_task(tmp_path)], launcher=launcher, progress=False,
                                 ledger_dir=tmp_path / "ledgers")
    assert not (fake_pbs / "pwned").exists()
    assert result["t"].succeeded
    assert "worker output for block" in (logs / "t" / "worker_0.out").read_text()


def test_the_token_stays_out_of_the_job_environment(fake_pbs, tmp_path):
    launcher = pbs_launcher(fake_pbs, tmp_path / "logs")
    result = daisy.run_blockwise([small_task(tmp_path, workers=2)], launcher=launcher,
                                 progress=False, ledger_dir=tmp_path / "ledgers")
    assert result["t"].succeeded
    records = list((fake_pbs / "records").iterdir())
    assert len(records) == 2
    for record in records:
        environment = record.read_text()
        assert "token=" not in environment and "LUIGI_DAISY_CONTEXT=" not in environment
        assert "LUIGI_DAISY_CONTEXT_FILE=" in environment
    # each worker deleted its context file once read; the run removed the payload
    assert not list(payload_folder(tmp_path / "logs").iterdir())


# ------------------------------------------------------------------ leftovers
KILLED_RUN = """\
import functools, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import luigi_daisy as daisy
from luigi_daisy import Roi
from luigi_daisy.launchers.command import CommandLauncher
from test_planted_links import hold

folder = Path({folder!r})
task = daisy.Task("held", total_roi=Roi((0,), (10,)), read_roi=Roi((0,), (10,)),
                  write_roi=Roi((0,), (10,)),
                  process_function=functools.partial(hold, str(folder)), num_workers=1)
launcher = CommandLauncher(
    submit_command="{fake}/qsub -N {{job_name}} -o {{stdout}} -e {{stderr}} -- "
                   "{{worker_command}}",
    cancel_command="{fake}/qdel {{job_id}}", job_id_pattern=r"^(\\S+)",
    status_command="{fake}/qstat {{job_id}}", log_dir=folder / "logs", poll_interval=1.0)
daisy.run_blockwise([task], launcher=launcher, progress=False,
                    ledger_dir=folder / "ledgers")
"""


def hold(folder: str, block) -> None:
    (Path(folder) / "holding").touch()
    deadline = time.monotonic() + 60
    while not (Path(folder) / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_for(condition, what: str, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_held_run(fake_pbs, tmp_path: Path, extra: str = "") -> subprocess.Popen:
    """Start KILLED_RUN (``extra``: Python run before it) in its own session; return
    once its worker holds its block."""
    script = tmp_path / "killed_run.py"
    text = textwrap.dedent(KILLED_RUN).format(
        tests=str(Path(__file__).parent), folder=str(tmp_path), fake=str(fake_pbs))
    text = text.replace("daisy.run_blockwise(", f"{extra}\ndaisy.run_blockwise(", 1)
    script.write_text(text)
    process = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ),
                               start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (tmp_path / "holding").exists(), "the first run's worker")
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        raise
    return process


def wait_for_jobs_to_end(fake_pbs) -> None:
    for pid_file in (fake_pbs / "jobs").iterdir():
        wait_for(lambda: not Path(f"/proc/{pid_file.name}").exists() or Path(
            f"/proc/{pid_file.name}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
            "the killed run's job to end")


def age(path: Path, seconds: float) -> None:
    """Set ``path``'s mtime ``seconds`` into the past (time passing for the test)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_the_payload_of_a_killed_run_is_removed_by_the_next_run(fake_pbs, tmp_path):
    process = start_held_run(fake_pbs, tmp_path)
    try:
        payloads = payload_folder(tmp_path / "logs")
        left = [path for path in payloads.iterdir() if ".payload-" in path.name]
        assert len(left) == 1
        locks = [path for path in payloads.iterdir() if path.suffix == ".lock"]
        assert len(locks) == 1 and locks[0].name == left[0].name.split(".")[0] + ".lock"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        (tmp_path / "release").touch()
    # the killed run's job ends on its own (its run is gone); its payload stays behind
    wait_for_jobs_to_end(fake_pbs)
    assert left[0].exists()
    # its lock is free, but it was touched a moment ago: a run elsewhere may be alive
    launcher = pbs_launcher(fake_pbs, tmp_path / "logs")
    assert daisy.run_blockwise([small_task(tmp_path, "soon")], launcher=launcher,
                               progress=False, ledger_dir=tmp_path / "ledgers")[
        "soon"].succeeded
    assert left[0].exists() and locks[0].exists()
    age(locks[0], STALE_AFTER + 60)
    launcher = pbs_launcher(fake_pbs, tmp_path / "logs")
    task = small_task(tmp_path, "next")
    assert daisy.run_blockwise([task], launcher=launcher, progress=False,
                               ledger_dir=tmp_path / "ledgers")["next"].succeeded
    assert not left[0].exists() and not locks[0].exists()
    assert not list(payloads.iterdir())


def test_a_live_runs_files_are_not_removed(tmp_path):
    from luigi_daisy.payload import RunFiles, remove_stale_files

    (tmp_path / "logs").mkdir()
    folder = payload_folder(tmp_path / "logs")
    files = RunFiles(folder)
    path = files.write("payload", b"data", ".pickle")
    lock = folder / f"{files.run_id}.lock"
    try:
        age(lock, STALE_AFTER + 60)  # not refreshed for long, but locked: alive
        assert remove_stale_files(folder) == []
        assert path.exists()
    finally:
        files.close()
    assert not path.exists() and not lock.exists()


# ------------------------------------------------------------------ Luigi's RunOutcome
@pytest.fixture
def luigi_folders(tmp_path, monkeypatch):
    """``[luigi_daisy] ledger_dir`` and ``log_dir`` in ``tmp_path`` for one test."""
    import luigi

    config = luigi.configuration.get_config()
    saved = {key: config.get("luigi_daisy", key) if config.has_option("luigi_daisy", key)
             else None for key in ("ledger_dir", "log_dir", "num_workers")}
    monkeypatch.chdir(tmp_path)
    config.set("luigi_daisy", "ledger_dir", str(shared_folder(tmp_path / "ledgers")))
    config.set("luigi_daisy", "log_dir", str(tmp_path / "logs"))
    config.set("luigi_daisy", "num_workers", "1")
    try:
        yield tmp_path
    finally:
        for key, value in saved.items():
            if value is None:
                config.remove_option("luigi_daisy", key)
            else:
                config.set("luigi_daisy", key, value)


def test_a_planted_run_outcome_link_is_not_written_through(luigi_folders):
    import luigi

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import pipeline as example

    tmp_path = luigi_folders
    target = victim(tmp_path)
    task = example.Threshold(workdir=str(tmp_path / "data"), size=16, block_size=8)
    outcome = Path(f"{task.ledger_file()}.outcome.json")
    # the name the outcome was written under before being renamed into place
    plant(Path(f"{outcome}.{os.getpid()}"), target)
    assert luigi.build([task], local_scheduler=True, workers=1) is True
    assert target.read_text() == VICTIM_TEXT
    assert not outcome.is_symlink() and '"succeeded": true' in outcome.read_text()
