"""Config: defaults, environment, overrides and validation."""

from __future__ import annotations

import json

import pytest

from covid_tasks.config import CLASS_NAMES, Config, class_indices, safe_run_key


def test_class_order_is_fixed():
    assert CLASS_NAMES == ("non_covid", "covid")
    assert class_indices() == {"non_covid": 0, "covid": 1}


def test_precedence_defaults_env_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("COVID_IMG_SIZE", "96")
    monkeypatch.setenv("COVID_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("COVID_EPOCHS", "7")
    cfg = Config.from_env({"epochs": 3, "batch_size": None, "source_uri": ""})
    assert cfg.img_size == 96  # environment
    assert cfg.epochs == 3  # override wins
    assert cfg.batch_size == Config().batch_size  # None keeps the default
    assert cfg.source_uri == Config().source_uri  # empty keeps the default
    assert cfg.data_root == str(tmp_path)


def test_coercion_from_strings(monkeypatch):
    cfg = Config.from_env({"views": "PA, AP ,AP Supine", "split_fractions": "0.6,0.2,0.2", "force": "true",
                           "min_sensitivity": "0.9"})
    assert cfg.views == ("PA", "AP", "AP Supine")
    assert cfg.split_fractions == (0.6, 0.2, 0.2)
    assert cfg.force is True and cfg.min_sensitivity == 0.9


@pytest.mark.parametrize("field,value,match", [
    ("backbone", "vgg16", "backbone"),
    ("img_size", 16, "img_size"),
    ("min_sensitivity", 1.5, "min_sensitivity"),
    ("split_fractions", (0.5, 0.5, 0.5), "split_fractions"),
    ("batch_size", 0, "batch_size"),
])
def test_invalid_values_raise(field, value, match):
    with pytest.raises(ValueError, match=match):
        Config(**{field: value})


def test_unknown_override_is_ignored_but_unknown_replace_raises():
    assert Config.from_env({"not_a_field": 1}) == Config.from_env()
    with pytest.raises(ValueError, match="unknown config field"):
        Config().replace(not_a_field=1)


def test_to_dict_is_json_and_round_trips():
    cfg = Config(img_size=64)
    again = Config.from_env(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_run_dir_is_inside_data_root(tmp_path):
    cfg = Config(data_root=str(tmp_path))
    run = cfg.run_dir("manual__2026-01-01T00:00:00+00:00")
    assert run.parent == tmp_path / "runs"
    assert safe_run_key("../../etc") == "etc"
    with pytest.raises(ValueError):
        safe_run_key("../..")


def test_default_tracking_uri_is_local_sqlite(tmp_path):
    cfg = Config(data_root=str(tmp_path / "data"))
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert Config(mlflow_tracking_uri="http://mlflow:5000").tracking_uri == "http://mlflow:5000"


def test_bundled_weights_need_an_efficientnet_lite_backbone():
    """Caught when the config is built (the first task), not after pull, relabel and split."""
    with pytest.raises(ValueError, match="weights 'bundled' exist only for the efficientnet_lite backbones"):
        Config(backbone="resnet50", weights="bundled")
    assert Config(backbone="efficientnet_lite0", weights="bundled").weights == "bundled"
