"""A local Airflow for the season replay: ``make airflow``'s set-up in a folder of its own, driven over
its REST API (a token from ``/auth/token``, runs created with their logical dates, polled to the end).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "covid_retraining"
FINISHED = ("success", "failed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalAirflow:
    """API server, scheduler (LocalExecutor), DAG processor and triggerer on SQLite, on loopback.

    Args:
        home: the Airflow home (database, logs, the generated admin password).
        env: extra environment for every component and task (``COVID_DATA_ROOT``...).
    """

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = Path(home)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        bin_dir = Path(sys.executable).parent
        self.env = {**os.environ, **env,
                    "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
                    "AIRFLOW_HOME": str(self.home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
                    "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                    "AIRFLOW__CORE__PARALLELISM": "4",
                    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home / 'airflow.db'}",
                    "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
                    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                    "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(self.port),
                    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                    "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.airflow = str(bin_dir / "airflow")
        self.proc: subprocess.Popen | None = None
        self.token: str | None = None

    def __enter__(self) -> LocalAirflow:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "setup.log", "a")  # noqa: SIM115 - closed below
        with log:
            for args in (["db", "migrate"], ["pools", "set", "gpu", "1", "GPU slots for train and finetune"]):
                subprocess.run([self.airflow, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                               check=True, timeout=600)
        self.proc = subprocess.Popen([sys.executable, "-m", "covid_tasks.local_airflow"], env=self.env,
                                     cwd=REPO, stdout=open(self.home / "airflow.log", "a"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"local Airflow exited ({self.proc.returncode}); "
                                   f"see {self.home / 'airflow.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=3):
                    break
            except OSError:
                time.sleep(2)
        else:
            raise TimeoutError(f"local Airflow did not answer in 300 s; see {self.home / 'airflow.log'}")
        self.token = self._token()
        self._wait_for_dag()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    # -- REST ----------------------------------------------------------------------------------
    def _token(self) -> str:
        """The simple auth manager's admin password (generated at first start) exchanged for a JWT."""
        path = self.home / "simple_auth_manager_passwords.json.generated"
        deadline = time.monotonic() + 60
        while not (path.is_file() and path.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(1)
        password = json.loads(path.read_text())["admin"]
        body = self.request("POST", "/auth/token", {"username": "admin", "password": password}, auth=False)
        return body["access_token"]

    def request(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: HTTP {exc.code}: {exc.read().decode()[:500]}") from None
        return json.loads(text) if text else None

    def _wait_for_dag(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.request("GET", f"/api/v2/dags/{DAG_ID}").get("dag_id") == DAG_ID:
                    return
            except RuntimeError:
                pass
            time.sleep(3)
        raise TimeoutError(f"the DAG {DAG_ID} was not parsed in {timeout:.0f} s")

    def trigger(self, run_id: str, logical_date: str, conf: dict[str, Any]) -> dict[str, Any]:
        """Create a DAG run for ``logical_date`` with ``conf``, as the UI's Trigger does."""
        return self.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                            {"dag_run_id": run_id, "logical_date": logical_date, "conf": conf})

    def wait(self, run_id: str, timeout: float) -> dict[str, Any]:
        """Poll the run until it succeeds or fails; its final record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
            if run["state"] in FINISHED:
                return run
            time.sleep(5)
        raise TimeoutError(f"DAG run {run_id} did not finish in {timeout:.0f} s")

    def task_states(self, run_id: str) -> dict[str, str]:
        body = self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
        return {ti["task_id"]: ti["state"] for ti in body["task_instances"]}

    def xcom(self, run_id: str, task_id: str) -> Any:
        """A task's return value (``None`` when it returned nothing)."""
        try:
            body = self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/"
                                       "xcomEntries/return_value?deserialize=true&stringify=false")
        except RuntimeError:
            return None
        value = body.get("value")
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value
