"""``make airflow``: a local Airflow (UI and API, scheduler, DAG processor, triggerer) on one address.

Like ``airflow standalone``, with two differences: the API server listens on ``[api] host`` /
``[api] port`` only (``make airflow`` sets 127.0.0.1:8080), and nothing serves logs on a network
port. ``airflow standalone`` starts the scheduler's and the triggerer's log servers on every
interface (8793, 8794); here they run with ``--skip-serve-logs`` and the API server reads task logs
from the local log folder, which is all a single machine needs.

The simple auth manager writes the generated admin password to
``$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated`` at the first start; the file is
created beforehand with mode 600 (the manager keeps the mode) and an older file is made 600.

Ctrl-C (or SIGTERM) stops every component; when one component exits on its own, the others are
stopped too and the exit status is non-zero. Usage: ``python -m covid_tasks.local_airflow``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO

#: Component name -> ``airflow`` arguments.
COMPONENTS: dict[str, list[str]] = {
    "api-server": ["api-server"],
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}
STOP_TIMEOUT_S = 30.0


def _pump(name: str, stream: IO[str]) -> None:
    for line in stream:
        sys.stdout.write(f"{name:<13} | {line}")
        sys.stdout.flush()


def _ready(url: str, procs: dict[str, subprocess.Popen]) -> bool:
    """Wait until the API server answers its health check; ``False`` if a component exits first."""
    while all(p.poll() is None for p in procs.values()):
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    return False


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for p in procs.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def secure_password_file() -> Path:
    """Create the simple auth manager's password file with mode 600 (or make an existing one 600)."""
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    path = Path(SimpleAuthManager.get_generated_password_file())
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600))
    path.chmod(0o600)
    return path


def _banner(url: str, passwords: Path) -> str:
    from covid_tasks.run_report import settings_line

    return "\n".join([
        f"local_airflow | ready: {url} (Ctrl-C stops every component)",
        f"local_airflow | login: admin; its password is in {passwords} (mode 600), made at the first start",
        f"local_airflow | Trigger form defaults: {settings_line()}",
    ])


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    from airflow.configuration import conf

    airflow = str(Path(sys.executable).parent / "airflow")
    host, port = conf.get("api", "host"), conf.getint("api", "port")
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    passwords = secure_password_file()
    procs: dict[str, subprocess.Popen] = {}
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for name, args in COMPONENTS.items():
            procs[name] = subprocess.Popen([airflow, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True, env=os.environ.copy())
            threading.Thread(target=_pump, args=(name, procs[name].stdout), daemon=True).start()
        if _ready(f"http://{local}:{port}/api/v2/monitor/health", procs):
            print(_banner(f"http://{local}:{port}", passwords), flush=True)
        while all(p.poll() is None for p in procs.values()):
            time.sleep(1)
        dead = [f"{n} (exit {p.returncode})" for n, p in procs.items() if p.poll() is not None]
        print(f"local_airflow | stopped because {', '.join(dead)} ended", flush=True)
        return 1
    except KeyboardInterrupt:
        print("local_airflow | stopping", flush=True)
        return 0
    finally:
        _stop(procs)


if __name__ == "__main__":
    sys.exit(main())
