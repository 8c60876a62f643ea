"""Upload a dataset folder (``metadata.csv`` + ``images/``) to the stack's S3 store.

Run inside the stack, where the S3 endpoint and key pair are in the environment
(the ``airflow-cli`` service of docker-compose.yaml has them)::

    docker compose run --rm -v /srv/covid-chestxray-dataset:/import:ro \\
        airflow-cli python /opt/covid/bin/upload_dataset.py /import s3://covid-xray/incoming

Only ``metadata.csv`` and the files under ``images/`` are sent, with the key rules ``pull`` applies
(:func:`covid_tasks.sources.check_key`): hidden files are skipped, and a symbolic link (to a file
or a folder) or an unsafe name (``..``, a backslash, a control character) is refused: the upload
stops before sending anything and names each one, so a link cannot send a file from outside the
folder. An object is skipped only when its content is the same: its ``sha256`` metadata (written
by this script) or, for objects uploaded otherwise, its single-part ETag (the MD5) must match the
local file; a same-size file with other bytes is sent again. Exit status: 0 done, 1 refused or
failed, 2 usage.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from covid_tasks.sources import METADATA_KEY, check_key
from covid_tasks.storage import UnsafePathError

CHUNK = 1 << 20


def collect(src: Path) -> tuple[list[Path], list[str]]:
    """The files to upload and the reasons for refusing others, without following any link.

    Args:
        src: the dataset folder.

    Returns:
        ``(files, refused)``: regular files (``metadata.csv`` first, then ``images/`` sorted)
        and one line per refused entry.
    """
    files: list[Path] = []
    refused: list[str] = []
    for top in (src / METADATA_KEY, src / "images"):
        if top.is_symlink():
            refused.append(f"{top}: a symbolic link (pull refuses links; copy the target in)")
    if refused:
        return files, refused
    files.append(src / METADATA_KEY)
    for dirpath, dirnames, filenames in os.walk(src / "images", followlinks=False):
        base = Path(dirpath)
        for name in sorted(dirnames) + sorted(filenames):
            path = base / name
            st = path.lstat()
            rel = path.relative_to(src).as_posix()
            if stat.S_ISLNK(st.st_mode):
                refused.append(f"{path}: a symbolic link (pull refuses links; copy the target in)")
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            try:
                wanted = check_key(rel)
            except UnsafePathError as exc:
                refused.append(f"{path}: {exc}")
                continue
            if wanted is None:
                continue  # hidden files, as pull ignores them
            if not stat.S_ISREG(st.st_mode):
                refused.append(f"{path}: not a regular file")
                continue
            files.append(path)
    return files, refused


def digests(fh: Any) -> tuple[str, str]:
    """``(sha256, md5)`` hex digests of an open binary file, read from the start; rewinds it."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    fh.seek(0)
    for chunk in iter(lambda: fh.read(CHUNK), b""):
        sha.update(chunk)
        md5.update(chunk)
    fh.seek(0)
    return sha.hexdigest(), md5.hexdigest()


def open_nofollow(path: Path) -> Any:
    """Open a file for reading; a file swapped for a link since :func:`collect` is not read."""
    return os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb")


def same_content(head: dict[str, Any], sha256: str, md5: str) -> bool:
    """Whether an object's ``head_object`` answer shows the same bytes as the local file."""
    recorded = (head.get("Metadata") or {}).get("sha256")
    if recorded:
        return recorded == sha256
    etag = str(head.get("ETag", "")).strip('"')
    return "-" not in etag and etag == md5  # a multipart ETag is not an MD5: send again


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].startswith("s3://"):
        print("usage: upload_dataset.py FOLDER s3://bucket/prefix", file=sys.stderr)
        return 2
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    src = Path(argv[0])
    if not (src / METADATA_KEY).is_file():
        print(f"{src}/{METADATA_KEY} not found: the folder must hold {METADATA_KEY} and images/",
              file=sys.stderr)
        return 1
    files, refused = collect(src)
    if refused:
        for line in refused:
            print(f"refused: {line}", file=sys.stderr)
        print(f"nothing uploaded: {len(refused)} entry(ies) refused", file=sys.stderr)
        return 1
    url = urlparse(argv[1])
    bucket, prefix = url.netloc, url.path.strip("/")
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    s3 = boto3.client("s3", endpoint_url=endpoint,
                      config=Config(s3={"addressing_style": "path"}) if endpoint else None)
    sent = skipped = 0
    for path in files:
        key = "/".join(filter(None, [prefix, path.relative_to(src).as_posix()]))
        with open_nofollow(path) as fh:
            sha256, md5 = digests(fh)
            try:
                if same_content(s3.head_object(Bucket=bucket, Key=key), sha256, md5):
                    skipped += 1
                    continue
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                    raise
            s3.upload_fileobj(fh, bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}})
        sent += 1
    print(f"uploaded {sent} file(s), {skipped} unchanged, to s3://{bucket}/{prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
