"""The example pipeline against a real ``luigid``: progress, status and tracking URLs.

A fixture starts ``luigid --background`` on a free loopback port with its own pid file,
log folder and state file, waits until ``GET /`` answers, and stops it with SIGTERM
(waiting until it has exited; it is reparented, so "exited" includes a zombie nobody
reaps). The pipeline runs through the ``luigi`` command with ``--scheduler-host
127.0.0.1 --scheduler-port P``; the checks read luigid's HTTP API
(``GET /api/<method>?data=<JSON>``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(150)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SIZE, BLOCK_SIZE = 32, 8
EXAMPLE_BLOCKS = (SIZE // BLOCK_SIZE) ** 3
START_DEADLINE = 30.0     # seconds luigid may take to answer
STOP_DEADLINE = 20.0      # seconds luigid may take to exit after SIGTERM
RUN_DEADLINE = 90.0       # seconds a pipeline run may take
BLOCKWISE_FAMILIES = ("Smooth", "Threshold")


# --------------------------------------------------------------------------- luigid
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
        return response.read()


def process_gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie left for an absent reaper counts)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


class Luigid:
    """A running luigid and its HTTP API."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def api(self, method: str, **data):
        query = urllib.parse.urlencode({"data": json.dumps(data)})
        return json.loads(http_get(f"{self.url}/api/{method}?{query}"))["response"]


@pytest.fixture
def luigid(tmp_path):
    folder = tmp_path / "luigid"
    folder.mkdir()
    port = free_port()
    pidfile = folder / "luigid.pid"
    subprocess.run(
        [str(Path(sys.executable).parent / "luigid") if (Path(sys.executable).parent /
                                                         "luigid").exists() else "luigid",
         "--background", "--port", str(port), "--address", "127.0.0.1",
         "--pidfile", str(pidfile), "--logdir", str(folder / "logs"),
         "--state-path", str(folder / "state.pickle")],
        cwd=folder, check=True, timeout=START_DEADLINE, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    server = Luigid(port)
    pid = None
    try:
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if pid is None and pidfile.exists() and pidfile.read_text().strip():
                pid = int(pidfile.read_text().strip())
            try:
                http_get(f"{server.url}/", timeout=2.0)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"luigid did not answer on port {port} within "
                                f"{START_DEADLINE} s")
                time.sleep(0.05)
        if pid is None:
            pid = int(pidfile.read_text().strip())
        yield server
    finally:
        if pid is None and pidfile.exists() and pidfile.read_text().strip():
            pid = int(pidfile.read_text().strip())
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + STOP_DEADLINE
            while not process_gone(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"luigid (pid {pid}) did not stop within {STOP_DEADLINE} s of "
                            f"SIGTERM")


# --------------------------------------------------------------------------- luigi runs
def write_config(tmp_path: Path, **stage) -> None:
    stage_lines = "".join(f"{key} = {value}\n" for key, value in stage.items())
    (tmp_path / "luigi.cfg").write_text(
        "[luigi_daisy]\nnum_workers = 2\nledger_dir = ledgers\nlog_dir = logs\n\n"
        f"[Smooth]\n{stage_lines}\n[Threshold]\n{stage_lines}")


def start_pipeline(tmp_path: Path, server: Luigid, task: str, *args: str,
                   log_name: str = "luigi.log") -> subprocess.Popen:
    beside = Path(sys.executable).parent / "luigi"
    command = [str(beside)] if beside.exists() else ["luigi"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), str(REPO), env.get("PYTHONPATH", "")])
    env["LUIGI_CONFIG_PATH"] = str(tmp_path / "luigi.cfg")
    log = open(tmp_path / log_name, "wb")  # noqa: SIM115 - closed below, the child keeps it
    try:
        return subprocess.Popen(
            command + ["--module", "pipeline", task, "--size", str(SIZE), "--block-size",
                       str(BLOCK_SIZE), "--scheduler-host", "127.0.0.1",
                       "--scheduler-port", str(server.port), "--retcode-task-failed", "3",
                       *args],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    finally:
        log.close()


def stop_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def blockwise_tasks(tasks: dict) -> dict:
    return {task_id: task for task_id, task in tasks.items()
            if task["name"] in BLOCKWISE_FAMILIES}


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("workers", [1, 2])
def test_every_blockwise_task_is_reported_done_with_progress_status_and_tracking_url(
        tmp_path, luigid, workers):
    """With 2 Luigi workers both Thresholds run at once: one run claims Smooth, the
    other follows it; luigid must still end with Smooth DONE, at 100 %, with its
    status message and tracking URL."""
    write_config(tmp_path)
    process = start_pipeline(tmp_path, luigid, "AllReports", "--workers", str(workers))
    try:
        returncode = process.wait(timeout=RUN_DEADLINE)
    finally:
        stop_group(process)
    output = (tmp_path / "luigi.log").read_text()
    assert returncode == 0, output[-5000:]

    done = luigid.api("task_list", status="DONE")
    families = sorted(task["name"] for task in done.values())
    assert families == ["AllReports", "Raw", "Report", "Report", "Smooth", "Threshold",
                        "Threshold"], families
    blockwise = blockwise_tasks(done)
    for task_id, task in blockwise.items():
        assert task["status"] == "DONE"
        assert task["progress_percentage"] == 100, (task_id, task)
        assert luigid.api("get_task_progress_percentage", task_id=task_id)[
            "progressPercentage"] == 100
        message = luigid.api("get_task_status_message", task_id=task_id)["statusMessage"]
        assert message and "blocks" in message, (task_id, message)
        assert f"{EXAMPLE_BLOCKS}/{EXAMPLE_BLOCKS} blocks" in message, (task_id, message)
        assert task["tracking_url"] and task["tracking_url"].startswith("http://127.0.0.1:"), (
            task_id, task)
    # nothing is left RUNNING or PENDING in luigid
    for status in ("RUNNING", "PENDING", "FAILED"):
        assert not luigid.api("task_list", status=status), status


def test_progress_and_the_tracking_page_are_visible_during_a_run(tmp_path, luigid):
    """Smooth (run by Luigi) shows up RUNNING and Threshold (pulled into Smooth's
    pipelined run, PENDING in Luigi until Smooth is DONE) PENDING, both with a partial
    progress, a status message about blocks and a tracking URL whose page and
    ``state.json`` answer."""
    write_config(tmp_path, block_seconds=0.15)
    process = start_pipeline(tmp_path, luigid, "Threshold", "--workers", "1")
    try:
        deadline = time.monotonic() + RUN_DEADLINE
        seen: dict[str, tuple[str, dict]] = {}
        while set(seen) != set(BLOCKWISE_FAMILIES):
            assert process.poll() is None, (tmp_path / "luigi.log").read_text()[-5000:]
            assert time.monotonic() < deadline, f"only {sorted(seen)} seen running"
            running = blockwise_tasks(luigid.api("task_list", status="RUNNING"))
            running.update(blockwise_tasks(luigid.api("task_list", status="PENDING")))
            for task_id, task in running.items():
                expected = "RUNNING" if task["name"] == "Smooth" else "PENDING"
                if (task["name"] not in seen and task["status"] == expected
                        and task["progress_percentage"] is not None
                        and 0 < task["progress_percentage"] < 100
                        and task["status_message"] and "blocks" in task["status_message"]
                        and task["tracking_url"]):
                    seen[task["name"]] = (task_id, task)
            time.sleep(0.1)

        for task_id, task in seen.values():
            # how many of the run's pool of workers hold the task's blocks now
            assert re.search(r"blocks/s, \d+ workers? now", task["status_message"]), task
            page = http_get(task["tracking_url"]).decode()
            assert "luigi_daisy run" in page
            # the tracking URL carries the run's token; state.json needs it too
            parts = urllib.parse.urlsplit(task["tracking_url"])
            state = json.loads(http_get(urllib.parse.urlunsplit(
                parts._replace(path=parts.path + "state.json"))))
            assert task_id in state["tasks"], state
            assert state["tasks"][task_id]["total"] == EXAMPLE_BLOCKS

        # progress keeps moving while the run goes on
        task_id, task = seen["Threshold"]
        while True:
            assert process.poll() is None, (tmp_path / "luigi.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "progress did not move"
            now = luigid.api("get_task_progress_percentage", task_id=task_id)[
                "progressPercentage"]
            if now is not None and now > task["progress_percentage"]:
                break
            time.sleep(0.1)
    finally:
        stop_group(process)
