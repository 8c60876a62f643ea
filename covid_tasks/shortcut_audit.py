"""Shortcut audit: does the model still separate the classes when the lungs are hidden?

Every run scores the test split three ways with the evaluated (calibrated) model, using the fixed
views of ``covid_tasks.occlusion``: ``full``; ``lungs_hidden`` (the central box of 70% of each
side filled with the image's mean); ``outside_hidden`` (everything else filled). A model that
reads the lungs falls towards ROC AUC 0.5 with the lungs hidden; one that still ranks covid
above non-covid there reads something else: hospital, device, burnt-in text, borders, the
patient's outline (DeGrave et al. 2021). When ``roc_auc_lungs_hidden >= shortcut_auc_limit`` the
audit writes a warning; ``shortcut_blocks_promotion`` decides whether it also blocks promotion.

What it cannot show: the box is the same for every image, so it hides some mediastinum and keeps
some lung apex; a shortcut *inside* the box (a device on the chest, a tube) passes unseen; an
occluded image is out of distribution, so a low AUC there is not proof the model reads pathology;
and on a small test split the AUCs carry wide intervals (recorded beside them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from covid_tasks.config import CLASS_NAMES, POSITIVE_INDEX, Config
from covid_tasks.occlusion import REGION, VIEWS, occlude

EXAMPLES_PER_CLASS = 2


def score_views(dual: Any, frame: Any, images_dir: Path, cfg: Config) -> dict[str, Any]:
    """Run ``dual`` (features and P(covid), see ``calibration.features_and_output``) on every view.

    Args:
        dual: a model returning ``[features, prob]``.
        frame: the test rows (``filename``, ``label``), scored in row order.
        images_dir: where the images are.
        cfg: configuration (``img_size``, ``batch_size``).

    Returns:
        ``{"features": (N, D) array of the full view, "prob": {view: (N,) P(covid)},
        "examples": {class index: [images]}}``, the examples for the audit's figure.
    """
    import numpy as np

    from covid_tasks.dataset import make_dataset

    features, probs = [], {view: [] for view in VIEWS}
    examples: dict[int, list[Any]] = {0: [], 1: []}
    for x, y in make_dataset(frame, images_dir, cfg, training=False):
        x = np.asarray(x)
        for view in VIEWS:
            feats, prob = dual.predict_on_batch(occlude(x, view) if view != "full" else x)
            probs[view].append(np.asarray(prob, dtype=float).reshape(-1))
            if view == "full":
                features.append(np.asarray(feats, dtype=float))
        for image, label in zip(x, np.asarray(y).astype(int), strict=True):
            if len(examples[label]) < EXAMPLES_PER_CLASS:
                examples[label].append(image)
    width = int(dual.outputs[0].shape[-1])
    return {"features": np.concatenate(features) if features else np.zeros((0, width)),
            "prob": {v: np.concatenate(p) if p else np.zeros(0) for v, p in probs.items()},
            "examples": examples}


def summarize(y_true: Any, probs: dict[str, Any], limit: float, seed: int) -> dict[str, Any]:
    """The audit's ``metrics.json`` entry: the three ROC AUCs (with 95% intervals) and the warning.

    Args:
        y_true: test class indices.
        probs: ``{view: P(covid)}`` from :func:`score_views`.
        limit: the lungs-hidden ROC AUC at or above which the audit warns.
        seed: bootstrap seed of the intervals.

    Returns:
        ``{"roc_auc_full", "roc_auc_lungs_hidden", "roc_auc_outside_hidden", "<each>_ci95",
        "region", "limit", "flagged", "warning"}``; ``warning`` is ``None`` when not flagged.
    """
    from covid_tasks.metrics import bootstrap_auc_intervals
    from covid_tasks.stats import fmt

    both = len(set(int(v) for v in y_true)) == 2
    out: dict[str, Any] = {}
    for view in VIEWS:
        out[f"roc_auc_{view}"] = _auc(y_true, probs[view]) if both else float("nan")
        out[f"roc_auc_{view}_ci95"] = bootstrap_auc_intervals(y_true, probs[view], seed=seed)["roc_auc_ci95"]
    hidden = out["roc_auc_lungs_hidden"]
    flagged = both and hidden >= limit
    out.update(region=REGION, limit=limit, flagged=bool(flagged), warning=None)
    if flagged:
        out["warning"] = (f"the model still separates the classes with the lungs hidden (test ROC AUC "
                          f"{fmt(hidden)} >= {limit:.2f}; full image {fmt(out['roc_auc_full'])}): it may "
                          "read borders, devices, text or the patient's outline instead of the lungs")
    return out


def plot(target: Path, examples: dict[int, list[Any]], audit: dict[str, Any]) -> str:
    """``shortcut_audit.png``: example test images of each class in each view, with the view's AUC."""
    import numpy as np

    from covid_tasks.plots import pyplot, save_figure
    from covid_tasks.stats import fmt

    plt = pyplot()
    rows = [(cls, img) for cls in (POSITIVE_INDEX, 1 - POSITIVE_INDEX) for img in examples.get(cls, [])]
    n_rows = max(len(rows), 1)
    fig, axes = plt.subplots(n_rows, len(VIEWS), figsize=(2.3 * len(VIEWS), 2.3 * n_rows), squeeze=False)
    for j, view in enumerate(VIEWS):
        axes[0, j].set_title(f"{view}\nROC AUC {fmt(audit[f'roc_auc_{view}'])}", fontsize=8)
        for i, (cls, image) in enumerate(rows):
            shown = occlude(image, view) if view != "full" else image
            axes[i, j].imshow(np.clip(shown, 0, 255).astype("uint8"))
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(CLASS_NAMES[cls], fontsize=8)
    for ax in axes.ravel()[len(rows) * len(VIEWS):] if rows else axes.ravel():
        ax.axis("off")
    fig.suptitle("Shortcut audit" + (" - WARNING" if audit.get("flagged") else ""), fontsize=9)
    fig.tight_layout()
    return save_figure(fig, target)


def _auc(y_true: Any, prob: Any) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y_true, prob))
