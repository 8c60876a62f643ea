"""A real ``mlflow server`` on loopback for tests: SQLite backend, temporary artifact folder.

``MlflowServer.start()`` launches ``mlflow server`` in its own process group on a free loopback
port and returns at once; ``url`` waits for ``/health`` on first use, so a test module can build
its data and models while the server boots (20-40 s on a busy 2-core machine). ``stop()`` sends
SIGTERM, then SIGKILL, to the whole group (the CLI and its uvicorn worker).

``shared_server(tmp_path_factory)`` returns one server per pytest process, stopped at exit, so
several test modules pay for one start; they keep apart by using their own model names.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers.procs import stop_group

#: Airflow's log server, MLflow's default and other well-known ports we never take.
AVOID_PORTS = frozenset({5000, 8080, 8793, 8888})
START_TIMEOUT_S = 180.0

_SHARED: "MlflowServer | None" = None


def free_port() -> int:
    """A loopback port that is free right now (chosen by the kernel)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in AVOID_PORTS:
            return port


def closed_port_uri() -> str:
    """An ``http://127.0.0.1:<port>`` URI where nothing listens (a registry that is down)."""
    return f"http://127.0.0.1:{free_port()}"


def mlflow_binary() -> str:
    """The ``mlflow`` executable of the running virtual environment."""
    local = Path(sys.executable).parent / "mlflow"
    if not local.is_file():
        raise FileNotFoundError(f"{local} not found: install mlflow in this environment")
    return str(local)


class MlflowServer:
    """One ``mlflow server`` process with its own SQLite store and artifact folder under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready = False

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def start(self) -> "MlflowServer":
        """Launch the server without waiting for it (see :attr:`url`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            mlflow_binary(), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.root, start_new_session=True)
        return self

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, once ``/health`` answers.

        Raises:
            RuntimeError: the server exited or did not answer within ``START_TIMEOUT_S``.
        """
        if not self._ready:
            self.wait()
        return f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = START_TIMEOUT_S) -> None:
        if self.proc is None:
            raise RuntimeError("server not started")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self._tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        self._ready = True
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f}s:\n{self._tail()}")

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL what is left after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_group(self.proc, 10.0)
        self._ready = False

    def _tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def shared_server(tmp_path_factory: Any) -> MlflowServer:
    """The process-wide test server, started on first call and stopped when the process exits."""
    global _SHARED
    if _SHARED is None or _SHARED.proc is None or _SHARED.proc.poll() is not None:
        _SHARED = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
        atexit.register(_SHARED.stop)
    return _SHARED
