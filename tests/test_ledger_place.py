"""The record of done blocks lives with the data it describes (issue 20, part 1).

Real ``luigi`` commands (subprocesses, own ``luigi.cfg``) run the chain of
``ledger_place_tasks`` (Raw -> Smooth -> Pieces -> Collect, the segmentation's shape)
into a folder; then each output is deleted in turn and the chain runs again: the task
that lost its output and every task downstream of it compute every block again, the
tasks upstream none, with one warning per task that says why, and no "Unfulfilled" or
``FileNotFoundError``.
"""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import pytest
from test_luigi_layer import luigi_settings, run_luigi, write_config  # noqa: F401

from luigi_daisy.ledger import find_ledgers, read_ledger_summary

pytestmark = pytest.mark.timeout(240)

TESTS = Path(__file__).resolve().parent
FAMILIES = ["Raw", "Smooth", "Pieces", "Collect"]
BLOCKS = 9
#: the output each family declares, and the folder its record is kept in
OUTPUTS = {"Raw": "raw.zarr", "Smooth": "smooth.zarr", "Pieces": "pieces",
           "Collect": "collect.zarr"}
RECORD_FOLDERS = {"Raw": "raw.zarr/.luigi_daisy", "Smooth": "smooth.zarr/.luigi_daisy",
                  "Pieces": ".luigi_daisy", "Collect": "collect.zarr/.luigi_daisy"}


def chain_args(task: str = "Collect") -> list[str]:
    return ["--module", "ledger_place_tasks", task, "--folder", "out", "--local-scheduler",
            "--retcode-task-failed", "3", "--retcode-missing-data", "4",
            "--retcode-unhandled-exception", "5", "--retcode-scheduling-error", "6"]


def setup_run(tmp_path: Path) -> None:
    write_config(tmp_path, {"luigi_daisy": {"ledger_dir": "ledgers", "log_dir": "logs"}})
    (tmp_path / "out").mkdir()


def calls(tmp_path: Path) -> collections.Counter:
    """How often each family processed a block since the last :func:`forget_calls`."""
    path = tmp_path / "out" / "calls.txt"
    if not path.exists():
        return collections.Counter()
    return collections.Counter(line.split()[0] for line in path.read_text().splitlines())


def forget_calls(tmp_path: Path) -> None:
    (tmp_path / "out" / "calls.txt").unlink(missing_ok=True)


def run_chain(tmp_path: Path, log_name: str) -> str:
    returncode, output = run_luigi(tmp_path, chain_args(), log_name, extra_path=TESTS)
    assert returncode == 0, output[-4000:]
    assert "Unfulfilled" not in output and "FileNotFoundError" not in output, output[-4000:]
    return output


def test_each_task_keeps_its_record_with_its_first_output(tmp_path):
    """Inside the zarr array it writes, next to the folder it declares; a first run
    leaves nothing in ``ledger_dir``."""
    setup_run(tmp_path)
    run_chain(tmp_path, "first.log")
    assert calls(tmp_path) == {family: BLOCKS for family in FAMILIES}
    out = tmp_path / "out"
    for family, folder in RECORD_FOLDERS.items():
        records = [path for path in find_ledgers(out / folder)
                   if read_ledger_summary(path)["task_id"].startswith(f"{family}_")]
        assert len(records) == 1, (family, list((out / folder).iterdir()))
        summary = read_ledger_summary(records[0])
        assert summary["done"] == BLOCKS
        origin = summary["origin"]
        assert origin["kind"] == "luigi" and origin["family"] == family
        assert origin["module"] == "ledger_place_tasks"
        assert origin["params"]["folder"] == "out"
    assert not (tmp_path / "ledgers").exists()


@pytest.mark.parametrize("deleted", FAMILIES)
def test_deleting_an_output_computes_it_again_and_downstream_follows(tmp_path, deleted):
    """Delete one task's output: that task and every task after it compute all their
    blocks again, those before it none; each recomputed task says why, once."""
    setup_run(tmp_path)
    run_chain(tmp_path, "first.log")
    forget_calls(tmp_path)
    shutil.rmtree(tmp_path / "out" / OUTPUTS[deleted])

    output = run_chain(tmp_path, "again.log")
    position = FAMILIES.index(deleted)
    assert calls(tmp_path) == {family: BLOCKS for family in FAMILIES[position:]}, output[-4000:]
    afresh = [line for line in output.splitlines() if "starts afresh" in line]
    stale = [family for family in FAMILIES if any(f"{family}_" in line.split(":")[0]
                                                  for line in afresh)]
    # a record inside the deleted array went with it: nothing stale to warn about
    warned = FAMILIES[position + 1:] if OUTPUTS[deleted].endswith(".zarr") else (
        FAMILIES[position:])
    assert stale == warned and len(afresh) == len(warned), afresh
    if not OUTPUTS[deleted].endswith(".zarr"):
        assert any(f"its output {Path('out') / OUTPUTS[deleted]}" in line
                   or f"out/{OUTPUTS[deleted]}" in line for line in afresh), afresh

    # and the chain is complete again: one more run computes nothing
    forget_calls(tmp_path)
    run_chain(tmp_path, "third.log")
    assert calls(tmp_path) == {}


def test_a_record_that_outlived_its_output_is_not_complete(tmp_path, luigi_settings,  # noqa: F811
                                                         monkeypatch):
    """``complete()`` is False when the record says every block is done but an output is
    gone (the record of ``Pieces`` sits next to ``pieces/``, so it survives it), and
    False downstream of it; True again for the tasks upstream."""
    setup_run(tmp_path)
    run_chain(tmp_path, "first.log")
    monkeypatch.syspath_prepend(str(TESTS))
    from ledger_place_tasks import Collect, Pieces, Smooth

    pieces, collect, smooth = Pieces(folder="out"), Collect(folder="out"), Smooth(folder="out")
    assert pieces.ledger_file().parent == Path("out") / ".luigi_daisy"
    assert smooth.ledger_folder() == Path("out") / "smooth.zarr" / ".luigi_daisy"
    assert pieces.complete() and collect.complete() and smooth.complete()
    shutil.rmtree(tmp_path / "out" / "pieces")
    assert read_ledger_summary(pieces.ledger_file())["done"] == BLOCKS
    assert not pieces.complete()
    assert not collect.complete()
    assert smooth.complete()


def test_a_task_without_outputs_keeps_its_record_in_ledger_dir(tmp_path):
    """``Loose`` declares nothing but its ledger: the record goes to ``ledger_dir``."""
    setup_run(tmp_path)
    args = chain_args("Loose")
    returncode, output = run_luigi(tmp_path, args, "loose.log", extra_path=TESTS)
    assert returncode == 0, output[-4000:]
    records = find_ledgers(tmp_path / "ledgers")
    assert [read_ledger_summary(path)["task_id"].split("_")[0] for path in records] == [
        "Loose"]
    assert read_ledger_summary(records[0])["done"] == BLOCKS
    assert not (tmp_path / "out" / ".luigi_daisy").exists()


def test_the_shared_ledger_interface(tmp_path):
    """What the Luigi layer and the command use of a record: origin (stored when given,
    kept when None), bulk records, forgetting blocks (and their failures), failed
    blocks, and finding records in a folder."""
    from luigi_daisy.ledger import Ledger, is_ledger, ledger_path

    geometry = {"total_roi": [[0], [100]], "read_roi": [[0], [10]],
                "write_roi": [[0], [10]], "fit": "valid", "num_blocks": 10}
    path = ledger_path(tmp_path / "records", "t")
    origin = {"kind": "daisy", "upstream": {"s": None}}
    with Ledger(path, "t", geometry, origin=origin) as ledger:
        ledger.record_done_many(range(6))
        ledger.record_failed(7, "Traceback\nValueError: seven")
        ledger.flush()
        assert ledger.done_count() == 6
        assert ledger.failed_blocks() == [(7, "Traceback\nValueError: seven")]
        assert ledger.forget_done([0, 1, 7, 9]) == 2
        assert ledger.failed_blocks() == []
        assert list(ledger.done_indices()) == [2, 3, 4, 5]
    with Ledger(path, "t", geometry) as reopened:
        assert reopened.origin == origin
        assert list(reopened.done_indices()) == [2, 3, 4, 5]
    with Ledger(path, "t", geometry, origin={"kind": "daisy"}) as replaced:
        assert replaced.origin == {"kind": "daisy"}
    assert read_ledger_summary(path)["origin"] == {"kind": "daisy"}
    assert is_ledger(path) and not is_ledger(tmp_path / "records")
    assert find_ledgers(path) == [path]
    with Ledger(ledger_path(tmp_path / "records", "a"), "a", geometry):
        pass
    assert find_ledgers(tmp_path / "records") == sorted([path, ledger_path(
        tmp_path / "records", "a")])


def test_records_an_earlier_version_kept_in_ledger_dir_are_used_where_they_are(tmp_path):
    """Before records lived with the data, every record was in ``ledger_dir``: after the
    upgrade a finished chain must stay finished, not be computed again."""
    setup_run(tmp_path)
    run_chain(tmp_path, "first.log")
    out = tmp_path / "out"
    ledgers = tmp_path / "ledgers"
    ledgers.mkdir()
    for folder in set(RECORD_FOLDERS.values()):
        for record in find_ledgers(out / folder):
            shutil.move(str(record), str(ledgers / record.name))
    assert len(find_ledgers(ledgers)) == len(FAMILIES)
    forget_calls(tmp_path)
    run_chain(tmp_path, "again.log")
    assert calls(tmp_path) == {}, "blocks recorded done before the upgrade ran again"
