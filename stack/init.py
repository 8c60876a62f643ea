"""One-shot set-up steps of the process stack (compose: postgres' init script and airflow-init).

Every step is idempotent, so ``make stack`` may run again on a stack that is already set up.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from stack import tls
from stack.services import bin_path, pg_bin, pg_user
from stack.settings import BIND, REPO, Settings, write_private

log = logging.getLogger("stack")


class StepFailed(RuntimeError):
    """A set-up step failed; the message ends with the tail of its log."""


def docker_module(name: str) -> Any:
    """A helper of docker/ (shared with the images) as a module."""
    spec = importlib.util.spec_from_file_location(f"covid_docker_{name}", REPO / "docker" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(argv: list[str], env: dict[str, str], logfile: Path, what: str, user: Any | None = None,
        timeout: float = 600) -> str:
    """Run a step, append its output to ``logfile``; raise :class:`StepFailed` with the tail on error."""
    kwargs: dict[str, Any] = {}
    if user is not None:
        kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kwargs)
    out = proc.stdout + proc.stderr
    with open(logfile, "a") as fh:
        fh.write(f"\n===== {what}: {' '.join(argv[:3])} (exit {proc.returncode})\n{out}")
    if proc.returncode != 0:
        tail = "\n".join(out.splitlines()[-30:])
        raise StepFailed(f"{what} failed (exit {proc.returncode}); full log {logfile}:\n{tail}")
    return out


def prepare(s: Settings) -> None:
    """Folders of the stack's home (the home itself is traversable only, the env file is 600), the
    Redis configuration and SeaweedFS' gRPC certificate."""
    s.home.mkdir(parents=True, exist_ok=True)
    os.chmod(s.home, 0o711)
    for sub in ("logs", "data", "s3", "redis", "mlflow", "airflow/logs", "airflow/config"):
        (s.home / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("redis", "mlflow", "s3"):
        os.chmod(s.home / sub, 0o700)
    tls.ensure(s.home / "s3" / "tls")
    write_secrets(s)
    text = "\n".join([
        f"bind {BIND}", f"port {s.port('STACK_PORT_REDIS')}", "protected-mode yes",
        f"requirepass {s.env['REDIS_PASSWORD']}", f"dir {s.home / 'redis'}", "daemonize no",
        "save 60 1", "appendonly no", "",
    ])
    write_private(s.home / "redis" / "redis.conf", text)


def write_secrets(s: Settings) -> None:
    """Compose's secrets as the files a container sees in /run/secrets: ``HOME/secrets/<name>``
    (folder 700, files 600), each the value of its ``environment`` variable in the stack's env file."""
    folder = s.home / "secrets"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    for name, spec in (s.model.get("secrets") or {}).items():
        variable = (spec or {}).get("environment")
        if not variable:
            raise ValueError(f"docker-compose.yaml's secret {name}: the stack writes only secrets taken "
                             "from an environment variable (environment: NAME)")
        if not s.env.get(variable):
            raise ValueError(f"{s.home / 'stack.env'} lacks {variable} (the secret {name})")
        write_private(folder / name, s.env[variable] + "\n")


def initdb(s: Settings) -> bool:
    """Create the PostgreSQL cluster (superuser ``airflow``) unless it exists; True when created."""
    data = s.home / "postgres" / "data"
    if (data / "PG_VERSION").exists():
        return False
    user = pg_user()
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)
    if user is not None:
        _reachable_by(user, s)
    with tempfile.TemporaryDirectory(dir=s.home / "postgres") as tmp:
        pwfile = Path(tmp) / "pw"
        write_private(pwfile, s.env["POSTGRES_PASSWORD"] + "\n")
        if user is not None:
            for path in (data.parent, data, Path(tmp), pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        run([pg_bin("initdb", s.home), "-D", str(data), "-U", "airflow", f"--pwfile={pwfile}",
             "-A", "scram-sha-256", "-E", "UTF8", "--locale=C"], s.base_env(),
            s.home / "logs" / "postgres-init.log", "initdb", user=user)
    return True


def _reachable_by(user: Any, s: Settings) -> None:
    """As root: copy the server binaries into the home and check that ``user`` reaches them.

    PostgreSQL refuses to run as root, so it runs as ``user``, who must be able to traverse
    every parent folder of the stack's home.
    """
    import shutil

    src = Path(pg_bin("postgres")).parents[1]  # site-packages/pgserver/pginstall
    target = Path(pg_bin("postgres", s.home))
    if not target.exists():  # same layout as site-packages: the binaries' rpath is relative
        dst = target.parents[1]
        for sub in ("bin", "lib", "share"):
            shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)
        libs = src.parents[1] / "pgserver.libs"
        if libs.is_dir():
            shutil.copytree(libs, dst.parents[1] / "pgserver.libs", dirs_exist_ok=True)
    os.chmod(s.home / "postgres", 0o755)
    probe = subprocess.run([str(target), "--version"], user=user.pw_uid, group=user.pw_gid,
                           extra_groups=[], capture_output=True)
    if probe.returncode != 0:
        raise StepFailed(f"PostgreSQL runs as user {user.pw_name} (it refuses root), who cannot reach "
                         f"{s.home}: make its parent folders traversable (chmod o+x) or choose another "
                         "home (make stack STACK_HOME=/srv/covid-stack)")


def postgres_sql(s: Settings) -> None:
    """What the postgres image does on an empty volume: database ``airflow`` (POSTGRES_DB), then
    docker/postgres-init.sh once (role and database ``mlflow``)."""
    marker = s.home / "postgres" / "init-done"
    if marker.exists():
        return
    import psycopg2

    conn = psycopg2.connect(host=BIND, port=s.port("STACK_PORT_POSTGRES"), user="airflow", dbname="postgres",
                            password=s.env["POSTGRES_PASSWORD"], connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = 'airflow'")
            if cur.fetchone() is None:
                cur.execute("CREATE DATABASE airflow OWNER airflow")
    finally:
        conn.close()
    env = {**s.base_env(), "POSTGRES_USER": "airflow", "POSTGRES_DB": "airflow",
           "MLFLOW_DB_PASSWORD": s.env["MLFLOW_DB_PASSWORD"], "PGHOST": BIND,
           "PGPORT": str(s.port("STACK_PORT_POSTGRES")), "PGPASSWORD": s.env["POSTGRES_PASSWORD"],
           "PATH": f"{Path(pg_bin('psql')).parent}{os.pathsep}{s.base_env()['PATH']}"}
    run(["bash", str(REPO / "docker" / "postgres-init.sh")], env, s.home / "logs" / "postgres-init.log",
        "postgres-init.sh")
    marker.write_text("done\n")


def airflow_init(s: Settings) -> None:
    """What compose's airflow-init does: check .env, migrate, admin user, pool, connections,
    buckets; then upload the sample data to the source bucket when it is empty."""
    setup = docker_module("airflow_setup")
    env = s.airflow_env("airflow-init")
    problems = setup.check(env)
    if problems:
        raise StepFailed("; ".join(problems) + f" (in {s.home / 'stack.env'})")
    logfile = s.home / "logs" / "airflow-init.log"
    airflow = bin_path("airflow")
    run([airflow, "db", "migrate"], env, logfile, "airflow db migrate")
    user, password = env["_AIRFLOW_WWW_USER_USERNAME"], env["_AIRFLOW_WWW_USER_PASSWORD"]
    users = run([airflow, "users", "list", "--output", "plain"], env, logfile, "airflow users list")
    if user in users.split():
        run([airflow, "users", "reset-password", "--username", user, "--password", password], env, logfile,
            "airflow users reset-password")
    else:
        run([airflow, "users", "create", "--username", user, "--password", password, "--role", "Admin",
             "--firstname", "Stack", "--lastname", "Admin", "--email", f"{user}@localhost"], env, logfile,
            "airflow users create")
    with tempfile.TemporaryDirectory(dir=s.home) as tmp:
        saved = os.environ.copy()
        try:
            os.environ.clear()
            os.environ.update(env)
            setup.main(["write", tmp])
        finally:
            os.environ.clear()
            os.environ.update(saved)
        run([airflow, "pools", "import", f"{tmp}/pools.json"], env, logfile, "airflow pools import")
        run([airflow, "connections", "import", "--overwrite", f"{tmp}/connections.json"], env, logfile,
            "airflow connections import")
    setup.create_buckets(env)
    upload_sample(s, env, logfile)


def upload_sample(s: Settings, env: dict[str, str], logfile: Path) -> None:
    """Upload sample_data/ to ``COVID_SOURCE_URI`` when that is a prefix of one of the stack's buckets."""
    source = env.get("COVID_SOURCE_URI", "")
    if not source.startswith("s3://") or source[5:].split("/")[0] not in s.buckets:
        return
    aws = {**s.base_env(), "AWS_ACCESS_KEY_ID": env["S3_ACCESS_KEY"],
           "AWS_SECRET_ACCESS_KEY": env["S3_SECRET_KEY"], "AWS_ENDPOINT_URL": env["S3_ENDPOINT_URL"],
           "AWS_DEFAULT_REGION": env.get("S3_REGION") or "us-east-1"}
    import sys

    out = run([sys.executable, str(REPO / "docker" / "upload_dataset.py"), str(REPO / "sample_data"), source],
              aws, logfile, "upload sample_data")
    log.info("sample data: %s", out.strip().splitlines()[-1] if out.strip() else "uploaded")
