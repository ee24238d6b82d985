"""Messages that send users the right way, and file names no two task ids share.

Real runs with worker processes (the local launcher), real ledgers and log folders:

- Task ids that differ only where a file name cannot follow them (``a/b``, ``a_b``) get
  their own ledger, lock and log folder, in one run or in two; a ledger that another
  version wrote under a shared name says whose it is and where it belongs, instead of
  advising to delete it.
- A task id longer than a file name may be runs, and resumes from its ledger.
- A ledger folder this user may not write in (checked as a user without the override of
  file permissions, which root has), one that does not exist inside such a folder, and a
  file standing where the folder should be: each says which folder and what to change,
  never "delete the file".
- A task of 10^24 blocks is refused when it is built, saying how many blocks and why;
  tasks of 10^9 to 10^14 blocks still start at once.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
from ledger_files import record_done
from test_planted_links import fake_pbs  # noqa: F401 - fixture

import luigi_daisy as daisy
from luigi_daisy import Roi, _sqlite_ledger
from luigi_daisy.context import MAX_FILE_NAME, safe_file_name
from luigi_daisy.errors import GeometryError, LedgerError
from luigi_daisy.launchers.command import _RECORD_EXIT, CommandLauncher
from luigi_daisy.ledger import ledger_path, legacy_path, read_ledger_summary

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_stray_processes")]


def note_block(events: str, block) -> None:
    """Append ``task_id number`` to ``events`` (one write: safe across processes)."""
    descriptor = os.open(events, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(descriptor, f"{block.block_id[0]}\t{block.block_id[1]}\n".encode())
    finally:
        os.close(descriptor)


def executions(events: Path) -> Counter:
    if not events.exists():
        return Counter()
    return Counter(tuple(line.split("\t")) for line in events.read_text().splitlines())


def line_task(task_id: str, blocks: int, events: Path) -> daisy.Task:
    return daisy.Task(task_id, total_roi=Roi((0,), (blocks,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)),
                      process_function=functools.partial(note_block, str(events)),
                      num_workers=1, max_retries=0, read_write_conflict=False)


def run(tasks, tmp_path: Path, **options):
    return daisy.run_blockwise(tasks, progress=False, ledger_dir=tmp_path / "ledgers",
                               log_dir=tmp_path / "logs", **options)


def recorded(path: Path) -> set[int]:
    return record_done(path)


# ------------------------------------------------------------------ names of files
def test_ids_sharing_a_readable_name_get_their_own_files_in_one_run(tmp_path):
    # before: the second id took the first's lock for another run's, and followed
    # itself forever
    events = tmp_path / "events"
    ids = ("a/b", "a_b", "a b")
    result = run([line_task(task_id, 4, events) for task_id in ids], tmp_path)
    assert all(result[task_id].succeeded for task_id in ids)
    assert executions(events) == Counter(
        {(task_id, str(number)): 1 for task_id in ids for number in range(4)})
    ledgers = {task_id: ledger_path(tmp_path / "ledgers", task_id) for task_id in ids}
    assert len(set(ledgers.values())) == 3
    for task_id, path in ledgers.items():
        assert read_ledger_summary(path)["task_id"] == task_id
        assert recorded(path) == {0, 1, 2, 3}
        assert Path(f"{path}.lock").exists()
    assert ledgers["a_b"].name == "a_b.ledger", "a plain id keeps its plain name"
    # one pool of workers serves the three tasks: its logs are the pool's
    assert sorted(folder.name for folder in (tmp_path / "logs").iterdir()) == ["pool"]
    # again: each resumes from its own ledger, nothing runs twice
    again = run([line_task(task_id, 4, events) for task_id in ids], tmp_path)
    assert all(again[task_id].skipped_count == 4 for task_id in ids)
    assert sum(executions(events).values()) == 12


def test_ids_sharing_a_readable_name_run_one_after_the_other(tmp_path):
    # before: the second run was refused, with the advice to delete the first's ledger
    events = tmp_path / "events"
    assert run([line_task("a/b", 3, events)], tmp_path)["a/b"].succeeded
    assert run([line_task("a_b", 3, events)], tmp_path)["a_b"].succeeded
    assert executions(events) == Counter(
        {(task_id, str(number)): 1 for task_id in ("a/b", "a_b") for number in range(3)})


def test_a_task_id_longer_than_a_file_name_runs_and_resumes(tmp_path):
    # before: "File name too long" (an OSError, or a LedgerStorageError of the lock)
    events = tmp_path / "events"
    task_id = "segmentation/" + "very-long-parameter-" * 15  # 313 characters
    assert len(task_id) > 255
    result = run([line_task(task_id, 3, events)], tmp_path)
    assert result[task_id].succeeded and len(executions(events)) == 3
    path = ledger_path(tmp_path / "ledgers", task_id)
    assert len(path.name) <= MAX_FILE_NAME + len(".ledger")
    assert path.name.startswith("segmentation_very-long-parameter-")
    assert read_ledger_summary(path)["done"] == 3
    (log_folder,) = (tmp_path / "logs").iterdir()
    assert log_folder.name == safe_file_name(task_id)
    assert len(log_folder.name) <= MAX_FILE_NAME
    assert (log_folder / "worker_0.out").exists()
    again = run([line_task(task_id, 3, events)], tmp_path)
    assert again[task_id].skipped_count == 3 and len(executions(events)) == 3
    # two long ids with the same first 200 characters do not share a file
    other = task_id[:-1] + "X"
    assert ledger_path(tmp_path, other) != ledger_path(tmp_path, task_id)


def test_names_are_plain_for_plain_ids_and_bounded_for_the_rest():
    for plain in ("segment", "a_b", "seg-1.2=+3", "x" * MAX_FILE_NAME,
                  "Family_param_value_0123456789"):
        assert safe_file_name(plain) == plain
    for odd in ("a/b", "../up", ".", "..", ".hidden", "a b", "ü", "x" * (MAX_FILE_NAME + 1),
                "a\0b", "C:\\x"):
        name = safe_file_name(odd)
        assert name != odd and "@" in name and "/" not in name and "\0" not in name
        assert shlex.quote(name) == name, "a template would quote it"
        assert not name.startswith(".") and len(name) <= MAX_FILE_NAME and name.isascii()
        assert safe_file_name(odd) == name, "the same id always gets the same name"
    assert len({safe_file_name(name) for name in ("a/b", "a_b", "a b", "a:b", "a\\b")}) == 5


# an sbatch-shaped fake: fakesub [--job-name=N] [--output=OUT] [--error=ERR] -- COMMAND...
# runs COMMAND in the background in its own folder, keeping its arguments one a line
FAKE_SUB = """\
#!/bin/sh
here=$(dirname "$0")
arguments=$(printf '%s\\n' "$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --job-name=*) shift;;
    --output=*) out=${1#--output=}; shift;;
    --error=*) err=${1#--error=}; shift;;
    --) shift; break;;
    *) break;;
  esac
done
cd "$here" || exit 1
setsid "$@" </dev/null >>"${out:-/dev/null}" 2>>"${err:-/dev/null}" &
printf '%s\\n' "$arguments" > "arguments/$!"
echo "$!" > "jobs/$!"
echo "$!.fakepbs"
"""


def print_block(block) -> None:
    print(f"worker output for block {block.block_id[1]}")


@pytest.mark.parametrize("submit", [
    "{fake}/fakesub --job-name={{job_name}} --output={{stdout}} --error={{stderr}} -- "
    "{{worker_command}}",
    "{fake}/fakesub --job-name={{job_name}} -- "
    "sh -c '{{worker_command}} > \"{{stdout}}\" 2> \"{{stderr}}\"'",
], ids=["option_words", "shell_redirection"])
def test_hashed_names_fill_into_templates_without_quotes(fake_pbs, tmp_path,  # noqa: F811
                                                          submit):
    # before: "predict affs" became predict_affs~<hash>, which shlex.quote quotes inside
    # a word: --output='/.../predict_affs~985eefcffc70/worker_0.out' kept its quotes,
    # and the job's logs went nowhere the run looked
    (fake_pbs / "fakesub").write_text(FAKE_SUB)
    (fake_pbs / "fakesub").chmod(0o755)
    (fake_pbs / "arguments").mkdir()
    task_id = "predict affs"
    task = daisy.Task(task_id, total_roi=Roi((0,), (3,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)), process_function=print_block,
                      num_workers=1, max_retries=0, max_worker_restarts=0)
    logs = tmp_path / "logs"
    launcher = CommandLauncher(
        submit_command=submit.format(fake=fake_pbs),
        cancel_command=f"{fake_pbs}/qdel {{job_id}}", job_id_pattern=r"^(\S+)",
        status_command=f"{fake_pbs}/qstat {{job_id}}", log_dir=logs, poll_interval=1.0)
    result = run([task], tmp_path, launcher=launcher)
    assert result[task_id].succeeded
    name = safe_file_name(task_id)
    assert name.startswith("predict_affs") and shlex.quote(name) == name
    out = logs / name / "worker_0.out"
    assert "worker output for block" in out.read_text()
    assert (logs / name / "worker_0.err.exit").read_text() == "0\n"
    (recorded_arguments,) = (fake_pbs / "arguments").iterdir()
    arguments = recorded_arguments.read_text()
    assert "'" not in arguments.replace(shlex.quote(_RECORD_EXIT), ""), arguments
    assert "--job-name=predict_affs.worker0\n" in arguments
    assert str(out) in arguments
    quoted = [str(path) for path in tmp_path.rglob("*") if "'" in str(path)]
    assert not quoted, f"files with quotes in their names: {quoted}"


def test_a_ledger_of_another_task_says_whose_it_is_and_where_it_belongs(tmp_path):
    # the ledger an older version wrote for task "a/b" under the name "a_b" now shares
    # "a_b"'s plain name: neither task may take it, and nobody is told to delete it
    events = tmp_path / "events"
    folder = tmp_path / "ledgers"
    old_task = line_task("a/b", 4, events)
    old_name = folder / "a_b.ledger.sqlite"
    # an SQLite ledger, as that version wrote it (its code is kept as _sqlite_ledger)
    with _sqlite_ledger.Ledger(old_name, "a/b", old_task.grid.describe()) as ledger:
        for index in (0, 1):
            ledger.record_done(index)
    with pytest.raises(LedgerError) as refused:
        run([line_task("a_b", 4, events)], tmp_path)
    message = str(refused.value)
    new_name = ledger_path(folder, "a/b")
    assert "belongs to task 'a/b'" in message and str(new_name) in message
    assert "delete" not in message
    # task "a/b" itself is told how to resume from it, instead of starting afresh
    with pytest.raises(LedgerError) as refused:
        run([old_task], tmp_path)
    message = str(refused.value)
    assert str(old_name) in message and str(new_name) in message
    assert "2 finished blocks" in message and "move it" in message
    assert not events.exists(), "a refused run processed blocks"
    assert f"move it (and nothing else) to {legacy_path(new_name)}" in message
    os.rename(old_name, legacy_path(new_name))  # converted by the run's first open
    result = run([old_task], tmp_path)
    assert result["a/b"].skipped_count == 2
    assert executions(events) == Counter({("a/b", "2"): 1, ("a/b", "3"): 1})
    # and "a_b" now has its plain name to itself
    assert run([line_task("a_b", 4, events)], tmp_path)["a_b"].succeeded


# ------------------------------------------------------------------ unusable folders
RUN_IN_FOLDER = textwrap.dedent("""
    import sys
    import luigi_daisy as daisy
    from luigi_daisy import Roi
    from luigi_daisy.ledger import Ledger, ledger_path

    def process(block):
        raise AssertionError("no block may run without a ledger")

    folder = sys.argv[1]
    task = daisy.Task("t", total_roi=Roi((0,), (4,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)), process_function=process)
    for attempt in ("run", "ledger"):
        try:
            if attempt == "run":
                daisy.run_blockwise([task], progress=False, ledger_dir=folder)
            else:
                Ledger(ledger_path(folder, "t"), "t", task.grid.describe())
        except Exception as error:
            print(f"{attempt}\\t{type(error).__name__}\\t{error}")
        else:
            print(f"{attempt}\\tno error")
""")


def refusals(tmp_path: Path, folder: Path, as_user: bool) -> dict[str, tuple[str, str]]:
    """What a real run, and opening the ledger alone, say about ledger folder
    ``folder``: ``{"run": (class name, message), "ledger": (...)}``. ``as_user``: without
    root's override of file permissions (as every user but root runs)."""
    script = tmp_path / "run_in_folder.py"
    script.write_text(RUN_IN_FOLDER)
    command = [sys.executable, str(script), str(folder)]
    if as_user and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop root's file permission "
                        "override")
        caps = "-dac_override,-dac_read_search"
        command = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=60,
                              cwd=tmp_path, check=False)
    assert finished.returncode == 0, finished.stderr
    answers = {}
    for line in finished.stdout.splitlines():
        attempt, kind, *message = line.split("\t")
        answers[attempt] = (kind, "\t".join(message))
    return answers


def test_a_ledger_folder_this_user_may_not_write_in_says_so(tmp_path):
    # before: "its folder ... is read-only", and the ledger alone a bare PermissionError
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for folder in (locked, locked / "sub" / "ledgers"):
            answers = refusals(tmp_path, folder, as_user=True)
            for attempt in ("run", "ledger"):
                kind, message = answers[attempt]
                assert kind == "LedgerReadOnlyError", (attempt, kind, message)
                assert f"may not create files in the folder {locked} " in message
                assert "mode 555" in message and "write permission" in message
                assert "ledger_dir" in message, "says where to give another folder"
                assert "delete" not in message and "SQLite" not in message
                if folder != locked:
                    assert f"the ledger folder {folder} cannot be created" in message
    finally:
        locked.chmod(0o755)
    assert not any(locked.iterdir())


def test_a_file_where_the_ledger_folder_should_be_says_so(tmp_path):
    # before: "[Errno 17] File exists" and "[Errno 20] Not a directory", bare
    in_the_way = tmp_path / "ledgers"
    in_the_way.write_text("not a folder")
    for folder in (in_the_way, in_the_way / "sub"):
        answers = refusals(tmp_path, folder, as_user=False)
        # run_blockwise refuses the setting before anything starts (a ConfigError);
        # a ledger opened there says what is in the way
        kind, message = answers["run"]
        assert kind == "ConfigError", (kind, message)
        assert str(in_the_way) in message and "is a file" in message
        assert "ledger_dir" in message and "delete" not in message
        kind, message = answers["ledger"]
        assert kind == "LedgerStorageError", (kind, message)
        assert f"{in_the_way} is a file, not a folder" in message
        assert "ledger_dir" in message and "delete" not in message
    assert in_the_way.read_text() == "not a folder"


# ------------------------------------------------------------------ huge grids
def cube_task(grid_shape: tuple[int, ...], context: int = 0) -> daisy.Task:
    """A task of ``grid_shape`` blocks of one voxel; with ``context``, neighbours within
    it conflict."""
    dims = len(grid_shape)
    write = Roi((context,) * dims, (1,) * dims)
    return daisy.Task("huge", Roi((0,) * dims, tuple(n + 2 * context for n in grid_shape)),
                      write.grow(context, context), write, process_function=print,
                      read_write_conflict=context > 0)


@pytest.mark.parametrize("grid_shape", [(10**8,) * 3, (10**12, 10**12), (10**24,)])
def test_a_task_of_too_many_blocks_is_refused_when_it_is_built(grid_shape):
    # before: the Task was built, and the run ended in a bare MemoryError (itertools.product
    # in graph.py listing an axis of 10^8 blocks)
    with pytest.raises(GeometryError) as refused:
        cube_task(grid_shape)
    message = str(refused.value)
    assert "task 'huge'" in message
    assert "1,000,000,000,000,000,000,000,000 blocks" in message
    assert "2^63" in message and "64-bit" in message, "says the limit and why"
    assert "larger write ROIs" in message and "split total_roi" in message


def test_a_task_whose_block_ids_cannot_travel_is_refused_when_it_is_built():
    # few enough blocks, but daisy's block id (a Cantor number) of the last one is ~10^70
    with pytest.raises(GeometryError, match=r"2\^128"):
        cube_task((10**18, 2, 2, 2))


@pytest.mark.parametrize("grid_shape, context", [
    ((10**9,), 0), ((10**4,) * 3, 1), ((10**6, 10**6), 1), ((10**7, 10**7), 0),
    ((3 * 10**9, 3 * 10**9), 0)])
def test_tasks_of_up_to_ten_to_the_nineteen_blocks_start_at_once(grid_shape, context):
    # before: the blocks that depend on nothing were listed along every axis but the
    # last, a tuple of 10^7 (360 MB) or 3 * 10^9 (a MemoryError) entries
    started = time.perf_counter()
    tracemalloc.start()
    try:
        scheduler = daisy.BlockScheduler([cube_task(grid_shape, context)])
        first = [scheduler.acquire("huge") for _ in range(3)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - started
    assert all(block is not None for block in first)
    assert peak < 20 * 2**20, f"starting took {peak / 2**20:.1f} MiB: blocks were listed"
    assert seconds < 1.0, f"starting took {seconds:.2f} s"
