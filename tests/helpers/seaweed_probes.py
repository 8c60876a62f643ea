"""What a local user without the S3 keys tries on a SeaweedFS ``weed server`` (issue 19, item 5).

Every port of ``weed server`` listens on 127.0.0.1, which any local user (and any web page, for a
form POST) can reach. These probes try, without credentials: the filer's HTTP API (upload a file
into the bucket the pipeline pulls from, read and list one), the master's HTTP API (get a file id,
delete a bucket's volumes), a volume server upload, and ``weed filer.copy`` (the filer's gRPC API
plus a volume upload). Each returns what came back, so a test can assert that it was refused.

Used by tests/deploy/test_seaweed_security.py (the compose file's s3 service, run for real) and
tests/deploy/stack (the process stack).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tests.helpers.s3_server import port_is_free, weed_binary

HOST = "127.0.0.1"


def http(method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None
         ) -> tuple[int | str, bytes]:
    """(status, first 2 KB of the body); the status is the error's text when nothing answered."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(2048)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(2048)
    except OSError as exc:
        return f"no answer: {exc}", b""


def multipart(filename: str, content: bytes) -> tuple[bytes, dict[str, str]]:
    """A ``curl -F file=@...`` body and its headers."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def filer_upload(filer_port: int, path: str, content: bytes) -> tuple[int | str, bytes]:
    """``curl -F file=@x.jpg http://127.0.0.1:<filer>/<path>``."""
    body, headers = multipart(path.rsplit("/", 1)[-1], content)
    return http("POST", f"http://{HOST}:{filer_port}/{path.lstrip('/')}", body, headers)


def filer_read(filer_port: int, path: str) -> tuple[int | str, bytes]:
    return http("GET", f"http://{HOST}:{filer_port}/{path.lstrip('/')}")


def filer_list(filer_port: int, folder: str) -> tuple[int | str, bytes]:
    return http("GET", f"http://{HOST}:{filer_port}/{folder.strip('/')}/",
                headers={"Accept": "application/json"})


def master_assign(master_port: int) -> tuple[int | str, bytes]:
    """``POST /dir/assign``: a file id (and, with volume JWTs, its write token) for anybody who asks."""
    return http("POST", f"http://{HOST}:{master_port}/dir/assign")


def master_delete_collection(master_port: int, collection: str) -> tuple[int | str, bytes]:
    """``POST /col/delete``: drops every volume of a bucket (its objects' data)."""
    return http("POST", f"http://{HOST}:{master_port}/col/delete?collection={collection}")


def volume_upload(volume_port: int, master_port: int) -> list[tuple[int | str, bytes]]:
    """Uploads to the volume server: with the file id and token the master handed out (when it
    did), and with made-up file ids in the first volumes; returns every answer."""
    out = []
    status, raw = master_assign(master_port)
    body, headers = multipart("planted.bin", b"planted on the volume server")
    if status == 200:
        assigned = json.loads(raw)
        token = {"Authorization": f"BEARER {assigned['auth']}"} if assigned.get("auth") else {}
        out.append(http("POST", f"http://{assigned['url']}/{assigned['fid']}", body, {**headers, **token}))
    for volume in (1, 2, 3):
        fid = f"{volume},{random.getrandbits(40):010x}{random.getrandbits(32):08x}"
        out.append(http("POST", f"http://{HOST}:{volume_port}/{fid}", body, headers))
    return out


def grpc_copy(filer_port: int, folder: str, content: bytes) -> subprocess.CompletedProcess:
    """``weed filer.copy FILE http://127.0.0.1:<filer>/<folder>/``: the filer's gRPC API (port + 10000)
    to create the entry, a volume server upload for the data. Run from an empty folder without the
    stack's settings, as another local user would."""
    with tempfile.TemporaryDirectory() as tmp:
        planted = Path(tmp) / "planted-by-grpc.jpg"
        planted.write_bytes(content)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEED_")}
        env.update(TMPDIR=tmp, HOME=tmp)
        return subprocess.run([weed_binary() or "weed", "filer.copy", str(planted),
                               f"http://{HOST}:{filer_port}/{folder.strip('/')}/"],
                              capture_output=True, text=True, timeout=120, cwd=tmp, env=env)


def free_port_base(offsets: list[int]) -> int:
    """A base whose ``base + offset`` ports are all free (20000..34000, so port + 10000 < 45000)."""
    for _ in range(200):
        base = random.randrange(20000, 34000, 20)
        if all(port_is_free(base + o) for o in offsets):
            return base
    raise RuntimeError("no free block of loopback ports")

