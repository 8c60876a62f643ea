"""Quality benchmark: cross-validated recipes (``--cv``) and the single fixed split.

``--cv`` runs repeated, patient-grouped, label-stratified k-fold cross-validation (default 5 folds
x 2 repeats, ``covid_tasks.folds``) over the whole labelled set for each configuration named in
``--configs`` (see ``CV_CONFIGS``): frozen-feature linear probes (``probe-*``, cheap screening) and
the pipeline's own train + finetune stages per fold (``ft-*``). Within a fold, everything that
learns (weights, early stopping, the threshold) sees only that fold's training part. Each
configuration saves ``benchmarks/results/<configuration>/predictions.csv`` (out-of-fold P(covid)
per image and repeat, also with the lungs hidden and with everything outside them hidden),
``folds.csv`` and ``run.json`` (settings, wall time, images/s); ``--report`` recomputes every
figure of the README's table from those files alone (``benchmarks/cv_metrics.py``).

Without ``--cv`` it runs the pipeline's stages once on the fixed split (pull, relabel, split; then
train, finetune and evaluate per backbone/weights pair) and prints test sensitivity and
specificity (Wilson intervals) and ROC AUC (patient bootstrap interval), as before.

Usage::

    python benchmarks/quality_bench.py --cv --configs probe-lite0-224,ft-lite0-224
    python benchmarks/quality_bench.py --report            # the README table from benchmarks/results/
    python benchmarks/quality_bench.py --epochs 3 --finetune-epochs 5 --work /tmp/qb   # fixed split

Exits 0 with a note when the data set is absent. This is a script, not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "covid-chestxray"
RESULTS = REPO / "benchmarks" / "results"
CONFIGS: tuple[tuple[str, str], ...] = (
    ("efficientnet_lite0", "bundled"),
    ("efficientnet_lite0", "none"),
    ("resnet50", "none"),
)
BOOTSTRAP_ROUNDS = 2000


def bootstrap_auc_ci(labels: Any, probs: Any, groups: Any, rounds: int = BOOTSTRAP_ROUNDS,
                     seed: int = 1234) -> tuple[float, float]:
    """95% percentile interval of ROC AUC, resampling patients (images of one patient move together).

    Args:
        labels: 0/1 labels (1 = covid), one per image.
        probs: P(covid), one per image.
        groups: patient id per image.
        rounds: bootstrap resamples.
        seed: random seed.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when no resample holds both classes.
    """
    import numpy as np
    from sklearn.metrics import roc_auc_score

    y, p, g = np.asarray(labels, int), np.asarray(probs, float), np.asarray(groups).astype(str)
    patients, inverse = np.unique(g, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(patients))]
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(rounds):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(patients), len(patients))])
        if len(set(y[idx].tolist())) == 2:
            aucs.append(roc_auc_score(y[idx], p[idx]))
    if not aucs:
        return (float("nan"), float("nan"))
    low, high = np.percentile(aucs, [2.5, 97.5])
    return (float(low), float(high))


def _auc_ci(result: dict[str, Any]) -> tuple[float, float]:
    if result.get("roc_auc_ci95"):
        low, high = result["roc_auc_ci95"]
        return (float(low), float(high))
    import pandas as pd

    preds = pd.read_csv(result["predictions_path"])
    labels = (preds["label"] == "covid").astype(int)
    return bootstrap_auc_ci(labels, preds["prob_covid"], preds["patientid"])


def _fmt(value: float, ci: Any) -> str:
    return f"{value:.3f} ({float(ci[0]):.3f}–{float(ci[1]):.3f})"


def run_config(work: Path, cfg: Any, backbone: str, weights: str) -> dict[str, Any]:
    """Train, fine-tune and evaluate one backbone/weights pair on the prepared data root."""
    from covid_tasks.stages.evaluate import evaluate
    from covid_tasks.stages.finetune import finetune
    from covid_tasks.stages.train import train

    run_cfg = cfg.replace(backbone=backbone, weights=weights)
    run_key = f"quality-{backbone}-{weights}"
    start = time.perf_counter()
    trained = train(run_cfg, run_key)
    tuned = finetune(run_cfg, run_key)
    result = evaluate(run_cfg, run_key)
    wall = time.perf_counter() - start
    return {
        "backbone": backbone,
        "weights": weights,
        "wall_s": wall,
        "epochs_run": [trained.get("epochs_run"), tuned.get("epochs_run")],
        "best_val_auc": tuned.get("best_val_auc"),
        "threshold": result["threshold"],
        "n_test": result.get("n_test", result.get("n")),
        "sensitivity": result["sensitivity"],
        "sensitivity_ci95": result["sensitivity_ci95"],
        "specificity": result["specificity"],
        "specificity_ci95": result["specificity_ci95"],
        "roc_auc": result["roc_auc"],
        "roc_auc_ci95": list(_auc_ci(result)),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown results table."""
    lines = [
        "| backbone | weights | test ROC AUC (95% CI) | sensitivity (95% CI) | specificity (95% CI) "
        "| threshold | epochs (train+finetune) | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        epochs = "+".join(str(e) for e in r["epochs_run"])
        lines.append(
            f"| {r['backbone']} | {r['weights']} | {_fmt(r['roc_auc'], r['roc_auc_ci95'])} "
            f"| {_fmt(r['sensitivity'], r['sensitivity_ci95'])} "
            f"| {_fmt(r['specificity'], r['specificity_ci95'])} "
            f"| {r['threshold']:.3f} | {epochs} | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with metadata.csv and images/")
    parser.add_argument("--work", default="", help="data root to use (default: a new temporary folder)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=None, help="head phase (default: Config's)")
    parser.add_argument("--finetune-learning-rate", type=float, default=None,
                        help="fine-tuning phase (default: Config's)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="fixed split: override a Config field (repeatable), e.g. --set lung_gate=false")
    parser.add_argument("--configs", default=None,
                        help="fixed split: comma-separated backbone:weights pairs; --cv: configuration "
                             "names from CV_CONFIGS (default: all probes)")
    parser.add_argument("--cv", action="store_true", help="repeated patient-grouped k-fold cross-validation")
    parser.add_argument("--report", action="store_true", help="recompute the table from benchmarks/results/")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--target-sensitivity", type=float, default=0.80,
                        help="the sensitivity each fold's threshold aims for on its training part")
    parser.add_argument("--results", default=str(RESULTS), help="where per-configuration results go")
    parser.add_argument("--patience", type=int, default=3, help="--cv fine-tuning: early stopping patience")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.cv else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="keras")
    sys.path.insert(0, str(REPO))
    if args.report:
        from cv_run import report

        print(report(Path(args.results)))
        return 0
    data = Path(args.data).resolve()
    if not (data / "metadata.csv").is_file():
        print(f"quality_bench: {data}/metadata.csv not found; nothing to benchmark.")
        return 0
    if args.cv:
        from cv_run import run_cv

        return run_cv(args, data)
    return fixed_split(args, data)


def fixed_split(args: argparse.Namespace, data: Path) -> int:
    """The single fixed split: the pipeline's stages once per backbone/weights pair."""
    from covid_tasks.config import Config
    from covid_tasks.stages.pull import pull
    from covid_tasks.stages.relabel import relabel
    from covid_tasks.stages.split import split

    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="quality-bench-"))
    rates = {"learning_rate": args.learning_rate, "finetune_learning_rate": args.finetune_learning_rate}
    if any("=" not in item for item in args.set):
        raise SystemExit(f"--set expects FIELD=VALUE, got {args.set}")
    sets = dict(item.split("=", 1) for item in args.set)
    cfg = Config.from_env({"data_root": str(work), "source_uri": str(data), "img_size": args.img_size,
                           "epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
                           "batch_size": args.batch_size, **rates, **sets})
    pairs = args.configs or ",".join(f"{b}:{w}" for b, w in CONFIGS)
    configs = [tuple(c.split(":", 1)) for c in pairs.split(",") if c]

    start = time.perf_counter()
    pull(cfg, "run")
    labelled = relabel(cfg, "run")
    splits = split(cfg, "run")
    prep_s = time.perf_counter() - start
    print(f"data: {data} -> {work} ({prep_s:.0f} s for pull, relabel, split)")
    split_counts = {k: v for k, v in splits.items() if not str(k).endswith("csv")}
    print(f"split: {json.dumps(split_counts, default=str)}")
    print(f"relabel: {json.dumps({k: v for k, v in labelled.items() if isinstance(v, (int, float))})}")

    rows = []
    for backbone, weights in configs:
        print(f"{time.strftime('%H:%M:%S')} running {backbone} + {weights} ...", flush=True)
        rows.append(run_config(work, cfg, backbone, weights))
        print(json.dumps(rows[-1], default=str), flush=True)

    head = ("linear-probe head (frozen backbone)" if cfg.head == "probe" else
            f"Adam head {cfg.epochs} epochs at lr {cfg.learning_rate:g} (frozen backbone)")
    settings = (f"Settings: img_size {cfg.img_size}, batch {cfg.batch_size}, lung_gate {cfg.lung_gate}, "
                f"multiscale {cfg.multiscale}, {head}, finetune up to {cfg.finetune_epochs} epochs at "
                f"lr {cfg.finetune_learning_rate:g} (all but BatchNorm, early stopping patience "
                f"{cfg.early_stopping_patience} on val AUC), calibration {cfg.calibration}, seed {cfg.seed}, "
                f"threshold: the evaluate stage's (target sensitivity {cfg.min_sensitivity:g} on val); "
                f"{os.cpu_count()} CPU cores. "
                f"AUC interval: {BOOTSTRAP_ROUNDS} patient-level bootstrap resamples; "
                "sensitivity/specificity: Wilson.")
    print()
    print(settings)
    print()
    print(table(rows))
    (work / "quality_bench.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
