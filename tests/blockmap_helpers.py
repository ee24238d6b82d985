"""Starting and stopping the gated run of ``blockmap_run.py`` for the block map tests."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "blockmap_run.py"
START_DEADLINE = 60.0   # seconds until the run prints its URL
STOP_DEADLINE = 60.0    # seconds the run may take to end once its gates are gone
GATES = ("hold_smooth", "hold_end")


def wait_for(condition: Callable[[], object], deadline: float, what: str,
             interval: float = 0.05):
    """Poll ``condition`` until it returns something true; fail after ``deadline`` s."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline} s waiting for {what}")
        time.sleep(interval)


class GatedRun:
    """``blockmap_run.py`` in a subprocess of its own session, with its gate files."""

    def __init__(self, folder: Path, *arguments: str) -> None:
        """``arguments``: ``blockmap_run.py``'s optional host and block map host."""
        self.folder = folder
        for gate in GATES:
            (folder / gate).touch()
        with open(folder / "run.err", "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(SCRIPT), str(folder), *arguments],
                stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        #: the URL the run printed, with its ``?token=...``
        self.url = self._read_url()
        parts = urllib.parse.urlsplit(self.url)
        #: the page's address without the token, ending in ``/``
        self.base = urllib.parse.urlunsplit(parts._replace(query=""))
        self.token = urllib.parse.parse_qs(parts.query).get("token", [""])[0]

    def address(self, path: str, token: bool = True) -> str:
        """The URL of ``path`` on the block map, with the run's token unless told not."""
        if not token:
            return self.base + path
        return self.base + path + ("&" if "?" in path else "?") + "token=" + self.token

    def _read_url(self) -> str:
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        end = time.monotonic() + START_DEADLINE
        output = b""
        while time.monotonic() < end:
            if selector.select(timeout=0.5):
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    break
                output += chunk
                for line in output.decode().splitlines():
                    if line.startswith("live block map: "):
                        selector.close()
                        return line.removeprefix("live block map: ").strip()
        self.stop()
        raise AssertionError(f"the run ended or printed no block map URL within "
                             f"{START_DEADLINE} s: {output.decode()!r}\n{self.stderr()}")

    def stderr(self) -> str:
        return (self.folder / "run.err").read_text(errors="replace")[-5000:]

    def open(self, gate: str) -> None:
        """Let the blocks held by ``gate`` go."""
        (self.folder / gate).unlink(missing_ok=True)

    def get(self, path: str, token: bool = True) -> tuple[int, dict, bytes]:
        """``(status, JSON body, raw body)`` of ``GET path`` on the block map."""
        try:
            with urllib.request.urlopen(self.address(path, token), timeout=10) as response:  # noqa: S310
                body = response.read()
                status = response.status
        except urllib.error.HTTPError as error:
            body = error.read()
            status = error.code
        return status, json.loads(body), body

    def stop(self) -> int:
        """Open every gate, wait for the run to end (kill its session past the deadline)."""
        for gate in GATES:
            self.open(gate)
        try:
            return self.process.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            raise AssertionError(f"the run did not end within {STOP_DEADLINE} s of opening "
                                 f"its gates\n{self.stderr()}") from None
        finally:
            self.process.stdout.close()
