"""Config: defaults, environment, overrides and validation."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from covid_tasks.config import (
    CLASS_NAMES,
    ENV_NOT_FIELD_PREFIXES,
    ENV_NOT_FIELDS,
    RENAMED_FIELDS,
    Config,
    class_indices,
    safe_run_key,
)
from covid_tasks.layout import DataRoot


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
    ("gate_on", "median", "gate_on"),
    ("calibration", "isotonic", "calibration"),
    ("promotion_margin", 1.5, "promotion_margin"),
    ("shortcut_auc_limit", -0.1, "shortcut_auc_limit"),
])
def test_invalid_values_raise(field, value, match):
    with pytest.raises(ValueError, match=match):
        Config(**{field: value})


@pytest.mark.parametrize("overrides", [{"img_sise": 32}, {"not_a_field": 1, "epochs": 2}])
def test_unknown_override_is_refused_with_the_valid_fields(overrides):
    """A typo in ``--set img_sise=32`` or a DAG run's conf must not be ignored silently."""
    bad = next(k for k in overrides if k not in {f.name for f in dataclasses.fields(Config)})
    with pytest.raises(ValueError, match=f"unknown config field.*{bad}") as err:
        Config.from_env(overrides)
    for name in ("img_size", "epochs", "data_root", "max_image_pixels"):  # the valid ones are listed
        assert name in str(err.value)
    with pytest.raises(ValueError, match="unknown config field"):
        Config().replace(not_a_field=1)


def test_unknown_covid_environment_variable_is_refused(monkeypatch):
    monkeypatch.setenv("COVID_IMG_SISE", "32")
    with pytest.raises(ValueError, match="COVID_IMG_SISE") as err:
        Config.from_env()
    assert "COVID_IMG_SIZE" in str(err.value)  # the valid variables are listed


def test_deployment_variables_that_are_not_fields_are_allowed(monkeypatch):
    """Variables the stack, the images and the tests set today keep working."""
    for name in [*ENV_NOT_FIELDS, "COVID_SERVE_POLL_S", "COVID_K8S_GPU_IMAGE"]:
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("COVID_S3_CONN_ID", "my_s3")
    assert Config.from_env().s3_conn_id == "my_s3"


def test_every_covid_variable_the_repository_sets_is_known():
    """Grep the deployment files and tests: each COVID_* name is a field or on the allow list."""
    repo = Path(__file__).resolve().parents[2]
    files = [repo / n for n in ("Makefile", "docker-compose.yaml", ".env.example", "README.md")]
    suffixes = ("", ".py", ".sh", ".yaml", ".yml", ".md", ".env", ".txt")
    files += [p for d in ("docker", "tests", "dags", "covid_tasks", "benchmarks", "scripts", ".ci")
              for p in (repo / d).rglob("*") if p.is_file() and p.suffix in suffixes]
    files += sorted((repo / "docs").glob("*.md"))
    fields = {"COVID_" + f.name.upper() for f in dataclasses.fields(Config)}
    fields |= {"COVID_" + old.upper() for old in RENAMED_FIELDS}
    names = set()
    for path in files:
        if path.is_file() and path != Path(__file__).resolve():  # this file spells typos on purpose
            names |= set(re.findall(r"\bCOVID_[A-Z][A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")))
    constants = {"COVID_MEAN", "COVID_SYNONYMS", "COVID_LIKE"}  # Python names, not variables
    typos = {"COVID_IMG_SISE"}  # docs/pipeline.md's example of a refused variable
    unknown = sorted(n for n in names - fields - set(ENV_NOT_FIELDS) - constants - typos
                     if not n.startswith(ENV_NOT_FIELD_PREFIXES))
    assert not unknown, f"COVID_* variables that Config.from_env would refuse: {unknown}"


def test_renamed_pixel_limit_is_still_accepted(monkeypatch):
    monkeypatch.setenv("COVID_PULL_MAX_IMAGE_PIXELS", "1000000")
    assert Config.from_env().max_image_pixels == 1_000_000
    assert Config.from_env({"pull_max_image_pixels": 2_000_000}).max_image_pixels == 2_000_000


def test_to_dict_is_json_and_round_trips():
    cfg = Config(img_size=64)
    again = Config.from_env(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_run_dir_is_inside_data_root(tmp_path):
    cfg = Config(data_root=str(tmp_path))
    run = DataRoot.of(cfg).run("manual__2026-01-01T00:00:00+00:00").path
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


def test_decision_settings_defaults_and_strings():
    cfg = Config()
    assert (cfg.gate_on, cfg.promotion_margin, cfg.calibration) == ("point", 0.05, "platt")
    assert (cfg.shortcut_auc_limit, cfg.shortcut_blocks_promotion) == (0.70, False)
    cfg = Config.from_env({"gate_on": "lower_bound", "shortcut_blocks_promotion": "true"})
    assert cfg.gate_on == "lower_bound" and cfg.shortcut_blocks_promotion is True
