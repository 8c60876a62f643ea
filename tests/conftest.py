"""Test-wide set-up: an isolated Airflow home and no leaked COVID_* settings.

Airflow reads its configuration when first imported, so the environment is fixed here,
before any test module imports it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
SHARED_DATA = REPO.parent / "shared" / "data"

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="covid-test-airflow-"))
for _key in [k for k in os.environ if k.startswith("COVID_")]:
    del os.environ[_key]  # `make test` exports the make-run defaults; tests set their own
os.environ.update({
    "AIRFLOW_HOME": str(_AIRFLOW_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "MPLBACKEND": "Agg",
})


#: The longest test files (an ``airflow dags test`` run or a trained service each), collected first:
#: ``make test`` hands whole files to its workers in collection order, and a long file handed out
#: last would leave one worker idle while the other finishes it.
LONGEST_FIRST = ("tests/dags/test_dag_run.py", "tests/dags/test_dag_dicom.py", "tests/code/test_serve_api.py",
                 "tests/code/test_dicom_service.py", "tests/dags/test_local_airflow.py",
                 "tests/code/test_register.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.path).relative_to(REPO).as_posix(), len(rank)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)


@pytest.fixture
def sample_raw(tmp_path: Path) -> Path:
    """A data root whose raw/ holds a copy of the shipped sample data set."""
    shutil.copytree(SAMPLE / "images", tmp_path / "raw" / "images")
    shutil.copy(SAMPLE / "metadata.csv", tmp_path / "raw" / "metadata.csv")
    return tmp_path


@pytest.fixture(autouse=True)
def _restore_mlflow_uris():
    """Tests and stages set MLflow's process-wide URIs; put them back after every test."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    before = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    yield
    tracking_utils._tracking_uri, registry_utils._registry_uri = before
