"""The process stack's settings, derived from docker-compose.yaml and the stack's env file.

docker-compose.yaml is the one source of truth: the executor, broker and database URLs, the
workers and their queues, the MLflow server's command (basic auth, artifact destination), the
S3 server's command, the buckets, the pool size and the connection id are all read from it,
interpolated with the env file (the same variables as ``.env``), and then *localised*:

- a service's address ``<service>:<container port>`` becomes ``127.0.0.1:<stack port>``;
- container paths become folders of the stack's home (``/opt/airflow/data`` -> ``HOME/data``).

The env file (``HOME/stack.env``, mode 600, never committed) is written once from
``.env.example`` with fresh credentials (``docker/make_env.py``) plus the stack's ports.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stack import compose

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
BIND = "127.0.0.1"

#: Stack port variables, their offset from STACK_PORT_BASE, and the compose service:port they stand for.
PORTS: dict[str, tuple[int, str | None]] = {
    "STACK_PORT_POSTGRES": (0, "postgres:5432"),
    "STACK_PORT_REDIS": (1, "redis:6379"),
    "STACK_PORT_MLFLOW": (2, "mlflow:5000"),
    "STACK_PORT_API": (3, "airflow-apiserver:8080"),
    "STACK_PORT_SCHEDULER_HEALTH": (4, None),
    "STACK_PORT_TRIGGERER_LOGS": (5, None),
    "STACK_PORT_WORKER_LOGS": (6, None),
    # SeaweedFS: each also takes port + 10000 for gRPC, so these stay below 45000.
    "STACK_PORT_S3": (10, "s3:8333"),
    "STACK_PORT_S3_MASTER": (11, None),
    "STACK_PORT_S3_VOLUME": (12, None),
    "STACK_PORT_S3_FILER": (13, None),
}
DEFAULT_PORT_BASE = 41000
#: Container paths of the compose file -> (base, relative path) in the process stack.
PATHS = {
    "/opt/airflow/data": ("home", "data"),
    "/opt/airflow/logs": ("home", "airflow/logs"),
    "/opt/airflow/dags": ("repo", "dags"),
    "/opt/covid/bin/": ("repo", "docker/"),
    "/run/secrets/": ("home", "secrets/"),  # compose's secrets, written by stack/init.py
}
#: Process environment that must not leak from the caller into a stack service
#: (the Makefile exports the LocalExecutor/SQLite settings of `make run`).
SCRUBBED = ("AIRFLOW", "_AIRFLOW", "COVID_", "MLFLOW_", "AWS_", "PG", "REDISCLI")


def load_make_env() -> Any:
    """docker/make_env.py as a module (the credential generator shared with compose)."""
    spec = importlib.util.spec_from_file_location("covid_make_env", REPO / "docker" / "make_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render_env(port_base: int = DEFAULT_PORT_BASE) -> str:
    """A new env file: .env.example with fresh credentials, then the stack's ports."""
    if not BIND.startswith("127.") or port_base < 1024 or port_base + 13 + 10000 >= 55000:
        raise ValueError(f"STACK_PORT_BASE {port_base}: the stack's ports (and SeaweedFS' port + 10000) "
                         "must stay within 1024..54999")
    text = load_make_env().render(ENV_EXAMPLE.read_text())
    lines = ["", "# ---------------------------------------------------------------- make stack",
             "# Ports of the process stack, all on 127.0.0.1 (SeaweedFS also uses port + 10000).",
             "# Lines AIRFLOW__SECTION__KEY=value added below override Airflow settings of every",
             "# Airflow process of the stack."]
    lines += [f"{name}={port_base + offset}" for name, (offset, _) in PORTS.items()]
    return text + "\n".join(lines) + "\n"


def add_new_credentials(env_path: Path) -> list[str]:
    """Append a fresh value for each credential .env.example has and the env file lacks (one added
    since the file was written); returns their names."""
    make_env = load_make_env()
    text = env_path.read_text()
    have = compose.env_file(text)
    example = compose.env_file(ENV_EXAMPLE.read_text())
    missing = [name for name in make_env.GENERATED if name in example and not have.get(name)]
    if missing:
        lines = ["", "# ---------------------------------------------------------------- added later",
                 "# Credentials .env.example gained after this file was written."]
        lines += [f"{name}={make_env.GENERATED[name]()}" for name in missing]
        write_private(env_path, text.rstrip("\n") + "\n" + "\n".join(lines) + "\n")
    return missing


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 600 from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


@dataclass
class Settings:
    """Everything the launcher needs, for one stack home."""

    home: Path
    env: dict[str, str]
    model: dict[str, Any] = field(repr=False)

    @classmethod
    def load(cls, home: str | Path, port_base: int | None = None) -> "Settings":
        """Read (or on first use write) ``HOME/stack.env`` and interpolate the compose file with it."""
        home = Path(home).resolve()
        env_path = home / "stack.env"
        if not env_path.exists():
            home.mkdir(parents=True, exist_ok=True)
            write_private(env_path, render_env(port_base or DEFAULT_PORT_BASE))
        add_new_credentials(env_path)
        env = compose.env_file(env_path.read_text())
        missing = [name for name in PORTS if not env.get(name, "").isdigit()]
        if missing:
            raise ValueError(f"{env_path} lacks {', '.join(missing)}; delete it to have it written again")
        model = compose.interpolate(compose.load(COMPOSE_FILE), env)
        return cls(home=home, env=env, model=model)

    # ------------------------------------------------------------------ addresses
    def port(self, name: str) -> int:
        return int(self.env[name])

    @property
    def addresses(self) -> dict[str, str]:
        """``service:container port`` -> ``127.0.0.1:stack port``."""
        return {svc: f"{BIND}:{self.port(name)}" for name, (_, svc) in PORTS.items() if svc}

    def url(self, service: str) -> str:
        """``http://127.0.0.1:port`` of an HTTP service (``mlflow``, ``s3``, ``airflow-apiserver``)."""
        return "http://" + next(v for k, v in self.addresses.items() if k.startswith(service + ":"))

    def localise(self, value: str) -> str:
        """A compose value with service addresses and container paths made local."""
        def swap(m: re.Match) -> str:
            key = f"{m[1]}:{m[2]}"
            if key not in self.addresses:
                raise ValueError(f"docker-compose.yaml addresses {key}; "
                                 f"the stack knows {sorted(self.addresses)}")
            return self.addresses[key]

        hosts = "|".join(sorted({k.split(":")[0] for k in self.addresses}, key=len, reverse=True))
        # host:port after // or @, and not user:password (the port must end the authority)
        value = re.sub(rf"(?<=[/@])({hosts}):(\d+)(?![\w@.:-])", swap, value)
        for container, (base, rel) in PATHS.items():
            root = self.home if base == "home" else REPO
            local = str(root / rel) + ("/" if container.endswith("/") else "")
            value = value.replace(container, local)
        return value

    # ------------------------------------------------------------------ compose services
    def service(self, name: str) -> dict[str, Any]:
        try:
            return self.model["services"][name]
        except KeyError:
            raise KeyError(f"docker-compose.yaml has no service {name!r}") from None

    def compose_env(self, name: str) -> dict[str, str]:
        """The service's ``environment`` from compose, localised."""
        raw = self.service(name).get("environment", {}) or {}
        if isinstance(raw, list):
            raw = dict(item.split("=", 1) for item in raw)
        return {k: self.localise(str(v)) for k, v in raw.items()}

    def workers(self) -> dict[str, set[str]]:
        """Celery worker services and their queues, as compose declares them."""
        return compose.workers(self.model)

    @property
    def buckets(self) -> list[str]:
        """The buckets airflow-init creates (``S3_BUCKETS`` of compose's airflow-init)."""
        return [b for b in self.service("airflow-init")["environment"]["S3_BUCKETS"].split(",") if b]

    # ------------------------------------------------------------------ process environment
    def base_env(self) -> dict[str, str]:
        """The caller's environment without Airflow/MLflow/AWS/COVID settings, with the venv first."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED)}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return env

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    def airflow_env(self, name: str) -> dict[str, str]:
        """Environment of an Airflow process: compose's, then the stack's ports, then overrides."""
        env = {**self.base_env(), **self.compose_env(name)}
        api = self.port("STACK_PORT_API")
        env.update({
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.airflow_home / "logs"),
            "AIRFLOW__API__HOST": BIND,
            "AIRFLOW__API__PORT": str(api),
            "AIRFLOW__API__BASE_URL": f"http://{BIND}:{api}",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": BIND,
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT":
                str(self.port("STACK_PORT_SCHEDULER_HEALTH")),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.port("STACK_PORT_TRIGGERER_LOGS")),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.port("STACK_PORT_WORKER_LOGS")),
            "MPLBACKEND": "Agg",
        })
        if compose.celery_queues(self.service(name)) is not None:
            # Two workers on one machine: each reports its compose service name as the hostname
            # of the task instances it runs (in compose every container has its own hostname).
            env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] = "stack.hostname.get_hostname"
            env["STACK_WORKER_HOSTNAME"] = name
        env.update({k: v for k, v in self.env.items() if k.startswith("AIRFLOW__")})
        return env
