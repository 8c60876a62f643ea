"""Threshold stability: how the operating threshold moves when the sensitivity target moves a little.

Reads one or more evaluated run folders (``val_predictions.csv`` and ``predictions.csv`` with the
uncalibrated logits that ``evaluate`` writes, ``metrics.json`` for the calibration), sweeps the
target ``min_sensitivity`` in small steps and prints, for the plain rule (the highest validation
score reaching the target) and for the rule ``evaluate`` uses (``covid_tasks.operating_point``):
the threshold as the uncalibrated P(covid) (the network's own sigmoid), evaluate's threshold also
on the calibrated scale the registered model outputs, and the test sensitivity and specificity.
It ends with the largest threshold move per step of the target, as a markdown table for the
README. No model is run; this is a script, not a test.

Usage::

    python benchmarks/threshold_stability.py data/runs/<run id> [more run folders]
    python benchmarks/threshold_stability.py RUN --start 0.50 --stop 0.95 --step 0.01
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sweep(run_dir: Path, targets: list[float]) -> list[dict[str, Any]]:
    """One row per target: both rules' thresholds (calibrated P) and their test results."""
    import numpy as np
    import pandas as pd

    from covid_tasks.operating_point import choose_threshold, highest_threshold_reaching
    from covid_tasks.stats import sigmoid

    val = pd.read_csv(run_dir / "val_predictions.csv", dtype={"patientid": str})
    test = pd.read_csv(run_dir / "predictions.csv", dtype={"patientid": str})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    params = metrics["calibration"]["params"]
    seed = metrics["threshold_method"]["seed"]
    y_val = (val["label"] == "covid").to_numpy().astype(int)
    z_val = val["logit_uncalibrated"].to_numpy()
    y_test = (test["label"] == "covid").to_numpy()
    z_test = test["logit_uncalibrated"].to_numpy()
    rows = []
    for target in targets:
        plain = highest_threshold_reaching(y_val, z_val, target)
        chosen = choose_threshold(y_val, z_val, val["patientid"], target, seed=seed)["logit"]
        calibrated = float(sigmoid(params["a"] * chosen + params["b"]))
        row: dict[str, Any] = {"target": target, "calibrated": calibrated}
        for name, t in (("plain", plain), ("chosen", chosen)):
            row[name] = float(sigmoid(t))
            row[f"{name}_logit"] = float(t)
            row[f"{name}_sens"] = float(np.mean(z_test[y_test] >= t))
            row[f"{name}_spec"] = float(np.mean(z_test[~y_test] < t))
        rows.append(row)
    return rows


def report(run_dir: Path, rows: list[dict[str, Any]]) -> str:
    """The sweep as a markdown table, and the largest move per step for each rule."""
    import numpy as np

    lines = [f"### {run_dir}", "",
             "| target | plain rule | test sens / spec | evaluate's rule | (calibrated) | test sens / spec |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        plain = f"{r['plain']:.4f} | {r['plain_sens']:.2f} / {r['plain_spec']:.2f}"
        result = f"{r['chosen_sens']:.2f} / {r['chosen_spec']:.2f}"
        chosen = f"{r['chosen']:.4f} | {r['calibrated']:.4f} | {result}"
        lines.append(f"| {r['target']:.2f} | {plain} | {chosen} |")
    lines.append("")
    for name in ("plain", "chosen"):
        prob = np.abs(np.diff([r[name] for r in rows]))
        logit = np.abs(np.diff([r[f"{name}_logit"] for r in rows]))
        still = int((prob == 0).sum())
        lines.append(f"- {name}: largest move per step {prob.max():.4f} in uncalibrated P(covid) "
                     f"({logit.max():.3f} in logit), median {np.median(prob):.4f}; "
                     f"steps with no move {still} of {len(prob)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="evaluated run folders (<data_root>/runs/<key>)")
    parser.add_argument("--start", type=float, default=0.50)
    parser.add_argument("--stop", type=float, default=0.95)
    parser.add_argument("--step", type=float, default=0.01)
    args = parser.parse_args(argv)
    n = int(round((args.stop - args.start) / args.step)) + 1
    targets = [round(args.start + i * args.step, 6) for i in range(n)]
    for run_dir in args.runs:
        needed = ("val_predictions.csv", "predictions.csv", "metrics.json")
        missing = [f for f in needed if not (run_dir / f).is_file()]
        if missing:
            print(f"{run_dir}: missing {', '.join(missing)} (run evaluate first)", file=sys.stderr)
            return 1
        print(report(run_dir, sweep(run_dir, targets)))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
