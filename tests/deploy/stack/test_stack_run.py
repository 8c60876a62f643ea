"""The distributed stack, run for real (`make stack-test`): CeleryExecutor, Postgres, Redis, SeaweedFS,
MLflow with basic auth, a `default` and a `gpu` Celery worker, all as local processes.

One forced run is triggered through the REST API on the sample data in S3 at tiny settings, and
two faults hit it on the way:

1. while `train` runs, the `gpu` worker is killed with SIGKILL (its whole process tree, as a
   crash of its machine would) and started again: the scheduler fails the orphaned try once its
   heartbeat stops, and the retry runs on the restarted `gpu` worker;
2. as soon as `evaluate` has succeeded the MLflow server is stopped: `register` fails with an
   error naming the registry, is retried, and once the server is back registers exactly one
   version.

Then the run must have succeeded with every task, `train`/`finetune` on the `gpu` worker and the
rest on the `default` worker; the version's files must be in the S3 artifact bucket; `predict`
must load `models:/covid-xray-classifier@champion` through the MLflow server as the `inference`
user (who may not move the alias); the read-only users' take-over attempts (issue 19 item 2) must
all get 403 and change nothing; and a second, unforced run must stop after `pull`.
Finally `python -m stack down` must leave none of the stack's processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from urllib.request import quote

import pytest

from tests.deploy.stack.conftest import REPO, stack_cli

DAG = "covid_retraining"
MODEL = "covid-xray-classifier"
# Tiny settings; the gate is forced open (0.0) so that the run registers a version.
CONF = {"img_size": 32, "epochs": 1, "finetune_epochs": 1, "batch_size": 16,
        "backbone": "mobilenet_v3_small", "weights": "none",
        "min_sensitivity": 0.0, "min_specificity": 0.0}
GPU_TASKS = {"train", "finetune"}
ALL_TASKS = {"pull", "check_new_data", "relabel", "check_data", "split", "train", "finetune", "evaluate",
             "register", "outcome"}
RUN_TIMEOUT_S = 900


def _state(api, run_id: str, task_id: str) -> dict:
    return api.tis(DAG, run_id)[task_id]


def _mlflow_client(settings, user_var: str, password_var: str):
    """An MlflowClient of the stack's server logged in as one of the users of the env file."""
    os.environ["MLFLOW_TRACKING_USERNAME"] = settings.env[user_var]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = settings.env[password_var]
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    from mlflow import MlflowClient

    uri = settings.url("mlflow")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def faulty_run(api, settings, stack_home, fresh_registry) -> dict:
    """Trigger the forced run and inject both faults; returns what the tests check.

    ``fresh_registry`` first tries the read-only users' take-over on the untouched registry."""
    began = time.monotonic()
    run_id = api.trigger(DAG, {**CONF, "force": True})
    # 1. SIGKILL the gpu worker while train runs (give it a few seconds inside the task).
    api.wait("train running", lambda: _state(api, run_id, "train")["state"] == "running", 600)
    time.sleep(8)
    assert _state(api, run_id, "train")["state"] == "running", "train ended before the worker was killed"
    killed = stack_cli(stack_home, "kill", "airflow-worker-gpu", timeout=120)
    assert killed.returncode == 0, killed.stderr
    restarted = stack_cli(stack_home, "start", "airflow-worker-gpu", timeout=300)
    assert restarted.returncode == 0, restarted.stderr
    # 2. Stop MLflow as soon as evaluate is done, so register meets a registry that is down.
    api.wait("evaluate success",
             lambda: _state(api, run_id, "evaluate")["state"] in ("success", "failed"), RUN_TIMEOUT_S, 0.3)
    stopped = stack_cli(stack_home, "stop", "mlflow", timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    first = api.wait("register's first try to fail",
                     lambda: _register_first_try(api, run_id), 300, 0.5)
    started = stack_cli(stack_home, "start", "mlflow", timeout=300)
    assert started.returncode == 0, started.stderr
    run = api.wait("the run to end", lambda: _ended(api, run_id), RUN_TIMEOUT_S, 2.0)
    print(f"\nforced run with both faults: {time.monotonic() - began:.0f} s")
    return {"run_id": run_id, "run": run, "register_first_try": first,
            "register_first_log": api.log(DAG, run_id, "register", 1)}


def _ended(api, run_id: str) -> dict | None:
    run = api.run(DAG, run_id)
    return run if run["state"] in ("success", "failed") else None


def _register_first_try(api, run_id: str) -> dict | None:
    for t in api.tries(DAG, run_id, "register"):
        if t["try_number"] == 1 and t["state"] in ("failed", "up_for_retry"):
            return t
    ti = _state(api, run_id, "register")
    if ti["try_number"] == 1 and ti["state"] in ("up_for_retry", "failed"):
        return ti
    return None


def test_the_run_survives_both_faults_and_every_task_succeeds(api, faulty_run):
    run_id = faulty_run["run_id"]
    tis = api.tis(DAG, run_id)
    assert faulty_run["run"]["state"] == "success", {t: ti["state"] for t, ti in tis.items()}
    assert set(tis) == ALL_TASKS
    assert {t: ti["state"] for t, ti in tis.items()} == {t: "success" for t in ALL_TASKS}


def test_gpu_tasks_ran_on_the_gpu_worker_and_the_rest_on_the_default_worker(api, faulty_run):
    tis = api.tis(DAG, faulty_run["run_id"])
    for task_id, ti in tis.items():
        if task_id in GPU_TASKS:
            assert (ti["queue"], ti["pool"], ti["hostname"]) == ("gpu", "gpu", "airflow-worker-gpu"), ti
        else:
            assert (ti["queue"], ti["hostname"]) == ("default", "airflow-worker"), ti


def test_train_was_retried_after_the_gpu_worker_was_killed(api, faulty_run):
    run_id = faulty_run["run_id"]
    tries = {t["try_number"]: t for t in api.tries(DAG, run_id, "train")}
    final = _state(api, run_id, "train")
    assert final["try_number"] >= 2 and final["state"] == "success"
    assert tries[1]["state"] == "failed" and tries[1]["hostname"] == "airflow-worker-gpu", tries[1]


def test_register_failed_clearly_while_mlflow_was_down_then_registered_once(api, faulty_run, settings):
    run_id = faulty_run["run_id"]
    port = str(settings.port("STACK_PORT_MLFLOW"))
    log = faulty_run["register_first_log"]
    assert port in log and ("Connection refused" in log or "Max retries exceeded" in log), log[-3000:]
    final = _state(api, run_id, "register")
    assert final["try_number"] >= 2 and final["state"] == "success"
    client = _mlflow_client(settings, "MLFLOW_VIEWER_USER", "MLFLOW_VIEWER_PASSWORD")
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert len(versions) == 1, [(v.version, v.tags) for v in versions]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == versions[0].version
    assert champion.tags.get("run_key"), champion.tags


def test_the_model_s_artifacts_are_in_the_s3_artifact_bucket(settings, faulty_run):
    import boto3

    s3 = boto3.client("s3", endpoint_url=settings.url("s3"), region_name="us-east-1",
                      aws_access_key_id=settings.env["S3_ACCESS_KEY"],
                      aws_secret_access_key=settings.env["S3_SECRET_KEY"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
            for o in page.get("Contents", [])]
    names = {k.rsplit("/", 1)[-1] for k in keys}
    assert {"model.keras", "class_indices.json", "operating_point.json"} <= names, sorted(keys)[:50]
    assert not any(k.startswith("/") or ".." in k for k in keys)


def test_predict_loads_the_champion_through_mlflow_as_the_inference_user(settings, faulty_run):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "COVID_"))}
    env.update(PYTHONPATH=str(REPO), COVID_MLFLOW_TRACKING_URI=settings.url("mlflow"),
               MLFLOW_TRACKING_USERNAME=settings.env["MLFLOW_INFERENCE_USER"],
               MLFLOW_TRACKING_PASSWORD=settings.env["MLFLOW_INFERENCE_PASSWORD"],
               TF_CPP_MIN_LOG_LEVEL="2")
    image = REPO / "sample_data" / "images" / "00cfd1c1.jpg"
    out = subprocess.run([sys.executable, "-m", "covid_tasks", "predict", str(image),
                          "--model", f"models:/{MODEL}@champion"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "(version 1)" in out.stdout and "Class : " in out.stdout, out.stdout


def test_relabel_hashed_patient_ids_with_the_stack_s_secret_key(settings, faulty_run):
    report = json.loads((settings.home / "data" / "relabel_report.json").read_text())
    assert report["from_header"]["patient_hash_key"] == "site secret", report["from_header"]
    key = settings.home / "secrets" / "patient_hash_key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert settings.env["DICOM_PATIENT_HASH_KEY"] not in json.dumps(report)


def test_the_inference_user_cannot_move_the_champion(settings, faulty_run):
    from mlflow.exceptions import MlflowException

    client = _mlflow_client(settings, "MLFLOW_INFERENCE_USER", "MLFLOW_INFERENCE_PASSWORD")
    with pytest.raises(MlflowException, match="(?i)permission|403"):
        client.set_registered_model_alias(MODEL, "champion", "1")


@pytest.mark.parametrize("role", ["INFERENCE", "VIEWER"])
def test_read_only_users_cannot_take_over_the_registered_champion(settings, faulty_run, role):
    from tests.deploy.stack.conftest import mlflow_login
    from tests.helpers import registry_attacks

    url, admin = settings.url("mlflow"), mlflow_login(settings, "ADMIN")
    before = registry_attacks.snapshot(url, admin)
    assert ("champion", "1") in before["model"]["aliases"] and len(before["versions"]) == 1, before
    attempts = registry_attacks.take_over(url, mlflow_login(settings, role))
    assert attempts == dict.fromkeys(attempts, 403), attempts
    assert registry_attacks.snapshot(url, admin) == before


def test_a_second_unforced_run_stops_after_pull(api, settings, faulty_run):
    run_id = api.trigger(DAG, {**CONF, "force": False})
    run = api.wait("the unforced run to end", lambda: _ended(api, run_id), 600, 2.0)
    states = {t: ti["state"] for t, ti in api.tis(DAG, run_id).items()}
    assert run["state"] == "success", states
    assert states["pull"] == "success" and states["check_new_data"] == "success", states
    assert {states[t] for t in ALL_TASKS - {"pull", "check_new_data", "outcome"}} == {"skipped"}, states
    assert states["outcome"] == "success", states  # it says why: "skipped: no new or changed data ..."
    outcome = api.call("GET", f"/dags/{DAG}/dagRuns/{quote(run_id, safe='')}/taskInstances/outcome/"
                       "xcomEntries/return_value?deserialize=true&stringify=false")["value"]
    assert outcome["decision"] == "skipped" and "no new or changed data" in outcome["summary"], outcome
    client = _mlflow_client(settings, "MLFLOW_VIEWER_USER", "MLFLOW_VIEWER_PASSWORD")
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 1


def test_every_port_of_the_stack_listens_on_loopback_only(stack_home, faulty_run):
    import psutil

    from stack import procs

    listening = {}
    for name, rec in procs.State(stack_home).read().items():
        for pid in rec.members():
            try:
                conns = psutil.Process(pid).net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in conns:
                if c.status == psutil.CONN_LISTEN:
                    listening.setdefault(name, set()).add((c.laddr.ip, c.laddr.port))
    assert {"postgres", "redis", "s3", "mlflow", "airflow-apiserver"} <= set(listening), listening
    wide = {n: a for n, addrs in listening.items() for a in addrs if a[0] != "127.0.0.1" or a[1] >= 55000}
    assert not wide, f"listening beyond 127.0.0.1 or above 54999: {wide}"


def test_stack_down_leaves_no_process_of_the_stack(stack_home, settings, faulty_run):
    if os.environ.get("STACK_TEST_HOME"):
        pytest.skip("STACK_TEST_HOME keeps the stack running")
    from stack import procs
    from stack.settings import PORTS

    recorded = procs.State(stack_home).read()
    assert set(recorded) >= {"postgres", "redis", "s3", "mlflow", "airflow-worker", "airflow-worker-gpu"}
    members = {name: {pid: procs.start_time(pid) for pid in rec.members()} for name, rec in recorded.items()}
    assert all(members.values()), {n: m for n, m in members.items() if not m}
    down = stack_cli(stack_home, "down", timeout=300)
    print("\n" + down.stderr)
    assert down.returncode == 0, down.stdout + down.stderr
    left = {pid for pids in members.values() for pid, started in pids.items()
            if started is not None and procs.start_time(pid) == started}
    assert not left, f"processes of the stack still running after down: {sorted(left)}"
    assert procs.State(stack_home).read() == {}
    from tests.helpers.s3_server import port_is_free

    busy = [settings.port(n) for n in PORTS if not port_is_free(settings.port(n))]
    assert not busy, f"ports still taken after down: {busy}"
