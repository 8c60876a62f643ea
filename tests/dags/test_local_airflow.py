"""`make airflow`'s launcher: every port on loopback, no log server, the password file private."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

START_TIMEOUT_S = 240


def _free_port() -> int:
    """A free loopback port below 55000, away from Airflow's usual ones."""
    for port in range(20000 + os.getpid() % 20000, 55000):
        if port in (8080, 8793, 8794):
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process tree listens on."""
    found = set()
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def _healthy(health: dict) -> bool:
    return all((health.get(part) or {}).get("status") == "healthy" for part in ("scheduler", "triggerer"))


def test_local_airflow_binds_loopback_only_and_keeps_the_password_private(
        tmp_path: Path, airflow_db: dict[str, str]) -> None:
    port = _free_port()
    home = tmp_path / "home"
    home.mkdir()
    old = home / "simple_auth_manager_passwords.json.generated"
    env = {**airflow_db, "AIRFLOW_HOME": str(home), "AIRFLOW__API__HOST": "127.0.0.1",
           "AIRFLOW__API__PORT": str(port), "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path / "no-dags"),
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/"}
    proc = subprocess.Popen([sys.executable, "-m", "covid_tasks.local_airflow"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # Wait until the scheduler and the triggerer heartbeat: their log servers, if any, start first.
        deadline, health = time.monotonic() + START_TIMEOUT_S, {}
        while time.monotonic() < deadline and proc.poll() is None and not _healthy(health):
            time.sleep(2)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=2) as r:
                    health = json.loads(r.read())
            except OSError:
                pass
        assert _healthy(health), health
        time.sleep(3)
        listening = _listening(proc.pid)
        assert (("127.0.0.1", port)) in listening
        assert {ip for ip, _ in listening} <= {"127.0.0.1", "::1"}, listening
        assert not {p for _, p in listening} & {8793, 8794}, listening
        mode = stat.S_IMODE(old.stat().st_mode)
        assert mode == 0o600, oct(mode)
        assert "admin" in json.loads(old.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "ready: http://127.0.0.1:" in out, out[-4000:]
    assert f"password is in {old} (mode 600)" in out


def test_an_existing_password_file_is_made_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from covid_tasks.local_airflow import secure_password_file

    path = tmp_path / "pw.json"
    path.write_text('{"admin": "x"}\n')
    path.chmod(0o644)
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(path))
    assert secure_password_file() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == '{"admin": "x"}\n'
