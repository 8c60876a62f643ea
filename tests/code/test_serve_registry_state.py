"""A local registry that is gone or broken is reported as such, never as a reachable empty one (item 10).

The service follows a SQLite store; the store is then moved away, replaced by garbage, or was never
there. ``/readyz`` must say the registry cannot be read (``reachable: false``, with the reason), and
no look-up may create an empty store in its place.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, empty MLflow SQLite store (made once; each test works on a copy)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("registry_state") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the schema
    return path


def _readyz(uri: str, before: Any = None) -> tuple[dict[str, Any], Any]:
    from fastapi.testclient import TestClient

    from covid_tasks.serve.app import create_app
    from covid_tasks.serve.model_holder import ModelHolder
    from covid_tasks.serve.settings import ServeSettings

    settings = ServeSettings(tracking_uri=uri)
    holder = ModelHolder(settings)
    if before is not None:
        holder.refresh()
        before(holder)
    holder.refresh()
    response = TestClient(create_app(settings, holder)).get("/readyz")
    assert response.status_code == 503
    return response.json(), holder


def test_a_working_store_without_a_champion_is_reachable(store: Path, tmp_path: Path) -> None:
    path = Path(shutil.copy(store, tmp_path / "mlflow.db"))
    body, _ = _readyz(f"sqlite:///{path}")
    assert body["registry"]["reachable"] is True and "no champion yet" in body["reason"]


def test_a_store_that_never_existed_is_unreachable_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "mlflow.db"
    body, _ = _readyz(f"sqlite:///{path}")
    assert body["registry"]["reachable"] is False
    assert f"{path} does not exist" in body["registry"]["error"] and "unreachable" in body["reason"]
    assert not path.exists() and not path.parent.exists()


def test_a_store_moved_away_while_served_is_unreachable_and_not_recreated(store: Path, tmp_path: Path
                                                                         ) -> None:
    path = Path(shutil.copy(store, tmp_path / "mlflow.db"))
    states = []

    def move(holder: Any) -> None:
        states.append(holder.status()["registry"]["reachable"])
        path.rename(tmp_path / "moved.db")

    body, _ = _readyz(f"sqlite:///{path}", before=move)
    assert states == [True]
    assert body["registry"]["reachable"] is False and f"{path} does not exist" in body["registry"]["error"]
    assert not path.exists()  # MLflow would have made a new, empty store there


@pytest.mark.parametrize("content", [b"", b"this is not a database\n" * 100, "other"],
                         ids=["empty file", "garbage", "another sqlite database"])
def test_a_store_replaced_by_something_else_is_reported_broken(store: Path, tmp_path: Path,
                                                              content: Any) -> None:
    path = Path(shutil.copy(store, tmp_path / "mlflow.db"))

    def replace(holder: Any) -> None:
        path.unlink()
        if content == "other":
            with sqlite3.connect(path) as db:
                db.execute("CREATE TABLE notes (text TEXT)")
        else:
            path.write_bytes(content)

    body, _ = _readyz(f"sqlite:///{path}", before=replace)
    assert body["registry"]["reachable"] is False, body
    error = body["registry"]["error"]
    assert "not an MLflow store" in error or "cannot be read" in error, error
    if content == "other":  # nothing was written to it
        with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"notes"}
    else:
        assert path.read_bytes() == content


def test_tasks_still_read_a_missing_store_as_no_champion_but_fail_on_a_broken_one(tmp_path: Path) -> None:
    from covid_tasks.registry import RegistryUnavailableError, alias_version

    missing = tmp_path / "none.db"
    assert alias_version("m", "champion", f"sqlite:///{missing}") is None  # first run: no store yet
    assert not missing.exists()
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"garbage" * 50)
    with pytest.raises(RegistryUnavailableError, match="cannot be read"):
        alias_version("m", "champion", f"sqlite:///{broken}")
