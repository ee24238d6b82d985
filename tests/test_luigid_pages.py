"""What luigid's own page and the block map it links to show, in a real headless
Chromium, for a real Luigi run against a real luigid (``test_luigid.py``'s fixture).

The run's task (``luigid_page_tasks.Hostile``) fails a block with markup in its error and
holds another block, so the task is RUNNING while the browser looks. The run is started
as the README tells users to start runs across nodes (``host = 0.0.0.0``), and luigid is
opened as ``localhost`` while the block map is on ``127.0.0.1``: following luigid's link
is a cross-site navigation, as it is from another machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from blockmap_helpers import wait_for
from luigid_page_tasks import FAILURE, PAYLOAD
from selenium.webdriver.common.by import By
from test_blockmap_browser import browser  # noqa: F401 - the fixture
from test_luigid import REPO, luigid, stop_group  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(180)

TESTS = Path(__file__).resolve().parent
RUN_DEADLINE = 60.0   # seconds until luigid shows the failed block in the running task
PAGE_DEADLINE = 30.0  # seconds for a page to show what luigid or the run says
STOP_DEADLINE = 60.0  # seconds the run may take to end once its gate is gone
#: JavaScript: whether the payload ran, or left an element, anywhere in the page
INJECTED = ("return window.luigiDaisyInjected !== undefined"
            " || document.querySelector('img[src=x]') !== null;")


def start_run(tmp_path: Path, port: int) -> subprocess.Popen:
    (tmp_path / "luigi.cfg").write_text(
        "[luigi_daisy]\nnum_workers = 1\nmax_retries = 0\nledger_dir = ledgers\n"
        "log_dir = logs\nhost = 0.0.0.0\n")
    (tmp_path / "hold").touch()
    beside = Path(sys.executable).parent / "luigi"
    command = [str(beside)] if beside.exists() else ["luigi"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env["LUIGI_CONFIG_PATH"] = str(tmp_path / "luigi.cfg")
    with open(tmp_path / "luigi.log", "wb") as log:
        return subprocess.Popen(
            command + ["--module", "luigid_page_tasks", "Hostile", "--folder", str(tmp_path),
                       "--scheduler-host", "127.0.0.1", "--scheduler-port", str(port),
                       "--retcode-task-failed", "3"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture
def running(tmp_path, luigid):  # noqa: F811 - the fixture
    """The run, RUNNING in luigid with its failed block; yields luigid's record of the
    task. Ends the run (its gate removed) and checks that it failed as it should."""
    process = start_run(tmp_path, luigid.port)
    try:
        def running_with_failure():
            assert process.poll() is None, (tmp_path / "luigi.log").read_text()[-5000:]
            for task in luigid.api("task_list", status="RUNNING").values():
                if (task["name"] == "Hostile" and task["tracking_url"]
                        and "bad metadata" in (task["status_message"] or "")):
                    return task
            return None
        yield wait_for(running_with_failure, RUN_DEADLINE,
                       "Hostile RUNNING in luigid with its failed block", interval=0.1)
        (tmp_path / "hold").unlink()
        assert process.wait(STOP_DEADLINE) == 3, (tmp_path / "luigi.log").read_text()[-5000:]
    finally:
        stop_group(process)


def open_luigid(browser, luigid) -> None:  # noqa: F811 - the fixture
    """luigid's page, by the name ``localhost`` (the block map is on 127.0.0.1)."""
    browser.get(f"http://localhost:{luigid.port}/static/visualiser/index.html")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#taskTable button.statusMessage"),
             PAGE_DEADLINE, "the running task in luigid's task list")


def test_markup_in_a_blocks_error_is_shown_as_text_in_luigids_status_window(
        running, luigid, browser):  # noqa: F811 - fixtures
    """luigid refreshes the open status window every 500 ms with jQuery's ``.html()``."""
    open_luigid(browser, luigid)
    browser.find_element(By.CSS_SELECTOR, "#taskTable button.statusMessage").click()
    wait_for(lambda: "bad metadata" in browser.find_element(
        By.CSS_SELECTOR, "#statusMessageModal pre").text, PAGE_DEADLINE,
        "the status message in luigid's window")
    # two more refreshes of the window
    refreshed = time.monotonic() + 1.2
    wait_for(lambda: time.monotonic() > refreshed, 5.0, "two refreshes")
    shown = browser.find_element(By.CSS_SELECTOR, "#statusMessageModal pre").text
    assert not browser.execute_script(INJECTED), "the block's error ran in luigid's page"
    assert FAILURE in shown, shown
    # luigid holds it escaped (and so its API answers it)
    assert PAYLOAD not in running["status_message"], running["status_message"]


def test_luigids_link_opens_the_block_map_on_loopback_with_its_token_and_nothing_without(
        running, luigid, browser):  # noqa: F811 - fixtures
    """With ``host = 0.0.0.0`` the block map still listens on loopback; luigid's link
    carries the token; following it (cross-site: luigid opened as ``localhost``) the
    page works through the cookie the token set, and drops the token from the address
    bar; without the token the map answers 403."""
    url = running["tracking_url"]
    parts = urllib.parse.urlsplit(url)
    assert f"{parts.scheme}://{parts.hostname}" == "http://127.0.0.1", url
    assert urllib.parse.parse_qs(parts.query).get("token"), url
    base = urllib.parse.urlunsplit(parts._replace(query=""))
    assert http_status(base) == 403
    assert http_status(base + "api/run") == 403

    open_luigid(browser, luigid)
    link = browser.find_element(By.CSS_SELECTOR, '#taskTable a[title="Track Progress"]')
    assert link.get_attribute("href") == url
    luigid_window = browser.current_window_handle
    link.click()
    wait_for(lambda: len(browser.window_handles) == 2, PAGE_DEADLINE, "the map's window")
    browser.switch_to.window(next(handle for handle in browser.window_handles
                                  if handle != luigid_window))
    line = wait_for(lambda: browser.find_elements(
        By.CSS_SELECTOR, "section.task .failed-blocks .error-line"), PAGE_DEADLINE,
        "the failed block in the block map")[0]
    assert line.text == FAILURE
    assert browser.current_url == base
    assert not browser.execute_script(INJECTED), "the block's error ran in the block map"
    # the page keeps polling through its cookie
    status = browser.find_element(By.ID, "status")
    first = status.text
    wait_for(lambda: status.text != first and status.text.startswith("running for"),
             PAGE_DEADLINE, "the page's next answer from the run")
    problems = [entry for entry in browser.get_log("browser")
                if entry["level"] == "SEVERE" and str(parts.port) in entry["message"]]
    assert not problems, problems
