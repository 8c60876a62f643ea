"""Figures written into a run folder: training curves, the test confusion matrix and ROC curve.

Every figure is written atomically with :func:`save_figure`; the calibration and shortcut-audit
figures (:mod:`covid_tasks.calibration`, :mod:`covid_tasks.shortcut_audit`) use it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from covid_tasks.config import CLASS_NAMES, POSITIVE_INDEX
from covid_tasks.layout import RunDir
from covid_tasks.stats import fmt
from covid_tasks.storage import atomic_path

PLOT_METRICS = ("accuracy", "loss", "precision", "recall", "auc")


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend (tasks and services have no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, target: Path) -> str:
    """Write a matplotlib figure as PNG atomically, close it, and return the path."""
    plt = pyplot()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return str(target)


def plot_history(history: dict[str, list[float]], run_dir: RunDir, phase: str) -> list[str]:
    """One PNG per metric of ``PLOT_METRICS``: train and validation curves per epoch.

    Args:
        history: Keras' history (``loss``, ``val_loss``, ...).
        run_dir: the run folder.
        phase: ``train`` or ``finetune``; files are ``<phase>_<metric>.png``.

    Returns:
        The paths written, in ``PLOT_METRICS`` order.
    """
    plt = pyplot()
    out = []
    for metric in PLOT_METRICS:
        if metric not in history:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        epochs = range(1, len(history[metric]) + 1)
        ax.plot(epochs, history[metric], marker="o", label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], marker="o", label="val")
        ax.set(title=f"{phase}: {metric}", xlabel="epoch", ylabel=metric)
        ax.legend()
        fig.tight_layout()
        out.append(save_figure(fig, run_dir.figure(f"{phase}_{metric}")))
    return out


def confusion_figure(target: Path, m: dict[str, Any]) -> str:
    """The test confusion matrix (counts and row %) at the operating threshold."""
    import numpy as np

    plt = pyplot()
    cells = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(cells, cmap="Blues")
    for i in range(2):
        for j in range(2):
            row = cells[i].sum()
            pct = f"\n{100 * cells[i, j] / row:.1f}%" if row else ""
            ax.text(j, i, f"{cells[i, j]}{pct}", ha="center", va="center",
                    color="white" if cells[i, j] > cells.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASS_NAMES, yticklabels=CLASS_NAMES,
           xlabel="predicted", ylabel="true",
           title=f"Test confusion matrix (threshold {m['threshold']:.3f})")
    fig.tight_layout()
    return save_figure(fig, target)


def roc_figure(target: Path, y: Any, curves: list[tuple[str, Any, dict[str, Any]]],
               title: str = "Test ROC") -> str:
    """ROC curves with each model's operating point.

    Args:
        target: the PNG to write.
        y: true class indices.
        curves: ``(label, P(covid), metrics at its threshold)`` per model (the challenger first,
            drawn solid; the others dashed).
        title: the figure's title.
    """
    import numpy as np
    from sklearn.metrics import roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for k, (label, p, mm) in enumerate(curves):
        colour, style = f"C{k}", "-" if k == 0 else "--"
        if len(set(np.asarray(y).tolist())) == 2:
            fpr, tpr, _ = roc_curve(y, p, pos_label=POSITIVE_INDEX)
            ax.plot(fpr, tpr, style, color=colour, label=f"{label} AUC {fmt(mm['roc_auc'])} "
                    f"[{fmt(mm['roc_auc_ci95'][0])}, {fmt(mm['roc_auc_ci95'][1])}]")
        ax.plot(1 - mm["specificity"], mm["sensitivity"], "o", color=colour,
                label=f"{label} at threshold {mm['threshold']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity (covid recall)", title=title, xlim=(0, 1),
           ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return save_figure(fig, target)

