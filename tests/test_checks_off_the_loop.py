"""Check functions run beside the loop that hands out blocks: a slow check (a database
query, a slow filesystem) of one task never holds up the blocks of another."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

import luigi_daisy as daisy
from luigi_daisy import Roi

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_stray_processes")]

CHECK_SECONDS = 1.5
#: the other task's blocks take this long each, a hundred of them
FREE_SECONDS = 0.015


def line_task(task_id: str, num_blocks: int, process_function, **options) -> daisy.Task:
    return daisy.Task(task_id, total_roi=Roi((0,), (num_blocks,)), read_roi=Roi((0,), (1,)),
                      write_roi=Roi((0,), (1,)), process_function=process_function,
                      read_write_conflict=False, **options)


def stamp(folder: Path, what: str) -> None:
    (folder / f"{time.time():.6f}-{what}-{uuid.uuid4().hex[:8]}").touch()


def events(folder: Path) -> list[tuple[float, str]]:
    return sorted((float(path.name.split("-")[0]), path.name.split("-")[1])
                  for path in folder.iterdir())


@pytest.mark.parametrize("check", ["pre", "post"])
def test_a_slow_check_of_one_task_does_not_hold_up_another(tmp_path, check):
    records = tmp_path / "records"
    records.mkdir()

    def slow_check(block) -> bool:
        time.sleep(CHECK_SECONDS)
        stamp(records, "check")
        return check == "post"  # a pre check finds nothing done; a post check passes

    def checked_block(block) -> None:
        stamp(records, "checked")

    def free_block(block) -> None:
        time.sleep(FREE_SECONDS)
        stamp(records, "free")

    checks = (slow_check, None) if check == "pre" else (None, slow_check)
    result = daisy.run_blockwise(
        [line_task("checked", 3, checked_block, check_function=checks, num_workers=1),
         line_task("free", 100, free_block, num_workers=1)],
        progress=False, log_dir=tmp_path / "logs")
    assert result, result
    happened = events(records)
    last_free = max(at for at, what in happened if what == "free")
    check_times = sorted(at for at, what in happened if what == "check")
    assert len(check_times) == 3
    # the checks take 4.5 s one after the other; the other task's hundred blocks of
    # 1.5 s in all do not wait for them (on the loop, each check would stop every hand-out)
    assert last_free < check_times[-1], (
        f"the free task's last block ended {last_free - check_times[0]:.2f} s after the "
        f"first check, after the last one")
