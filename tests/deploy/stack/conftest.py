"""The process stack for `make stack-test`: one stack per pytest session, on free loopback ports.

The stack runs docker-compose.yaml's settings (stack/settings.py) with three test-only overrides,
all through Airflow's own configuration, so that the fault scenarios fit in CI's time:

- ``use_job_schedule = False``: unpausing the DAG does not start a weekly run with the default
  (ResNet50, 224 px) Params next to the tiny runs the tests trigger;
- ``task_instance_heartbeat_timeout = 40`` s (default 300): a task whose worker was killed is
  failed, and retried, within a minute;
- a cluster policy (``airflow_local_settings.py`` in the stack's AIRFLOW_HOME) that sets every
  task's ``retry_delay`` to RETRY_DELAY_S (``register``: REGISTER_RETRY_DELAY_S) instead of the
  DAG's minutes.

``STACK_TEST_HOME=/path`` reuses (or creates) a stack there and leaves it running, to
iterate on the tests; by default the stack lives in a temporary folder and is stopped at the end.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.s3_server import port_is_free

REPO = Path(__file__).resolve().parents[3]
RETRY_DELAY_S = 25
#: register waits longer: its retry must outlast an MLflow restart (a minute on a busy 2-core machine).
REGISTER_RETRY_DELAY_S = 60
POLICY = f'''"""Test-only cluster policy of `make stack-test`: short retry delays (tests/deploy/stack)."""
from datetime import timedelta


def task_policy(task):
    seconds = {REGISTER_RETRY_DELAY_S} if task.task_id == "register" else {RETRY_DELAY_S}
    task.retry_delay = timedelta(seconds=seconds)
'''
OVERRIDES = {
    "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "40",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    "CPU_WORKER_CONCURRENCY": "2",
}
TERMINAL = {"success", "failed"}


def free_port_base() -> int:
    """A base whose stack ports (and SeaweedFS' port + 10000) are all free, avoiding 8793 & co."""
    from stack.settings import PORTS

    offsets = [o for o, _ in PORTS.values()] + [o + 10000 for n, (o, _) in PORTS.items() if "S3" in n]
    for _ in range(200):
        base = random.randrange(20000, 34000, 20)
        if all(port_is_free(base + o) for o in offsets):
            return base
    raise RuntimeError("no free port block for the stack")


def stack_cli(home: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "stack", *args, "--home", str(home)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


class AirflowAPI:
    """The Airflow 3 REST API with a JWT from ``/auth/token`` (the stack's admin user)."""

    def __init__(self, base: str, user: str, password: str) -> None:
        self.base, self.user, self.password = base, user, password
        self.token = ""

    def login(self) -> None:
        body = json.dumps({"username": self.user, "password": self.password}).encode()
        req = urllib.request.Request(f"{self.base}/auth/token", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            self.token = json.loads(resp.read())["access_token"]

    def call(self, method: str, path: str, body: Any = None) -> Any:
        if not self.token:
            self.login()
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.base}/api/v2{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json",
                                              "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 401:  # token expired: log in again once
                self.token = ""
                return self.call(method, path, body)
            raise AssertionError(f"{method} {path}: HTTP {exc.code} {exc.read()[:500]!r}") from exc
        return json.loads(payload)

    # ---------------------------------------------------------------- DAG runs
    def trigger(self, dag_id: str, conf: dict) -> str:
        self.call("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        run = self.call("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        return run["dag_run_id"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{_q(run_id)}")

    def tis(self, dag_id: str, run_id: str) -> dict[str, dict]:
        out = self.call("GET", f"/dags/{dag_id}/dagRuns/{_q(run_id)}/taskInstances")["task_instances"]
        return {ti["task_id"]: ti for ti in out}

    def tries(self, dag_id: str, run_id: str, task_id: str) -> list[dict]:
        path = f"/dags/{dag_id}/dagRuns/{_q(run_id)}/taskInstances/{task_id}/tries"
        return self.call("GET", path)["task_instances"]

    def log(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        """The task log of one try, as the UI shows it (one JSON event per line)."""
        path = f"/dags/{dag_id}/dagRuns/{_q(run_id)}/taskInstances/{task_id}/logs/{try_number}"
        content = self.call("GET", path + "?full_content=true")["content"]
        return "\n".join(json.dumps(c) if isinstance(c, dict) else str(c) for c in content)

    def wait(self, what: str, predicate, timeout: float, interval: float = 1.0) -> Any:
        """Poll ``predicate()`` until it returns a truthy value; fail naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)


def _q(run_id: str) -> str:
    return urllib.request.quote(run_id, safe="")


@pytest.fixture(scope="session")
def stack_home():
    """A running stack; yields its home folder. Stopped at the end unless STACK_TEST_HOME is set.

    The home is a fresh folder in the system's temporary directory rather than pytest's (mode
    700 parents): run as root, PostgreSQL runs as an unprivileged user who must reach it.
    """
    from stack.settings import render_env, write_private

    keep = os.environ.get("STACK_TEST_HOME")
    home = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="covid-stack-test-"))
    env_path = home / "stack.env"
    if not env_path.exists():
        text = render_env(free_port_base())
        text = "\n".join(line for line in text.splitlines() if line.split("=")[0] not in OVERRIDES)
        write_private(env_path, text + "\n" + "".join(f"{k}={v}\n" for k, v in OVERRIDES.items()))
    config = home / "airflow" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "airflow_local_settings.py").write_text(POLICY)
    began = time.monotonic()
    up = stack_cli(home, "up")
    print(f"\nmake stack equivalent (python -m stack up) took {time.monotonic() - began:.0f} s")
    if up.returncode != 0:
        if stack_cli(home, "down").returncode == 0 and not keep:
            shutil.rmtree(home, ignore_errors=True)
        pytest.fail(f"the stack did not come up:\n{up.stdout[-4000:]}\n{up.stderr[-6000:]}")
    yield home
    if not keep:
        down = stack_cli(home, "down")
        if down.returncode == 0:
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(stack_home):
    from stack.settings import Settings

    return Settings.load(stack_home)


def mlflow_login(settings, role: str) -> tuple[str, str]:
    """(user, password) of the env file's MLflow user ``role``: ADMIN, AIRFLOW, INFERENCE or VIEWER."""
    return settings.env[f"MLFLOW_{role}_USER"], settings.env[f"MLFLOW_{role}_PASSWORD"]


@pytest.fixture(scope="session")
def fresh_registry(settings) -> dict:
    """Issue 19 item 2 on the fresh stack, before the pipeline's first registration (the forced run
    asks for this fixture, so it always comes first): the registry as the admin sees it, the
    take-over attempts of the read-only users, then the registry again."""
    from tests.helpers import registry_attacks

    url, admin = settings.url("mlflow"), mlflow_login(settings, "ADMIN")
    before = registry_attacks.snapshot(url, admin)
    attempts = {role: registry_attacks.take_over(url, mlflow_login(settings, role))
                for role in ("INFERENCE", "VIEWER")}
    return {"before": before, "attempts": attempts, "after": registry_attacks.snapshot(url, admin)}


@pytest.fixture(scope="session")
def api(settings) -> AirflowAPI:
    return AirflowAPI(settings.url("airflow-apiserver"), settings.env.get("AIRFLOW_ADMIN_USER") or "admin",
                      settings.env["AIRFLOW_ADMIN_PASSWORD"])
