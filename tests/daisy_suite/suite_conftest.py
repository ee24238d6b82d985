"""Every test of daisy's suite writes its workers' logs into its own tmp folder."""

import pytest

from luigi_daisy.logging import set_log_basedir


@pytest.fixture(autouse=True)
def _worker_logs_in_tmp(tmp_path):
    set_log_basedir(tmp_path / "daisy_logs")
