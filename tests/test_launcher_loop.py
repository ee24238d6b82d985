"""Batch commands never run on the loop that hands out blocks.

Real runs (a real block server, real ``python -m luigi_daisy.worker`` processes) with
the SLURM launcher against fake ``sbatch``, ``squeue`` and ``scancel`` shell scripts on
``PATH`` (in ``tmp_path``). ``sbatch`` starts the wrapped command in a session of its
own (or, for a job name with ``pending`` in it, starts nothing: a job that stays
pending until cancelled); ``squeue`` reports every job from the files ``sbatch`` and the
jobs leave; ``scancel`` ends a job's process group. Every call records when it started
and ended, so the tests check the order of events (a block handed out while ``squeue``
was running), never a duration. Every job is gone after each test.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import luigi_daisy as daisy
from luigi_daisy import Roi
from luigi_daisy.errors import ConfigError, LauncherError
from luigi_daisy.launchers.base import WorkerSpec
from luigi_daisy.launchers.batch import EXIT_CANCELLED, MIN_POLL_INTERVAL
from luigi_daisy.launchers.command import CommandLauncher
from luigi_daisy.launchers.lsf import LsfLauncher
from luigi_daisy.launchers.per_task import PerTaskLauncher
from luigi_daisy.launchers.slurm import SlurmLauncher
from luigi_daisy.payload import FunctionTarget, WorkerPayload

pytestmark = [pytest.mark.timeout(150), pytest.mark.usefixtures("no_stray_processes")]

FAKE_SBATCH = r"""#!/bin/sh
# sbatch --parsable --job-name=NAME --output=OUT --error=ERR ... --wrap=COMMAND
here=$(dirname "$0")
start=$(date +%s.%N)
for arg; do
  case "$arg" in
    --job-name=*) name=${arg#--job-name=};;
    --output=*) out=${arg#--output=};;
    --error=*) err=${arg#--error=};;
    --wrap=*) wrap=${arg#--wrap=};;
  esac
done
if [ -e "$here/refuse" ]; then
  echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
  echo "sbatch $start $(date +%s.%N) refused" >> "$here/calls"
  exit 1
fi
case "$name" in
  *pending*) id=$$; : > "$here/jobs/$id.pending";;
  *) setsid sh -c 'sh -c "$1"; echo $? > "$2/$$.exit"' sh "$wrap" "$here/jobs" \
       </dev/null >>"$out" 2>>"$err" &
     id=$!; : > "$here/jobs/$id.job";;
esac
sleep "$(cat "$here/sbatch_delay" 2>/dev/null || echo 0)"
echo "sbatch $start $(date +%s.%N) $id"  >> "$here/calls"
echo "$id"
"""

FAKE_SQUEUE = r"""#!/bin/sh
# squeue ... --Format=JobID:|,State:|,exit_code:|,Reason:  (every job, whatever the options)
here=$(dirname "$0")
start=$(date +%s.%N)
sleep "$(cat "$here/squeue_delay" 2>/dev/null || echo 0)"
for path in "$here"/jobs/*.job "$here"/jobs/*.pending; do
  [ -e "$path" ] || continue
  file=${path##*/}; id=${file%.*}
  if [ -e "$here/jobs/$id.exit" ]; then
    code=$(cat "$here/jobs/$id.exit")
    if [ "$code" = 0 ]; then state=COMPLETED; else state=FAILED; fi
    echo "$id|$state|$((code * 256))|None"
  elif [ "$file" = "$id.job" ] && stat=$(ps -o stat= -p "$id") && [ "${stat#Z}" = "$stat" ]; then
    echo "$id|RUNNING|0|None"
  elif [ -e "$here/jobs/$id.cancelled" ]; then
    echo "$id|CANCELLED|0|None"
  elif [ "$file" = "$id.pending" ]; then
    echo "$id|PENDING|0|Priority"
  fi
done
echo "squeue $start $(date +%s.%N)" >> "$here/calls"
"""

FAKE_SCANCEL = r"""#!/bin/sh
# scancel ID...: SIGTERM to the process group of a job that still runs (dash's kill
# takes no "--")
here=$(dirname "$0")
start=$(date +%s.%N)
for id; do
  : > "$here/jobs/$id.cancelled"
  if [ -e "$here/jobs/$id.job" ] && [ ! -e "$here/jobs/$id.exit" ]; then
    kill -TERM -"$id" 2>/dev/null
  fi
done
echo "scancel $start $(date +%s.%N) $*" >> "$here/calls"
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """The fake commands first on PATH; afterwards every job they started is gone."""
    folder = tmp_path / "fake_slurm"
    (folder / "jobs").mkdir(parents=True)
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE),
                       ("scancel", FAKE_SCANCEL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    yield folder
    left = [int(path.stem) for path in (folder / "jobs").glob("*.job")
            if alive(int(path.stem))]
    for pid in left:
        os.killpg(pid, signal.SIGKILL)
    assert not left, f"jobs outlived the run: {left}"


def calls(folder: Path, command: str) -> list[tuple[float, float, list[str]]]:
    """(start, end, rest) of every recorded call of ``command``, by start."""
    found = []
    path = folder / "calls"
    for line in path.read_text().splitlines() if path.exists() else []:
        words = line.split()
        if words[0] == command:
            found.append((float(words[1]), float(words[2]), words[3:]))
    return sorted(found)


def stamp(folder: str, seconds: float, block) -> None:
    """Process a block for ``seconds``; record (worker pid, start, end) in a file."""
    start = time.time()
    time.sleep(seconds)
    path = Path(folder) / f"{block.block_id[1]}.{os.getpid()}"
    path.write_text(f"{os.getpid()} {start} {time.time()}")


def stamps(folder: Path) -> dict[int, list[tuple[float, float]]]:
    """(start, end) of every processed block, per worker pid, by start."""
    per_worker: dict[int, list[tuple[float, float]]] = {}
    for path in folder.iterdir():
        pid, start, end = path.read_text().split()
        per_worker.setdefault(int(pid), []).append((float(start), float(end)))
    return {pid: sorted(blocks) for pid, blocks in per_worker.items()}


def handed_out_within(per_worker: dict[int, list[tuple[float, float]]],
                      windows: list[tuple[float, float]]) -> int:
    """Blocks that must have been handed out inside one of ``windows``: the worker
    finished its previous block after the window opened and started this one before
    it closed (with prefetch 0 a worker asks for a block only when it has none)."""
    count = 0
    for blocks in per_worker.values():
        for (_, previous_end), (start, _) in zip(blocks, blocks[1:]):
            if any(opened < previous_end and start < closed for opened, closed in windows):
                count += 1
    return count


def line_task(name: str, blocks: int, function, **options) -> daisy.Task:
    return daisy.Task(name, total_roi=Roi((0,), (blocks,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)), process_function=function, **options)


def slurm(tmp_path: Path, **options) -> SlurmLauncher:
    return SlurmLauncher(log_dir=tmp_path / "logs", poll_interval=MIN_POLL_INTERVAL,
                         **options)


def test_blocks_are_handed_out_while_squeue_takes_a_second(fake_slurm, tmp_path):
    """(a) a slow state query does not stop the hand-out; (b) one query of all jobs
    at a time, never closer than the poll interval after the last answer."""
    (fake_slurm / "squeue_delay").write_text("1")
    events = tmp_path / "events"
    events.mkdir()
    task = line_task("served", 300, functools.partial(stamp, str(events), 0.02),
                     num_workers=3)
    launcher = slurm(tmp_path)
    result = daisy.run_blockwise([task], launcher=launcher, progress=False, prefetch=0,
                                 ledger_dir=tmp_path / "ledgers")
    assert result["served"].succeeded
    queries = calls(fake_slurm, "squeue")
    windows = [(start, end) for start, end, _ in queries]
    inside = handed_out_within(stamps(events), windows)
    assert inside >= 5, (f"only {inside} blocks were handed out while squeue ran "
                         f"({len(queries)} calls)")
    # one squeue per poll for the 3 jobs, never two at once, and an interval between
    assert launcher.command_counts["query"] == len(queries)
    for (_, previous_end, _), (start, _, _) in zip(queries, queries[1:]):
        assert start >= previous_end + MIN_POLL_INTERVAL - 0.05
    assert launcher.command_counts["submit"] == 3
    assert {job.exit_code() for job in launcher.jobs.values()} == {0}


def test_a_burst_of_submissions_does_not_stall_the_hand_out(fake_slurm, tmp_path):
    """(d) 200 submissions of 20 ms each are made while blocks are handed out, and a run
    that ends in the middle of them leaves no job behind."""
    (fake_slurm / "sbatch_delay").write_text("0.02")
    events = tmp_path / "events"
    events.mkdir()
    served = line_task("served", 200, functools.partial(stamp, str(events), 0.02),
                       num_workers=2)
    queued = line_task("pending", 10, functools.partial(stamp, str(events), 0.0),
                       num_workers=200)
    stop = threading.Event()

    def stop_when_served() -> None:
        deadline = time.monotonic() + 100
        while len(os.listdir(events)) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()

    watcher = threading.Thread(target=stop_when_served)
    watcher.start()
    # a launcher of its own for each task: two pools, whose jobs are named after their
    # task (the fake sbatch leaves jobs named "pending..." pending)
    launcher = PerTaskLauncher({"served": slurm(tmp_path), "pending": slurm(tmp_path)})
    try:
        result = daisy.run_blockwise([served, queued], launcher=launcher, progress=False,
                                     prefetch=0, stop_event=stop,
                                     ledger_dir=tmp_path / "ledgers")
    finally:
        stop.set()
        watcher.join(10)
    assert result["served"].succeeded and not result["pending"].succeeded
    submissions = calls(fake_slurm, "sbatch")
    assert [rest[0] for _, _, rest in submissions[:2]] != []
    first_pending = min(start for start, _, rest in submissions
                        if (fake_slurm / "jobs" / f"{rest[0]}.pending").exists())
    last = max(end for _, end, _ in submissions)
    inside = handed_out_within(stamps(events), [(first_pending, last)])
    assert inside >= 5, (f"only {inside} blocks were handed out during "
                         f"{len(submissions)} submissions")
    # every pending job that was submitted was cancelled; none was left to the queue
    pending = {path.stem for path in (fake_slurm / "jobs").glob("*.pending")}
    cancelled = {path.stem for path in (fake_slurm / "jobs").glob("*.cancelled")}
    assert pending and pending <= cancelled
    assert sum(each.command_counts["submit"] for each in launcher.distinct) \
        == len(submissions) <= 202
    assert all(job.finished for each in launcher.distinct for job in each.jobs.values())


def test_a_submission_in_flight_when_the_run_ends_is_cancelled(fake_slurm, tmp_path):
    """(e) the run ends while sbatch has started the job but not yet answered: the end
    of the run waits for the job id and cancels the job."""
    (fake_slurm / "sbatch_delay").write_text("3")
    events = tmp_path / "events"
    events.mkdir()
    task = line_task("late", 10, functools.partial(stamp, str(events), 0.0), num_workers=1)
    stop = threading.Event()
    stop.set()
    launcher = slurm(tmp_path)
    daisy.run_blockwise([task], launcher=launcher, progress=False, stop_event=stop,
                        ledger_dir=tmp_path / "ledgers")
    (job,) = launcher.jobs.values()
    assert (fake_slurm / "jobs" / f"{job.job_id}.job").exists()
    assert (fake_slurm / "jobs" / f"{job.job_id}.cancelled").exists()
    assert job.exit_code() == EXIT_CANCELLED and job.state == "CANCELLED"
    (cancel,) = calls(fake_slurm, "scancel")
    (submission,) = calls(fake_slurm, "sbatch")
    assert cancel[0] >= submission[1] and cancel[2] == [job.job_id]


def test_a_refused_first_submission_ends_the_run_with_the_command_and_its_output(
        fake_slurm, tmp_path):
    """(f) sbatch refuses the job: the run raises, naming sbatch and what it said."""
    (fake_slurm / "refuse").touch()
    task = line_task("refused", 10, functools.partial(stamp, str(tmp_path), 0.0),
                     num_workers=2)
    launcher = slurm(tmp_path, queue="nope")
    with pytest.raises(LauncherError) as raised:
        daisy.run_blockwise([task], launcher=launcher, progress=False,
                            ledger_dir=tmp_path / "ledgers")
    message = str(raised.value)
    assert "submit command sbatch" in message and "--partition=nope" in message
    assert "Invalid partition name specified" in message
    assert not launcher.jobs


def test_a_missing_submit_command_is_named(tmp_path):
    task = line_task("missing", 10, functools.partial(stamp, str(tmp_path), 0.0),
                     num_workers=1)
    launcher = CommandLauncher(submit_command=f"{tmp_path}/no_such_qsub {{worker_command}}",
                               cancel_command="true {job_id}", log_dir=tmp_path / "logs")
    with pytest.raises(LauncherError, match="no_such_qsub.*not installed or not on PATH"):
        daisy.run_blockwise([task], launcher=launcher, progress=False,
                            ledger_dir=tmp_path / "ledgers")


# ----------------------------------------------------------- the poll interval's minimum
@pytest.mark.parametrize("value", [0, 0.05, 0.99, -1, float("nan"), "soon"])
def test_a_poll_interval_below_the_minimum_is_refused(tmp_path, value):
    """(c) every batch launcher, and the [luigi_daisy] key."""
    for kind in (SlurmLauncher, LsfLauncher):
        with pytest.raises(LauncherError, match=r"poll_interval=.*at most once every 1 s"):
            kind(log_dir=tmp_path, poll_interval=value)
    with pytest.raises(LauncherError, match="poll_interval"):
        CommandLauncher(submit_command="qsub {worker_command}", cancel_command="qdel {job_id}",
                        poll_interval=value)
    from luigi_daisy.luigi.launching import make_launcher
    config = SimpleNamespace(log_dir=str(tmp_path), job_poll_interval=value,
                             start_method="spawn")
    for name in ("slurm", "local"):
        with pytest.raises(ConfigError, match=r"\[luigi_daisy\] job_poll_interval=.*give 1 "
                                              r"or more"):
            make_launcher(name, {}, config)


def test_the_config_key_below_the_minimum_is_refused_when_settings_are_read():
    import luigi

    from luigi_daisy.luigi.config import settings
    config = luigi.configuration.get_config()
    added = not config.has_section("luigi_daisy")
    if added:
        config.add_section("luigi_daisy")
    saved = config.get("luigi_daisy", "job_poll_interval", fallback=None)
    config.set("luigi_daisy", "job_poll_interval", "0")
    try:
        with pytest.raises(ConfigError, match="job_poll_interval=0.0"):
            settings()
        config.set("luigi_daisy", "job_poll_interval", "1")
        assert settings().job_poll_interval == 1.0
    finally:
        if added:
            config.remove_section("luigi_daisy")
        elif saved is None:
            config.remove_option("luigi_daisy", "job_poll_interval")
        else:
            config.set("luigi_daisy", "job_poll_interval", saved)


# ------------------------------------------------------ the command launcher's status
SLOW_STATUS = """#!/bin/sh
# status JOB: takes half a second, says the job runs until cancelled; records its call
start=$(date +%s.%N)
sleep 0.5
echo "status $start $(date +%s.%N) $1" >> "$(dirname "$0")/calls"
[ ! -e "$(dirname "$0")/cancelled.$1" ]
"""

NO_OP_SUBMIT = """#!/bin/sh
# submit ...: queues nothing, prints a new job id
echo "$$"
"""


def noop(block) -> None:
    """Nothing."""


def test_status_commands_of_one_query_run_together(tmp_path):
    """A per-job status_command runs for all jobs of one query at once, off the
    caller's thread: start(), poll() and kill() return without waiting."""
    for name, text in (("status", SLOW_STATUS), ("submit", NO_OP_SUBMIT)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    launcher = CommandLauncher(submit_command=f"{tmp_path}/submit {{worker_command}}",
                               cancel_command=f"touch {tmp_path}/cancelled.{{job_id}}",
                               status_command=f"{tmp_path}/status {{job_id}}",
                               log_dir=tmp_path / "logs")
    payload = WorkerPayload(FunctionTarget(noop), "t")
    handles = [launcher.start(WorkerSpec(
        task_id="t", worker_id=worker_id, environment={}, payload=payload,
        stdout_path=tmp_path / "logs" / f"{worker_id}.out",
        stderr_path=tmp_path / "logs" / f"{worker_id}.err", job_name="j"))
        for worker_id in range(4)]
    try:
        deadline = time.monotonic() + 60
        # a query may start while submissions still return: count only the queries
        # that started once every job had its id (one query at a time: all four)
        while any(handle.job_id is None for handle in handles):
            assert time.monotonic() < deadline, "the submissions never returned"
            launcher.poll()
            time.sleep(0.05)
        all_known = time.time()

        def later_calls() -> list:
            return sorted(call for call in calls(tmp_path, "status") if call[0] > all_known)

        while len(later_calls()) < 4 and time.monotonic() < deadline:
            launcher.poll()
            time.sleep(0.05)
        statuses = later_calls()[:4]
        assert sorted(rest[0] for _, _, rest in statuses) == \
            sorted(handle.job_id for handle in handles)
        # all four ran at once: each started before any other ended
        assert max(start for start, _, _ in statuses) < min(end for _, end, _ in statuses)
        assert all(handle.exit_code() is None for handle in handles)
    finally:
        assert launcher.stop_all(30) == []
    assert {handle.exit_code() for handle in handles} == {EXIT_CANCELLED}


def test_a_submission_slower_than_the_end_of_the_run_is_still_cancelled(fake_slurm,
                                                                          tmp_path):
    """stop_all gives up waiting for an sbatch that takes longer than its timeout; the
    job that sbatch then starts is ended as soon as its id arrives."""
    (fake_slurm / "sbatch_delay").write_text("2")
    launcher = slurm(tmp_path)
    spec = WorkerSpec(task_id="late", worker_id=0, environment={},
                      payload=WorkerPayload(FunctionTarget(noop), "late"),
                      stdout_path=tmp_path / "logs" / "w.out",
                      stderr_path=tmp_path / "logs" / "w.err", job_name="late")
    launcher.prepare(spec.payload)
    launcher.start(spec)
    deadline = time.monotonic() + 10
    while not calls_started(fake_slurm):  # the submission is running
        assert time.monotonic() < deadline, "sbatch never started"
        time.sleep(0.02)
    not_gone = launcher.stop_all(timeout=0.3)
    assert len(not_gone) == 1, not_gone
    deadline = time.monotonic() + 20
    while not calls(fake_slurm, "scancel"):
        assert time.monotonic() < deadline, "the late job was never cancelled"
        time.sleep(0.05)
    (submission,) = calls(fake_slurm, "sbatch")
    (cancel,) = calls(fake_slurm, "scancel")
    assert cancel[2] == [submission[2][0]] and cancel[0] >= submission[1]
    assert (fake_slurm / "jobs" / f"{submission[2][0]}.cancelled").exists()


def calls_started(folder: Path) -> bool:
    """Whether the fake sbatch has started a job (it records the call only at its end)."""
    return any((folder / "jobs").glob("*.job"))
