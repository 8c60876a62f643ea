"""Driver of ``quality_bench.py --cv`` and ``--report``: folds, configurations, saved results."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
from cv_probe import features, run_mixed

logger = logging.getLogger("quality_cv")

SHORT = {"lite0": "efficientnet_lite0", "lite1": "efficientnet_lite1", "lite2": "efficientnet_lite2"}


def parse(name: str) -> dict[str, Any]:
    """``probe-lite2-300-clahe`` -> kind, backbone, size, prep (``ft-...`` adds fine-tuning options)."""
    parts = name.split("-")
    if len(parts) < 3 or parts[0] not in ("probe", "ft") or parts[1] not in SHORT:
        raise ValueError(f"bad configuration name {name!r}: expected probe|ft-lite0|1|2-<size>[-<prep>...]")
    return {"kind": parts[0], "backbone": SHORT[parts[1]], "size": int(parts[2]),
            "prep": parts[3] if len(parts) > 3 else "none", "options": parts[4:]}


def prepare_data(data: Path, work: Path, seed: int) -> pd.DataFrame:
    """Pull (incremental) and relabel into ``work/data`` with the pipeline's own stages."""
    from covid_tasks.config import Config
    from covid_tasks.stages.pull import pull
    from covid_tasks.stages.relabel import relabel

    root = work / "data"
    cfg = Config(data_root=str(root), source_uri=str(data), seed=seed)
    pull(cfg, "run")
    relabel(cfg, "run")
    return pd.read_csv(root / "labeled.csv", dtype=str, keep_default_na=False)


def ap_supine_rows(work: Path) -> pd.DataFrame:
    """AP Supine X-rays, labelled by the pipeline's own relabel with AP Supine as a primary view."""
    from covid_tasks.config import Config
    from covid_tasks.stages.relabel import relabel

    root = work / "data_apsupine"
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "raw").exists():
        (root / "raw").symlink_to(work / "data" / "raw")
    relabel(Config(data_root=str(root), views=("PA", "AP", "AP Supine"), fallback_views=()), "run")
    rows = pd.read_csv(root / "labeled.csv", dtype=str, keep_default_na=False)
    return rows[rows["view"] == "AP Supine"].reset_index(drop=True)


def run_cv(args: argparse.Namespace, data: Path) -> int:
    from cv_metrics import summarise, table

    from covid_tasks.folds import assign_folds

    work = Path(args.work or "/tmp/quality-cv").resolve()
    labeled = prepare_data(data, work, 1234)
    write_images(labeled, work / "data" / "raw" / "metadata.csv", Path(args.results) / IMAGES_CSV)
    folds = assign_folds(labeled, args.folds, args.repeats, seed=1234)
    names = [n for n in (args.configs or "probe-lite0-224").split(",") if n]
    rows = []
    for name in names:
        spec = parse(name)
        start = time.perf_counter()
        if spec["kind"] == "probe":
            preds, extra = _probe(spec, labeled, folds, work, args)
        else:
            from cv_finetune import run_finetune

            preds, extra = run_finetune(spec, labeled, folds, work, args)
        wall = time.perf_counter() - start + extra.pop("cached_seconds", 0.0)
        row = _save(Path(args.results) / name, name, spec, preds, folds, wall, extra, args)
        row["summary"] = summarise(preds)
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    return 0


def _probe(spec: dict[str, Any], labeled: pd.DataFrame, folds: pd.DataFrame, work: Path,
           args: argparse.Namespace) -> tuple[pd.DataFrame, dict[str, Any]]:
    import cv_prep
    from cv_probe import run, run_fold

    filenames = sorted(labeled["filename"])
    images = work / "data" / "raw" / "images"
    options = [o for o in spec["options"] if o not in ("apsup", "tta")]
    feature_set = options[0] if options else "gap"
    extra = None
    if "apsup" in spec["options"]:  # AP Supine images as extra training data, never scored
        rows = ap_supine_rows(work)
        extra_feats, _ = features(work, sorted(rows["filename"]), images, spec["backbone"], spec["size"],
                                  spec["prep"], cv_prep.PREPS[spec["prep"]])
        extra = (rows.sort_values("filename").reset_index(drop=True), extra_feats)
    if spec["prep"] not in ("lungmask", "lungcrop"):
        feats, seconds = features(work, filenames, images, spec["backbone"], spec["size"], spec["prep"],
                                  cv_prep.PREPS[spec["prep"]])
        preds = run(folds, feats, filenames, args.target_sensitivity, 1234, feature_set, extra)
        if "tta" in spec["options"]:  # average P(covid) over zoomed views, same fitted probes
            preds = _tta(preds, folds, feats, filenames, work, images, spec, feature_set, args, extra)
        return preds, {"cached_seconds": seconds, "images_per_s": 3 * len(filenames) / max(seconds, 1e-9),
                       "feature_seconds": seconds}
    import cv_lungs

    parts, total = [], 0.0
    for (repeat, fold), _ in folds.groupby(["repeat", "fold"]):
        segmenter = cv_lungs.fold_segmenter(work, folds, int(repeat), int(fold))
        how = cv_lungs.gate if spec["prep"] == "lungmask" else cv_lungs.crop

        def prepare(x: Any, names: list[str], how: Any = how, segmenter: Any = segmenter) -> Any:
            return how(x, segmenter)

        feats, seconds = features(work, filenames, images, spec["backbone"], spec["size"], spec["prep"],
                                  prepare, tag=f"-r{repeat}f{fold}")
        total += seconds
        parts.append(run_fold(folds, int(repeat), int(fold), feats, filenames, args.target_sensitivity, 1234,
                              feature_set))
    per_fold = total / max(len(parts), 1)
    return pd.concat(parts, ignore_index=True), {
        "cached_seconds": total, "images_per_s": 3 * len(filenames) / max(per_fold, 1e-9),
        "feature_seconds": total, "note": "features recomputed per fold (one segmenter per fold); "
                                          "segmenter training time not included"}


def _tta(preds: pd.DataFrame, folds: pd.DataFrame, feats: Any, filenames: list[str], work: Path,
         images: Path, spec: dict[str, Any], feature_set: str, args: argparse.Namespace,
         extra: Any) -> pd.DataFrame:
    """Test-time augmentation: the mean P(covid) over the image and two central zooms (90%, 95%).

    Each fold's probe is fitted on the un-augmented training features (exactly as in ``run``);
    only the held-out images are scored in three views and averaged (per occlusion view too).
    """
    import cv_prep
    from cv_probe import VIEWS

    columns = ["prob_covid"] + [f"prob_covid_{v}" for v in VIEWS[1:]]
    total = preds.sort_values(["repeat", "filename"]).reset_index(drop=True)
    for view in ("zoom90", "zoom95"):
        zoomed, _ = features(work, filenames, images, spec["backbone"], spec["size"], view,
                             cv_prep.PREPS[view])
        # Fit on the plain features, score the zoomed ones: swap the held-out rows' features.
        mixed = {v: {k: zoomed[v][k] for k in zoomed[v]} for v in zoomed}
        scored = run_mixed(folds, feats, mixed, filenames, args.target_sensitivity, feature_set, extra)
        scored = scored.sort_values(["repeat", "filename"]).reset_index(drop=True)
        total[columns] += scored[columns]
    total[columns] /= 3.0
    return total


def _save(out: Path, name: str, spec: dict[str, Any], preds: pd.DataFrame, folds: pd.DataFrame,
          wall: float, extra: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    preds.sort_values(["repeat", "fold", "filename"]).to_csv(out / "predictions.csv", index=False,
                                                               float_format="%.6g")
    folds.to_csv(out / "folds.csv", index=False)
    row = {"name": name, **spec, "wall_s": wall, "images_per_s": extra.pop("images_per_s", float("nan")),
           "folds": args.folds, "repeats": args.repeats, "target_sensitivity": args.target_sensitivity,
           "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), **extra}
    (out / "run.json").write_text(json.dumps(row, indent=2, default=str) + "\n")
    return row


def report(results: Path) -> str:
    """The docs' two tables, recomputed from every ``results/<configuration>/`` folder and
    ``results/images.csv`` (each image's source, finding and view; without it, no within-source
    figures)."""
    from cv_metrics import subgroup_table, summarise, table

    images = None
    if (results / IMAGES_CSV).is_file():
        images = pd.read_csv(results / IMAGES_CSV, dtype=str, keep_default_na=False)
    rows = []
    for folder in sorted(p for p in results.iterdir() if (p / "predictions.csv").is_file()):
        row = json.loads((folder / "run.json").read_text())
        row["summary"] = summarise(pd.read_csv(folder / "predictions.csv", dtype={"filename": str,
                                                                                  "patientid": str}),
                                   images=images)
        rows.append(row)
    order = {n: i for i, n in enumerate(_README_ORDER)}
    rows.sort(key=lambda r: (order.get(r["name"], len(order)), r["name"]))
    second = subgroup_table(rows)
    return table(rows) + (f"\n\n{second}" if second else "")


#: Each labelled image's source, finding and view, beside the configurations' folders.
IMAGES_CSV = "images.csv"


def write_images(labeled: pd.DataFrame, metadata_csv: Path, target: Path) -> Path:
    """``images.csv``: ``filename, source, finding, view`` of every labelled image.

    The source is ``covid_tasks.provenance``'s (the metadata's ``source`` column, else its ``url``
    host), the rule ``evaluate`` and the data checks use.
    """
    from covid_tasks.data_statistics import read_metadata
    from covid_tasks.provenance import labeled_sources

    frame = labeled[["filename", "finding", "view"]].copy()
    frame.insert(1, "source", labeled_sources(labeled, read_metadata(metadata_csv)).to_numpy())
    target.parent.mkdir(parents=True, exist_ok=True)
    frame.sort_values("filename").to_csv(target, index=False)
    return target


#: Row order of the README table (others follow alphabetically).
_README_ORDER: list[str] = [
    "ft-lite0-224",                                   # the recipe before this benchmark
    "ft-lite0-224-none-lung-ms-probe",                # the default now
    "probe-lite0-224-none-gap", "probe-lite0-224-histeq", "probe-lite0-224-clahe",
    "probe-lite0-224-standardize", "probe-lite1-240", "probe-lite2-260", "probe-lite2-260-none-ms",
    "probe-lite0-300-none-ms", "probe-lite0-224-none-grid2", "probe-lite0-224-none-apsup",
    "probe-lite0-224-none-ms", "probe-lite0-224-none-ms-apsup", "probe-lite0-224-none-ms-tta",
    "probe-lite0-224-lungmask-ms", "probe-lite0-224-lungcrop-ms",
    "ft-lite0-224-none-ms-probe", "ft-lite0-224-none-ms-probe-top6-lr4-cos",
    "ft-lite0-224-none-lung-ms-probe-top6-lr4-cos", "ft-lite0-224-none-lung-ms-probe-aug0",
    "ft-lite0-224-none-lung-ms-probe-aug2",
]
