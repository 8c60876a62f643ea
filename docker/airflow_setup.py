"""Set-up helpers for the ``airflow-init`` service (see docker/init.sh); standard library only.

``check``  refuses to go on while a credential in ``.env`` is empty, still a placeholder, too short,
           or (the Fernet key) not a valid key, naming each one so the operator can fix ``.env``.
``writable DIR UID`` fails unless user UID (group 0) can create a file in DIR (the data root).
``write DIR`` writes ``DIR/connections.json`` for ``airflow connections import --overwrite`` and
           ``DIR/pools.json`` (the pools the DAG's tasks use), both from the environment.
``buckets`` creates the buckets of ``S3_BUCKETS`` in the S3 store unless they exist (needs boto3).

Environment read by ``write`` (docker-compose.yaml passes it to airflow-init):
    S3_ACCESS_KEY, S3_SECRET_KEY     key pair of the S3 store (SeaweedFS): the connection's login, password
    S3_ENDPOINT_URL                  e.g. http://s3:8333
    S3_REGION                        e.g. us-east-1
    COVID_S3_CONN_ID                 the connection id the DAG reads (default aws_default)
    COVID_MLFLOW_TRACKING_URI        e.g. http://mlflow:5000 (also stored as connection mlflow_default)
    GPU_POOL_SLOTS                   slots of pool ``gpu`` (= GPUs that may train at once), default 1
    S3_BUCKETS                       comma-separated buckets to create (``buckets``)
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

#: Pool used by the DAG's train and finetune tasks (queue "gpu", pool "gpu").
GPU_POOL = "gpu"

#: Credentials that must be set in .env; each is checked by ``check``.
SECRETS = (
    "POSTGRES_PASSWORD",
    "MLFLOW_DB_PASSWORD",
    "REDIS_PASSWORD",
    "_AIRFLOW_WWW_USER_PASSWORD",
    "AIRFLOW__API__SECRET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "S3_SECRET_KEY",
)
FERNET = "AIRFLOW__CORE__FERNET_KEY"
MIN_LENGTH = 12
PLACEHOLDERS = ("change-me", "changeme", "change_me", "airflow", "password", "secret", "admin")
#: Characters that would break the credential inside a database or broker URL.
URL_UNSAFE = set("@:/?#%[] ")
IN_URLS = ("POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "REDIS_PASSWORD")


def check(env: dict[str, str]) -> list[str]:
    """Return one message per unusable credential (an empty list when all are fine)."""
    problems = []
    for name in SECRETS + ("S3_ACCESS_KEY", FERNET):
        value = env.get(name, "")
        if not value:
            problems.append(f"{name} is empty")
        elif value.lower() in PLACEHOLDERS or "change-me" in value.lower():
            problems.append(f"{name} is still a placeholder")
        elif name in SECRETS and len(value) < MIN_LENGTH:
            problems.append(f"{name} is shorter than {MIN_LENGTH} characters")
        elif name in IN_URLS and URL_UNSAFE & set(value):
            problems.append(f"{name} contains one of {''.join(sorted(URL_UNSAFE))!r}; it goes into a URL, "
                            "use letters and digits (openssl rand -hex 24)")
    fernet = env.get(FERNET, "")
    if fernet and not _valid_fernet(fernet):
        problems.append(f"{FERNET} is not a Fernet key (32 url-safe base64-encoded bytes)")
    return problems


def _valid_fernet(key: str) -> bool:
    try:
        return len(base64.urlsafe_b64decode(key.encode("ascii"))) == 32
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return False


def connections(env: dict[str, str]) -> dict[str, dict[str, object]]:
    """The connections file: the S3 store (read by covid_tasks.airflow_support.s3_options) and MLflow."""
    conn_id = env.get("COVID_S3_CONN_ID") or "aws_default"
    s3_extra = {"endpoint_url": env["S3_ENDPOINT_URL"], "region_name": env.get("S3_REGION") or "us-east-1"}
    out: dict[str, dict[str, object]] = {
        conn_id: {
            "conn_type": "aws",
            "login": env["S3_ACCESS_KEY"],
            "password": env["S3_SECRET_KEY"],
            "extra": json.dumps(s3_extra),
            "description": "S3 store of the covid-xray stack (data source, MLflow artifacts, logs)",
        },
    }
    tracking = env.get("COVID_MLFLOW_TRACKING_URI", "")
    if tracking.startswith(("http://", "https://")):
        url = urlparse(tracking)
        out["mlflow_default"] = {
            "conn_type": "http",
            "host": url.hostname,
            "port": url.port or (443 if url.scheme == "https" else 80),
            **({"schema": "https"} if url.scheme == "https" else {}),
            "description": "MLflow tracking server (the tasks read COVID_MLFLOW_TRACKING_URI)",
        }
    return out


def pools(env: dict[str, str]) -> dict[str, dict[str, object]]:
    slots = int(env.get("GPU_POOL_SLOTS") or 1)
    if slots < 1:
        raise ValueError(f"GPU_POOL_SLOTS must be >= 1, got {slots}")
    return {GPU_POOL: {"slots": slots, "description": "GPU slots for train and finetune",
                       "include_deferred": False}}


def create_buckets(env: dict[str, str], attempts: int = 30) -> list[str]:
    """Create every bucket of ``S3_BUCKETS`` that does not exist yet; returns the bucket names.

    Retries while the S3 store is still starting (a fresh SeaweedFS needs a few seconds).
    """
    import time

    import boto3
    from botocore.config import Config as BotoConfig

    names = [b.strip() for b in env.get("S3_BUCKETS", "").split(",") if b.strip()]
    client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"],
                          region_name=env.get("S3_REGION") or "us-east-1",
                          aws_access_key_id=env["S3_ACCESS_KEY"],
                          aws_secret_access_key=env["S3_SECRET_KEY"],
                          config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 3}))
    for attempt in range(attempts):
        try:
            existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            for name in names:
                if name not in existing:
                    client.create_bucket(Bucket=name)
            return names
        except Exception:  # noqa: BLE001 - the store may still be starting
            if attempt == attempts - 1:
                raise
            time.sleep(2)
    return names


def writable(folder: str, uid: int) -> str | None:
    """``None`` when user ``uid`` (group 0) can create a file in ``folder``, else the reason.

    Run as root, the probe runs in a child process that switches to ``uid`` first.
    """
    import tempfile

    if os.getuid() != 0 or uid == 0:
        try:
            tempfile.TemporaryFile(dir=folder).close()
            return None
        except OSError as exc:
            return str(exc)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to uid, probe, report through the pipe
        os.close(read_end)
        try:
            os.setgid(0)
            os.setuid(uid)
            tempfile.TemporaryFile(dir=folder).close()
            code = 0
        except OSError as exc:
            os.write(write_end, str(exc).encode())
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        reason = fh.read().decode()
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return None if status == 0 else (reason or f"exit status {status}")


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    if argv[:1] == ["check"] and len(argv) == 1:
        problems = check(env)
        for p in problems:
            print(f"airflow-init: {p}; set it in .env (see .env.example)", file=sys.stderr)
        return 1 if problems else 0
    if argv[:1] == ["write"] and len(argv) == 2:
        out = Path(argv[1])
        out.mkdir(parents=True, exist_ok=True)
        os.chmod(out, 0o700)
        for name, data in (("connections.json", connections(env)), ("pools.json", pools(env))):
            path = out / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=2)
        return 0
    if argv == ["buckets"]:
        print(f"airflow-init: buckets {', '.join(create_buckets(env))} are there")
        return 0
    if argv[:1] == ["writable"] and len(argv) == 3:
        reason = writable(argv[1], int(argv[2]))
        if reason:
            print(f"airflow-init: uid {argv[2]} cannot write the data root {argv[1]}: {reason}",
                  file=sys.stderr)
        return 1 if reason else 0
    print("usage: airflow_setup.py check | writable DIR UID | write DIR | buckets", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
