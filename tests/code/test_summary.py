"""``make run``'s closing summary: one ``Registered:`` line per version, naming each alias it carries."""

from __future__ import annotations

from pathlib import Path

from covid_tasks.config import Config
from covid_tasks.summary import summary


def test_one_line_per_version_with_every_alias(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    name = "covid-xray-classifier"
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, source=str(tmp_path), tags={"sensitivity": "0.8", "run_key": "r"})
    cfg = Config(data_root=str(tmp_path / "data"), mlflow_tracking_uri=uri)
    client.set_registered_model_alias(name, "champion", "1")
    client.set_registered_model_alias(name, "challenger", "1")
    text, result = summary(cfg)
    registered = [line for line in text.splitlines() if line.startswith("Registered:")]
    assert registered == [f"Registered: {name} version 1 is @champion and @challenger (sensitivity 0.8, "
                          "specificity None, run r)"]
    assert result["champion_version"] == result["challenger_version"] == 1
    client.set_registered_model_alias(name, "challenger", "2")
    text, _ = summary(cfg)
    registered = [line for line in text.splitlines() if line.startswith("Registered:")]
    assert [line.split(" (")[0] for line in registered] == [f"Registered: {name} version 1 is @champion",
                                                           f"Registered: {name} version 2 is @challenger"]
