"""The three decisions' statistics, without a model: threshold, gate and paired promotion.

* The operating threshold moves smoothly with the sensitivity target where the plain rule jumps,
  never leaves the validation scores and commutes with an affine recalibration.
* The patient bootstrap draws a patient's images together and keeps both classes.
* The gate reads point estimates or Wilson lower bounds.
* Paired promotion: a challenger better by one image whose interval spans zero is not promoted
  under a margin of 0; a clearly better one is; the rule that decided is named.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from covid_tasks.operating_point import choose_threshold, highest_threshold_reaching, rule_thresholds
from covid_tasks.promotion import RULE_AUDIT, RULE_FIRST, RULE_GATE, RULE_PAIRED, decide, gate, paired_deltas
from covid_tasks.stats import (
    brier_score,
    expected_calibration_error,
    patient_bootstrap,
    weighted_auc,
    weighted_rates,
)


def _val_split(seed: int = 0, n_pos: int = 24, n_neg: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A small validation split like the real one: few non-covid, overlapping scores, 2 images per patient."""
    rng = np.random.default_rng(seed)
    y = np.array([1] * n_pos + [0] * n_neg)
    logits = np.where(y == 1, rng.normal(1.0, 1.5, len(y)), rng.normal(-0.5, 1.5, len(y)))
    patients = np.array([f"p{i // 2}" if i < n_pos else f"q{i // 2}" for i in range(len(y))])
    return y, logits, patients


def test_rule_threshold_is_midway_and_interpolated_between_reachable_sensitivities() -> None:
    y = np.array([1, 1, 1, 1, 0, 0])
    score = np.array([4.0, 3.0, 2.0, 1.0, 2.5, 0.0])  # covid at 4, 3, 2, 1; non-covid at 2.5 and 0
    ones = np.ones((1, 6))
    # 3 of 4 covid reached at score 2.0; the next lower score present is 1.0.
    assert rule_thresholds(y, score, ones, 0.75)[0] == pytest.approx(1.5)
    # At 100% the lowest covid score 1.0 is kept; midway to 0.0.
    assert rule_thresholds(y, score, ones, 1.0)[0] == pytest.approx(0.5)
    # 2 of 4 at 3.0, midway to the non-covid 2.5: 2.75; a target between 0.5 and 0.75 interpolates.
    assert rule_thresholds(y, score, ones, 0.5)[0] == pytest.approx(2.75)
    assert rule_thresholds(y, score, ones, 0.625)[0] == pytest.approx((2.75 + 1.5) / 2)
    assert rule_thresholds(y, score, ones, 0.0)[0] == pytest.approx(4.0)  # never above the top score
    # Nothing lower in the resample: the score itself (never beyond the scores seen).
    only = np.array([[1, 1, 1, 1, 0, 0]], dtype=float)  # the non-covid at 0.0 not drawn
    assert rule_thresholds(y, score, only, 1.0)[0] == pytest.approx(1.0)
    assert highest_threshold_reaching(y, score, 0.75) == 2.0
    tied = [rule_thresholds([1, 1, 0], [2.0, 2.0, 1.0], np.ones((1, 3)), t)[0] for t in (1.0, 0.5)]
    assert tied == pytest.approx([1.5, 1.75])  # tied covid scores are reached together


def test_threshold_moves_smoothly_with_the_target_where_the_plain_rule_jumps() -> None:
    y, z, patients = _val_split()
    targets = np.round(np.arange(0.60, 0.951, 0.01), 2)
    chosen = np.array([choose_threshold(y, z, patients, t, resamples=600, seed=1)["logit"] for t in targets])
    plain = np.array([highest_threshold_reaching(y, z, t) for t in targets])
    assert np.all(np.diff(chosen) <= 1e-12)  # a higher target never raises the threshold
    spread = z[y == 1].max() - z[y == 1].min()
    # The plain rule jumps by whole gaps between covid scores; the chosen threshold moves in small steps.
    assert np.abs(np.diff(chosen)).max() < 0.25 * np.abs(np.diff(plain)).max()
    assert np.abs(np.diff(chosen)).max() < 0.05 * spread
    assert np.all(chosen >= z.min()) and np.all(chosen <= z.max())


def test_threshold_is_seeded_equivariant_and_needs_a_covid_image() -> None:
    y, z, patients = _val_split(3)
    first = choose_threshold(y, z, patients, 0.8, resamples=300, seed=5)
    assert first == choose_threshold(y, z, patients, 0.8, resamples=300, seed=5)
    scaled = choose_threshold(y, 2.5 * z - 1.0, patients, 0.8, resamples=300, seed=5)
    assert scaled["logit"] == pytest.approx(2.5 * first["logit"] - 1.0)
    assert first["ci95_logit"][0] <= first["logit"] <= first["ci95_logit"][1]
    with pytest.raises(ValueError, match="no covid"):
        choose_threshold([0, 0, 0], [0.1, 0.2, 0.3], ["a", "b", "c"], 0.8)


def test_patient_bootstrap_draws_patients_whole_and_keeps_both_classes() -> None:
    y = np.array([1, 1, 1, 0, 0, 1, 0])
    patients = ["a", "a", "b", "c", "c", "d", "e"]
    w = patient_bootstrap(patients, y, 500, seed=2)
    assert w.shape == (500, 7)
    assert np.array_equal(w[:, 0], w[:, 1]) and np.array_equal(w[:, 3], w[:, 4])  # same patient
    # 3 covid patients (a, b, d) and 2 non-covid (c, e) are drawn in every resample.
    assert np.all(w[:, [0, 2, 5]].sum(axis=1) == 3)  # one image of each covid patient
    assert np.all(w[:, [3, 6]].sum(axis=1) == 2)
    assert np.array_equal(w, patient_bootstrap(patients, y, 500, seed=2))


def test_weighted_rates_and_calibration_errors() -> None:
    y = np.array([1, 1, 0, 0])
    sens, spec = weighted_rates(y, np.array([1, 0, 0, 1]), np.array([[1, 1, 1, 1], [3, 1, 0, 2]]))
    assert sens.tolist() == [0.5, 0.75] and spec.tolist() == [0.5, 0.0]
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0
    assert expected_calibration_error([1, 1, 0, 0], [0.55] * 4) == pytest.approx(0.05)
    assert brier_score([1, 0], [0.8, 0.4]) == pytest.approx((0.04 + 0.16) / 2)


def test_gate_on_point_or_wilson_lower_bound() -> None:
    m = {"sensitivity": 0.85, "specificity": 0.75, "sensitivity_ci95": [0.62, 0.95],
         "specificity_ci95": [0.71, 0.86]}
    assert gate(m, 0.8, 0.7) == []
    lower = gate(m, 0.8, 0.7, "lower_bound")
    assert len(lower) == 1 and lower[0].startswith("sensitivity 95% lower bound 0.620 < min_sensitivity")
    reasons = gate({"sensitivity": 0.79, "specificity": float("nan")}, 0.8, 0.7)
    assert len(reasons) == 2 and "sensitivity" in reasons[0] and "specificity" in reasons[1]
    with pytest.raises(ValueError, match="gate_on"):
        gate(m, 0.8, 0.7, "median")


def test_gate_on_the_lower_bound_of_roc_auc_only_when_asked() -> None:
    m = {"sensitivity": 0.85, "specificity": 0.75, "roc_auc": 0.62, "roc_auc_ci95": [0.48, 0.77]}
    assert gate(m, 0.8, 0.7) == [] and gate(m, 0.8, 0.7, min_roc_auc=0.0) == []
    assert gate(m, 0.8, 0.7, min_roc_auc=0.5) == ["ROC AUC 95% lower bound 0.480 < min_roc_auc 0.500"]
    assert gate({**m, "roc_auc_ci95": [0.51, 0.77]}, 0.8, 0.7, min_roc_auc=0.5) == []
    assert gate({**m, "roc_auc_ci95": [0.5, 0.77]}, 0.8, 0.7, min_roc_auc=0.5) == []  # reaching it passes
    for undefined in (float("nan"), [float("nan"), float("nan")], None):  # one class only: fails
        assert len(gate({**m, "roc_auc_ci95": undefined}, 0.8, 0.7, min_roc_auc=0.5)) == 1


def _paired_case(extra_right: int, extra_wrong: int) -> dict[str, np.ndarray]:
    """40 covid and 15 non-covid patients (one image each); the champion misses covid 0-5.

    The challenger finds ``extra_right`` of those six and misses ``extra_wrong`` covid images the
    champion found, so it is better by ``extra_right - extra_wrong`` images.
    """
    y = np.array([1] * 40 + [0] * 15)
    champion = np.where(y == 1, 0.9, 0.1)
    champion[:6] = 0.1  # tied with the non-covid images
    challenger = champion.copy()
    challenger[:extra_right] = 0.9
    challenger[6:6 + extra_wrong] = 0.1
    return {"y": y, "patients": np.array([f"p{i}" for i in range(len(y))]), "champion": champion,
            "challenger": challenger}


@pytest.mark.parametrize("right,wrong,margin,promoted", [
    (3, 2, 0.0, False),   # better by one image, but the interval spans zero: not shown non-inferior
    (3, 2, 0.10, True),   # ... within a 0.10 margin it is
    (6, 0, 0.0, True),    # clearly better: every resample favours or ties it
    (0, 3, 0.05, False),  # worse by three images
])
def test_paired_promotion(right: int, wrong: int, margin: float, promoted: bool) -> None:
    case = _paired_case(right, wrong)
    deltas = paired_deltas(case["y"], case["patients"], (case["challenger"], 0.5), (case["champion"], 0.5),
                           resamples=2000, seed=7)
    assert deltas["sensitivity"]["point"] == pytest.approx((right - wrong) / 40)
    assert deltas["specificity"] == {"point": 0.0, "ci95": [0.0, 0.0]}
    if right == 3 and wrong == 2:
        lo, hi = deltas["sensitivity"]["ci95"]
        assert lo < 0 < hi  # a one-image advantage is within the noise
    decision = decide([], deltas, "4", margin, {"warning": None}, audit_blocks=False)
    assert decision["rule"] == RULE_PAIRED and decision["promoted"] is promoted
    assert decision["margin"] == margin and decision["champion_version"] == "4"
    if not promoted:
        assert "sensitivity" in decision["reason"] and "champion v4" in decision["reason"]


def test_paired_deltas_of_identical_models_are_zero_and_auc_is_paired() -> None:
    case = _paired_case(0, 0)
    deltas = paired_deltas(case["y"], case["patients"], (case["champion"], 0.5), (case["champion"], 0.5))
    for name in ("roc_auc", "sensitivity", "specificity"):
        assert deltas[name] == {"point": 0.0, "ci95": [0.0, 0.0]}
    better = paired_deltas(case["y"], case["patients"], (case["challenger"] + 0.0, 0.5),
                           (case["champion"], 0.5))
    auc = weighted_auc(case["y"], case["champion"], np.ones((1, len(case["y"]))))[0]
    assert better["roc_auc"]["point"] == 0.0 and auc == pytest.approx(1 - 6 / 40 * 0.5)


def test_decision_rules_gate_first_model_and_audit() -> None:
    case = _paired_case(6, 0)
    deltas = paired_deltas(case["y"], case["patients"], (case["challenger"], 0.5), (case["champion"], 0.5))
    failed = decide(["sensitivity 0.7 < min_sensitivity 0.8"], deltas, "1", 0.05, {"warning": None}, False)
    assert failed["rule"] == RULE_GATE and not failed["promoted"] and "gate failed" in failed["reason"]
    first = decide([], None, None, 0.05, {"warning": None}, False)
    assert first["rule"] == RULE_FIRST and first["promoted"] and first["metric_deltas"] is None
    warned = {"warning": "lungs hidden AUC 0.9"}
    assert decide([], deltas, "1", 0.05, warned, audit_blocks=False)["promoted"]
    blocked = decide([], deltas, "1", 0.05, warned, audit_blocks=True)
    assert blocked["rule"] == RULE_AUDIT and not blocked["promoted"]


def test_undefined_difference_cannot_block() -> None:
    deltas = {"roc_auc": {"point": math.nan, "ci95": [math.nan, math.nan]},
              "sensitivity": {"point": 0.0, "ci95": [-0.01, 0.02]},
              "specificity": {"point": math.nan, "ci95": [math.nan, math.nan]}}
    assert decide([], deltas, "2", 0.05, {"warning": None}, False)["promoted"]


def test_a_data_check_warning_keeps_a_passing_model_challenger() -> None:
    """The gate passed and there is no champion, yet a data-check warning holds the promotion back."""
    from covid_tasks.promotion import RULE_DATA, decide

    audit = {"warning": None}
    clean = decide([], None, None, 0.05, audit, False)
    warned = decide([], None, None, 0.05, audit, False, "data checks: warn: source_label_jump (...)")
    assert clean["promoted"] and not warned["promoted"]
    assert warned["rule"] == RULE_DATA and "person must promote" in warned["reason"]
    assert decide(["sensitivity 0.1 < 0.8"], None, None, 0.05, audit, False, "warn")["rule"] == "gate"
