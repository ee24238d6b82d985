"""``benchmarks/bench_load.py`` keeps working: a small run of its real server and
client processes prints figures and starts no process it does not stop."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("no_stray_processes")]

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_load.py"


def test_bench_load_serves_simulated_workers_and_prints_its_figures():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--workers", "20", "--client-processes", "2",
         "--seconds", "1", "--durations", "0,5", "--blocks", "1000000"],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()
            if re.match(r"\s+(0|5)\s+[\d,]+\s", line)]
    assert [row[0] for row in rows] == ["0", "5"], done.stdout
    for row in rows:
        assert int(row[1].replace(",", "")) > 0, done.stdout
    # 5 ms blocks: a worker keeps its next block in hand and is rarely idle
    assert float(rows[1][4].rstrip("%")) < 50, done.stdout
    assert "0 ms blocks, 20 workers" in done.stdout
