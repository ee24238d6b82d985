"""With the ``luigi.cfg`` that ships, a failed run of the ``luigi`` command exits non-zero.

Each case runs the real ``luigi`` command in a folder holding a copy of the repository's
``luigi.cfg`` (the command reads ``luigi.cfg`` from the folder it runs in, as from the
repository root in the README): a blockwise task whose blocks fail, an unknown key in
``[luigi_daisy]``, and a geometry that cannot be tiled.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
RUN_DEADLINE = 60.0

FAILING_MODULE = textwrap.dedent('''
    from luigi_daisy import BlockwiseTask, Roi

    class AlwaysFails(BlockwiseTask):
        """Every block raises."""
        max_retries = 0

        def total_roi(self):
            return Roi((0,), (8,))

        def read_roi(self):
            return Roi((0,), (4,))

        def write_roi(self):
            return Roi((0,), (4,))

        def process_block(self, block):
            raise ValueError(f"block {block.index} refuses to work")
''')


def shipped_retcodes() -> dict[str, int]:
    config = configparser.ConfigParser()
    config.read(REPO / "luigi.cfg")
    return {key: int(value) for key, value in config["retcode"].items()}


def run_luigi(folder: Path, *arguments: str, config_text: str | None = None
              ) -> subprocess.CompletedProcess:
    text = (REPO / "luigi.cfg").read_text()
    (folder / "luigi.cfg").write_text(config_text(text) if config_text else text)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(REPO), env.get("PYTHONPATH", "")])
    env.pop("LUIGI_CONFIG_PATH", None)
    beside = Path(sys.executable).parent / "luigi"
    command = [str(beside)] if beside.exists() else ["luigi"]
    # Luigi's pid file per command line goes here, so a concurrent test suite running
    # the same command is not taken for a second copy
    return subprocess.run(command + list(arguments) + ["--local-scheduler", "--lock-pid-dir",
                                                       str(folder / "luigi-pids")], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=RUN_DEADLINE)


def test_the_shipped_config_sets_non_zero_exit_codes():
    codes = shipped_retcodes()
    for key in ("task_failed", "scheduling_error", "unhandled_exception", "missing_data"):
        assert codes.get(key, 0) > 0, key


def test_a_failed_blockwise_task_exits_with_task_failed(tmp_path):
    (tmp_path / "failing_tasks.py").write_text(FAILING_MODULE)
    result = run_luigi(tmp_path, "--module", "failing_tasks", "AlwaysFails")
    assert result.returncode == shipped_retcodes()["task_failed"], result.stderr[-4000:]
    assert "refuses to work" in result.stderr


def test_an_unknown_config_key_exits_non_zero(tmp_path):
    result = run_luigi(
        tmp_path, "--module", "examples.segmentation", "Segmentation", "--size", "32",
        "--block-size", "16",
        config_text=lambda text: text.replace("[luigi_daisy]\n",
                                              "[luigi_daisy]\nnum_workerz = 2\n", 1))
    assert result.returncode in shipped_retcodes().values(), result.stderr[-4000:]
    assert result.returncode != 0
    assert "num_workerz" in result.stderr
    assert not (tmp_path / "segmentation_data").exists(), "the run went ahead anyway"


def test_a_geometry_that_cannot_be_tiled_exits_non_zero(tmp_path):
    result = run_luigi(tmp_path, "--module", "examples.segmentation", "Segmentation",
                       "--size", "40", "--block-size", "16")
    assert result.returncode in shipped_retcodes().values(), result.stderr[-4000:]
    assert result.returncode != 0
    assert "GeometryError" in result.stderr and "multiple of --block-size 16" in result.stderr
