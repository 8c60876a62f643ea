"""Figures by source, within source and by subgroup (``covid_tasks.subgroups``), and evaluate's record.

Every AUC is checked against scikit-learn's on the same images; the within-source mean against a
hand computation; a model that only recognises sources scores high pooled and 0.5 within them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from covid_tasks.subgroups import (
    MIN_PER_CLASS,
    by_group,
    finding_family,
    group_figures,
    metric_scalars,
    subgroups,
    within_source,
    within_source_auc,
)


def _three_sources() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    y = np.array([1] * 30 + [0] * 12 + [1] * 8 + [0] * 20 + [1] * 15)
    sources = np.array(["a.org"] * 42 + ["b.org"] * 28 + ["c.org"] * 15)  # c.org: covid only
    prob = np.clip(0.5 + 0.2 * (y - 0.5) + rng.normal(0, 0.25, len(y)), 0, 1)
    return y, prob, sources


def test_within_source_auc_is_sklearn_s_per_source_and_their_image_weighted_mean() -> None:
    y, prob, sources = _three_sources()
    out = within_source(y, prob, sources, resamples=200, seed=1)
    assert list(out["sources"]) == ["a.org", "b.org"]  # c.org holds one class: no AUC within it
    auc_a = roc_auc_score(y[sources == "a.org"], prob[sources == "a.org"])
    auc_b = roc_auc_score(y[sources == "b.org"], prob[sources == "b.org"])
    assert out["sources"]["a.org"]["roc_auc"] == pytest.approx(auc_a)
    assert out["sources"]["b.org"]["roc_auc"] == pytest.approx(auc_b)
    assert out["roc_auc"] == pytest.approx((42 * auc_a + 28 * auc_b) / 70)
    assert (out["n"], out["n_sources"]) == (70, 2)
    assert out["sources"]["a.org"] | {"roc_auc": 0, "roc_auc_ci95": 0} == {
        "n": 42, "n_covid": 30, "n_non_covid": 12, "roc_auc": 0, "roc_auc_ci95": 0, "too_small": False}
    assert out["sources"]["b.org"]["n_non_covid"] == 20 and out["sources"]["b.org"]["too_small"]  # 8 covid
    low, high = out["sources"]["a.org"]["roc_auc_ci95"]
    assert low <= auc_a <= high
    # The bootstrap form: an all-ones row is the point figure, integer weights are repeated images.
    assert within_source_auc(y, prob, sources, np.ones((1, len(y))))[0] == pytest.approx(out["roc_auc"])
    w = np.random.default_rng(0).integers(1, 4, len(y))
    repeated = within_source(np.repeat(y, w), np.repeat(prob, w), np.repeat(sources, w), resamples=0)
    assert within_source_auc(y, prob, sources, w[None].astype(float))[0] == pytest.approx(repeated["roc_auc"])


def test_a_model_that_only_knows_the_source_is_good_pooled_and_at_chance_within_sources() -> None:
    # Source "s.org" is mostly covid, "e.org" mostly not; the model answers each source's prevalence.
    y = np.array([1] * 35 + [0] * 5 + [1] * 10 + [0] * 30)
    sources = np.array(["s.org"] * 40 + ["e.org"] * 40)
    prob = np.where(sources == "s.org", 0.9, 0.2)
    assert roc_auc_score(y, prob) > 0.8
    out = within_source(y, prob, sources, resamples=0)
    assert out["roc_auc"] == pytest.approx(0.5)
    assert all(math.isnan(v) for v in out["sources"]["s.org"]["roc_auc_ci95"])  # resamples=0


def test_no_source_with_both_classes_gives_nan_not_an_error() -> None:
    out = within_source([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2], ["a", "a", "b", "b"], resamples=0)
    assert math.isnan(out["roc_auc"]) and out["sources"] == {} and out["n"] == 0
    assert math.isnan(within_source_auc([1, 0], [0.9, 0.1], ["a", "b"], np.ones((2, 2)))[0])


def test_group_figures_flag_groups_too_small_to_read() -> None:
    y = [1] * MIN_PER_CLASS + [0] * (MIN_PER_CLASS - 1)
    prob = np.linspace(0.9, 0.1, len(y))
    small = group_figures(y, prob, 0.5, resamples=100)
    assert small["too_small"] and (small["n_covid"], small["n_non_covid"]) == (10, 9)
    assert small["roc_auc"] == pytest.approx(roc_auc_score(y, prob))
    assert small["sensitivity"] == pytest.approx(np.mean(prob[:10] >= 0.5))
    enough = group_figures([*y, 0], [*prob, 0.05], 0.5, resamples=100)
    assert not enough["too_small"]
    one_class = group_figures([1, 1, 1], [0.9, 0.2, 0.7], 0.5)
    assert one_class["too_small"] and math.isnan(one_class["roc_auc"])
    assert math.isnan(one_class["specificity"])
    empty = group_figures([], [], 0.5)
    assert empty["n"] == 0 and empty["too_small"] and math.isnan(empty["sensitivity"])


def test_by_group_lists_every_source_largest_first_with_rates_at_the_threshold() -> None:
    y, prob, sources = _three_sources()
    out = by_group(y, prob, sources, 0.5, resamples=0)
    assert list(out) == ["a.org", "b.org", "c.org"]
    c = out["c.org"]
    assert c["n"] == 15 and math.isnan(c["roc_auc"]) and c["too_small"]
    assert c["sensitivity"] == pytest.approx(np.mean(prob[sources == "c.org"] >= 0.5))


def test_finding_families_and_views() -> None:
    assert finding_family("COVID-19, ARDS", "covid") == "covid"
    assert finding_family("No Finding", "non_covid") == "no_finding"
    assert finding_family(" no  finding ", "non_covid") == "no_finding"
    assert finding_family("Pneumonia/Bacterial/Streptococcus", "non_covid") == "other_pneumonia"
    frame = pd.DataFrame({
        "label": ["covid"] * 6 + ["non_covid"] * 6,
        "finding": ["COVID-19"] * 6 + ["No Finding"] * 2 + ["Streptococcus", "SARS", "ARDS", "Pneumocystis"],
        "view": ["PA", "AP", "AP Supine", "PA", "PA", "AP"] + ["PA", "AP", "PA", "AP Supine", "AP", "PA"]})
    y = (frame["label"] == "covid").astype(int).to_numpy()
    prob = np.linspace(0.95, 0.05, 12)
    out = subgroups(frame, y, prob, 0.5, resamples=0)
    nf, op = out["finding_family"]["covid_vs_no_finding"], out["finding_family"]["covid_vs_other_pneumonia"]
    assert (nf["n"], nf["n_covid"], nf["n_non_covid"]) == (8, 6, 2)
    assert (op["n"], op["n_covid"], op["n_non_covid"]) == (10, 6, 4)
    keep = np.r_[0:6, 8:12]
    assert op["roc_auc"] == pytest.approx(roc_auc_score(y[keep], prob[keep]))
    assert {v: out["view"][v]["n"] for v in out["view"]} == {"PA": 6, "AP": 4, "AP Supine": 2}
    pa = (frame["view"] == "PA").to_numpy()
    assert out["view"]["PA"]["roc_auc"] == pytest.approx(roc_auc_score(y[pa], prob[pa]))
    assert all(g["too_small"] for kind in ("finding_family", "view") for g in out[kind].values())
    # Without finding or view columns the groups are empty, not an error.
    bare = subgroups(frame[["label"]], y, prob, 0.5, resamples=0)
    assert bare["finding_family"]["covid_vs_no_finding"]["n"] == 0 and bare["view"]["PA"]["n"] == 0


def test_metric_scalars_flatten_the_figures_for_mlflow() -> None:
    y, prob, sources = _three_sources()
    frame = pd.DataFrame({"label": np.where(y == 1, "covid", "non_covid"), "finding": "Pneumonia",
                          "view": "PA"})
    metrics = {"within_source": within_source(y, prob, sources, resamples=50),
               "subgroups": subgroups(frame, y, prob, 0.5, resamples=50)}
    flat = metric_scalars(metrics)
    assert flat["within_source_roc_auc"] == pytest.approx(metrics["within_source"]["roc_auc"])
    a_org = metrics["within_source"]["sources"]["a.org"]
    assert flat["within_source_a.org_roc_auc"] == pytest.approx(a_org["roc_auc"])
    pa = metrics["subgroups"]["view"]["PA"]
    assert flat["subgroup_pa_roc_auc"] == pytest.approx(pa["roc_auc"])
    assert flat["subgroup_pa_sensitivity_ci95_low"] == pytest.approx(pa["sensitivity_ci95"][0])
    assert flat["subgroup_pa_n"] == 85 and "subgroup_ap_supine_roc_auc" not in flat  # NaN left out
    assert flat["subgroup_covid_vs_no_finding_n"] == 53 and "subgroup_covid_vs_no_finding_roc_auc" not in flat


def test_evaluate_records_sources_within_source_and_subgroups(tmp_path) -> None:
    """metrics.json and the MLflow metrics carry them; sources come from the metadata's url host."""
    from covid_tasks.config import Config
    from covid_tasks.layout import DataRoot
    from covid_tasks.stages.evaluate import evaluate
    from covid_tasks.tracking import metric_scalars as tracked
    from tests.helpers import tiny_run

    data = tiny_run.make_data_root(tmp_path / "data")
    splits = pd.read_csv(data / "splits.csv", dtype=str, keep_default_na=False)
    test = splits["split"] == "test"
    # Two sources in the test split, each with both classes; a view and a finding per image.
    host = np.where(np.arange(len(splits)) % 2 == 0, "https://www.radiopaedia.org/cases/1", "https://eurorad.org/x")
    splits["finding"] = np.where(splits["label"] == "covid", "COVID-19",
                                 np.where(np.arange(len(splits)) % 3 == 0, "No Finding", "Streptococcus"))
    splits["view"] = np.where(np.arange(len(splits)) % 4 == 0, "AP", "PA")
    splits.to_csv(data / "splits.csv", index=False)
    metadata = pd.DataFrame({"filename": splits["filename"], "url": host})
    metadata.to_csv(data / "raw" / "metadata.csv", index=False)

    cfg = Config(data_root=str(data), mlflow_tracking_uri=f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}",
                 img_size=32, batch_size=8)
    tiny_run.write_model_run(cfg, "groups", tiny_run.channel_model(tiny_run.WORSE))
    result = evaluate(cfg, "groups")
    run_dir = DataRoot.of(cfg).run("groups").path
    metrics = json.loads((run_dir / "metrics.json").read_text())
    preds = pd.read_csv(run_dir / "predictions.csv", dtype={"filename": str})
    source_of = dict(zip(splits["filename"], np.where(host == "https://eurorad.org/x", "eurorad.org",
                                                      "radiopaedia.org"), strict=True))
    preds["source"] = preds["filename"].map(source_of)
    y = (preds["label"] == "covid").astype(int)

    within = metrics["within_source"]
    assert set(within["sources"]) == {"radiopaedia.org", "eurorad.org"}
    want = {s: roc_auc_score(y[g.index], g["prob_covid"]) for s, g in preds.groupby("source")}
    for s, auc in want.items():
        assert within["sources"][s]["roc_auc"] == pytest.approx(auc)
    sizes = preds["source"].value_counts()
    assert within["roc_auc"] == pytest.approx(sum(sizes[s] * want[s] for s in want) / len(preds))
    assert sum(v["n"] for v in metrics["sources"].values()) == int(test.sum()) == metrics["n_test"]
    views = metrics["subgroups"]["view"]
    assert views["AP"]["n"] + views["PA"]["n"] == metrics["n_test"]
    fam = metrics["subgroups"]["finding_family"]
    assert fam["covid_vs_no_finding"]["n_covid"] == fam["covid_vs_other_pneumonia"]["n_covid"] == 15
    assert fam["covid_vs_no_finding"]["n_non_covid"] + fam["covid_vs_other_pneumonia"]["n_non_covid"] == 20
    assert result["within_source"]["roc_auc"] == pytest.approx(within["roc_auc"])
    logged = tracked(metrics)
    assert logged["within_source_roc_auc"] == pytest.approx(within["roc_auc"])
    assert logged["subgroup_pa_n"] == metrics["subgroups"]["view"]["PA"]["n"]
