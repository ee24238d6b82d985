"""Fixtures shared by the test modules."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import time

import pytest


@pytest.fixture
def no_stray_processes(tmp_path, monkeypatch):
    """Run in tmp_path (no daisy_logs in the repo) and leave no worker process behind."""
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
