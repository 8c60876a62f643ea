"""Upload a dataset folder (``metadata.csv`` + ``images/``) to the stack's S3 store.

Run inside the stack, where the S3 endpoint and key pair are in the environment
(the ``airflow-cli`` service of docker-compose.yaml has them)::

    docker compose run --rm -v /srv/covid-chestxray-dataset:/import:ro \\
        airflow-cli python /opt/covid/bin/upload_dataset.py /import s3://covid-xray/incoming

Only ``metadata.csv`` and the files under ``images/`` are sent. ``metadata.csv`` is always sent;
an image whose object already has the same size is skipped, so a second run is quick.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].startswith("s3://"):
        print("usage: upload_dataset.py FOLDER s3://bucket/prefix", file=sys.stderr)
        return 2
    import boto3

    src = Path(argv[0])
    if not (src / "metadata.csv").is_file():
        print(f"{src}/metadata.csv not found: the folder must hold metadata.csv and images/", file=sys.stderr)
        return 1
    url = urlparse(argv[1])
    bucket, prefix = url.netloc, url.path.strip("/")
    s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    files = [src / "metadata.csv"] + sorted(p for p in (src / "images").rglob("*") if p.is_file())
    sent = skipped = 0
    for path in files:
        key = "/".join(filter(None, [prefix, path.relative_to(src).as_posix()]))
        if path.name != "metadata.csv":
            try:
                if s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == path.stat().st_size:
                    skipped += 1
                    continue
            except s3.exceptions.ClientError:
                pass  # not there yet
        s3.upload_file(str(path), bucket, key)
        sent += 1
    print(f"uploaded {sent} file(s), {skipped} unchanged, to s3://{bucket}/{prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
