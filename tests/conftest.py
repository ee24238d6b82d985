"""Fixtures shared by the test modules."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from pathlib import Path

import pytest


def worker_children() -> list[int]:
    """Pids of this process's children that run ``python -m luigi_daisy.worker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat[stat.rindex(")") + 2:].split()[1])
            if parent != os.getpid():
                continue
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"luigi_daisy.worker" in command:
            found.append(int(entry.name))
    return found


@pytest.fixture
def no_stray_processes(tmp_path, monkeypatch):
    """Run in tmp_path (no daisy_logs in the repo) and leave no worker process behind
    (neither forked multiprocessing children nor spawned ``luigi_daisy.worker``s)."""
    monkeypatch.chdir(tmp_path)
    yield
    deadline = time.monotonic() + 15.0
    while multiprocessing.active_children() and time.monotonic() < deadline:
        multiprocessing.connection.wait(
            [child.sentinel for child in multiprocessing.active_children()], timeout=0.5)
    leftovers = multiprocessing.active_children()
    for child in leftovers:
        child.kill()
        child.join(5.0)
    assert not leftovers, f"worker processes outlived the run: {leftovers}"
    spawned = worker_children()
    while spawned and time.monotonic() < deadline:
        time.sleep(0.05)  # noqa: the children are not ours to wait on; poll until reaped
        spawned = worker_children()
    for pid in spawned:
        os.kill(pid, signal.SIGKILL)
    assert not spawned, f"spawned worker processes outlived the run: {spawned}"
