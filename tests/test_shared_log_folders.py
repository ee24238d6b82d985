"""Log and payload folders shared by users, runs and hosts: nobody's files are taken
for stale, nobody is locked out, and a run's open descriptors do not grow with its jobs.

Real runs: ``run_blockwise`` with the command launcher around the fake PBS commands of
``test_planted_links`` (shell scripts in ``tmp_path``), the local launcher, a Luigi
pipeline. A second user is a real process of uid 65534 (``setpriv``) that keeps only
``CAP_DAC_READ_SEARCH``, so that it can read this machine's Python under ``/root``; it
writes, and owns what it creates, as that user.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_planted_links import (  # noqa: F401 - fixtures
    SHARED_GID,
    age,
    fake_pbs,
    luigi_folders,
    pbs_launcher,
    shared_folder,
    small_task,
    start_held_run,
    wait_for,
    wait_for_jobs_to_end,
)

import luigi_daisy as daisy
from luigi_daisy import Roi, UnsafePathError
from luigi_daisy.errors import ConfigError
from luigi_daisy.launchers.base import WorkerSpec
from luigi_daisy.payload import FunctionTarget, WorkerPayload

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("no_stray_processes")]

OTHER_UID = 65534
HOUR = 3600.0


def payload_files(logs: Path) -> list[Path]:
    """Every file in any payload folder of ``logs`` (``.payloads`` or ``.payloads-*``)."""
    return sorted(path for folder in logs.glob(".payloads*") for path in folder.iterdir())


# ------------------------------------------------------------------ two users, one folder
OTHER_USERS_RUN = """\
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import luigi_daisy as daisy
from test_planted_links import pbs_launcher, small_task

shared = Path({shared!r})
(shared / "bob").mkdir(exist_ok=True)
try:
    result = daisy.run_blockwise(
        [small_task(shared / "bob", "bob")],
        launcher=pbs_launcher(Path({fake!r}), shared / "logs"), progress=False,
        ledger_dir=shared / f"ledgers-bob-{{sys.argv[1]}}")
except Exception as error:
    print(f"{{type(error).__name__}}: {{error}}")
else:
    print("succeeded" if result["bob"].succeeded else "failed")
"""


def run_as_other_user(script: Path, cwd: Path, attempt: int) -> str:
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to run as a second user")
    command = [setpriv, f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
               "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
               sys.executable, str(script), str(attempt)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120,
                              cwd=cwd, check=False)
    assert finished.returncode == 0, finished.stderr
    return finished.stdout.strip().splitlines()[-1]


def test_two_users_share_a_sticky_log_folder(fake_pbs, tmp_path):
    # before: .payloads belonged to whoever ran first; everyone else got
    # "UnsafePathError: payload folder ... belongs to user id ..."
    shared = shared_folder(tmp_path / "shared")
    logs = shared_folder(shared / "logs")
    for sub in ("jobs", "records"):
        (fake_pbs / sub).chmod(0o1777)
    script = tmp_path / "other_user.py"
    script.write_text(OTHER_USERS_RUN.format(tests=str(Path(__file__).parent),
                                             shared=str(shared), fake=str(fake_pbs)))
    assert run_as_other_user(script, shared, 1) == "succeeded"
    launcher = pbs_launcher(fake_pbs, logs)
    assert daisy.run_blockwise([small_task(tmp_path, "alice")], launcher=launcher,
                               progress=False, ledger_dir=tmp_path / "ledgers")[
        "alice"].succeeded
    assert run_as_other_user(script, shared, 2) == "succeeded"  # and again, after this user
    mine, theirs = logs / f".payloads-{os.getuid()}", logs / f".payloads-{OTHER_UID}"
    assert mine.stat().st_uid == os.getuid() and theirs.stat().st_uid == OTHER_UID
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o700
    assert not list(mine.iterdir()) and not list(theirs.iterdir())
    assert len(list((fake_pbs / "records").iterdir())) == 3  # a job of each run


# ------------------------------------------------------------------ descriptors
def quiet(block) -> None:
    pass


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_runs_descriptors_do_not_grow_with_its_jobs(fake_pbs, tmp_path):
    # before: every job's context file stayed open (holding its lock) until the run ended
    launcher = pbs_launcher(fake_pbs, tmp_path / "logs")
    payload = WorkerPayload(FunctionTarget(quiet), "t")

    def spec(worker_id: int) -> WorkerSpec:
        # a context no worker accepts: each job starts, reads its file and ends at once
        return WorkerSpec("t", worker_id, {"LUIGI_DAISY_CONTEXT": "not a context"},
                          payload, tmp_path / "logs" / "t" / f"worker_{worker_id}.out",
                          tmp_path / "logs" / "t" / f"worker_{worker_id}.err",
                          f"t-worker-{worker_id}")

    def submitted(count: int) -> None:
        def applied() -> bool:
            launcher.pending_jobs(0.0)  # applies the submissions that returned
            return len(launcher.jobs) == count

        wait_for(applied, f"{count} submissions")

    try:
        launcher.start(spec(0))
        submitted(1)
        before = open_descriptors()
        jobs = 40
        for worker_id in range(1, jobs):
            launcher.start(spec(worker_id))
        submitted(jobs)
        after = open_descriptors()
    finally:
        assert launcher.stop_all(60.0) == []
    assert after - before < 5, f"{after - before} more descriptors after {jobs - 1} jobs"
    assert payload_files(tmp_path / "logs") == []


# ------------------------------------------------------------------ locks per host
def test_a_live_runs_files_survive_when_its_lock_looks_free(fake_pbs, tmp_path):
    # the first run's lock is not held (as another host sees a lock its client keeps);
    # before: the second run deleted the first run's payload while its job still needed it
    process = start_held_run(fake_pbs, tmp_path,
                             "import fcntl\nfcntl.flock = lambda *arguments: None\n")
    try:
        first = payload_files(tmp_path / "logs")
        assert any("payload-" in path.name for path in first)
        launcher = pbs_launcher(fake_pbs, tmp_path / "logs")
        assert daisy.run_blockwise([small_task(tmp_path, "second")], launcher=launcher,
                                   progress=False, ledger_dir=tmp_path / "ledgers")[
            "second"].succeeded
        left = payload_files(tmp_path / "logs")
        assert [path for path in first if "payload-" in path.name and path not in left] == []
    finally:
        (tmp_path / "release").touch()
        try:
            assert process.wait(60) == 0
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
    wait_for_jobs_to_end(fake_pbs)
    assert payload_files(tmp_path / "logs") == []  # each run removed its own


def test_a_live_run_refreshes_its_lock_file(fake_pbs, tmp_path):
    process = start_held_run(
        fake_pbs, tmp_path,
        "import luigi_daisy.launchers.batch as batch\nbatch.LOCK_REFRESH_INTERVAL = 0.2\n")
    try:
        locks = [path for path in payload_files(tmp_path / "logs") if path.suffix == ".lock"]
        assert len(locks) == 1
        age(locks[0], 2 * HOUR)
        wait_for(lambda: time.time() - locks[0].stat().st_mtime < 60,
                 "the run to refresh its lock file", 30)
    finally:
        (tmp_path / "release").touch()
        try:
            assert process.wait(60) == 0
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
    wait_for_jobs_to_end(fake_pbs)


class NoLocks:
    """``fcntl`` of a file system without ``flock`` (Lustre mounted ``noflock``); no
    such file system runs here, so ``flock`` itself is replaced."""

    LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = 1, 2, 4, 8

    @staticmethod
    def flock(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))


def test_a_folder_without_file_locks_is_tolerated(fake_pbs, tmp_path, monkeypatch, caplog):
    # before: taking the lock raised, so no batch job could be submitted at all
    import luigi_daisy.payload

    logs = tmp_path / "logs"
    first = pbs_launcher(fake_pbs, logs)
    assert daisy.run_blockwise([small_task(tmp_path, "first")], launcher=first,
                               progress=False, ledger_dir=tmp_path / "ledgers")[
        "first"].succeeded
    folder = next(logs.glob(".payloads*"))
    # files of a run gone long ago: with no locks, nothing tells it was not alive
    dead = [folder / "run-0123456789abcdef.lock",
            folder / "run-0123456789abcdef.payload-x.pickle"]
    for path in dead:
        path.write_bytes(b"x")
        path.chmod(0o600)
        age(path, 2 * HOUR)
    monkeypatch.setattr(luigi_daisy.payload, "fcntl", NoLocks)
    monkeypatch.setattr(luigi_daisy.payload, "_said_no_locks", False, raising=False)
    caplog.set_level(logging.INFO, logger="luigi_daisy.payload")
    launcher = pbs_launcher(fake_pbs, logs)
    assert daisy.run_blockwise([small_task(tmp_path, "t", workers=2)], launcher=launcher,
                               progress=False, ledger_dir=tmp_path / "ledgers")[
        "t"].succeeded
    assert all(path.exists() for path in dead)
    assert sorted(payload_files(logs)) == sorted(dead)  # the run removed its own
    said = [record for record in caplog.records if "does not support flock" in
            record.getMessage()]
    assert len(said) == 1, [record.getMessage() for record in caplog.records]


# ------------------------------------------------------------------ folders of earlier versions
@pytest.fixture
def private_group():
    """This user's private group id; skip where the user has none."""
    import grp
    import pwd

    owner = pwd.getpwuid(os.getuid())
    try:
        group = grp.getgrgid(owner.pw_gid)
    except KeyError:
        pytest.skip("this user's primary group has no name")
    if group.gr_name != owner.pw_name or set(group.gr_mem) - {owner.pw_name}:
        pytest.skip("this user has no private group")
    return group.gr_gid


def test_folders_of_the_users_private_group_may_be_group_writable(tmp_path, private_group):
    # before: refused ("writable by its group and not sticky")
    ledgers, logs = tmp_path / "ledgers", tmp_path / "logs"
    for folder in (ledgers, logs):
        folder.mkdir()
        os.chown(folder, -1, private_group)
        folder.chmod(0o775)  # as made under umask 002 (Debian, Ubuntu)
    result = daisy.run_blockwise([small_task(tmp_path)], progress=False, log_dir=logs,
                                 ledger_dir=ledgers)
    assert result["t"].succeeded
    # writable by others: refused whatever the group (a setting: before anything)
    logs.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by .*others"):
        daisy.run_blockwise([small_task(tmp_path, "u")], progress=False, log_dir=logs,
                            ledger_dir=ledgers)


@pytest.mark.parametrize("launcher", ["local", "batch"])
def test_folders_an_earlier_run_made_group_writable_are_fixed(fake_pbs, tmp_path, launcher,
                                                             caplog):
    # before: "task log folder ... is writable by its group": refused after an upgrade
    logs = tmp_path / "logs"
    made = [logs / "t", logs / f".payloads-{os.getuid()}"]
    for folder in made:
        folder.mkdir(parents=True)
        os.chown(folder, -1, SHARED_GID)
        folder.chmod(0o775)
    caplog.set_level(logging.DEBUG, logger="luigi_daisy.safe_files")
    options = {"launcher": pbs_launcher(fake_pbs, logs)} if launcher == "batch" else \
        {"log_dir": logs}
    assert daisy.run_blockwise([small_task(tmp_path)], progress=False,
                               ledger_dir=tmp_path / "ledgers", **options)["t"].succeeded
    assert stat.S_IMODE(made[0].stat().st_mode) == 0o755
    assert any(f"task log folder {made[0]} was writable by its group" in record.getMessage()
               for record in caplog.records)
    if launcher == "batch":
        assert stat.S_IMODE(made[1].stat().st_mode) == 0o755


# ------------------------------------------------------------------ nested runs
def start_inner_run(fake: str, tmp: str, block) -> None:
    """An outer run's process function that runs a batch run of its own."""
    tmp_path = Path(tmp)
    (tmp_path / "inner").mkdir(exist_ok=True)
    result = daisy.run_blockwise([small_task(tmp_path / "inner", "inner")],
                                 launcher=pbs_launcher(Path(fake), tmp_path / "logs"),
                                 progress=False, ledger_dir=tmp_path / "ledgers-inner")
    assert result["inner"].succeeded


def test_a_nested_run_does_not_pass_on_the_outer_context(fake_pbs, tmp_path):
    # before: qsub -V recorded the outer run's LUIGI_DAISY_CONTEXT, with its token
    outer = daisy.Task("outer", total_roi=Roi((0,), (10,)), read_roi=Roi((0,), (10,)),
                       write_roi=Roi((0,), (10,)), num_workers=1,
                       process_function=functools.partial(start_inner_run, str(fake_pbs),
                                                          str(tmp_path)))
    result = daisy.run_blockwise([outer], progress=False, log_dir=tmp_path / "outer-logs",
                                 ledger_dir=tmp_path / "ledgers-outer")
    records = list((fake_pbs / "records").iterdir())
    assert records
    for record in records:
        lines = record.read_text().splitlines()
        assert any(line.startswith("LUIGI_DAISY_CONTEXT_FILE=") for line in lines)
        leaked = [line.split("=", 1)[0] for line in lines
                  if line.startswith(("LUIGI_DAISY_CONTEXT=", "DAISY_CONTEXT="))]
        assert leaked == [], f"the job's record holds {leaked}"
        assert "token=" not in record.read_text()
    # and the inner run's workers did not take the outer worker's parent for theirs
    assert result["outer"].succeeded, result["outer"]


# ------------------------------------------------------------------ files replaced whole
def test_a_luigi_tasks_outcome_file_is_readable_by_its_owner_only(luigi_folders):
    # before: 0644, whatever the umask, though it may hold a block's error text
    import luigi

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import pipeline as example

    task = example.Threshold(workdir=str(luigi_folders / "data"), size=16, block_size=8)
    assert luigi.build([task], local_scheduler=True, workers=1) is True
    outcome = Path(f"{task.ledger_file()}.outcome.json")
    assert '"succeeded": true' in outcome.read_text()
    assert stat.S_IMODE(outcome.stat().st_mode) == 0o600
