"""Evaluate: metrics from hand-made confusion matrices, the swapped-report regression, intervals,
the plain threshold rule, and the files the stage writes (calibrated model, operating point).

Every ``metrics.json`` + ``predictions.csv`` pair written here is recomputed from the CSV with
scikit-learn (``tests.helpers.tiny_run.assert_metrics_match``) and must agree.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, classification_report, recall_score, roc_auc_score

from covid_tasks.config import Config
from covid_tasks.layout import DataRoot
from covid_tasks.metrics import binary_metrics, bootstrap_auc_intervals, confusion
from covid_tasks.metrics import classification_report as our_report
from covid_tasks.operating_point import highest_threshold_reaching
from covid_tasks.stats import weighted_auc, weighted_average_precision, wilson_interval
from tests.helpers import tiny_run


def _labels_from_counts(tp: int, fn: int, tn: int, fp: int) -> tuple[np.ndarray, np.ndarray]:
    """y_true and P(covid) whose confusion at threshold 0.5 is exactly the given counts."""
    y = np.array([1] * (tp + fn) + [0] * (tn + fp))
    prob = np.array([0.9] * tp + [0.1] * fn + [0.2] * tn + [0.7] * fp)
    return y, prob


@pytest.mark.parametrize("tp,fn,tn,fp", [(30, 5, 15, 4), (10, 0, 0, 10), (0, 8, 12, 0), (7, 3, 9, 1)])
def test_metrics_from_hand_made_confusion(tp: int, fn: int, tn: int, fp: int) -> None:
    y, prob = _labels_from_counts(tp, fn, tn, fp)
    m = binary_metrics(y, prob, 0.5, resamples=0)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (tp, fn, tn, fp)
    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan
    expected = {"sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
                "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn), "accuracy": (tp + tn) / len(y),
                "f1_covid": ratio(2 * tp, 2 * tp + fp + fn), "f1_non_covid": ratio(2 * tn, 2 * tn + fp + fn)}
    for key, want in expected.items():
        assert m[key] == pytest.approx(want, nan_ok=True), key
    assert m["balanced_accuracy"] == pytest.approx((expected["sensitivity"] + expected["specificity"]) / 2,
                                                   nan_ok=True)
    assert m["sensitivity_ci95"] == pytest.approx(list(wilson_interval(tp, tp + fn)), nan_ok=True)


def test_source_projects_swapped_report_is_not_what_we_report() -> None:
    """Regression: the source project printed non_covid recall as "sensitivity" (supports 19 / 35)."""
    tp, fn, tn, fp = 31, 4, 12, 7  # 35 covid, 19 non_covid
    y, prob = _labels_from_counts(tp, fn, tn, fp)
    y_pred = (prob >= 0.5).astype(int)
    m = binary_metrics(y, prob, 0.5, resamples=0)
    assert m["sensitivity"] == pytest.approx(31 / 35)  # covid recall, over the 35 covid images
    assert m["specificity"] == pytest.approx(12 / 19)  # non_covid recall, over the 19
    text, report = our_report(y, y_pred)
    assert report["covid"]["support"] == 35 and report["non_covid"]["support"] == 19
    assert report["covid"]["recall"] == pytest.approx(m["sensitivity"])
    assert report["non_covid"]["recall"] == pytest.approx(m["specificity"])
    assert "covid" in text and "non_covid" in text
    # The swap: index 0 taken as the positive class gives other numbers, which we never report.
    swapped_sensitivity = recall_score(y, y_pred, pos_label=0)
    swapped_specificity = recall_score(y, y_pred, pos_label=1)
    assert swapped_sensitivity == pytest.approx(12 / 19) and swapped_specificity == pytest.approx(31 / 35)
    assert m["sensitivity"] != pytest.approx(swapped_sensitivity)
    assert m["specificity"] != pytest.approx(swapped_specificity)
    # sklearn's own report without names lists rows "0" then "1": the row a reader took for
    # "sensitivity" (the first) is non_covid's recall.
    plain = classification_report(y, y_pred, output_dict=True)
    assert plain["0"]["recall"] == pytest.approx(swapped_sensitivity)


def test_confusion_has_fixed_cells_whatever_the_data() -> None:
    assert confusion([1, 1, 1], [1, 0, 1]) == {"tp": 2, "fn": 1, "tn": 0, "fp": 0}
    assert confusion([0, 0], [0, 1]) == {"tp": 0, "fn": 0, "tn": 1, "fp": 1}
    m = binary_metrics([1, 1, 1], [0.9, 0.2, 0.8], 0.5)
    assert math.isnan(m["specificity"]) and math.isnan(m["roc_auc"]) and math.isnan(m["roc_auc_ci95"][0])


def test_wilson_interval_known_values_and_scipy() -> None:
    from scipy.stats import binomtest

    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    for k, n in [(3, 19), (31, 35), (1, 1), (50, 200)]:
        ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-6)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_bootstrap_weighted_aucs_equal_sklearn_and_intervals_behave() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    prob = np.round(rng.random(80), 1)  # ties on purpose
    weights = rng.integers(0, 3, (6, 80)).astype(float)
    assert weighted_auc(y, prob, weights) == pytest.approx(
        [roc_auc_score(y, prob, sample_weight=w) for w in weights])
    assert weighted_average_precision(y, prob, weights) == pytest.approx(
        [average_precision_score(y, prob, sample_weight=w) for w in weights])

    a = bootstrap_auc_intervals(y, prob, seed=3)
    assert a == bootstrap_auc_intervals(y, prob, seed=3)  # seeded
    lo, hi = a["roc_auc_ci95"]
    assert lo <= roc_auc_score(y, prob) <= hi
    assert bootstrap_auc_intervals([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])["roc_auc_ci95"] == [1.0, 1.0]
    big_y, big_p = np.tile(y, 10), np.tile(prob, 10)
    big = bootstrap_auc_intervals(big_y, big_p, seed=3)["roc_auc_ci95"]
    assert big[1] - big[0] < hi - lo  # ten times the data, a narrower interval


def test_plain_rule_is_the_highest_threshold_reaching_the_target() -> None:
    y = [1, 1, 1, 1, 1, 0, 0, 0]
    prob = [0.95, 0.9, 0.6, 0.4, 0.3, 0.5, 0.2, 0.1]
    t = highest_threshold_reaching(y, prob, 0.8)
    assert t == 0.4  # 4 of 5 covid images at or above it
    assert binary_metrics(y, prob, t, resamples=0)["sensitivity"] >= 0.8
    assert binary_metrics(y, prob, np.nextafter(t, 1), resamples=0)["sensitivity"] < 0.8
    assert highest_threshold_reaching(y, prob, 1.0) == 0.3
    with pytest.raises(ValueError, match="no covid"):
        highest_threshold_reaching([0, 0], [0.1, 0.2], 0.8)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory):
    return tiny_run.make_data_root(tmp_path_factory.mktemp("evaluate_data"))


def _cfg(data_root, tmp_path, **kw) -> Config:
    # A SQLite registry that does not exist yet: no champion, and evaluate must not create it.
    uri = f"sqlite:///{tmp_path / 'registry' / 'mlflow.db'}"
    return Config(data_root=str(data_root), mlflow_tracking_uri=uri, img_size=32, batch_size=8, **kw)


def test_evaluate_writes_metrics_that_sklearn_reproduces(data_root, tmp_path) -> None:
    from covid_tasks.dataset import predict_split
    from covid_tasks.layout import load_splits
    from covid_tasks.stages.evaluate import evaluate
    from covid_tasks.storage import file_sha256

    cfg = _cfg(data_root, tmp_path)
    tiny_run.write_model_run(cfg, "good", tiny_run.channel_model(tiny_run.GOOD))
    result = evaluate(cfg, "good")
    run_dir = DataRoot.of(cfg).run("good").path
    metrics = tiny_run.load_metrics(run_dir)
    tiny_run.assert_metrics_match(metrics, run_dir / "predictions.csv")
    assert {k: result[k] for k in metrics} == metrics  # the returned dict is the file's content

    # The threshold is chosen on val logits, mapped through the calibration, applied unchanged to test.
    import keras
    import pandas as pd

    from covid_tasks.operating_point import choose_threshold
    from covid_tasks.stats import sigmoid

    splits = load_splits(DataRoot(data_root))
    source = keras.saving.load_model(run_dir / "finetune.keras")
    val_prob = predict_split(source, splits["val"], data_root / "raw" / "images", cfg)
    val_rows = pd.read_csv(run_dir / "val_predictions.csv")
    assert sigmoid(val_rows["logit_uncalibrated"]) == pytest.approx(val_prob, abs=1e-6)
    y_val = (splits["val"]["label"] == "covid").astype(int)
    chosen = choose_threshold(y_val, val_rows["logit_uncalibrated"], splits["val"]["patientid"],
                              cfg.min_sensitivity, seed=cfg.seed)
    a, b = metrics["calibration"]["params"]["a"], metrics["calibration"]["params"]["b"]
    assert metrics["threshold"] == pytest.approx(float(sigmoid(a * chosen["logit"] + b)), rel=1e-9)
    assert metrics["threshold_uncalibrated"] == pytest.approx(float(sigmoid(chosen["logit"])), rel=1e-9)
    # The evaluated model file outputs the calibrated probabilities written to predictions.csv,
    # and calibration changed no decision.
    evaluated = keras.saving.load_model(run_dir / "model.keras")
    rows = pd.read_csv(run_dir / "predictions.csv")
    test_prob = predict_split(evaluated, splits["test"], data_root / "raw" / "images", cfg)
    assert test_prob == pytest.approx(rows["prob_covid"].to_numpy(), abs=1e-6)
    raw = predict_split(source, splits["test"], data_root / "raw" / "images", cfg)
    assert list(raw >= metrics["threshold_uncalibrated"]) == list(rows["predicted"] == "covid")
    assert metrics["model_sha256"] == file_sha256(run_dir / "model.keras")
    op = json.loads((run_dir / "operating_point.json").read_text())
    assert op["threshold"] == metrics["threshold"] and op["model_sha256"] == metrics["model_sha256"]
    assert op["output"].startswith("calibrated P(covid)") and op["calibration"]["method"] == "platt"
    # Loading a run folder's file picks the threshold that belongs to it.
    from covid_tasks.registry import load_keras_file

    assert load_keras_file(run_dir / "model.keras").threshold == metrics["threshold"]
    raw_file = load_keras_file(run_dir / "finetune.keras")
    assert raw_file.threshold == metrics["threshold_uncalibrated"] and raw_file.calibration is None

    assert metrics["passed"] and metrics["promote"] and metrics["decision"] == "promote"
    assert metrics["champion"] is None and metrics["n_test"] == 35
    assert metrics["classification_report"]["covid"]["support"] == 15
    for key in ("sensitivity", "specificity", "threshold", "roc_auc", "tp", "fn", "tn", "fp", "n_test",
                "min_sensitivity", "min_specificity", "passed", "reasons", "roc_auc_ci95", "pr_auc_ci95"):
        assert key in metrics
    for name in ("confusion_matrix.png", "roc_curve.png", "reliability.png", "shortcut_audit.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "non_covid" in (run_dir / "classification_report.txt").read_text()
    assert not (tmp_path / "registry").exists()

    outputs = ("metrics.json", "predictions.csv", "val_predictions.csv", "model.keras",
               "operating_point.json")
    first = {n: (run_dir / n).read_bytes() for n in outputs}
    evaluate(cfg, "good")
    assert first == {n: (run_dir / n).read_bytes() for n in outputs}  # a re-run changes no byte


def test_evaluate_gate_failure_is_a_result_not_an_error(data_root, tmp_path) -> None:
    from covid_tasks.stages.evaluate import evaluate

    cfg = _cfg(data_root, tmp_path)
    tiny_run.write_model_run(cfg, "failing", tiny_run.channel_model(tiny_run.FAILING))
    result = evaluate(cfg, "failing")
    assert not result["passed"] and not result["promote"] and result["decision"] == "reject"
    assert any(r.startswith("specificity") for r in result["reasons"])
    tiny_run.assert_metrics_match(result, DataRoot.of(cfg).run("failing").path / "predictions.csv")


def test_threshold_margin_moves_the_threshold_target_and_min_roc_auc_gates(data_root, tmp_path) -> None:
    from covid_tasks.stages.evaluate import evaluate

    base = _cfg(data_root, tmp_path, min_sensitivity=0.6, min_specificity=0.0)
    tiny_run.write_model_run(base, "m", tiny_run.channel_model(tiny_run.GOOD))
    plain = evaluate(base, "m")
    wide = evaluate(_cfg(data_root, tmp_path, min_sensitivity=0.6, min_specificity=0.0, threshold_margin=0.25,
                         min_roc_auc=1.0), "m")
    assert plain["threshold_method"]["target"] == 0.6 and plain["threshold_margin"] == 0.0
    assert wide["threshold_method"]["target"] == pytest.approx(0.85) and wide["threshold_margin"] == 0.25
    assert wide["threshold"] < plain["threshold"]  # a higher sensitivity target, a lower threshold
    assert wide["sensitivity"] >= plain["sensitivity"] and wide["val_sensitivity"] >= plain["val_sensitivity"]
    assert wide["roc_auc"] == plain["roc_auc"]  # the ranking is the model's, not the threshold's
    assert wide["min_roc_auc"] == 1.0 and wide["decision"] == "reject"
    assert [r for r in wide["reasons"] if r.startswith("ROC AUC 95% lower bound")], wide["reasons"]
    capped = evaluate(_cfg(data_root, tmp_path, min_sensitivity=0.9, threshold_margin=0.5), "m")
    assert capped["threshold_method"]["target"] == 1.0


def test_evaluate_fails_when_the_registry_is_unreachable(data_root, tmp_path, monkeypatch) -> None:
    from covid_tasks.registry import MLFLOW_HTTP_LIMITS, RegistryUnavailableError
    from covid_tasks.stages.evaluate import evaluate
    from tests.helpers.mlflow_server import closed_port_uri

    for key in MLFLOW_HTTP_LIMITS:  # the stage bounds MLflow's retries itself
        monkeypatch.delenv(key, raising=False)
    down = closed_port_uri()
    cfg = _cfg(data_root, tmp_path).replace(mlflow_tracking_uri=down)
    tiny_run.write_model_run(cfg, "offline", tiny_run.channel_model(tiny_run.GOOD))
    with pytest.raises(RegistryUnavailableError, match=f"MLflow registry at {down} is unreachable") as failed:
        evaluate(cfg, "offline")
    assert "\n" not in str(failed.value)
    assert not (DataRoot.of(cfg).run("offline").path / "metrics.json").exists()
