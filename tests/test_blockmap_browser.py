"""The block map in a real headless Chromium (Debian's chromium and chromium-driver,
driven by selenium) against a real gated run (``blockmap_run.py``).

The test takes its own screenshots of the pictures and counts their pixels by state
colour (the colours are read from the page's CSS); nothing is written to the repository.
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
from blockmap_helpers import GatedRun, wait_for
from blockmap_run import FAILURE
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

import luigi_daisy.tracking

pytestmark = pytest.mark.timeout(180)

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,1400")
PAGE_DEADLINE = 60.0   # seconds for the page to show what the run did
COLOUR_TOLERANCE = 3   # per channel, between a pixel and a state's colour


def state_colours() -> dict[str, tuple[int, int, int]]:
    """The colour of each block state, from the page's own CSS."""
    css = (Path(luigi_daisy.tracking.WEB_FOLDER) / "blockmap.css").read_text()
    colours = {name: tuple(int(value[i:i + 2], 16) for i in (0, 2, 4))
               for name, value in re.findall(r"--(\w+): #([0-9a-fA-F]{6});", css)}
    return {state: colours[state] for state in
            ("waiting", "ready", "processing", "done", "failed", "orphaned")}


COLOURS = state_colours()


def pixels_by_state(png: bytes) -> dict[str, int]:
    """How many pixels of a screenshot have each state's colour."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    counts = dict.fromkeys(COLOURS, 0)
    for count, (red, green, blue) in image.getcolors(maxcolors=1 << 20):
        for state, (r, g, b) in COLOURS.items():
            if (abs(red - r) <= COLOUR_TOLERANCE and abs(green - g) <= COLOUR_TOLERANCE
                    and abs(blue - b) <= COLOUR_TOLERANCE):
                counts[state] += count
    return counts


def find_chromium() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("the block map tests need Debian's chromium and chromium-driver: "
                    "apt-get install -y --no-install-recommends chromium chromium-driver "
                    "(.ci/run installs them)")
    return chromium, driver


@pytest.fixture
def browser(tmp_path, monkeypatch):
    chromium, chromedriver = find_chromium()
    monkeypatch.setenv("SE_AVOID_STATS", "true")  # selenium: no telemetry, no downloads
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(chromedriver)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def section(driver, task_id: str):
    return driver.find_element(By.CSS_SELECTOR, f'section.task[data-task-id="{task_id}"]')


def picture(driver, task_id: str) -> dict[str, int]:
    """Pixels by state of a screenshot of a task's picture."""
    return pixels_by_state(section(driver, task_id).find_element(
        By.CSS_SELECTOR, "canvas.blocks").screenshot_as_png)


def count(driver, task_id: str, name: str) -> str:
    return section(driver, task_id).find_element(
        By.CSS_SELECTOR, f'[data-count="{name}"] b').text


def test_the_block_map_shows_every_task_and_changes_colour_as_blocks_finish(tmp_path, browser):
    folder = tmp_path / "run"
    folder.mkdir()
    run = GatedRun(folder)
    try:
        browser.get(run.url)
        browser.execute_script("window.loadedOnce = true;")

        # every task of the run has its section
        wait_for(lambda: {element.get_attribute("data-task-id") for element in
                          browser.find_elements(By.CSS_SELECTOR, "section.task")}
                 == {"smooth", "label", "tiles", "frames"}, PAGE_DEADLINE, "a section per task")
        # the page's requests carry the cookie it set: the token left the address bar
        assert "token=" in run.url and "token=" not in browser.current_url
        # a slider per axis before the last two: one for 3D, two for 4D, none for 2D
        assert [len(section(browser, task).find_elements(By.CSS_SELECTOR, "input[type=range]"))
                for task in ("smooth", "label", "tiles", "frames")] == [1, 1, 0, 2]

        # the failed block's error line, with the log holding its traceback
        failures = wait_for(
            lambda: section(browser, "smooth").find_elements(By.CSS_SELECTOR, ".failed-blocks li"),
            PAGE_DEADLINE, "the failed block to be listed")
        assert failures[0].find_element(By.CSS_SELECTOR, ".error-line").text == FAILURE
        log = failures[0].find_element(By.CSS_SELECTOR, ".log").text.removeprefix("traceback in ")
        assert FAILURE in Path(log).read_text()

        # z = 0 of smooth: 19 done blocks and the failed one, nothing else
        first = wait_for(lambda: (lambda pixels: pixels if pixels["done"] and pixels["failed"]
                                  and not pixels["ready"] and not pixels["processing"]
                                  else None)(picture(browser, "smooth")),
                         PAGE_DEADLINE, "z = 0 of smooth drawn done and failed")
        assert 18 <= first["done"] / first["failed"] <= 20  # 19 cells against 1
        # pointing at the failed block's cell names it (5 x 4 cells: the centre is in
        # column 2, and 20 px up is row 1)
        canvas = section(browser, "smooth").find_element(By.CSS_SELECTOR, "canvas.blocks")
        ActionChains(browser).move_to_element_with_offset(canvas, 0, -20).perform()
        wait_for(lambda: section(browser, "smooth").find_element(
            By.CSS_SELECTOR, ".hover").text == "block at z 0, y 1, x 2: failed",
            PAGE_DEADLINE, "the failed block named under the pointer")
        # label's block below the failed one is orphaned
        wait_for(lambda: picture(browser, "label")["orphaned"], PAGE_DEADLINE,
                 "the orphaned block of label")

        # move smooth's slider to z = 1, held by its gate: processing and ready, none done
        slider = section(browser, "smooth").find_element(By.CSS_SELECTOR, "input[type=range]")
        slider.send_keys(Keys.ARROW_RIGHT)
        wait_for(lambda: section(browser, "smooth").find_element(
            By.CSS_SELECTOR, ".plane-note").text.startswith("z = 1:"), PAGE_DEADLINE,
            "the picture of z = 1")
        held = wait_for(lambda: (lambda pixels: pixels if pixels["processing"]
                                 and pixels["ready"] else None)(picture(browser, "smooth")),
                        PAGE_DEADLINE, "z = 1 of smooth drawn processing and ready")
        assert held["done"] == 0 and held["failed"] == 0
        assert 8 <= held["ready"] / held["processing"] <= 10  # 18 cells against 2
        # the counts come with the page's next poll of the run, the picture with its own
        wait_for(lambda: count(browser, "smooth", "processing") == "2", PAGE_DEADLINE,
                 "smooth's count of 2 blocks processing")

        # let the blocks go: the same cells turn done, without a reload
        run.open("hold_smooth")
        finished = wait_for(lambda: (lambda pixels: pixels if pixels["done"]
                                     and not pixels["processing"] and not pixels["ready"]
                                     else None)(picture(browser, "smooth")),
                            PAGE_DEADLINE, "z = 1 of smooth drawn done")
        cells_held = held["processing"] + held["ready"]
        assert abs(finished["done"] - cells_held) <= 0.02 * cells_held
        wait_for(lambda: count(browser, "smooth", "done") == "59", PAGE_DEADLINE,
                 "59 done blocks of smooth")
        assert browser.execute_script("return window.loadedOnce === true;")

        # the last block of label is held: its worker shows, holding one block
        wait_for(lambda: [row for row in browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")
                          if row.find_elements(By.TAG_NAME, "td")[1].text == "label"],
                 PAGE_DEADLINE, "label's worker in the workers table")

        # nothing went wrong in the page: no console errors, no uncaught exceptions
        problems = [entry for entry in browser.get_log("browser")
                    if entry["level"] in ("SEVERE", "WARNING")]
        assert not problems, problems
    finally:
        exit_code = run.stop()
    assert exit_code == 0, run.stderr()
