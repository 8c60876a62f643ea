"""Ensembles of saved cross-validated configurations: the mean P(covid) of their fold models.

All members must share the fold assignment (every ``--cv`` run uses seed 1234, so they do). Each
held-out image's ensemble score is the mean of the members' out-of-fold scores, so every member
still saw only its fold's training part; the fold thresholds are not averaged (no threshold
figures)::

    .venv/bin/python benchmarks/cv_ensemble.py probe-lite0-224-none-ms,probe-lite0-224-histeq [...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from cv_metrics import VIEW_COLUMNS, fmt_ci, summarise

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ["filename", "patientid", "label", "fold", "repeat"]


def ensemble(results: Path, members: list[str]) -> pd.DataFrame:
    """The members' predictions averaged per image and repeat (views present in every member)."""
    frames = [pd.read_csv(results / m / "predictions.csv", dtype={"filename": str, "patientid": str})
              for m in members]
    columns = ["prob_covid"] + [c for c in VIEW_COLUMNS.values() if all(c in f for f in frames)]
    merged = frames[0][KEYS + columns]
    for i, frame in enumerate(frames[1:], start=1):
        merged = merged.merge(frame[KEYS + columns], on=KEYS, suffixes=("", f"_{i}"), validate="1:1")
    if len(merged) != len(frames[0]):
        raise ValueError("the members do not share the same images and folds")
    for c in columns:
        merged[c] = merged[[c] + [f"{c}_{i}" for i in range(1, len(frames))]].mean(axis=1)
    return merged[KEYS + columns]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+", help="comma-separated member configurations, one ensemble each")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    print("| ensemble | pooled AUC (95% CI) | spec @ sens 0.80 | AUC lungs hidden (drop) |")
    print("|---|---|---|---|")
    for members in args.sets:
        s = summarise(ensemble(Path(args.results), members.split(",")))
        hidden = (f"{s['roc_auc_lungs_hidden']:.3f} ({-s['auc_drop_lungs_hidden']:+.3f})"
                  if "roc_auc_lungs_hidden" in s else "–")
        print(f"| {members.replace(',', ' + ')} | {fmt_ci(s['roc_auc'], s['roc_auc_ci95'])} | "
              f"{s['spec_at_sens80']:.2f} | {hidden} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
