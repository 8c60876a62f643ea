#!/usr/bin/env python3
"""Write ``.env`` for docker-compose.yaml from ``.env.example``, with fresh random credentials.

    python3 docker/make_env.py            # writes .env next to docker-compose.yaml (mode 600)
    python3 docker/make_env.py --force    # replaces an existing .env (new credentials!)
    python3 docker/make_env.py --stdout   # prints instead of writing

Every credential left empty in .env.example gets a random value that passes the checks of the
airflow-init service; all other settings keep the example's values, and AIRFLOW_UID becomes the
uid of the user running this script (unless that is root). Standard library only.

Run it once per stack and copy the same .env to every machine of the stack (remote workers need
the same passwords and AIRFLOW_JWT_SECRET). Replacing .env after the first start does not change
passwords already stored in the postgres volume.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Generators for the credentials of .env.example (all URL-safe: hex or url-safe base64).
GENERATED = {
    "AIRFLOW_ADMIN_PASSWORD": lambda: secrets.token_hex(12),
    "POSTGRES_PASSWORD": lambda: secrets.token_hex(24),
    "MLFLOW_DB_PASSWORD": lambda: secrets.token_hex(24),
    "REDIS_PASSWORD": lambda: secrets.token_hex(24),
    "S3_ACCESS_KEY": lambda: "covid" + secrets.token_hex(8),
    "S3_SECRET_KEY": lambda: secrets.token_hex(24),
    "SEAWEEDFS_FILER_WRITE_KEY": lambda: secrets.token_hex(32),
    "SEAWEEDFS_FILER_READ_KEY": lambda: secrets.token_hex(32),
    "SEAWEEDFS_VOLUME_WRITE_KEY": lambda: secrets.token_hex(32),
    "SEAWEEDFS_VOLUME_READ_KEY": lambda: secrets.token_hex(32),
    "AIRFLOW_FERNET_KEY": lambda: base64.urlsafe_b64encode(os.urandom(32)).decode("ascii"),
    "AIRFLOW_API_SECRET_KEY": lambda: secrets.token_hex(32),
    "AIRFLOW_JWT_SECRET": lambda: secrets.token_hex(32),
    "MLFLOW_ADMIN_PASSWORD": lambda: secrets.token_hex(16),
    "MLFLOW_AIRFLOW_PASSWORD": lambda: secrets.token_hex(24),
    "MLFLOW_INFERENCE_PASSWORD": lambda: secrets.token_hex(24),
    "MLFLOW_VIEWER_PASSWORD": lambda: secrets.token_hex(16),
    "MLFLOW_FLASK_SECRET_KEY": lambda: secrets.token_hex(32),
    "DICOM_PATIENT_HASH_KEY": lambda: secrets.token_hex(32),
}


def render(example: str, uid: int | None = None) -> str:
    """``example`` with each empty credential filled in (and AIRFLOW_UID set when ``uid`` is given)."""
    out = []
    for line in example.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            key = key.strip()
            if key in GENERATED and not value.strip():
                line = f"{key}={GENERATED[key]()}"
            elif key == "AIRFLOW_UID" and uid:
                line = f"{key}={uid}"
        out.append(line)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="replace an existing .env")
    parser.add_argument("--stdout", action="store_true", help="print instead of writing .env")
    parser.add_argument("--example", type=Path, default=ROOT / ".env.example")
    parser.add_argument("--output", type=Path, default=ROOT / ".env")
    args = parser.parse_args(argv)
    uid = os.getuid() if hasattr(os, "getuid") and os.getuid() != 0 else None
    text = render(args.example.read_text(), uid)
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.output.exists() and not args.force:
        print(f"{args.output} exists; keeping it (use --force to replace it)", file=sys.stderr)
        return 1
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    print(f"wrote {args.output}; the Airflow admin password is AIRFLOW_ADMIN_PASSWORD in it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
