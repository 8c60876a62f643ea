"""A model card per registered version: what it is for, what it learnt from, how it did, where it fails.

``register`` calls :func:`facts` and :func:`publish` once the version exists, before any alias
moves onto it, so every registered version carries two files beside its model:

* ``model_card.json``: the facts (intended use, training data by label, view and source, the
  recipe, the probe head, test metrics with intervals, within-source and subgroup figures,
  calibration, the shortcut audit, the data-check verdict, the decision);
* ``model_card.md``: :func:`render` of those facts plus the external validations logged against
  the version (``python -m covid_tasks validate --log`` tags it ``external_validation.<run id>``
  and calls :func:`refresh`, which renders the card again from the stored facts).

The inference service serves the champion's card at ``/v1/model/card``. Every value that comes
from data (source names, findings, reasons) is written as plain text with Markdown table
separators escaped; the page renders it with ``textContent`` only.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from covid_tasks.config import CLASS_NAMES, Config, redact_uri
from covid_tasks.layout import SPLITS, DataRoot

logger = logging.getLogger(__name__)

CARD = "model_card.md"
FACTS = "model_card.json"
#: Version tags naming an external validation run: ``external_validation.<run id>`` -> a JSON summary.
VERSION_TAG_PREFIX = "external_validation."
#: Settings of the recipe shown on the card (``Config`` fields).
RECIPE_FIELDS = ("backbone", "weights", "img_size", "lung_gate", "multiscale", "head", "epochs",
                 "learning_rate", "finetune_epochs", "finetune_learning_rate", "finetune_top_blocks",
                 "finetune_schedule", "augment_strength", "batch_size", "calibration", "seed",
                 "min_sensitivity", "min_specificity", "gate_on", "min_roc_auc",
                 "threshold_margin", "promotion_margin")
_SPECIAL = re.compile(r"[\\|<>*_`\[\]]")
TEST_FIGURES = ("roc_auc", "pr_auc", "sensitivity", "specificity", "ppv", "npv", "accuracy")
INTENDED_USE = (
    "Research and engineering of a weekly retraining process for a COVID-19 vs non-COVID chest X-ray "
    "classifier: comparing recipes, watching a model's figures week to week, and measuring it on a "
    "hospital's own labelled films (`python -m covid_tasks validate`) before anyone relies on it.")
NOT_FOR = (
    "Not for diagnosis, triage, screening or any decision about a patient. It is not a medical device, "
    "has not been validated clinically, and its output must not guide care.")
KNOWN_LIMITS = (
    "Trained on a public collection of a few hundred images from dozens of sources, where sources and "
    "labels are confounded: part of every pooled figure is telling sources apart (compare the "
    "within-source AUC with the pooled one).",
    "The test split is small: every figure carries a wide interval; read the intervals, not the points.",
    "The probability is calibrated to the training data's prevalence (mostly COVID-19), not to a clinic's.",
    "The shortcut audit hides a fixed central box: it cannot see a shortcut inside it, and an occluded "
    "film is out of distribution.",
    "Subgroups flagged too small hold fewer than 10 images of a class; their figures say little.",
    "Only PA/AP (and AP Supine as a fallback) X-rays; no CT, no lateral views, no children's films checked.",
)


def facts(root: DataRoot, cfg: Config, metrics: dict[str, Any], context: dict[str, Any], *, version: str,
          run_key: str, run_id: str, model_id: str | None) -> dict[str, Any]:
    """Everything the card says, as JSON-able facts of one registered version.

    Args:
        root: the data root (``splits.csv``, ``raw/metadata.csv``).
        cfg: the run's configuration.
        metrics: evaluate's ``metrics.json``.
        context: the run's context (``dataset_version``, ``logical_date``, ``airflow_run_id``).
        version: the registered version.
        run_key: the run's key.
        run_id: the MLflow run that logged the model.
        model_id: the MLflow logged model.

    Returns:
        The facts :func:`render` reads.
    """
    from covid_tasks.training_data import training_data

    trained_on = training_data(root, cfg.source_uri, context.get("dataset_version"))
    keep = ("n_test", "tp", "fn", "tn", "fp", "threshold", "threshold_rule", "threshold_uncalibrated",
            *TEST_FIGURES, *(f"{k}_ci95" for k in TEST_FIGURES))
    promotion = metrics.get("promotion") or {}
    return {
        "model": {"name": cfg.model_name, "version": str(version), "run_key": run_key, "run_id": run_id,
                  "model_id": model_id, "dataset_version": context.get("dataset_version"),
                  "logical_date": context.get("logical_date"),
                  "airflow_run_id": context.get("airflow_run_id"), "decision": metrics.get("decision"),
                  "promotion_rule": promotion.get("rule"), "promotion_reason": promotion.get("reason"),
                  "champion_compared": (metrics.get("champion") or {}).get("version")},
        "training_data": {**trained_on, **_composition(root)},
        "recipe": {k: getattr(cfg, k) for k in RECIPE_FIELDS if hasattr(cfg, k)},
        "probe": metrics.get("probe"),
        "test": {k: metrics.get(k) for k in keep},
        "within_source": metrics.get("within_source"),
        "subgroups": metrics.get("subgroups"),
        "calibration": {k: (metrics.get("calibration") or {}).get(k) for k in
                        ("method", "params", "ece_before", "ece_after", "brier_before", "brier_after")},
        "shortcut_audit": metrics.get("shortcut_audit"),
        "data_check": metrics.get("data_check"),
        "gate": {"passed": metrics.get("passed"), "reasons": metrics.get("reasons"),
                 "min_sensitivity": metrics.get("min_sensitivity"),
                 "min_specificity": metrics.get("min_specificity"), "gate_on": metrics.get("gate_on"),
                 "min_roc_auc": metrics.get("min_roc_auc", 0.0),
                 "threshold_margin": metrics.get("threshold_margin", 0.0)},
    }


def _composition(root: DataRoot) -> dict[str, Any]:
    """Images the model learnt from (train and val splits) by label and view, and by source and label."""
    import pandas as pd

    from covid_tasks.data_statistics import read_metadata
    from covid_tasks.provenance import labeled_sources

    if not root.splits.is_file():
        return {"by_view": {}, "by_source": {}}
    frame = pd.read_csv(root.splits, dtype=str, keep_default_na=False)
    frame = frame[frame["split"].isin(SPLITS[:2])].reset_index(drop=True)
    metadata = read_metadata(root.metadata) if root.metadata.is_file() else None
    source = labeled_sources(frame, metadata)
    views = frame["view"] if "view" in frame else pd.Series("unknown", index=frame.index)

    def table(keys: Any) -> dict[str, dict[str, int]]:
        counts = Counter(zip(keys, frame["label"], strict=True))
        size = Counter(keys)
        names = sorted(size, key=lambda k: (-size[k], k))
        return {k: {c: counts.get((k, c), 0) for c in CLASS_NAMES} for k in names}

    return {"learnt_from": "train and val splits", "by_view": table(views), "by_source": table(source)}


def external_validations(tags: dict[str, str]) -> list[dict[str, Any]]:
    """The validations logged against a version (its ``external_validation.*`` tags), oldest first."""
    out = []
    for key, value in (tags or {}).items():
        if key.startswith(VERSION_TAG_PREFIX):
            try:
                item = json.loads(value)
            except ValueError:
                logger.warning("model card: tag %s is not JSON; left out", key)
                continue
            if isinstance(item, dict):
                out.append(item)
    return sorted(out, key=lambda v: str(v.get("date", "")))


def _cell(value: Any) -> str:
    """A value as Markdown text: one line, with Markdown's punctuation (backslash, pipe, angle
    brackets, asterisk, underscore, backtick, square brackets) backslash-escaped, so any CommonMark
    renderer shows it as plain text (no HTML, no broken table); NaN and missing as ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return _SPECIAL.sub(r"\\\g<0>", " ".join(str(value).split()))


def _ci(value: Any, ci: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if not ci or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return _cell(value)
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _counts(g: dict[str, Any]) -> str:
    return f"{g.get('n', 0)} ({g.get('n_covid', 0)} / {g.get('n_non_covid', 0)})"


def _readable(g: dict[str, Any]) -> str:
    return "too small" if g.get("too_small") else "yes"


def _group_rows(groups: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| group | images (covid / non-COVID) | ROC AUC [95% CI] | sensitivity [95% CI] | "
            "specificity [95% CI] | readable |", "|---|---|---|---|---|---|"]
    for name, g in groups.items():
        figures = [_ci(g.get(k), g.get(f"{k}_ci95")) for k in ("roc_auc", "sensitivity", "specificity")]
        rows.append(f"| {_cell(name)} | {_counts(g)} | " + " | ".join(figures) + f" | {_readable(g)} |")
    return rows


def render(card: dict[str, Any], validations: list[dict[str, Any]] | None = None) -> str:
    """The Markdown card of one version.

    Args:
        card: :func:`facts`.
        validations: :func:`external_validations` of the version.

    Returns:
        The Markdown text.
    """
    model = card["model"]
    lines = [f"# Model card: {_cell(model['name'])} version {_cell(model['version'])}", "",
             "> **Research tool, not for diagnosis.** " + NOT_FOR, "",
             "## Intended use", "", INTENDED_USE, "",
             "Out of scope: any clinical use (above).", ""]
    data = card.get("training_data") or {}
    if data.get("demo"):
        lines += [f"**Demo model**: {_cell(data.get('demo_reason'))}. Its answers mean nothing.", ""]
    lines += _model_section(model, card.get("gate") or {})
    lines += _data_section(data)
    lines += _recipe_section(card.get("recipe") or {}, card.get("probe"))
    lines += _test_section(card.get("test") or {})
    lines += _groups_section(card.get("within_source") or {}, card.get("subgroups") or {})
    lines += _checks_section(card)
    lines += _validations_section(validations or [], model)
    lines += ["## Known limits", "", *(f"- {text}" for text in KNOWN_LIMITS), ""]
    return "\n".join(lines)


def _model_section(model: dict[str, Any], gate: dict[str, Any]) -> list[str]:
    rows = [("registered model", f"{model['name']} version {model['version']}"),
            ("pipeline run", model.get("run_key")), ("MLflow run", model.get("run_id")),
            ("logged model", model.get("model_id")), ("logical date", model.get("logical_date")),
            ("dataset version", model.get("dataset_version")),
            ("gate", ("passed" if gate.get("passed") else "failed") + f" (floors sensitivity "
                     f"{gate.get('min_sensitivity')}, specificity {gate.get('min_specificity')}, "
                     f"{gate.get('gate_on')})"),
            ("decision", model.get("decision")), ("promotion rule", model.get("promotion_rule")),
            ("why", model.get("promotion_reason")),
            ("compared with champion", model.get("champion_compared"))]
    return ["## Model", "", "| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows), ""]


def _data_section(data: dict[str, Any]) -> list[str]:
    lines = ["## Training data", "",
             f"Dataset version {_cell(data.get('dataset_version'))} from {_cell(data.get('source'))}: "
             f"{data.get('images', 0)} labelled images.", "",
             "| split | images | covid | non-COVID | patients |", "|---|---|---|---|---|"]
    for split, s in (data.get("splits") or {}).items():
        lines.append(f"| {split} | {s['images']} | {s['covid']} | {s['non_covid']} | {s['patients']} |")
    for title, key in (("view", "by_view"), ("source", "by_source")):
        table = data.get(key) or {}
        if not table:
            continue
        lines += ["", f"By {title} ({_cell(data.get('learnt_from'))}):", "",
                  f"| {title} | covid | non-COVID |", "|---|---|---|"]
        lines += [f"| {_cell(k)} | {v.get('covid', 0)} | {v.get('non_covid', 0)} |" for k, v in table.items()]
    return [*lines, ""]


def _recipe_section(recipe: dict[str, Any], probe: dict[str, Any] | None) -> list[str]:
    shown = {k: f"{v:g}" if isinstance(v, float) else v for k, v in recipe.items()}  # 1e-05, not 0.000
    lines = ["## Recipe", "", "| setting | value |", "|---|---|",
             *(f"| {_cell(k)} | {_cell(v)} |" for k, v in shown.items()), ""]
    if probe:
        edge = probe.get("probe_c_at_edge")
        signal = {True: "yes", False: "no"}.get(probe.get("probe_signal"), "unknown")
        inner = _ci(probe.get("probe_inner_auc"), probe.get("probe_inner_auc_ci95"))
        lines += [f"Probe head before fine-tuning: C = {_cell(probe.get('probe_c'))}"
                  + (f" (on the grid's {edge} edge)" if edge else "")
                  + f", inner cross-validated ROC AUC {inner}; carries signal: {signal}.", ""]
    return lines


def _test_section(test: dict[str, Any]) -> list[str]:
    n_covid = (test.get("tp") or 0) + (test.get("fn") or 0)
    n_non = (test.get("tn") or 0) + (test.get("fp") or 0)
    lines = ["## Test metrics", "",
             f"Test split: {_cell(test.get('n_test'))} images ({n_covid} covid, {n_non} non-COVID); COVID "
             f"is the positive class; threshold {_cell(test.get('threshold'))} on the calibrated P(covid) "
             f"({_cell(test.get('threshold_rule'))}).", "", "| metric | value [95% CI] |", "|---|---|"]
    lines += [f"| {name} | {_ci(test.get(name), test.get(f'{name}_ci95'))} |" for name in TEST_FIGURES]
    return [*lines, ""]


def _groups_section(within: dict[str, Any], groups: dict[str, Any]) -> list[str]:
    lines = ["## Within sources and subgroups (test split)", ""]
    if within and not within.get("sources"):
        lines += ["ROC AUC within sources: n/a, no source of the test split holds both classes.", ""]
    elif within:
        lines += [f"ROC AUC within sources: {_cell(within.get('roc_auc'))}, the image-weighted mean over "
                  f"{within.get('n_sources', 0)} source(s) holding both classes ({within.get('n', 0)} "
                  "images).", "", "| source | images (covid / non-COVID) | ROC AUC [95% CI] | readable |",
                  "|---|---|---|---|"]
        lines += [f"| {_cell(s)} | {_counts(v)} | {_ci(v.get('roc_auc'), v.get('roc_auc_ci95'))} | "
                  f"{_readable(v)} |" for s, v in (within.get("sources") or {}).items()]
        lines.append("")
    for title, key in (("By finding family", "finding_family"), ("By view", "view")):
        if groups.get(key):
            lines += [f"{title}:", "", *_group_rows(groups[key]), ""]
    if groups.get("too_small_rule"):
        lines += [f"Readable: {_cell(groups['too_small_rule'])}.", ""]
    return lines


def _audit_text(audit: dict[str, Any]) -> str:
    views = [f"{what} {_ci(audit.get(f'roc_auc_{key}'), audit.get(f'roc_auc_{key}_ci95'))}"
             for what, key in (("with the full film", "full"), ("with the lungs hidden", "lungs_hidden"),
                               ("with everything outside them hidden", "outside_hidden"))]
    verdict = f"**flagged**: {_cell(audit.get('warning'))}" if audit.get("flagged") else "not flagged"
    return f"Test ROC AUC {', '.join(views)}; limit {_cell(audit.get('limit'))}: {verdict}."


def _checks_section(card: dict[str, Any]) -> list[str]:
    cal = card.get("calibration") or {}
    check = card.get("data_check") or {}
    params = cal.get("params") or {}
    anomalies = f" (anomalies: {_cell(', '.join(check['anomalies']))})" if check.get("anomalies") else ""
    return ["## Calibration", "",
            f"{_cell(cal.get('method'))} (a = {_cell(params.get('a'))}, b = {_cell(params.get('b'))}), "
            f"fitted on the validation split. Test ECE {_cell(cal.get('ece_before'))} before, "
            f"{_cell(cal.get('ece_after'))} after; Brier score {_cell(cal.get('brier_before'))} before, "
            f"{_cell(cal.get('brier_after'))} after.", "",
            "## Shortcut audit", "", _audit_text(card.get("shortcut_audit") or {}), "",
            "## Data check", "",
            f"Verdict **{_cell(check.get('verdict', 'unchecked'))}**: {_cell(check.get('summary'))}"
            f"{anomalies}.",
            ""]


def _validations_section(validations: list[dict[str, Any]], model: dict[str, Any]) -> list[str]:
    lines = ["## External validations", ""]
    if not validations:
        uri = f"models:/{_cell(model['name'])}/{_cell(model['version'])}"
        return [*lines, "None logged yet. A hospital runs `python -m covid_tasks validate --labels films.csv "
                        f"--model {uri} --log` on its own labelled films to add one.", ""]
    lines += ["| date | films | images (covid / non-COVID) | ROC AUC [95% CI] | within sources | "
              "sensitivity [95% CI] | specificity [95% CI] | ECE | MLflow run |",
              "|---|---|---|---|---|---|---|---|---|"]
    for v in validations:
        figures = [_ci(v.get(k), v.get(f"{k}_ci95")) for k in ("roc_auc",)]
        figures.append(_cell(v.get("within_source_roc_auc")))
        figures += [_ci(v.get(k), v.get(f"{k}_ci95")) for k in ("sensitivity", "specificity")]
        lines.append(f"| {_cell(str(v.get('date', ''))[:10])} | {_cell(v.get('labels'))} | {_counts(v)} | "
                     + " | ".join(figures) + f" | {_cell(v.get('ece'))} | {_cell(v.get('run_id'))} |")
    return [*lines, ""]


def model_id_of(version: Any) -> str | None:
    """The logged model a version was registered from (its ``model_id`` tag, attribute or source)."""
    tags = dict(version.tags or {})
    found = tags.get("model_id") or getattr(version, "model_id", None)
    source = str(getattr(version, "source", "") or "")
    if not found and source.startswith("models:/m-"):
        found = source.removeprefix("models:/").split("/", 1)[0]
    return found or None


def publish(client: Any, name: str, version: str, card: dict[str, Any]) -> str:
    """Write ``model_card.json`` and ``model_card.md`` into the version's artifacts (its logged model).

    Args:
        client: an ``MlflowClient`` of the registry.
        name: the registered model.
        version: the version.
        card: :func:`facts`.

    Returns:
        The Markdown written.

    Raises:
        ValueError: the version was not registered from an MLflow logged model.
    """
    from covid_tasks.storage import jsonable

    entry = client.get_model_version(name, str(version))
    model_id = model_id_of(entry)
    if model_id is None:
        raise ValueError(f"{name} version {version} has no logged model to hold its model card")
    text = render(card, external_validations(dict(entry.tags or {})))
    with tempfile.TemporaryDirectory(prefix="covid-card-") as tmp:
        (Path(tmp) / FACTS).write_text(json.dumps(jsonable(card), indent=1, sort_keys=True), encoding="utf-8")
        (Path(tmp) / CARD).write_text(text, encoding="utf-8")
        client.log_model_artifact(model_id, str(Path(tmp) / FACTS))
        client.log_model_artifact(model_id, str(Path(tmp) / CARD))
    logger.info("model card: %s version %s (%d external validation(s))", name, version,
                len(external_validations(dict(entry.tags or {}))))
    return text


def read_artifact(client: Any, name: str, version: str, tracking_uri: str, filename: str) -> str | None:
    """A small text artifact of a version (``model_card.md``, ``model_card.json``); ``None`` if absent."""
    import mlflow
    from mlflow.exceptions import MlflowException

    source = client.get_model_version_download_uri(name, str(version)).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="covid-card-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(f"{source}/{filename}", dst_path=tmp,
                                                        tracking_uri=tracking_uri)
        except (MlflowException, OSError) as exc:
            if isinstance(exc, MlflowException) and exc.error_code not in ("RESOURCE_DOES_NOT_EXIST",
                                                                           "INVALID_PARAMETER_VALUE"):
                raise
            return None
        return Path(local).read_text(encoding="utf-8") if Path(local).is_file() else None


def refresh(client: Any, name: str, version: str, tracking_uri: str) -> bool:
    """Render a version's card again from its stored facts, with every validation now tagged.

    Returns:
        ``False`` (with a warning) when the version has no stored facts (registered before cards).
    """
    stored = read_artifact(client, name, version, tracking_uri, FACTS)
    if stored is None:
        logger.warning("model card: %s version %s has no %s (registered before model cards); not rendered "
                       "(registry %s)", name, version, FACTS, redact_uri(tracking_uri))
        return False
    publish(client, name, version, json.loads(stored))
    return True
