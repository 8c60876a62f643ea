"""The run history: one JSON line per DAG run in ``<data_root>/history.jsonl``, and its timeline.

A line holds what a person asks of a week: the dataset version and size, the data-check
verdict, the test metrics with their interval, the decision (``promote``, ``challenger``,
``reject`` or ``blocked``) and the champion after the run. ``register`` writes one for every
evaluated model; ``pull`` (a schema change) and ``check_data`` (a blocking anomaly) write one for
a blocked week. A re-run of a run key replaces its line. :func:`timeline_figure` draws the lines.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from covid_tasks.layout import DataRoot
from covid_tasks.storage import jsonable, write_bytes_atomic

logger = logging.getLogger(__name__)

DECISIONS = ("promote", "challenger", "reject", "blocked", "skipped", "failed")
FIELDS = ("run_key", "logical_date", "dataset_version", "n_labelled", "data_check", "roc_auc", "roc_auc_ci95",
          "sensitivity", "specificity", "decision", "version", "champion_version", "recorded_at")
_COLOURS = {"promote": "C2", "challenger": "C1", "reject": "C3", "blocked": "black", "skipped": "grey",
            "failed": "C4"}


def record(root: DataRoot, **entry: Any) -> dict[str, Any]:
    """Add (or replace, by ``run_key``) one run's line.

    Args:
        root: the data root.
        **entry: the line's fields (:data:`FIELDS`; ``run_key`` and ``decision`` are required).

    Returns:
        The line written.

    Raises:
        ValueError: no ``run_key``, an unknown field or an unknown decision.
    """
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown or not entry.get("run_key") or entry.get("decision") not in DECISIONS:
        raise ValueError(f"a history line needs a run_key and a decision in {DECISIONS}, and only the "
                         f"fields {FIELDS}; got {sorted(entry)}")
    line = {name: entry.get(name) for name in FIELDS}
    line["recorded_at"] = line["recorded_at"] or datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [old for old in load(root) if old.get("run_key") != line["run_key"]] + [jsonable(line)]
    text = "".join(json.dumps(item, sort_keys=True) + "\n" for item in lines)
    root.root.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(root.history, text.encode())
    logger.info("history: %s %s (%d line(s))", line["run_key"], line["decision"], len(lines))
    return line


def load(root: DataRoot) -> list[dict[str, Any]]:
    """Every line, oldest first (a torn or foreign line is skipped with a warning)."""
    if not root.history.is_file():
        return []
    out = []
    for number, text in enumerate(root.history.read_text(encoding="utf-8").splitlines(), 1):
        try:
            item = json.loads(text)
        except ValueError:
            logger.warning("history: line %d of %s is not JSON; skipped", number, root.history)
            continue
        if isinstance(item, dict) and item.get("run_key"):
            out.append(item)
    return out


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def timeline_figure(entries: list[dict[str, Any]], target: Path, title: str = "Weekly retraining") -> str:
    """Dataset size and data-check verdict, test ROC AUC (95% interval), sensitivity/specificity, and
    each week's decision with the champion after it.

    Args:
        entries: history lines (or the season's weeks), in order; ``week`` or ``logical_date``
            labels the x axis when present.
        target: the PNG to write.
        title: the figure's title.

    Returns:
        ``target`` as a string.
    """
    import numpy as np

    from covid_tasks.plots import pyplot, save_figure

    plt = pyplot()
    x = np.arange(1, len(entries) + 1)
    labels = [str(e.get("week") or (e.get("logical_date") or e["run_key"])[:10]) for e in entries]
    fig, (size, auc, rates, strip) = plt.subplots(4, 1, figsize=(8.5, 8.5), sharex=True,
                                                  gridspec_kw={"height_ratios": [1, 1.3, 1.1, 0.6]})
    checks = {"ok": "C2", "warn": "C1", "block": "C3"}
    size.bar(x, [_number(e.get("n_labelled")) for e in entries],
             color=[checks.get(str(e.get("data_check")), "lightgrey") for e in entries], alpha=0.75)
    size.set(ylabel="labelled images", title=title)
    size.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.75, label=f"data check {v}")
                         for v, c in checks.items()], fontsize=7, loc="upper left")
    roc = np.array([_number(e.get("roc_auc")) for e in entries])
    ci = np.array([(e.get("roc_auc_ci95") or [None, None]) for e in entries], dtype=float)
    auc.errorbar(x, roc, yerr=[roc - ci[:, 0], ci[:, 1] - roc], fmt="o", color="C0", capsize=3,
                 label="test ROC AUC, 95% CI")
    auc.axhline(0.5, ls=":", color="grey")
    auc.set(ylim=(0, 1.02), ylabel="ROC AUC")
    auc.legend(loc="lower left", fontsize=7)
    rates.plot(x, [_number(e.get("sensitivity")) for e in entries], "o", label="sensitivity")
    rates.plot(x, [_number(e.get("specificity")) for e in entries], "s", label="specificity")
    rates.set(ylim=(-0.02, 1.05), ylabel="test rate at\nthe threshold")
    rates.legend(loc="lower left", fontsize=7)
    for xi, e in zip(x, entries, strict=True):
        decision = e.get("decision") or "failed"
        strip.text(xi, 0.7, decision + (f"\nv{e['version']}" if e.get("version") else ""), ha="center",
                   va="center", fontsize=7, color=_COLOURS.get(decision, "black"))
        champion = e.get("champion_version")
        strip.text(xi, 0.2, f"champion\nv{champion}" if champion else "no\nchampion", ha="center",
                   va="center", fontsize=6, color="grey")
    strip.set(ylim=(0, 1), yticks=[], xticks=x, ylabel="decision")
    strip.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    fig.tight_layout()
    return save_figure(fig, target)
