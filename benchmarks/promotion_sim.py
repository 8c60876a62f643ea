"""Promotion rules on a small test split: how often does each promote an equivalent, worse or better model?

Simulates champion/challenger pairs scored on a test split the size of the real one (46 covid and
13 non-covid images, one per patient by default) and applies, to the same simulated scores:

* the old rule: promote when neither test sensitivity nor specificity is more than 0.02 below the
  champion's (point estimates);
* ``evaluate``'s rule (``covid_tasks.promotion``): paired patient bootstrap, promote when the
  lower 95% bound of each challenger-minus-champion difference (ROC AUC, sensitivity,
  specificity) is at least ``-margin``, for several margins.

Scores are ``class mean + shared noise + own noise``: both models see the same hard images
(shared noise), as two models trained on the same data do. Each model's threshold is fixed at
0; a scenario moves the challenger's covid and non-covid means. Prints a markdown table of
promotion rates. numpy only; a script, not a test.

Usage::

    python benchmarks/promotion_sim.py [--trials 400] [--resamples 1000] [--covid 46] [--non-covid 13]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MARGINS = (0.0, 0.02, 0.05, 0.10)
#: (name, challenger's covid mean shift, non-covid mean shift); positive = better separation.
SCENARIOS = (
    ("equivalent", 0.0, 0.0),
    ("worse (sens -0.10, spec -0.10)", -0.45, -0.3),
    ("better specificity (+0.20)", 0.0, 0.55),
    ("clearly better (sens +0.10, spec +0.25)", 0.6, 0.7),
)


def simulate(n_pos: int, n_neg: int, trials: int, resamples: int, seed: int) -> list[dict]:
    """Promotion rate of each rule in each scenario."""
    import numpy as np

    from covid_tasks.promotion import paired_deltas

    rng = np.random.default_rng(seed)
    y = np.array([1] * n_pos + [0] * n_neg)
    patients = np.arange(len(y))
    base_pos, base_neg, shared, own = 1.0, -0.3, 0.8, 0.6  # sens ~0.85, spec ~0.60, like the real models
    rows = []
    for name, d_pos, d_neg in SCENARIOS:
        counts = {"old rule (0.02)": 0, **{f"paired, margin {m:.2f}": 0 for m in MARGINS}}
        true_delta = {"sens": 0.0, "spec": 0.0}
        for _ in range(trials):
            common = rng.normal(0, shared, len(y))
            mean = np.where(y == 1, base_pos, base_neg)
            champion = mean + common + rng.normal(0, own, len(y))
            challenger = mean + np.where(y == 1, d_pos, -d_neg) + common + rng.normal(0, own, len(y))
            sens = [(s[y == 1] >= 0).mean() for s in (challenger, champion)]
            spec = [(s[y == 0] < 0).mean() for s in (challenger, champion)]
            true_delta["sens"] += (sens[0] - sens[1]) / trials
            true_delta["spec"] += (spec[0] - spec[1]) / trials
            if sens[0] >= sens[1] - 0.02 and spec[0] >= spec[1] - 0.02:
                counts["old rule (0.02)"] += 1
            deltas = paired_deltas(y, patients, (challenger, 0.0), (champion, 0.0), resamples=resamples,
                                   seed=int(rng.integers(1 << 31)))
            low = min(d["ci95"][0] for d in deltas.values())
            for m in MARGINS:
                counts[f"paired, margin {m:.2f}"] += int(low >= -m - 1e-12)
        rows.append({"scenario": name, "delta": true_delta, **{k: v / trials for k, v in counts.items()}})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--covid", type=int, default=46)
    parser.add_argument("--non-covid", type=int, default=13)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = simulate(args.covid, args.non_covid, args.trials, args.resamples, args.seed)
    keys = [k for k in rows[0] if k not in ("scenario", "delta")]
    print(f"Test split: {args.covid} covid, {args.non_covid} non-covid; {args.trials} trials per scenario; "
          f"{args.resamples} bootstrap resamples\n")
    print("| challenger vs champion | mean test delta sens / spec | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rows:
        delta = f"{r['delta']['sens']:+.2f} / {r['delta']['spec']:+.2f}"
        print(f"| {r['scenario']} | {delta} | " + " | ".join(f"{100 * r[k]:.0f}%" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
