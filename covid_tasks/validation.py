"""External validation: score a hospital's own labelled films with a registered model before trusting it.

``python -m covid_tasks validate --labels films.csv --model models:/covid-xray-classifier@champion``
reads a CSV with the columns ``image,label[,source]`` (image paths relative to the CSV's folder;
labels ``covid`` / ``non_covid``), decodes every film with :func:`covid_tasks.images.load_image`
(the decoder training and serving use), scores it with the model at the model's own operating
threshold and reports what ``evaluate`` reports on the test split: ROC AUC with a bootstrap
interval, sensitivity and specificity with Wilson intervals (:func:`covid_tasks.metrics.binary_metrics`),
the expected calibration error (:func:`covid_tasks.stats.expected_calibration_error`), and the
figures per ``source`` (:mod:`covid_tasks.subgroups`).

Nothing in the CSV is trusted: a row with an unknown label, an empty image, an absolute path or
``..`` is listed and skipped; a film that is missing or does not decode is listed and skipped; a
CSV of one class gives NaN AUC with a note; an empty or headerless CSV is an error.

With ``--log`` the validation is recorded in MLflow against the model version
(:func:`log_validation`): a run in the experiment :data:`EXPERIMENT` tagged with the model's name,
version and training run, ``external_*`` metrics, the reliability plot, the ROC curve and the
scores; the version gets a tag ``external_validation.<run id>`` summarising it, and its model card
(:mod:`covid_tasks.model_card`) is rendered again with the validation in it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from covid_tasks.config import CLASS_NAMES, POSITIVE_INDEX, redact_uri
from covid_tasks.model_card import VERSION_TAG_PREFIX

logger = logging.getLogger(__name__)

#: The MLflow experiment of logged external validations.
EXPERIMENT = "covid-external-validation"
UNSPECIFIED_SOURCE = "unspecified"
#: The figures copied into the summary tag and logged as ``external_<name>`` metrics.
SUMMARY_KEYS = ("n", "n_covid", "n_non_covid", "roc_auc", "roc_auc_ci95", "sensitivity", "sensitivity_ci95",
                "specificity", "specificity_ci95", "ppv", "npv", "threshold", "ece", "brier")
_BATCH = 16


@dataclass(frozen=True)
class LabelledFilm:
    """One usable row of the labels CSV."""

    line: int
    image: str
    path: Path
    label: str
    source: str


def read_labels(csv_path: str | Path) -> tuple[list[LabelledFilm], list[dict[str, Any]]]:
    """The usable rows of a labels CSV, and the rows skipped with why.

    Args:
        csv_path: a CSV with a header row naming ``image`` and ``label`` (and optionally ``source``),
            in any order and case.

    Returns:
        ``(films, skipped)``; each skipped entry is ``{"line", "image", "reason"}``.

    Raises:
        FileNotFoundError: the CSV does not exist.
        ValueError: the CSV is empty, not UTF-8, or its first row does not name ``image`` and ``label``.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in next(reader, [])]
    if not any(header):
        raise ValueError(f"{path} is empty: expected a header row 'image,label[,source]' and a row per film")
    if "image" not in header or "label" not in header:
        raise ValueError(f"{path} has no header row naming 'image' and 'label' (first row: "
                         f"{','.join(header)[:200]!r}); expected 'image,label[,source]'")
    col = {name: header.index(name) for name in ("image", "label", "source") if name in header}
    films: list[LabelledFilm] = []
    skipped: list[dict[str, Any]] = []
    seen: set[str] = set()
    for fields in reader:
        line = reader.line_num  # the record's last physical line
        if not any(f.strip() for f in fields):
            continue  # a blank line
        cell = {name: (fields[i].strip() if i < len(fields) else "") for name, i in col.items()}
        why = _row_problem(cell["image"], cell["label"].lower(), seen)
        if why:
            skipped.append({"line": line, "image": cell["image"], "reason": why})
            continue
        seen.add(cell["image"])
        films.append(LabelledFilm(line, cell["image"], path.parent / cell["image"], cell["label"].lower(),
                                  cell.get("source") or UNSPECIFIED_SOURCE))
    return films, skipped


def _row_problem(image: str, label: str, seen: set[str]) -> str | None:
    """Why a row cannot be used, or ``None``."""
    if not image:
        return "empty image path"
    if PurePosixPath(image).is_absolute() or PureWindowsPath(image).is_absolute() or image.startswith("\\"):
        return "absolute path: image paths are relative to the CSV's folder"
    if ".." in PurePosixPath(image.replace("\\", "/")).parts:
        return "path leaves the CSV's folder ('..')"
    if label not in CLASS_NAMES:
        return f"unknown label {label!r}: expected {' or '.join(CLASS_NAMES)}"
    if image in seen:
        return "duplicate row: the image is listed earlier"
    return None


def score_films(films: list[LabelledFilm], loaded: Any
                ) -> tuple[list[LabelledFilm], Any, list[dict[str, Any]]]:
    """Decode and score each film; a missing or undecodable file is skipped, not fatal.

    Args:
        films: the usable rows.
        loaded: a :class:`covid_tasks.registry.LoadedModel`.

    Returns:
        ``(scored films, P(covid) array, skipped)``; skipped entries are ``{"line", "image", "reason"}``.
    """
    import numpy as np

    from covid_tasks.images import load_image

    kept: list[LabelledFilm] = []
    skipped: list[dict[str, Any]] = []
    probs: list[Any] = []
    batch: list[Any] = []

    def flush() -> None:  # predict a batch at a time: a large folder never sits in memory at once
        if batch:
            probs.append(loaded.model.predict(np.stack(batch), verbose=0).reshape(-1))
            batch.clear()

    for film in films:
        if not film.path.is_file():
            skipped.append({"line": film.line, "image": film.image, "reason": "file not found"})
            continue
        try:
            batch.append(load_image(film.path, loaded.img_size))
        except (ValueError, OSError) as exc:
            skipped.append({"line": film.line, "image": film.image,
                            "reason": f"cannot decode: {str(exc).splitlines()[0][:300]}"})
            continue
        kept.append(film)
        if len(batch) == _BATCH:
            flush()
    flush()
    return kept, (np.concatenate(probs).astype(float) if probs else np.zeros(0)), skipped


def figures(y: Any, prob: Any, sources: list[str], threshold: float, seed: int = 0) -> dict[str, Any]:
    """The validation's figures at ``threshold``: pooled, calibration, per source and within source.

    Returns:
        ``n``, ``n_covid``, ``n_non_covid``, ``roc_auc`` / ``pr_auc`` (bootstrap ``_ci95``),
        ``sensitivity``, ``specificity``, ``ppv``, ``npv`` (Wilson ``_ci95``), ``tp fn tn fp``,
        ``threshold``, ``ece``, ``brier``, ``by_source`` (``n``, ``n_covid``, ``n_non_covid``,
        ``sensitivity``, ``specificity`` with intervals, ``too_small``, and ``roc_auc`` where the
        source holds both classes), ``within_source`` and ``notes``.
    """
    from covid_tasks.metrics import binary_metrics
    from covid_tasks.stats import brier_score, expected_calibration_error
    from covid_tasks.subgroups import by_group, within_source

    m = binary_metrics(y, prob, threshold, seed=seed)
    n_covid = int(sum(1 for v in y if v == POSITIVE_INDEX))
    keep = ("tp", "fn", "tn", "fp", "threshold", "roc_auc", "roc_auc_ci95", "pr_auc", "pr_auc_ci95",
            "sensitivity", "sensitivity_ci95", "specificity", "specificity_ci95", "ppv", "ppv_ci95", "npv",
            "npv_ci95", "balanced_accuracy")
    out: dict[str, Any] = {"n": len(y), "n_covid": n_covid, "n_non_covid": len(y) - n_covid,
                           **{k: m[k] for k in keep}, "ece": expected_calibration_error(y, prob),
                           "brier": brier_score(y, prob)}
    per_source = by_group(y, prob, sources, threshold, seed=seed)
    for fig in per_source.values():
        if min(fig["n_covid"], fig["n_non_covid"]) == 0:
            fig.pop("roc_auc"), fig.pop("roc_auc_ci95")
    out["by_source"] = per_source
    out["within_source"] = within_source(y, prob, sources, seed=seed)
    out["notes"] = _notes(out)
    return out


def _notes(out: dict[str, Any]) -> list[str]:
    notes = []
    for cls, count in ((CLASS_NAMES[POSITIVE_INDEX], out["n_covid"]),
                       (CLASS_NAMES[1 - POSITIVE_INDEX], out["n_non_covid"])):
        if count == 0:
            undefined = "specificity" if cls == CLASS_NAMES[1 - POSITIVE_INDEX] else "sensitivity"
            notes.append(f"no {cls} film was scored: ROC AUC and {undefined} are undefined (NaN); "
                         f"add {cls} films to measure them")
    if 0 < min(out["n_covid"], out["n_non_covid"]) < 10:
        notes.append(f"fewer than 10 films of one class ({out['n_covid']} covid, {out['n_non_covid']} "
                     "non_covid): the intervals are wide; read them, not the point figures")
    return notes


def model_identity(loaded: Any, model: str, tracking_uri: str | None) -> dict[str, Any]:
    """``{"uri", "name", "version", "run_id", "threshold", "img_size", "output"}`` of the loaded model."""
    from mlflow import MlflowClient

    from covid_tasks.registry import resolve_tracking_uri

    name = run_id = None
    if model.startswith("models:/"):
        rest = model.removeprefix("models:/").strip("/")
        name = rest.split("@", 1)[0].split("/", 1)[0]
    if name and loaded.version is not None:
        uri = resolve_tracking_uri(tracking_uri)
        run_id = MlflowClient(uri, registry_uri=uri).get_model_version(name, str(loaded.version)).run_id
    return {"uri": model, "name": name, "version": None if loaded.version is None else str(loaded.version),
            "run_id": run_id, "threshold": loaded.threshold, "img_size": loaded.img_size,
            "output": loaded.output}


def validate(labels_csv: str | Path, model: str, tracking_uri: str | None = None, log: bool = False,
             seed: int = 0) -> dict[str, Any]:
    """Score every labelled film with ``model`` at its own threshold and report the figures.

    Args:
        labels_csv: the labels CSV (see the module docstring).
        model: ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a ``.keras`` file with its
            operating point beside it.
        tracking_uri: MLflow tracking URI for a registered model (and for ``log``).
        log: record the validation in MLflow against the model version (:func:`log_validation`).
        seed: bootstrap seed.

    Returns:
        :func:`figures` plus ``labels`` (the CSV), ``model`` (:func:`model_identity`),
        ``skipped_rows``, ``skipped_files``, and with ``log`` ``mlflow`` (``run_id``,
        ``experiment``, ``version_tag``).

    Raises:
        FileNotFoundError: the CSV or the model file is missing.
        ValueError: the CSV is empty or headerless, no film could be scored, or ``log`` with a
            model that is not a registered version.
        RuntimeError: the registry cannot be reached or has no such model.
    """
    import numpy as np

    from covid_tasks.predict import load_model

    films, skipped_rows = read_labels(labels_csv)
    if log and not model.startswith("models:/"):
        raise ValueError("--log records the validation against a registered version: pass "
                         "--model models:/<name>/<version> or models:/<name>@<alias>, not a file")
    loaded = load_model(model, tracking_uri)
    identity = model_identity(loaded, model, tracking_uri)
    logger.info("validate: %d usable row(s) of %s (%d skipped); model %s version %s, threshold %.4f",
                len(films), labels_csv, len(skipped_rows), model, identity["version"], loaded.threshold)
    kept, prob, skipped_files = score_films(films, loaded)
    if not kept:
        raise ValueError(f"no film of {labels_csv} could be scored ({len(skipped_rows)} row(s) skipped, "
                         f"{len(skipped_files)} file(s) missing or undecodable)")
    y = np.array([POSITIVE_INDEX if f.label == CLASS_NAMES[POSITIVE_INDEX] else 1 - POSITIVE_INDEX
                  for f in kept])
    result = {"labels": str(labels_csv), **figures(y, prob, [f.source for f in kept], loaded.threshold, seed),
              "model": identity, "skipped_rows": skipped_rows, "skipped_files": skipped_files}
    for why in result["notes"]:
        logger.warning("validate: %s", why)
    if log:
        from mlflow.exceptions import MlflowException

        from covid_tasks.registry import resolve_tracking_uri, unavailable

        try:
            result["mlflow"] = log_validation(result, kept, y, prob, tracking_uri)
        except MlflowException as exc:
            uri = resolve_tracking_uri(tracking_uri)
            raise (unavailable(exc, uri, "log the validation") or RuntimeError(redact_uri(
                f"cannot log the validation in the MLflow registry at {uri}: {exc.message}"))) from exc
    return result


def summary(result: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The short record of a validation kept in the version tag and the model card."""
    return {"run_id": run_id, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "labels": Path(result["labels"]).name, "sources": len(result["by_source"]),
            "within_source_roc_auc": result["within_source"]["roc_auc"],
            **{k: result[k] for k in SUMMARY_KEYS}}


def log_validation(result: dict[str, Any], films: list[LabelledFilm], y: Any, prob: Any,
                   tracking_uri: str | None) -> dict[str, Any]:
    """Record a validation in MLflow against its model version and re-render the version's card.

    Args:
        result: :func:`validate`'s result (its ``model`` names a registered version).
        films: the scored films, aligned with ``y`` and ``prob``.
        y: class indices.
        prob: P(covid) per film.
        tracking_uri: the registry (``None``: the project's).

    Returns:
        ``{"run_id", "experiment", "version_tag", "model_card"}`` (``model_card``: whether the
        card was re-rendered).

    Raises:
        RuntimeError: the registry cannot be reached.
    """
    import pandas as pd
    from mlflow import MlflowClient

    from covid_tasks import model_card
    from covid_tasks.calibration import reliability_plot
    from covid_tasks.plots import roc_figure
    from covid_tasks.registry import bound_mlflow_http, resolve_tracking_uri
    from covid_tasks.storage import jsonable, write_json

    bound_mlflow_http()
    model = result["model"]
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri, registry_uri=uri)
    name, version = model["name"], model["version"]
    tags = {"model_name": name, "model_version": version, "model_run_id": model["run_id"] or "",
            "model_uri": model["uri"], "labels": Path(result["labels"]).name, "kind": "external_validation"}
    run = client.create_run(_experiment(client, uri), run_name=f"{name}-v{version}-external", tags=tags)
    run_id = run.info.run_id
    try:
        for key, value in {"labels": result["labels"], "threshold": model["threshold"],
                           "img_size": model["img_size"]}.items():
            client.log_param(run_id, key, str(value)[:500])
        for key, value in external_metrics(result).items():
            client.log_metric(run_id, key, value)
        with tempfile.TemporaryDirectory(prefix="covid-validation-") as tmp:
            folder = Path(tmp)
            reliability_plot(folder / "reliability.png", y, None, prob, (math.nan, result["ece"]),
                             title="Reliability on the external films", labels=("", f"version {version}"))
            roc_figure(folder / "roc_curve.png", y, [(f"version {version}", prob, result)],
                       title="External validation ROC")
            pd.DataFrame({"image": [f.image for f in films], "source": [f.source for f in films],
                          "label": [f.label for f in films], "prob_covid": prob,
                          "predicted": [CLASS_NAMES[POSITIVE_INDEX] if p >= model["threshold"]
                                        else CLASS_NAMES[1 - POSITIVE_INDEX] for p in prob]}
                         ).to_csv(folder / "scores.csv", index=False)
            write_json(folder / "validation.json", jsonable(result))
            client.log_artifacts(run_id, str(folder), "external_validation")
        record = jsonable(summary(result, run_id))
        tag = f"{VERSION_TAG_PREFIX}{run_id}"
        client.set_model_version_tag(name, version, tag, json.dumps(record, separators=(",", ":")))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    rendered = model_card.refresh(client, name, version, uri)
    logger.info("validate: logged run %s in %s at %s; version %s tagged %s", run_id, EXPERIMENT,
                redact_uri(uri), version, tag)
    return {"run_id": run_id, "experiment": EXPERIMENT, "version_tag": tag, "model_card": rendered}


def external_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The figures as ``external_*`` MLflow metrics (intervals as ``_low`` / ``_high``; NaN left out)."""
    out: dict[str, float] = {}
    for key in (*SUMMARY_KEYS, "pr_auc", "pr_auc_ci95", "tp", "fn", "tn", "fp"):
        value = result.get(key)
        if isinstance(value, list) and len(value) == 2:
            out[f"external_{key}_low"], out[f"external_{key}_high"] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"external_{key}"] = value
    out["external_within_source_roc_auc"] = result["within_source"]["roc_auc"]
    return {k: float(v) for k, v in out.items() if v is not None and v == v}


def _experiment(client: Any, uri: str) -> str:
    """The validation experiment's id, created beside a SQLite store's artifacts when missing."""
    from covid_tasks.config import sqlite_path

    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    db_file = sqlite_path(uri)
    location = (db_file.parent / "artifacts").as_uri() if db_file is not None else None
    return client.create_experiment(EXPERIMENT, artifact_location=location)


def text_report(result: dict[str, Any]) -> str:
    """The figures as lines for a person (the CLI prints them before the JSON line)."""
    from covid_tasks.stats import fmt

    def ci(key: str) -> str:
        low, high = result.get(f"{key}_ci95") or [math.nan, math.nan]
        return f"{fmt(result[key])} [{fmt(low)}, {fmt(high)}]"

    model = result["model"]
    version = f" (version {model['version']})" if model["version"] else ""
    lines = [f"Model : {model['uri']}{version}, threshold {model['threshold']:.3f}",
             f"Films : {result['n']} scored ({result['n_covid']} covid, {result['n_non_covid']} non_covid); "
             f"{len(result['skipped_rows'])} row(s) and {len(result['skipped_files'])} file(s) skipped",
             f"ROC AUC : {ci('roc_auc')}",
             f"Sensitivity : {ci('sensitivity')} ({result['tp']} of {result['tp'] + result['fn']} covid)",
             f"Specificity : {ci('specificity')} ({result['tn']} of {result['tn'] + result['fp']} non_covid)",
             f"ECE : {fmt(result['ece'])} (10 bins)",
             f"Within sources : ROC AUC {fmt(result['within_source']['roc_auc'])} over "
             f"{result['within_source']['n_sources']} source(s) holding both classes"]
    for source, fig in result["by_source"].items():
        auc = f", ROC AUC {fmt(fig['roc_auc'])}" if "roc_auc" in fig else ""
        lines.append(f"Source {source} : {fig['n']} films ({fig['n_covid']} covid), sensitivity "
                     f"{fmt(fig['sensitivity'])}, specificity {fmt(fig['specificity'])}{auc}"
                     + (" (too small to read)" if fig["too_small"] else ""))
    for item in result["skipped_rows"] + result["skipped_files"]:
        lines.append(f"Skipped : line {item['line']} {item['image']!r}: {item['reason']}")
    lines += [f"Note : {note}" for note in result["notes"]]
    if result.get("mlflow"):
        lines.append(f"Logged : MLflow run {result['mlflow']['run_id']} in {result['mlflow']['experiment']}; "
                     f"version tag {result['mlflow']['version_tag']}")
    return "\n".join(lines)
