"""The block map's JSON over plain HTTP, against a real run with real workers.

One gated run (``blockmap_run.py``) serves the module: its gates hold known blocks, so
every answer below is exact. The run ends when the module's tests are done.
"""

from __future__ import annotations

import gzip
import urllib.request
from pathlib import Path

import pytest
from blockmap_helpers import GatedRun, wait_for
from blockmap_run import FAILURE

from luigi_daisy.block_states import STATE_NAMES

pytestmark = pytest.mark.timeout(120)

SETTLE_DEADLINE = 60.0  # seconds until the ungated blocks have all finished
#: the digit of each state in a picture's cells
DIGIT = {name: str(code) for code, name in enumerate(STATE_NAMES)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    gated = GatedRun(tmp_path_factory.mktemp("blockmap_http"))
    try:
        # every block that no gate holds has finished; the gated ones are being held
        def settled():
            status, report, _ = gated.get("api/run")
            tasks = {task["task_id"]: task for task in report["tasks"]}
            return (tasks["smooth"]["done"] == 19 and tasks["smooth"]["failed"] == 1
                    and tasks["smooth"]["processing"] == 2 and tasks["label"]["done"] == 19
                    and tasks["tiles"]["done"] == 48 and tasks["frames"]["done"] == 60
                    and tasks["frames"]["processing"] == 1
                    and not any(worker["task_id"] == "tiles" for worker in report["workers"]))
        wait_for(settled, SETTLE_DEADLINE, "the ungated blocks to finish")
        yield gated
    finally:
        exit_code = gated.stop()
    assert exit_code == 0, gated.stderr()


def plane(run: GatedRun, query: str) -> dict:
    status, body, _ = run.get(f"api/blocks?{query}")
    assert status == 200, body
    return body


def cell(answer: dict, row: int, column: int) -> str:
    return answer["cells"][row * answer["columns"] + column]


def test_a_3d_task_is_served_one_z_slice_at_a_time(run):
    done = plane(run, "task=smooth&slice=0")
    assert done["grid_shape"] == [3, 4, 5] and done["slice"] == [0]
    assert (done["rows"], done["columns"], done["step"]) == (4, 5, 1)
    assert done["counts"] == {"waiting": 0, "ready": 0, "processing": 0, "done": 19,
                              "failed": 1, "orphaned": 0}
    assert cell(done, 1, 2) == DIGIT["failed"]  # the block at (0, 1, 2)
    assert 0 <= done["compute_seconds"] < 10
    assert done["cells"].count(DIGIT["done"]) == 19

    # z = 1 is held by the gate: both workers hold the first two blocks of the slice, the
    # others depend on nothing and are ready
    held = plane(run, "task=smooth&slice=1")
    assert held["counts"] == {"waiting": 0, "ready": 18, "processing": 2, "done": 0,
                              "failed": 0, "orphaned": 0}
    assert held["cells"] == DIGIT["processing"] * 2 + DIGIT["ready"] * 18
    assert plane(run, "task=smooth&slice=2")["cells"] == DIGIT["ready"] * 20

    # without slice, the first slice
    assert plane(run, "task=smooth")["cells"] == done["cells"]


def test_blocks_downstream_of_a_failed_block_are_orphaned_and_the_others_wait(run):
    first = plane(run, "task=label&slice=0")
    assert first["counts"]["done"] == 19 and first["counts"]["orphaned"] == 1
    assert cell(first, 1, 2) == DIGIT["orphaned"]
    # their smooth blocks are held: waiting, not ready
    assert plane(run, "task=label&slice=1")["cells"] == DIGIT["waiting"] * 20


def test_a_2d_task_is_one_plane_and_a_4d_task_takes_two_coordinates(run):
    tiles = plane(run, "task=tiles")
    assert (tiles["rows"], tiles["columns"], tiles["slice"]) == (6, 8, [])
    assert tiles["cells"] == DIGIT["done"] * 48

    assert plane(run, "task=frames&slice=0,2")["cells"] == DIGIT["done"] * 20
    held = plane(run, "task=frames&slice=1,0")
    assert held["counts"]["processing"] == 1 and held["counts"]["ready"] == 19
    assert cell(held, 0, 0) == DIGIT["processing"]
    assert plane(run, "task=frames&slice=1,2")["cells"] == DIGIT["ready"] * 20


def test_a_large_plane_is_coarsened_to_the_cells_asked_for(run):
    coarse = plane(run, "task=smooth&slice=1&cells=2")
    # 4 x 5 blocks in cells of 3 x 3: the top-left cell holds the processing blocks
    assert (coarse["rows"], coarse["columns"], coarse["step"]) == (2, 2, 3)
    assert coarse["cells"] == DIGIT["processing"] + DIGIT["ready"] * 3
    # counts stay those of every block of the plane
    assert coarse["counts"]["processing"] == 2 and coarse["counts"]["ready"] == 18
    # a cell is done only when all its blocks are; a failed block shows in its cell
    assert plane(run, "task=smooth&slice=0&cells=1")["cells"] == DIGIT["failed"]
    tiles = plane(run, "task=tiles&cells=4")  # 6 x 8 blocks: 4 cells along the longer side
    assert (tiles["rows"], tiles["columns"], tiles["cells"]) == (3, 4, DIGIT["done"] * 12)


@pytest.mark.parametrize(("query", "message"), [
    ("", "query parameter task is missing"),
    ("task=", "query parameter task is missing"),
    ("task=smooth&slice=3", "coordinate 3 of axis 0 is outside 0..2"),
    ("task=smooth&slice=-1", "coordinate -1 of axis 0 is outside 0..2"),
    ("task=smooth&slice=0,1", "must give 1 coordinates for task 'smooth'"),
    ("task=smooth&slice=", "must give 1 coordinates for task 'smooth'"),
    ("task=smooth&slice=one", "slice='one' must be integers separated by commas"),
    ("task=frames&slice=1", "must give 2 coordinates for task 'frames'"),
    ("task=frames&slice=0,3", "coordinate 3 of axis 1 is outside 0..2"),
    ("task=tiles&slice=0", "must give 0 coordinates for task 'tiles'"),
    ("task=smooth&cells=0", "cells='0' must be an integer from 1 to 1024"),
    ("task=smooth&cells=5000", "cells='5000' must be an integer from 1 to 1024"),
    ("task=smooth&cells=2,2", "cells='2,2' must be an integer from 1 to 1024"),
    ("task=smooth&cells=many", "cells='many' must be integers separated by commas"),
])
def test_bad_query_parameters_are_answered_400_with_what_to_change(run, query, message):
    status, body, _ = run.get(f"api/blocks?{query}")
    assert status == 400, body
    assert message in body["error"], body


def test_an_unknown_task_is_answered_404_naming_the_tasks_of_the_run(run):
    status, body, _ = run.get("api/blocks?task=segment")
    assert status == 404
    assert body["error"] == ("unknown task 'segment'; this run has 'smooth', 'label', "
                             "'tiles', 'frames'")


def test_the_run_report_has_counts_rate_eta_failures_and_workers(run):
    status, report, _ = run.get("api/run")
    assert status == 200
    tasks = {task["task_id"]: task for task in report["tasks"]}
    assert list(tasks) == ["smooth", "label", "tiles", "frames"]  # upstream first
    smooth = tasks["smooth"]
    assert (smooth["done"], smooth["failed"], smooth["total"]) == (19, 1, 60)
    assert smooth["blocks_per_second"] > 0 and smooth["eta_seconds"] > 0
    assert tasks["tiles"]["eta_seconds"] == 0
    assert tasks["label"]["orphaned"] == 1 and tasks["label"]["waiting"] == 40

    (failed,) = smooth["failed_blocks"]
    assert failed["position"] == [0, 1, 2]
    assert failed["error"] == FAILURE
    # the log named holds the rest of the traceback
    log = Path(failed["log"]).read_text()
    assert "Traceback" in log and FAILURE in log

    # the held blocks' workers are connected and hold them; tiles' worker has left
    holders = {worker["task_id"]: [] for worker in report["workers"]}
    for worker in report["workers"]:
        holders[worker["task_id"]].append(worker)
        assert worker["address"].startswith("127.0.0.1:")
        assert Path(worker["log"]).name.endswith(".err")
    assert "tiles" not in holders
    assert sorted(len(worker["blocks"]) for worker in holders["smooth"]) == [1, 1]
    assert [len(worker["blocks"]) for worker in holders["frames"]] == [1]
    # one pool serves the four tasks; each task's count is the workers holding its blocks
    assert {worker["pool"] for worker in report["workers"]} == {"pool"}
    assert tasks["smooth"]["worker_processes"] == 2
    assert tasks["frames"]["worker_processes"] == 1
    assert tasks["tiles"]["worker_processes"] == 0


def get_gzip(url: str) -> str:
    """The body of ``url``, asked for and answered with gzip."""
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
        assert response.headers["Content-Encoding"] == "gzip", url
        return gzip.decompress(response.read()).decode()


def test_the_page_and_its_files_are_served_and_nothing_is_fetched_elsewhere(run):
    with urllib.request.urlopen(run.url, timeout=10) as response:  # noqa: S310 - loopback
        page = response.read().decode()
    assert "<title>luigi_daisy run" in page
    assert "http://" not in page and "https://" not in page
    for name in ("static/blockmap.css", "static/blockmap.js"):
        assert f'"{name}"' in page
        with urllib.request.urlopen(run.address(name), timeout=10) as response:  # noqa: S310
            text = response.read().decode()
        assert "http://" not in text and "https://" not in text
    # larger answers travel compressed
    assert "function poll" in get_gzip(run.address("static/blockmap.js"))
    assert '"tasks"' in get_gzip(run.address("api/run"))
