"""Register against a real ``mlflow server`` on loopback *and* a SQLite store: gate, champion/challenger,
alias order, lookup.

Every test runs on both stores (the ``flow`` fixture is parametrized): the REST store returns a
version number as a string, the SQL store as an int, and registry code must work with both.

One module-scoped flow runs evaluate + register four times on the same tiny data set, as four
weekly DAG runs would:

1. a good model, no champion yet           -> registered as v1, promoted (gate only);
2. a worse model at another input size     -> v2, ``challenger`` only; champion v1 scored on
                                              the same test split (resized to its 32 px);
3. a model that fails the gate             -> nothing registered, aliases unchanged;
4. a model as good as the champion         -> v3, promoted.

Alias moves are recorded (with the version's status at that moment) by wrapping the client.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from covid_tasks.config import Config
from covid_tasks.layout import DataRoot
from tests.helpers import tiny_run
from tests.helpers.mlflow_server import closed_port_uri, shared_server

pytestmark = pytest.mark.mlflow_server

MODEL = "covid-xray-classifier-register-test"
RUNS = (  # run key, model direction, gain, img_size
    ("run1_good", tiny_run.GOOD, 10.0, 32),
    ("run2_worse", tiny_run.WORSE, 10.0, 40),
    ("run3_failing", tiny_run.FAILING, 10.0, 32),
    ("run4_as_good", tiny_run.GOOD, 14.0, 32),
)


@pytest.fixture(scope="module", autouse=True)
def _boot_server(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Start the shared server at once; it boots while the first tests import TensorFlow."""
    shared_server(tmp_path_factory)


def _aliases(client: Any) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()}
    except MlflowException:
        return {}


@pytest.fixture(scope="module", params=["server", "sqlite"])
def flow(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if request.param == "server":
        url = shared_server(tmp_path_factory).url  # boots while the data and models are built
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('register_sqlite') / 'mlflow.db'}"
    root = tiny_run.make_data_root(tmp_path_factory.mktemp("register_data"))
    models = {key: tiny_run.channel_model(d, size, gain) for key, d, gain, size in RUNS}

    from mlflow import MlflowClient

    from covid_tasks.stages.evaluate import evaluate
    from covid_tasks.stages.register import register

    base = Config(data_root=str(root), mlflow_tracking_uri=url, model_name=MODEL,
                  experiment_name="register-test", batch_size=8, backbone="mobilenet_v3_small")
    client = MlflowClient(url, registry_uri=url)
    calls: list[tuple[str, str, str]] = []
    original = MlflowClient.set_registered_model_alias

    def recording(self: Any, name: str, alias: str, version: Any) -> Any:
        calls.append((alias, str(version), str(self.get_model_version(name, str(version)).status)))
        return original(self, name, alias, version)

    out: dict[str, Any] = {"root": root, "base": base, "client": client, "url": url, "runs": {}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MlflowClient, "set_registered_model_alias", recording)
        for key, _, _, size in RUNS:
            cfg = base.replace(img_size=size)
            tiny_run.write_model_run(cfg, key, models[key])
            ev = evaluate(cfg, key)
            start = len(calls)
            context = {"dataset_version": f"ds-{key}", "airflow_run_id": f"manual__{key}"}
            reg = register(cfg, key, context=context)
            out["runs"][key] = {"cfg": cfg, "evaluate": ev, "register": reg, "alias_calls": calls[start:],
                                "aliases": _aliases(client)}
    return out


def test_first_run_has_no_champion_and_is_promoted_by_the_gate(flow: dict[str, Any]) -> None:
    run = flow["runs"]["run1_good"]
    ev, reg = run["evaluate"], run["register"]
    assert ev["champion"] is None and ev["passed"] and ev["decision"] == "promote"
    assert reg["registered"] and reg["promoted"] and reg["version"] == 1
    assert run["aliases"] == {"challenger": "1", "champion": "1"}


def test_worse_challenger_is_registered_but_not_promoted(flow: dict[str, Any]) -> None:
    first, run = flow["runs"]["run1_good"], flow["runs"]["run2_worse"]
    ev, reg = run["evaluate"], run["register"]
    assert ev["passed"], ev["reasons"]  # passes the gate ...
    assert not ev["promote"] and ev["decision"] == "challenger"  # ... but is worse than the champion
    assert ev["promotion"]["rule"] == "paired_patient_bootstrap_noninferiority"
    assert any("champion v1" in r and "lower 95% bound" in r for r in ev["promotion_reasons"])
    assert ev["promotion"]["metric_deltas"]["roc_auc"]["ci95"][0] < -ev["promotion_margin"]
    assert reg["registered"] and not reg["promoted"] and reg["version"] == 2
    assert run["aliases"] == {"challenger": "2", "champion": "1"}
    # The champion was scored on the same test split, at its own 32 px and threshold.
    champ, was = ev["champion"], first["evaluate"]
    assert champ["version"] == "1" and champ["img_size"] == 32 and ev["img_size"] == 40
    for key in ("threshold", "tp", "fn", "tn", "fp", "sensitivity", "specificity", "roc_auc"):
        assert champ[key] == pytest.approx(was[key], abs=1e-6), key


def test_gate_failure_registers_nothing_and_keeps_the_champion(flow: dict[str, Any]) -> None:
    run = flow["runs"]["run3_failing"]
    ev, reg = run["evaluate"], run["register"]
    assert not ev["passed"] and ev["decision"] == "reject"
    assert not reg["registered"] and reg["version"] is None and reg["decision"] == "reject"
    assert reg["champion_version"] == "1"
    assert run["aliases"] == {"challenger": "2", "champion": "1"}
    assert run["alias_calls"] == []
    client = flow["client"]
    assert client.search_model_versions(f"name='{MODEL}' and tag.run_key='run3_failing'") == []
    mlflow_run = client.get_run(reg["mlflow_run_id"])  # the run is kept, with metrics and reason
    assert mlflow_run.data.tags["decision"] == "reject"
    assert mlflow_run.data.metrics["gate_passed"] == 0.0
    assert mlflow_run.data.metrics["test_specificity"] == pytest.approx(ev["specificity"])


def test_challenger_not_worse_than_champion_is_promoted(flow: dict[str, Any]) -> None:
    run = flow["runs"]["run4_as_good"]
    ev, reg = run["evaluate"], run["register"]
    assert ev["champion"]["version"] == "1" and ev["promote"]
    # Same ranking and decisions as the champion: every paired difference is zero.
    assert all(d == {"point": 0.0, "ci95": [0.0, 0.0]} for d in ev["promotion"]["metric_deltas"].values())
    assert reg["promoted"] and reg["version"] == 3 and reg["promotion_rule"] == ev["promotion"]["rule"]
    assert run["aliases"] == {"challenger": "3", "champion": "3"}


def test_aliases_move_in_order_only_onto_ready_versions(flow: dict[str, Any]) -> None:
    calls = {key: run["alias_calls"] for key, run in flow["runs"].items()}
    assert calls["run1_good"] == [("challenger", "1", "READY"), ("champion", "1", "READY")]
    assert calls["run2_worse"] == [("challenger", "2", "READY")]
    assert calls["run3_failing"] == []
    assert calls["run4_as_good"] == [("challenger", "3", "READY"), ("champion", "3", "READY")]
    client = flow["client"]
    version = client.get_model_version(MODEL, "2")
    assert version.tags["decision"] == "challenger"
    assert client.get_model_version(MODEL, "3").tags["decision"] == "promote"


def test_registered_version_carries_model_mapping_signature_and_tags(flow: dict[str, Any]) -> None:
    import mlflow
    from mlflow.models import Model

    run = flow["runs"]["run2_worse"]
    ev = run["evaluate"]
    version = flow["client"].get_model_version(MODEL, "2")
    tags = version.tags
    assert tags["run_key"] == "run2_worse" and tags["dataset_version"] == "ds-run2_worse"
    assert tags["gate"] == "passed" and tags["champion_compared"] == "1"
    assert float(tags["sensitivity"]) == pytest.approx(ev["sensitivity"], abs=1e-4)
    assert float(tags["specificity"]) == pytest.approx(ev["specificity"], abs=1e-4)
    assert float(tags["threshold"]) == pytest.approx(ev["threshold"], abs=1e-6)
    assert tags["min_sensitivity"] == "0.8" and tags["min_specificity"] == "0.7"

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/2", tracking_uri=flow["url"]))
    assert json.loads((local / "class_indices.json").read_text()) == {"non_covid": 0, "covid": 1}
    op = json.loads((local / "operating_point.json").read_text())
    assert op["threshold"] == ev["threshold"] and op["img_size"] == 40
    meta = Model.load(str(local))
    assert meta.signature is not None
    assert list(meta.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 40, 40, 3]
    assert meta.saved_input_example_info is not None and (local / "input_example.json").is_file()
    assert "keras" in meta.flavors and (local / "data" / "model.keras").is_file()
    # The version holds exactly the evaluated (calibrated) file, identified by content.
    from covid_tasks.storage import file_sha256

    assert file_sha256(local / "data" / "model.keras") == ev["model_sha256"] == tags["model_sha256"]
    assert op["model_sha256"] == ev["model_sha256"] and tags["content_id"]
    assert op["output"].startswith("calibrated P(covid)") and tags["calibration"] == "platt"
    assert tags["promotion_rule"] == ev["promotion"]["rule"] and tags["shortcut_audit"] in ("ok", "warning")


def test_version_records_what_it_was_trained_on(flow: dict[str, Any]) -> None:
    run = flow["runs"]["run1_good"]
    tags = flow["client"].get_model_version(MODEL, str(run["register"]["version"])).tags
    trained_on = json.loads(tags["training_data"])
    assert trained_on["images"] == 67 and trained_on["dataset_version"] == "ds-run1_good"
    assert trained_on["splits"]["val"] == {"images": 24, "covid": 12, "non_covid": 12, "patients": 24}
    assert tags["demo"] == str(trained_on["demo"]).lower()  # the default source, sample_data, from here
    params = flow["client"].get_run(run["register"]["mlflow_run_id"]).data.params
    assert params["training_images"] == "67" and params["demo"] == tags["demo"]


def test_mlflow_run_holds_params_metrics_and_artifacts(flow: dict[str, Any]) -> None:
    client = flow["client"]
    reg = flow["runs"]["run2_worse"]["register"]
    run = client.get_run(reg["mlflow_run_id"])
    params, metrics = run.data.params, run.data.metrics
    assert params["dataset_version"] == "ds-run2_worse" and params["airflow_run_id"] == "manual__run2_worse"
    assert params["n_test"] == "35" and params["n_test_covid"] == "15" and params["n_val"] == "24"
    assert params["img_size"] == "40" and params["min_sensitivity"] == "0.8" and "git_commit" in params
    assert params["champion_version_compared"] == "1" and params["gate_on"] == "point"
    assert params["n_test"] == "35" and params["calibration_method"] == "platt"
    assert {"test_sensitivity", "test_specificity", "test_roc_auc", "test_sensitivity_ci95_low",
            "test_roc_auc_ci95_high", "champion_test_sensitivity", "promote", "val_sensitivity",
            "calibration_ece_before", "calibration_ece_after", "calibration_brier_after",
            "shortcut_roc_auc_lungs_hidden", "shortcut_roc_auc_outside_hidden",
            "promotion_delta_roc_auc", "promotion_delta_sensitivity_ci95_low"} <= set(metrics)
    settings = {"test_min_sensitivity", "test_min_specificity", "test_img_size", "test_promotion_margin",
                "test_bootstrap_resamples", "test_n_test", "test_n"}
    assert not settings & set(metrics)  # settings are params, not metrics
    history = client.get_metric_history(run.info.run_id, "finetune_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.7), (2, 0.5)]  # step = the epoch the logs print
    files = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"metrics.json", "predictions.csv", "champion_predictions.csv", "class_indices.json",
            "confusion_matrix.png", "roc_curve.png", "classification_report.txt", "reliability.png",
            "shortcut_audit.png", "val_predictions.csv"} <= files
    assert "operating_point.json" not in files  # only a model version holds one
    assert run.data.tags["decision"] == "challenger" and run.data.tags["model_version"] == "2"
    assert run.data.tags["promotion_rule"] == "paired_patient_bootstrap_noninferiority"
    assert "champion v1" in run.data.tags["promotion_reason"]


def test_model_is_an_mlflow3_logged_model_linked_to_run_metrics_and_version(flow: dict[str, Any]) -> None:
    import mlflow
    import pandas as pd

    from covid_tasks.dataset import make_dataset
    from covid_tasks.layout import load_splits

    client, reg = flow["client"], flow["runs"]["run2_worse"]["register"]
    mlflow.set_tracking_uri(flow["url"])
    mlflow.set_registry_uri(flow["url"])
    info = mlflow.models.get_model_info(f"models:/{MODEL}/2")
    assert info.model_id == reg["model_id"] and info.model_id.startswith("m-")
    assert info.run_id == reg["mlflow_run_id"]
    assert client.get_model_version(MODEL, "2").source == f"models:/{reg['model_id']}"
    logged = mlflow.get_logged_model(reg["model_id"])
    assert str(logged.status).endswith("READY") and logged.source_run_id == reg["mlflow_run_id"]
    assert logged.params["img_size"] == "40" and logged.tags["content_id"] == reg["content_id"]
    linked = {m.key: m.value for m in logged.metrics}
    run = client.get_run(reg["mlflow_run_id"])
    assert linked["test_sensitivity"] == run.data.metrics["test_sensitivity"]
    assert [o.model_id for o in run.outputs.model_outputs] == [reg["model_id"]]
    # The registered model's own output is the calibrated P(covid) recorded in predictions.csv.
    model = mlflow.keras.load_model(f"models:/{MODEL}/2")
    cfg = flow["runs"]["run2_worse"]["cfg"]
    test = load_splits(DataRoot(flow["root"]))["test"]
    prob = model.predict(make_dataset(test, flow["root"] / "raw" / "images", cfg, training=False), verbose=0)
    rows = pd.read_csv(DataRoot.of(cfg).run("run2_worse").path / "predictions.csv")
    assert prob.reshape(-1) == pytest.approx(rows["prob_covid"].to_numpy(), abs=1e-6)


def test_every_written_metrics_file_matches_sklearn_on_its_predictions(flow: dict[str, Any]) -> None:
    for key, run in flow["runs"].items():
        run_dir = DataRoot.of(run["cfg"]).run(key).path
        metrics = tiny_run.load_metrics(run_dir)
        tiny_run.assert_metrics_match(metrics, run_dir / "predictions.csv")
        if metrics["champion"]:
            tiny_run.assert_metrics_match(metrics["champion"], run_dir / "champion_predictions.csv")


def test_lookup_resolves_the_champion_with_its_mapping(flow: dict[str, Any], tmp_path: Path,
                                                      monkeypatch) -> None:
    import tempfile

    import mlflow
    import numpy as np

    from covid_tasks.registry import load_champion

    # MLflow's process-wide URIs point at an empty store: the lookup must use the URI it is given.
    elsewhere = tmp_path / "elsewhere.db"
    mlflow.set_tracking_uri(f"sqlite:///{elsewhere}")
    mlflow.set_registry_uri(f"sqlite:///{elsewhere}")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    loaded = load_champion(flow["url"], name=MODEL)
    assert not elsewhere.exists()
    # The model is in memory and its download gone: a service reloading on every alias move
    # does not pile up copies.
    assert list(scratch.iterdir()) == []
    assert loaded.version == "3" and loaded.source == f"models:/{MODEL}@champion"
    assert loaded.class_indices == {"non_covid": 0, "covid": 1}
    assert loaded.threshold == flow["runs"]["run4_as_good"]["evaluate"]["threshold"]
    assert loaded.img_size == 32 and loaded.run_key == "run4_as_good"

    mlflow.set_tracking_uri(flow["url"])
    mlflow.set_registry_uri(flow["url"])
    plain = mlflow.keras.load_model(f"models:/{MODEL}@champion")  # the flavour loads it too
    batch = np.full((1, 32, 32, 3), 180.0, dtype="float32")
    assert plain.predict(batch, verbose=0) == pytest.approx(loaded.model.predict(batch, verbose=0))


def test_register_retry_does_not_register_twice(flow: dict[str, Any]) -> None:
    from covid_tasks.stages.register import register

    run = flow["runs"]["run4_as_good"]
    again = register(run["cfg"], "run4_as_good", context={"dataset_version": "ds-run4_as_good"})
    assert again["version"] == 3 and again["promoted"]
    assert again["mlflow_run_id"] == run["register"]["mlflow_run_id"]
    versions = flow["client"].search_model_versions(f"name='{MODEL}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    assert _aliases(flow["client"]) == {"challenger": "3", "champion": "3"}


def test_registry_error_fails_the_task_and_moves_no_alias(flow: dict[str, Any], monkeypatch) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    from covid_tasks.stages.evaluate import evaluate
    from covid_tasks.stages.register import register

    client = flow["client"]
    before = _aliases(client)
    cfg = flow["base"].replace(img_size=32)
    tiny_run.write_model_run(cfg, "run5_good", tiny_run.channel_model(tiny_run.GOOD, 32, 20.0))
    assert evaluate(cfg, "run5_good")["promote"]

    # 1. The registry is down: the task fails with one line naming the URI, after MLflow's
    #    retries and timeouts were bounded by the task itself (MLflow's defaults take minutes).
    from covid_tasks.registry import MLFLOW_HTTP_LIMITS, RegistryUnavailableError

    for key in MLFLOW_HTTP_LIMITS:
        monkeypatch.delenv(key, raising=False)
    down = closed_port_uri()
    with pytest.raises(RegistryUnavailableError) as failed:
        register(cfg.replace(mlflow_tracking_uri=down), "run5_good")
    message = str(failed.value)
    assert message.startswith(f"MLflow registry at {down} is unreachable (Connection refused)")
    assert "\n" not in message
    import os

    assert {key: os.environ.get(key) for key in MLFLOW_HTTP_LIMITS} == MLFLOW_HTTP_LIMITS
    # 2. The registry refuses the registration itself, after the run was logged.
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise MlflowException("registry refused the new version")

    with monkeypatch.context() as mp:
        mp.setattr(mlflow, "register_model", refuse)
        with pytest.raises(MlflowException, match="refused"):
            register(cfg, "run5_good")
    assert _aliases(client) == before
    assert client.search_model_versions(f"name='{MODEL}' and tag.run_key='run5_good'") == []
    # Airflow's retry then completes the step.
    done = register(cfg, "run5_good")
    assert done["promoted"] and done["version"] == 4
    assert _aliases(client) == {"challenger": "4", "champion": "4"}


def test_rerun_with_the_same_run_key_registers_the_new_model(flow: dict[str, Any]) -> None:
    """A run re-trained and re-evaluated under the same key gets a new version holding the new model."""
    import hashlib

    import mlflow

    from covid_tasks.stages.evaluate import evaluate
    from covid_tasks.stages.register import register

    client = flow["client"]
    first = flow["runs"]["run2_worse"]
    cfg = first["cfg"]
    old = client.get_model_version(MODEL, "2")
    latest = max(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))
    tiny_run.write_model_run(cfg, "run2_worse", tiny_run.channel_model(tiny_run.GOOD, 40, 12.0))  # re-trained
    ev = evaluate(cfg, "run2_worse")
    reg = register(cfg, "run2_worse", context={"dataset_version": "ds-run2_worse-again"})
    assert reg["registered"] and reg["version"] == latest + 1  # not the old version 2
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{reg['version']}",
                                                     tracking_uri=flow["url"]))
    assert json.loads((local / "operating_point.json").read_text())["threshold"] == ev["threshold"]
    registered = hashlib.sha256((local / "data" / "model.keras").read_bytes()).hexdigest()
    evaluated = hashlib.sha256(Path(ev["model_path"]).read_bytes()).hexdigest()
    assert registered == evaluated == ev["model_sha256"] != old.tags["model_sha256"]
    assert reg["mlflow_run_id"] != first["register"]["mlflow_run_id"]  # a new run for the new model
    new = client.get_model_version(MODEL, str(reg["version"]))
    assert new.tags["run_key"] == "run2_worse" and new.tags["content_id"] == reg["content_id"]
    assert client.get_model_version(MODEL, "2").tags["model_sha256"] == old.tags["model_sha256"]  # untouched
    again = register(cfg, "run2_worse", context={"dataset_version": "ds-run2_worse-again"})
    assert again["version"] == reg["version"] and again["mlflow_run_id"] == reg["mlflow_run_id"]
    assert again["model_id"] == reg["model_id"]


def test_a_rerun_completes_the_version_description(flow: dict[str, Any], monkeypatch) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from covid_tasks.stages.evaluate import evaluate
    from covid_tasks.stages.register import register

    client = flow["client"]
    cfg = flow["base"].replace(img_size=32)
    tiny_run.write_model_run(cfg, "run6_desc", tiny_run.channel_model(tiny_run.GOOD, 32, 16.0))
    evaluate(cfg, "run6_desc")
    before = _aliases(client)

    def lost(*args: Any, **kwargs: Any) -> Any:
        raise MlflowException("connection lost while writing the description")

    with monkeypatch.context() as mp:
        mp.setattr(MlflowClient, "update_model_version", lost)
        with pytest.raises(MlflowException, match="description"):
            register(cfg, "run6_desc")
    [version] = client.search_model_versions(f"name='{MODEL}' and tag.run_key='run6_desc'")
    assert not version.description and _aliases(client) == before  # registered, nothing moved
    done = register(cfg, "run6_desc")
    assert done["version"] == int(version.version)
    description = client.get_model_version(MODEL, version.version).description
    assert description.startswith("run run6_desc: sensitivity")


def test_lookup_errors_name_the_uri_and_create_no_store(flow: dict[str, Any], tmp_path: Path,
                                                        monkeypatch) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from covid_tasks.registry import load_champion, load_registered

    for key in ("MLFLOW_TRACKING_URI", "COVID_MLFLOW_TRACKING_URI", "COVID_DATA_ROOT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MlflowException) as missing:
        load_champion()  # outside the repository, no store configured
    assert f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}" in str(missing.value)
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns/
    with pytest.raises(MlflowException) as absent:
        load_champion(flow["url"], name="no-such-model")
    assert flow["url"] in str(absent.value) and "no-such-model@champion" in str(absent.value)
    with pytest.raises(MlflowException, match=flow["url"]):
        load_registered(f"models:/{MODEL}/999", flow["url"])


def test_every_registered_version_has_a_model_card(flow: dict[str, Any]) -> None:
    """register writes model_card.md and model_card.json into each version's own artifacts."""
    from covid_tasks.model_card import CARD, FACTS, read_artifact

    client, url = flow["client"], flow["url"]
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))
    assert versions and len(versions) >= 3
    for number in versions:
        version = client.get_model_version(MODEL, str(number))
        card = read_artifact(client, MODEL, str(number), url, CARD)
        facts = json.loads(read_artifact(client, MODEL, str(number), url, FACTS))
        assert card.startswith(f"# Model card: {MODEL} version {number}")
        assert "Research tool, not for diagnosis" in card and "## Known limits" in card
        for section in ("## Intended use", "## Training data", "## Recipe", "## Test metrics",
                        "## Within sources and subgroups", "## Calibration", "## Shortcut audit",
                        "## Data check", "## External validations"):
            assert section in card, section
        tags = version.tags
        assert f"| sensitivity | {float(tags['sensitivity']):.3f} [" in card
        assert facts["model"]["run_key"] == tags["run_key"] and facts["model"]["version"] == str(number)
        assert facts["test"]["sensitivity"] == pytest.approx(float(tags["sensitivity"]), abs=1e-4)
        assert facts["training_data"]["images"] == 67 and "PA" in facts["training_data"]["by_view"]
        assert facts["data_check"]["verdict"] == tags["data_check"]
        assert "within_source" in facts and "subgroups" in facts
    failing = flow["runs"]["run3_failing"]["register"]
    assert not failing["registered"]  # a rejected model gets no version, so no card


def test_the_card_escapes_table_separators_and_renders_without_optional_facts() -> None:
    from covid_tasks.model_card import render

    card = {"model": {"name": "m", "version": "7"},
            "training_data": {"images": 3, "splits": {}, "by_source": {"a|b <script>": {"covid": 1}}},
            "within_source": {"roc_auc": float("nan"), "n": 0, "n_sources": 0, "sources": {}}}
    text = render(card, [{"date": "2026-01-01T00:00:00", "labels": "x|y.csv", "n": 4, "n_covid": 2,
                          "n_non_covid": 2, "roc_auc": 0.75, "roc_auc_ci95": [0.5, 1.0], "run_id": "r1"}])
    assert "| a\\|b \\<script\\> | 1 | 0 |" in text and "| x\\|y\\.csv |" not in text
    assert "| x\\|y.csv |" in text
    assert "0.750 [0.500, 1.000]" in text and "ROC AUC within sources: n/a, no source" in text
    card["recipe"] = {"finetune_learning_rate": 1e-05, "lung_gate": True}
    recipe = render(card)
    assert "| finetune\\_learning\\_rate | 1e-05 |" in recipe and "| lung\\_gate | True |" in recipe


def test_the_service_s_history_reads_the_lineage_from_either_store(flow: dict[str, Any]) -> None:
    """/v1/history's source: every version in order, its tags parsed, versions as str on both stores."""
    from covid_tasks.serve.registry_views import RegistryViews, lineage
    from covid_tasks.serve.settings import ServeSettings

    settings = ServeSettings(tracking_uri=flow["url"], model_name=MODEL, poll_interval_s=3600)
    found = lineage(settings)
    numbers = [v["version"] for v in found["versions"]]
    assert numbers == sorted(numbers, key=int) and all(isinstance(n, str) for n in numbers)
    assert found["champion"] == _aliases(flow["client"])["champion"]
    first = found["versions"][0]
    tags = flow["client"].get_model_version(MODEL, "1").tags
    assert first["roc_auc"] == pytest.approx(float(tags["roc_auc"]))
    ci = [float(x) for x in tags["roc_auc_ci95"].strip("[]").split(",")]
    assert first["roc_auc_ci95"] == pytest.approx(ci)
    assert first["training_images"] == 67 and first["dataset_version"] == "ds-run1_good"
    assert first["decision"] == tags["decision"] and first["data_check"] == tags["data_check"]
    champion = next(v for v in found["versions"] if v["champion_now"])
    assert champion["version"] == found["champion"] and "champion" in champion["aliases"]
    views = RegistryViews(settings, clock=lambda: 0.0)
    assert views.history() == found and views.history() is views.history()  # cached for the poll interval
    missing = lineage(ServeSettings(tracking_uri=flow["url"], model_name="no-such-model"))
    assert missing["versions"] == [] and missing["champion"] is None
