"""Shared by the DAG tests that run Airflow: one migrated metadata DB for the test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def airflow_db() -> dict[str, str]:
    """Migrate the session's Airflow DB (tests/conftest.py isolates AIRFLOW_HOME) and add the `gpu` pool.

    Returns:
        The environment to run ``airflow`` commands with (the venv's bin first on PATH).
    """
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for cmd in (["airflow", "db", "migrate"], ["airflow", "pools", "set", "gpu", "1", "GPU slots"]):
        out = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return env
