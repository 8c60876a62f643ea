"""Authentication and exposure of the stack (issue 16, item 2; issue 19, items 2 and 5).

Reads docker-compose.yaml and the remote-worker override: MLflow must run docker/mlflow_auth.py's
app ``covid-basic-auth`` with the users of .env, the Airflow tasks must log in to it, SeaweedFS
must expose only its S3 API (no WebDAV, Iceberg or Lance; master, volume and filer bound to the
container's loopback, the filer's and master's HTTP APIs off, JWT signing keys for the filer and
volume servers; tests/deploy/test_seaweed_security.py runs it), and the remote worker's log
server must not listen on every interface. Then starts a real ``mlflow server`` through
docker/mlflow_auth.py (SQLite backend) and checks who may do what: the experiment and the
registered model exist from the start, owned by the ``airflow`` user; the read-only users
(``inference``, ``viewer``) get 403 on every step of a registry take-over, before and after a
registration; anonymous requests get 401; the ``airflow`` user may log runs, artifacts and
versions and move the alias; the admin keeps every right.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from stack import compose
from tests.helpers import registry_attacks
from tests.helpers.procs import stop_group

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yaml"
sys.path.insert(0, str(ROOT / "docker"))
import make_env  # noqa: E402
import mlflow_app  # noqa: E402
import mlflow_auth  # noqa: E402


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    out = compose.env_file(make_env.render((ROOT / ".env.example").read_text(), uid=1000))
    out.update(STACK_HOST_IP="10.20.30.40", WORKER_HOSTNAME="gpu2", WORKER_BIND_IP="10.20.30.41",
               NFS_SERVER="10.20.30.50", NFS_EXPORT="/export")
    return out


@pytest.fixture(scope="module")
def services(env) -> dict:
    return compose.interpolate(compose.load(COMPOSE), env)["services"]


# --------------------------------------------------------------------------- what the compose file says
def mlflow_problems(svc: dict, airflow_env: dict) -> list[str]:
    """Why an mlflow service definition would accept unauthenticated requests (empty when fine)."""
    argv = compose.args(svc.get("entrypoint")) + compose.args(svc.get("command"))
    out = []
    if compose.flag(argv, "--app-name") != mlflow_app.APP_NAME:
        out.append(f"mlflow server runs without --app-name={mlflow_app.APP_NAME} (basic auth, and "
                   "read-only users refused every change)")
    if not any(a.endswith("mlflow_auth.py") for a in argv):
        out.append("the users of .env are not set up (docker/mlflow_auth.py is not the entrypoint)")
    senv = svc.get("environment", {})
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AIRFLOW_PASSWORD", "MLFLOW_INFERENCE_PASSWORD",
                 "MLFLOW_VIEWER_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        if not senv.get(name):
            out.append(f"mlflow service lacks {name}")
    if not (airflow_env.get("MLFLOW_TRACKING_USERNAME") and airflow_env.get("MLFLOW_TRACKING_PASSWORD")):
        out.append("the Airflow services have no MLflow login")
    return out


#: security.toml keys (as WEED_* variables) that make the filer and volume servers refuse unsigned requests.
SEAWEED_JWT_KEYS = ("WEED_JWT_FILER_SIGNING_KEY", "WEED_JWT_FILER_SIGNING_READ_KEY", "WEED_JWT_SIGNING_KEY",
                    "WEED_JWT_SIGNING_READ_KEY")


def _bool_flag(argv: list[str], name: str) -> bool:
    """Whether a Go boolean flag ends up on (``-name``, ``-name=true``; the last one wins)."""
    on = False
    for arg in argv:
        if arg == name:
            on = True
        elif arg.startswith(name + "="):
            on = arg.split("=", 1)[1].lower() in ("1", "t", "true")
    return on


def seaweed_problems(svc: dict) -> list[str]:
    """Why an s3 service would expose more than the S3 API (empty when fine)."""
    argv = compose.args(svc.get("command"))
    mode = argv[0] if argv else ""
    out = []
    webdav = compose.flag(argv, "-webdav")
    if (mode == "mini" and webdav != "false") or (webdav not in (None, "false")):
        out.append("WebDAV is enabled")
    if mode == "server" and "-webdav" in argv:
        out.append("WebDAV is enabled")
    for port in ("-s3.port.iceberg", "-s3.port.lance"):
        if compose.flag(argv, port) != "0":
            out.append(f"{port} is not 0 (Iceberg REST / Lance accept unauthenticated writes)")
    if compose.flag(argv, "-ip.bind") not in ("127.0.0.1", "localhost"):
        out.append("master, volume and filer listen on the network (-ip.bind)")
    if mode == "mini" and compose.flag(argv, "-admin.ui") != "false":
        out.append("the admin UI is enabled")
    if not _bool_flag(argv, "-filer.disableHttp"):
        out.append("the filer's HTTP API is on (-filer.disableHttp): anonymous uploads into the buckets")
    if not _bool_flag(argv, "-disableHttp"):
        out.append("the master's HTTP API is on (-disableHttp): anonymous /dir/assign and /col/delete")
    env = svc.get("environment") or {}
    missing = [key for key in SEAWEED_JWT_KEYS if not env.get(key)]
    if missing:
        out.append(f"no JWT signing key {', '.join(missing)}: the filer and volume servers take "
                   "unsigned requests")
    elif len({env[key] for key in SEAWEED_JWT_KEYS}) != len(SEAWEED_JWT_KEYS):
        out.append("the SeaweedFS JWT signing keys are not all different")
    return out


def test_compose_mlflow_requires_authentication(services):
    assert mlflow_problems(services["mlflow"], services["airflow-worker"]["environment"]) == []
    assert services["airflow-worker"]["environment"]["MLFLOW_TRACKING_USERNAME"] == "airflow"


def test_the_mlflow_check_fails_on_an_unauthenticated_server(services):
    """The old, unauthenticated definition is caught, and so is MLflow's plain basic-auth app."""
    bare = {"entrypoint": ["/usr/bin/dumb-init", "--", "mlflow", "server"],
            "command": ["--host=0.0.0.0", "--port=5000"], "environment": {}}
    problems = mlflow_problems(bare, {})
    assert any("basic-auth" in p for p in problems) and any("no MLflow login" in p for p in problems)
    plain = {**services["mlflow"], "command": ["mlflow", "server", "--app-name=basic-auth"]}
    assert any("read-only" in p for p in mlflow_problems(plain, services["airflow-worker"]["environment"]))


@pytest.mark.parametrize(("method", "path", "change"), [
    ("GET", "/api/2.0/mlflow/registered-models/alias", False),
    ("HEAD", "/api/2.0/mlflow-artifacts/artifacts/1/x", False),
    ("POST", "/api/2.0/mlflow/runs/search", False),
    ("POST", "/ajax-api/2.0/mlflow/runs/search", False),
    ("POST", "/graphql", False),
    ("POST", "/api/2.0/mlflow/experiments/create", True),
    ("POST", "/api/2.0/mlflow/runs/search/", True),  # not exactly a search endpoint: a change
    ("POST", "/gateway/proxy/x/mlflow/runs/search", True),
    ("POST", "/api/2.0/mlflow/logged-models", True),
    ("PUT", "/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/x", True),
    ("PATCH", "/api/2.0/mlflow/registered-models/update", True),
    ("DELETE", "/api/2.0/mlflow/registered-models/delete", True),
    ("POST", "/v1/traces", True),
])
def test_what_the_read_only_guard_counts_as_a_change(method, path, change):
    assert mlflow_app.is_change(method, path) is change


def test_the_read_only_guard_needs_its_users():
    with pytest.raises(RuntimeError, match=mlflow_app.USERS_VAR):
        mlflow_app.read_only_users({})
    assert mlflow_app.read_only_users({mlflow_app.USERS_VAR: "inference, viewer"}) == {"inference", "viewer"}
    assert mlflow_auth.read_only_users({}) == ["inference", "viewer"]
    assert mlflow_app.basic_login("Basic " + base64.b64encode(b"viewer:pw:x").decode()) == ("viewer", "pw:x")
    assert mlflow_app.basic_login("Bearer abc") is None and mlflow_app.basic_login("Basic !!") is None


def test_compose_seaweedfs_exposes_only_s3(services):
    assert seaweed_problems(services["s3"]) == []
    assert [p.split(":")[-1] for p in services["s3"]["ports"]] == ["8333"]


def test_the_seaweedfs_check_fails_on_webdav_and_an_open_filer(services):
    old = {"command": ["mini", "-dir=/data", "-ip=127.0.0.1", "-ip.bind=0.0.0.0", "-admin.ui=false"]}
    problems = seaweed_problems(old)
    assert "WebDAV is enabled" in problems
    assert any("-ip.bind" in p for p in problems) and any("iceberg" in p for p in problems)
    assert "WebDAV is enabled" in seaweed_problems({"command": ["server", "-webdav", "-ip.bind=127.0.0.1"]})
    # the definition before issue 19: filer and master HTTP APIs on, no JWT keys
    s3 = services["s3"]
    before = {"command": [a for a in s3["command"] if "disableHttp" not in a],
              "environment": {k: v for k, v in s3["environment"].items() if not k.startswith("WEED_")}}
    problems = seaweed_problems(before)
    assert any("-filer.disableHttp" in p for p in problems) and any("-disableHttp" in p for p in problems)
    assert any("WEED_JWT_FILER_SIGNING_KEY" in p for p in problems)
    same = {**s3, "environment": {**s3["environment"], **dict.fromkeys(SEAWEED_JWT_KEYS, "k" * 32)}}
    assert seaweed_problems(same) == ["the SeaweedFS JWT signing keys are not all different"]
    turned_off = seaweed_problems({**s3, "command": [*s3["command"], "-filer.disableHttp=false"]})
    assert len(turned_off) == 1 and "-filer.disableHttp" in turned_off[0]


def test_remote_worker_log_server_binds_to_the_private_interface(env):
    override = compose.interpolate(compose.load(ROOT / "docker" / "remote-worker.yaml"), env)
    for name, svc in override["services"].items():
        for port in svc.get("ports", []):
            parts = str(port).split(":")
            assert len(parts) == 3 and parts[0] == env["WORKER_BIND_IP"], \
                f"{name} publishes {port} on all interfaces"


def test_every_published_port_is_bound_to_bind_ip(services):
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond BIND_IP"


def test_mlflow_auth_refuses_weak_settings():
    good = {"MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32,
            "MLFLOW_AUTH_ADMIN_PASSWORD": "a" * 20, "MLFLOW_AIRFLOW_PASSWORD": "b" * 20,
            "MLFLOW_INFERENCE_PASSWORD": "c" * 20, "MLFLOW_VIEWER_PASSWORD": "d" * 20}
    assert mlflow_auth.problems(good) == []
    assert "MLFLOW_AIRFLOW_PASSWORD is empty" in mlflow_auth.problems({**good, "MLFLOW_AIRFLOW_PASSWORD": ""})
    assert mlflow_auth.problems({**good, "MLFLOW_VIEWER_PASSWORD": "short"})
    assert mlflow_auth.problems({**good, "MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"})
    assert mlflow_auth.problems({**good, "MLFLOW_VIEWER_USER": "airflow"})  # two roles, one user


# --------------------------------------------------------------------------- a real server
API = registry_attacks.API
MODEL = registry_attacks.MODEL
READ_ONLY = ("inference", "viewer")
USERS = {"admin": ("mlflow-admin", "admin-pw-0123456789"), "airflow": ("airflow", "airflow-pw-0123456789"),
         "inference": ("inference", "inference-pw-0123456789"), "viewer": ("viewer", "viewer-pw-0123456789")}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, services):
    """docker/mlflow_auth.py starting a real ``mlflow server`` with compose's ``--app-name``."""
    from tests.helpers.mlflow_server import free_port, mlflow_binary

    root = tmp_path_factory.mktemp("mlflow_auth")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_BACKEND_STORE_URI=f"sqlite:///{root / 'mlflow.db'}",
               MLFLOW_AUTH_CONFIG_PATH=str(root / "auth" / "basic_auth.ini"),
               MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key-0123456789",
               MLFLOW_AUTH_ADMIN_USERNAME=USERS["admin"][0], MLFLOW_AUTH_ADMIN_PASSWORD=USERS["admin"][1],
               MLFLOW_AIRFLOW_PASSWORD=USERS["airflow"][1], MLFLOW_INFERENCE_PASSWORD=USERS["inference"][1],
               MLFLOW_VIEWER_PASSWORD=USERS["viewer"][1], MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               MLFLOW_DISABLE_TELEMETRY="true")
    app_name = compose.flag(compose.args(services["mlflow"]["command"]), "--app-name")
    cmd = [sys.executable, str(ROOT / "docker" / "mlflow_auth.py"), mlflow_binary(), "server",
           f"--app-name={app_name}", "--host=127.0.0.1", f"--port={port}", "--workers=1",
           f"--artifacts-destination={root / 'artifacts'}"]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield url, root
    finally:
        stop_group(proc, 10.0, kill_wait=10.0)
        log.close()


def _call(url: str, path: str, body: dict | None, user: str | None) -> tuple[int, dict]:
    """(HTTP status, JSON body) of one MLflow REST call as ``user`` (``None``: anonymous)."""
    status, out = registry_attacks.call(url, "POST" if body is not None else "GET", path,
                                        USERS[user] if user else None, body)
    return status, out or {}


@pytest.fixture(scope="module")
def fresh_registry(auth_server) -> dict:
    """Issue 19 item 2 on a fresh server, before the pipeline's first registration: the registry
    as the admin sees it, then the take-over attempts of both read-only users, then the registry."""
    url, _ = auth_server
    before = registry_attacks.snapshot(url, USERS["admin"])
    attempts = {user: registry_attacks.take_over(url, USERS[user]) for user in READ_ONLY}
    return {"before": before, "attempts": attempts, "after": registry_attacks.snapshot(url, USERS["admin"])}


@pytest.mark.mlflow_server
def test_the_model_and_the_experiment_exist_from_the_start_owned_by_the_pipeline(auth_server, fresh_registry):
    url, _ = auth_server
    before = fresh_registry["before"]
    assert before["model"] == {"name": MODEL, "aliases": []} and before["versions"] == []
    assert registry_attacks.EXPERIMENT in before["experiments"]
    admin = USERS["admin"]
    status, exp = _call(url, f"{API}/experiments/get-by-name?experiment_name={registry_attacks.EXPERIMENT}",
                        None, "admin")
    assert status == 200
    exp_id = exp["experiment"]["experiment_id"]
    assert registry_attacks.permission(url, admin, "registered_model", MODEL, "airflow") == "MANAGE"
    assert registry_attacks.permission(url, admin, "experiment", exp_id, "airflow") == "MANAGE"
    for user in READ_ONLY:
        assert registry_attacks.permission(url, admin, "registered_model", MODEL, user) == "READ"
        assert registry_attacks.permission(url, admin, "experiment", exp_id, user) == "READ"


@pytest.mark.mlflow_server
@pytest.mark.parametrize("user", READ_ONLY)
def test_read_only_users_cannot_take_over_a_fresh_registry(fresh_registry, user):
    attempts = fresh_registry["attempts"][user]
    assert attempts == dict.fromkeys(attempts, 403), attempts
    assert fresh_registry["after"] == fresh_registry["before"]


@pytest.mark.mlflow_server
def test_mlflow_server_refuses_anonymous_and_read_only_alias_changes(auth_server, fresh_registry):
    """What the DAG does, as the ``airflow`` user, still works; nobody else may move the alias."""
    url, root = auth_server
    assert oct((root / "auth" / "basic_auth.ini").stat().st_mode & 0o777) == "0o600"
    model = {"name": MODEL}
    assert _call(url, f"{API}/registered-models/create", model, None)[0] == 401
    assert _call(url, f"{API}/registered-models/get?name={MODEL}", None, "airflow")[0] == 200
    status, exp = _call(url, f"{API}/experiments/get-by-name?experiment_name={registry_attacks.EXPERIMENT}",
                        None, "airflow")
    assert status == 200
    exp_id = exp["experiment"]["experiment_id"]
    status, run = _call(url, f"{API}/runs/create", {"experiment_id": exp_id}, "airflow")
    assert status == 200
    run_id = run["run"]["info"]["run_id"]
    artifact = f"/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/model/MLmodel"
    assert registry_attacks.call(url, "PUT", artifact, USERS["airflow"], data=b"flavors: {}\n")[0] == 200
    logged = {"experiment_id": exp_id, "name": "model", "source_run_id": run_id}
    assert _call(url, f"{API}/logged-models", logged, "airflow")[0] == 200
    source = f"mlflow-artifacts:/{exp_id}/{run_id}/artifacts/model"
    version = {"name": MODEL, "source": source, "run_id": run_id}
    assert _call(url, f"{API}/model-versions/create", version, "airflow")[0] == 200
    alias = {"name": MODEL, "alias": "champion", "version": "1"}
    assert _call(url, f"{API}/registered-models/alias", alias, None)[0] == 401
    assert _call(url, f"{API}/registered-models/alias", alias, "inference")[0] == 403
    assert _call(url, f"{API}/registered-models/alias", alias, "viewer")[0] == 403
    assert _call(url, f"{API}/registered-models/alias", alias, "airflow")[0] == 200
    get = f"{API}/registered-models/alias?name={MODEL}&alias=champion"
    assert _call(url, get, None, "inference") == (200, _call(url, get, None, "viewer")[1])
    assert _call(url, get, None, "inference")[1]["model_version"]["version"] == "1"
    assert _call(url, get, None, None)[0] == 401
    assert _call(url, "/health", None, None)[0] == 200


@pytest.mark.mlflow_server
@pytest.mark.parametrize("user", READ_ONLY)
def test_read_only_users_cannot_take_over_a_registered_model(auth_server, user):
    """Once the pipeline has registered a champion, the same attempts change nothing either."""
    url, _ = auth_server
    before = registry_attacks.snapshot(url, USERS["admin"])
    assert before["model"]["aliases"] == [("champion", "1")], before
    attempts = registry_attacks.take_over(url, USERS[user])
    assert attempts == dict.fromkeys(attempts, 403), attempts
    assert registry_attacks.snapshot(url, USERS["admin"]) == before


@pytest.mark.mlflow_server
def test_read_only_users_still_read_and_the_admin_keeps_every_right(auth_server):
    url, _ = auth_server
    for user in READ_ONLY:
        assert _call(url, f"{API}/runs/search", {"experiment_ids": ["0"]}, user)[0] == 200
        assert _call(url, "/graphql", {"query": "{ test { output } }"}, user)[0] == 200
    status, _ = _call(url, f"{API}/experiments/create", {"name": "made-by-the-admin"}, "admin")
    assert status == 200
    alias = {"name": MODEL, "alias": "rollback", "version": "1"}
    assert _call(url, f"{API}/registered-models/alias", alias, "admin")[0] == 200
