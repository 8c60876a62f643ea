"""The cross-validated benchmark's figures: its AUC and bootstrap, and the README table they make."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import cv_ensemble  # noqa: E402
import cv_metrics  # noqa: E402
import cv_run  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def test_auc_matches_scikit_learn_with_ties_and_weights() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200) + 0.3 * y, 1)  # coarse scores: many ties across the classes
    assert cv_metrics.auc(y, p)[0] == pytest.approx(roc_auc_score(y, p))
    w = rng.integers(0, 4, (3, 200)).astype(float)  # integer weights = rows repeated
    for row in w:
        reps = row.astype(int)
        assert cv_metrics.auc(y, p, row[None])[0] == pytest.approx(
            roc_auc_score(np.repeat(y, reps), np.repeat(p, reps)))
    np.testing.assert_allclose(cv_metrics.auc(y, p, w), [cv_metrics.auc(y, p, r[None])[0] for r in w])


def test_specificity_at_sensitivity() -> None:
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.75, 0.5, 0.2, 0.05])
    # Sensitivity 0.8 needs 4 of 5 positives: threshold 0.6, which leaves 3 of 4 negatives below.
    assert cv_metrics.spec_at_sens(y, p, 0.8) == pytest.approx(0.75)
    # 1.0 needs the threshold down to 0.1: only 0.05 is below it.
    assert cv_metrics.spec_at_sens(y, p, 1.0) == pytest.approx(0.25)


def _preds(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> pd.DataFrame:
    n = len(scores)
    one = pd.DataFrame({"filename": [f"{i}.jpg" for i in range(n)],
                        "patientid": [str(i // 2) for i in range(n)],
                        "label": np.where(labels == 1, "covid", "non_covid"), "fold": np.arange(n) % 5,
                        "prob_covid": scores, "threshold": threshold})
    return pd.concat([one.assign(repeat=0), one.assign(repeat=1)], ignore_index=True)


def test_summarise_separating_and_reversed_predictions() -> None:
    labels = np.array([1, 0] * 20)
    good = cv_metrics.summarise(_preds(labels * 0.8 + 0.1, labels), rounds=200)
    assert good["roc_auc"] == 1.0 and good["roc_auc_ci95"] == [1.0, 1.0]
    assert good["sensitivity"] == 1.0 and good["specificity"] == 1.0 and good["gate"]
    bad = cv_metrics.summarise(_preds(0.9 - labels * 0.8, labels), rounds=200)
    assert bad["roc_auc"] == 0.0 and bad["sensitivity"] == 0.0 and not bad["gate"]
    assert good["n_images"] == 40 and good["n_patients"] == 20 and good["n_repeats"] == 2


def test_the_docs_table_is_what_the_saved_predictions_give() -> None:
    """Every row of ``quality_bench.py --report`` is in docs/model-quality.md, so neither can drift alone."""
    rows = [line for line in cv_run.report(RESULTS).splitlines() if line.startswith("| ")]
    assert len(rows) >= 2 + 15, "the saved results of the configurations tried are missing"
    doc = (REPO / "docs" / "model-quality.md").read_text()
    missing = [r.split("|")[1].strip() for r in rows if r not in doc]
    assert not missing, f"docs/model-quality.md table rows differ from benchmarks/results for: {missing}"


def test_an_ensemble_of_one_configuration_with_itself_is_that_configuration() -> None:
    name = "probe-lite0-224-none-ms"
    alone = pd.read_csv(RESULTS / name / "predictions.csv", dtype={"filename": str, "patientid": str})
    twice = cv_ensemble.ensemble(RESULTS, [name, name])
    a, b = cv_metrics.summarise(alone, rounds=100), cv_metrics.summarise(twice, rounds=100)
    assert b["roc_auc"] == pytest.approx(a["roc_auc"])
    assert b["roc_auc_lungs_hidden"] == pytest.approx(a["roc_auc_lungs_hidden"])


def test_a_saved_fine_tuning_configuration_reruns_its_own_recipe_whatever_the_defaults() -> None:
    import argparse

    import cv_finetune

    args = argparse.Namespace(batch_size=32, epochs=3, finetune_epochs=5, patience=3, learning_rate=None,
                              finetune_learning_rate=None)
    old = cv_finetune.fold_config(cv_run.parse("ft-lite0-224"), Path("/tmp/x"), args)
    assert (old.lung_gate, old.multiscale, old.head, old.augment_strength) == (False, False, "adam", 1.0)
    new = cv_finetune.fold_config(cv_run.parse("ft-lite0-224-none-lung-ms-probe-aug2"), Path("/tmp/x"), args,
                                  segmenter="/tmp/seg.weights.h5")
    assert (new.lung_gate, new.multiscale, new.head, new.augment_strength) == (True, True, "probe", 2.0)
    assert new.lung_segmenter == "/tmp/seg.weights.h5"
    with pytest.raises(ValueError, match="unknown fine-tuning option"):
        cv_finetune.fold_config(cv_run.parse("ft-lite0-224-none-huge"), Path("/tmp/x"), args)


def test_the_saved_probe_results_searched_the_grid_the_benchmark_searches() -> None:
    """The pipeline extends its grid below 0.001 at a rising edge; the benchmark keeps the plain grid."""
    import cv_probe

    from covid_tasks import training

    chosen = set()
    for path in sorted(RESULTS.glob("probe-*/predictions.csv")):
        chosen |= set(pd.read_csv(path, usecols=["c"])["c"].round(12))
    assert chosen and chosen <= set(cv_probe.C_GRID) == set(training.PROBE_C_GRID)
    extension = training.PROBE_C_EXTENSION
    assert extension and max(extension) < min(training.PROBE_C_GRID)
    with cv_probe.saved_probe_search():  # what the ft-*-probe folds' train stage searches
        assert training.PROBE_C_EXTENSION == ()
        scores, _ = training.search_probe_c(lambda c: (0.6 - c, None))  # rising to the lower edge
        assert sorted(scores) == sorted(training.PROBE_C_GRID)
    assert training.PROBE_C_EXTENSION == extension


def test_within_source_and_subgroup_figures_of_pooled_predictions() -> None:
    """A model that only knows the source: high pooled AUC, 0.5 within sources; subgroups are sklearn's."""
    labels = np.array([1] * 30 + [0] * 10 + [1] * 10 + [0] * 30)
    source = np.where(np.arange(80) < 40, "a.org", "b.org")
    preds = _preds(np.where(source == "a.org", 0.9, 0.2), labels)
    images = pd.DataFrame({"filename": [f"{i}.jpg" for i in range(80)], "source": source,
                           "finding": np.where(labels == 1, "COVID-19",
                                               np.where(np.arange(80) % 2 == 0, "No Finding", "Pneumonia")),
                           "view": np.where(np.arange(80) % 3 == 0, "AP", "PA")})
    s = cv_metrics.summarise(preds, rounds=200, images=images)
    assert s["roc_auc"] > 0.7 and s["within_source_auc"] == pytest.approx(0.5)
    assert s["within_source_sources"] == 2 and s["within_source_n"] == 80
    assert s["source_auc"]["a.org"] == {"auc": 0.5, "n_covid": 30, "n_non_covid": 10}
    one = preds[preds["repeat"] == 0].sort_values("filename").merge(images, on="filename")
    y = (one["label"] == "covid").to_numpy()
    for name, keep in (("covid_vs_no_finding", y | (one["finding"] == "No Finding").to_numpy()),
                       ("view_ap", (one["view"] == "AP").to_numpy())):
        got = s["subgroup_auc"][name]
        assert got["auc"] == pytest.approx(roc_auc_score(y[keep], one["prob_covid"][keep]))
        assert (got["n_covid"], got["n_non_covid"]) == (int(y[keep].sum()), int((~y[keep]).sum()))
    assert "within-source" in cv_metrics.subgroup_table([{"name": "x", "summary": s}]).splitlines()[0]
