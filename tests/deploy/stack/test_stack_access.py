"""Who may change what on the running stack, before the pipeline's first run (issue 19, items 2 and 5).

MLflow: at start the stack has created the pipeline's experiment and registered model, owned
(MANAGE) by the ``airflow`` user; the read-only users (``inference``, ``viewer``) get 403 on
every step of the take-over the issue describes (experiment, run, artifact upload, logged model,
registered model, version, ``champion`` alias, delete) and the registry stays as it was. That
the ``airflow`` user can still do everything the DAG does is shown by test_stack_run.py's run.

S3 store (SeaweedFS): without the S3 keys nothing gets in or out: the filer's HTTP API (the
issue's ``curl -F file=@x.jpg .../buckets/covid-xray/incoming/images/planted.jpg``), the master's
HTTP API, the volume server and ``weed filer.copy`` over gRPC are refused, while S3 with the keys
serves the sample data the pipeline pulls.
"""

from __future__ import annotations

import pytest

from tests.deploy.stack.conftest import mlflow_login
from tests.helpers import registry_attacks
from tests.helpers import seaweed_probes as probe

BUCKET = "covid-xray"
SAMPLE = "incoming/metadata.csv"  # uploaded by `python -m stack up` (COVID_SOURCE_URI)


def _refused(status: int | str) -> bool:
    return not (isinstance(status, int) and 200 <= status < 300)


@pytest.fixture(scope="module")
def s3(settings):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=settings.url("s3"), region_name="us-east-1",
                        aws_access_key_id=settings.env["S3_ACCESS_KEY"],
                        aws_secret_access_key=settings.env["S3_SECRET_KEY"],
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))


def _exists(s3, key: str) -> bool:
    try:
        s3.head_object(Bucket=BUCKET, Key=key)
        return True
    except s3.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


# --------------------------------------------------------------------------- MLflow
def test_the_model_and_the_experiment_exist_from_the_start_owned_by_the_pipeline(settings, fresh_registry):
    before = fresh_registry["before"]
    assert before["model"] == {"name": registry_attacks.MODEL, "aliases": []} and before["versions"] == []
    assert registry_attacks.EXPERIMENT in before["experiments"]
    url, admin = settings.url("mlflow"), mlflow_login(settings, "ADMIN")
    path = f"{registry_attacks.API}/experiments/get-by-name?experiment_name={registry_attacks.EXPERIMENT}"
    status, exp = registry_attacks.call(url, "GET", path, admin)
    assert status == 200, exp
    exp_id = exp["experiment"]["experiment_id"]
    owner = settings.env["MLFLOW_AIRFLOW_USER"]
    model = registry_attacks.MODEL
    assert registry_attacks.permission(url, admin, "registered_model", model, owner) == "MANAGE"
    assert registry_attacks.permission(url, admin, "experiment", exp_id, owner) == "MANAGE"


@pytest.mark.parametrize("role", ["INFERENCE", "VIEWER"])
def test_read_only_users_cannot_take_over_the_fresh_registry(fresh_registry, role):
    attempts = fresh_registry["attempts"][role]
    assert attempts == dict.fromkeys(attempts, 403), attempts
    assert fresh_registry["after"] == fresh_registry["before"]


# --------------------------------------------------------------------------- S3 store
def test_an_anonymous_filer_upload_is_refused_and_never_reaches_s3(settings, s3):
    key = "incoming/images/planted.jpg"
    port = settings.port("STACK_PORT_S3_FILER")
    status, body = probe.filer_upload(port, f"buckets/{BUCKET}/{key}", b"planted")
    assert _refused(status), (status, body)
    assert not _exists(s3, key)


def test_anonymous_filer_reads_and_listings_are_refused(settings, s3):
    port = settings.port("STACK_PORT_S3_FILER")
    content = s3.get_object(Bucket=BUCKET, Key=SAMPLE)["Body"].read()
    assert content
    for status, body in (probe.filer_read(port, f"buckets/{BUCKET}/{SAMPLE}"),
                         probe.filer_list(port, f"buckets/{BUCKET}/incoming")):
        assert _refused(status), (status, body)
        assert content[:200] not in body and b"metadata.csv" not in body, body


def test_the_master_and_volume_servers_refuse_anonymous_requests(settings, s3):
    master = settings.port("STACK_PORT_S3_MASTER")
    status, body = probe.master_assign(master)
    assert _refused(status), (status, body)
    answers = probe.volume_upload(settings.port("STACK_PORT_S3_VOLUME"), master)
    assert answers and all(_refused(status) for status, _ in answers), answers
    status, body = probe.master_delete_collection(master, BUCKET)
    assert _refused(status), (status, body)
    assert s3.get_object(Bucket=BUCKET, Key=SAMPLE)["Body"].read()


def test_grpc_refuses_a_client_without_the_stack_s_certificate(settings, s3):
    port = settings.port("STACK_PORT_S3_FILER")
    done = probe.grpc_copy(port, f"buckets/{BUCKET}/incoming/images", b"planted")
    assert done.returncode != 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert not _exists(s3, "incoming/images/planted-by-grpc.jpg")
