"""Errors no retry can fix fail a task at once; transient ones (S3, MLflow) keep their retries.

`covid_tasks.airflow_support.classify` is checked on the project's real exceptions, then a small
DAG whose tasks raise through the same `fail_fast` wrapper as the pipeline's tasks runs under
`airflow dags test` with 2 retries each, and every task's tries are counted.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from covid_tasks.airflow_support import classify

REPO = Path(__file__).resolve().parents[2]

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the exception is what the test inspects
        return exc
    raise AssertionError("no exception")


def test_configuration_and_data_errors_are_permanent(tmp_path: Path) -> None:
    from covid_tasks.config import Config
    from covid_tasks.model import WeightsUnavailableError
    from covid_tasks.storage import require_file

    cases = {
        "bad Param": _raised(lambda: Config.from_env({"img_size": 8})),
        "missing input": _raised(lambda: require_file(tmp_path / "metrics.json", "evaluate")),
        "missing weights": WeightsUnavailableError("no resnet50 weights"),
        "empty class": ValueError("relabel left no image of class(es) ['non_covid']"),
        "corrupt json": _raised(lambda: json.loads("{")),
    }
    for what, exc in cases.items():
        assert classify(exc)[0] == "permanent", what


def test_outages_are_transient_and_the_unknown_keeps_retries() -> None:
    from botocore.exceptions import EndpointConnectionError

    from covid_tasks.registry import RegistryUnavailableError

    def wrapped() -> None:
        try:
            raise ConnectionRefusedError("refused")
        except ConnectionRefusedError as exc:
            raise ValueError("could not parse the answer") from exc

    assert classify(RegistryUnavailableError("mlflow down"))[0] == "transient"
    assert classify(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))[0] == "transient"
    assert classify(_raised(wrapped))[0] == "transient"  # a transient cause wins over ValueError
    assert classify(RuntimeError("surprise")) == ("unknown", "unexpected error")
    flagged = ValueError("flagged")
    flagged.retryable = True  # type: ignore[attr-defined]
    assert classify(flagged)[0] == "transient"


def test_mlflow_unreachable_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    exc = _raised(lambda: MlflowClient(f"http://127.0.0.1:{_free_port()}").search_experiments())
    assert classify(exc)[0] == "transient", exc


HARNESS = '''
import datetime
import os
from pathlib import Path

from airflow.sdk import dag, task


def _try(name, fn):
    from covid_tasks.airflow_support import fail_fast

    with fail_fast(name):
        with (Path(os.environ["RETRY_COUNTS"]) / name).open("a") as f:
            f.write("x")
        fn()


def _bad_param():
    from covid_tasks.config import Config

    Config.from_env({"img_size": 8})


def _missing_input():
    from covid_tasks.storage import require_file

    require_file(Path(os.environ["RETRY_COUNTS"]) / "metrics.json", "evaluate")


def _registry_down():
    from covid_tasks.registry import RegistryUnavailableError

    raise RegistryUnavailableError("cannot reach http://mlflow:5000")


def _surprise():
    raise RuntimeError("unexpected")


@dag(schedule=None, catchup=False, default_args={"retries": 2, "retry_delay": datetime.timedelta(0)})
def retry_harness():
    for name, fn in {"bad_param": _bad_param, "missing_input": _missing_input,
                     "registry_down": _registry_down, "surprise": _surprise}.items():
        task(task_id=name)(lambda name=name, fn=fn: _try(name, fn))()


retry_harness()
'''


def test_permanent_errors_fail_in_one_try_transient_ones_are_retried(
        tmp_path: Path, airflow_db: dict[str, str]) -> None:
    dags, counts = tmp_path / "dags", tmp_path / "counts"
    dags.mkdir()
    counts.mkdir()
    (dags / "retry_harness.py").write_text(textwrap.dedent(HARNESS))
    env = {**airflow_db, "AIRFLOW__CORE__DAGS_FOLDER": str(dags), "RETRY_COUNTS": str(counts)}
    out = subprocess.run([str(BIN / "airflow"), "dags", "test", "retry_harness"], env=env,
                         capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    tries = {p.name: len(p.read_text()) for p in counts.iterdir()}
    assert tries == {"bad_param": 1, "missing_input": 1, "registry_down": 3, "surprise": 3}, log[-6000:]
    assert "not retried: bad configuration or data" in log


def test_mlflow_s_own_messages_keep_their_level_in_a_task_log() -> None:
    """MLflow writes its INFO lines to stderr through a handler of its own, and Airflow files a task's
    stderr as ERROR; after quiet_mlflow_logging they reach the root logger as INFO, not stderr."""
    code = (
        "import io, logging, sys\n"
        "from covid_tasks.airflow_support import quiet_mlflow_logging\n"
        "records = []\n"
        "class Keep(logging.Handler):\n"
        "    def emit(self, r): records.append((r.levelname, r.getMessage()))\n"
        "logging.getLogger().addHandler(Keep()); logging.getLogger().setLevel(logging.INFO)\n"
        "if sys.argv[1] == 'quiet': quiet_mlflow_logging()\n"
        "import mlflow\n"
        "sys.stderr = io.StringIO()\n"
        "logging.getLogger('mlflow.tracking._model_registry.fluent').info('Created version 2 of model m.')\n"
        "print(records, repr(sys.stderr.getvalue()), file=sys.stdout)\n"
    )
    import os

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_CONFIGURE_LOGGING"}
    loud = subprocess.run([sys.executable, "-c", code, "loud"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    quiet = subprocess.run([sys.executable, "-c", code, "quiet"], capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=120)
    assert "Created version 2" in loud.stdout and "[]" in loud.stdout  # MLflow's default: stderr only
    assert "('INFO', 'Created version 2 of model m.')" in quiet.stdout
    assert "''" in quiet.stdout  # nothing on stderr
