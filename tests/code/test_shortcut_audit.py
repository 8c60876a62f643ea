"""Shortcut audit: a model that reads a corner marker is flagged; one that reads the lung region is not.

Both models are really trained (a small CNN, 32 px) on synthetic noise images whose covid class
carries its signal either in a bright corner marker, outside the audit's central lung box, or as
a texture inside that box. ``evaluate`` then scores the test split with the lungs hidden and
with everything else hidden.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from covid_tasks.config import Config
from tests.helpers import tiny_run


def _audit(tmp_path: Path, signal: str, **cfg_kw) -> dict:
    from covid_tasks.stages.evaluate import evaluate

    root = tiny_run.make_audit_data_root(tmp_path / signal, signal)
    cfg = Config(data_root=str(root), mlflow_tracking_uri=f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}",
                 img_size=32, batch_size=32, min_sensitivity=0.5, min_specificity=0.5, **cfg_kw)
    tiny_run.write_model_run(cfg, "run", tiny_run.train_small_cnn(root, cfg))
    return evaluate(cfg, "run")


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _audit(tmp_path_factory.mktemp("audit"), "corner_marker")


def test_a_model_reading_a_corner_marker_is_flagged(marker: dict, caplog: pytest.LogCaptureFixture) -> None:
    audit = marker["shortcut_audit"]
    assert marker["roc_auc"] > 0.95  # it learned the marker
    assert audit["roc_auc_full"] == marker["roc_auc"]
    assert audit["roc_auc_lungs_hidden"] >= 0.9  # the marker is still there
    assert audit["roc_auc_outside_hidden"] < 0.7  # hiding the outside removes it
    assert audit["flagged"] and "lungs hidden" in audit["warning"]
    assert audit["region"].startswith("central box of 70% of each side")
    # Warn only by default: the gate passed and the first model is promoted anyway.
    assert marker["passed"] and marker["promote"] and not audit["blocks_promotion"]
    run_dir = Path(marker["metrics_path"]).parent
    assert (run_dir / "shortcut_audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import pandas as pd

    from covid_tasks.stats import weighted_auc

    rows = pd.read_csv(run_dir / "predictions.csv")  # the audit's figures are reproducible from it
    y = (rows["label"] == "covid").astype(int).to_numpy()
    hidden = weighted_auc(y, rows["prob_covid_lungs_hidden"].to_numpy(), [[1.0] * len(y)])[0]
    assert hidden == pytest.approx(audit["roc_auc_lungs_hidden"])


def test_a_model_reading_the_lung_region_is_not_flagged(tmp_path: Path) -> None:
    result = _audit(tmp_path, "central_texture")
    audit = result["shortcut_audit"]
    assert result["roc_auc"] > 0.95  # it learned the texture
    assert audit["roc_auc_lungs_hidden"] < 0.7 and not audit["flagged"] and audit["warning"] is None
    assert audit["roc_auc_outside_hidden"] > 0.95  # the texture is inside the box


def test_the_audit_can_block_promotion(marker: dict, tmp_path: Path) -> None:
    """With ``shortcut_blocks_promotion`` the same flagged model passes the gate but is not promoted."""
    from covid_tasks.stages.evaluate import evaluate

    run_dir = Path(marker["metrics_path"]).parent
    root = run_dir.parents[1]
    cfg = Config(data_root=str(root), mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", img_size=32,
                 batch_size=32, min_sensitivity=0.5, min_specificity=0.5, shortcut_blocks_promotion=True)
    blocked = evaluate(cfg, "run")
    assert blocked["passed"] and not blocked["promote"] and blocked["decision"] == "challenger"
    assert blocked["promotion"]["rule"] == "shortcut_audit"
    assert json.loads((run_dir / "metrics.json").read_text())["promotion"]["rule"] == "shortcut_audit"
