"""Statistics of one labelled dataset version, for the data checks (:mod:`covid_tasks.data_checks`).

What TFX's StatisticsGen does for the pipeline: :func:`statistics` turns ``labeled.csv``, the
images and the upstream ``metadata.csv`` into one JSON-able dict (rows per label, view, source
and finding; image sizes and grey-level intensities, one entry per image so the next week can
reuse them by SHA-256; the metadata's schema summary). :func:`metadata_schema` is the pandera
schema of the upstream table; :func:`mutual_information` and :func:`psi` are the two measures
the checks compare.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from covid_tasks.config import METADATA_COLUMNS

if TYPE_CHECKING:
    import pandas as pd
    import pandera.pandas as pa

logger = logging.getLogger(__name__)

STATS_VERSION = 1
#: Edge of the downscaled copy the intensity figures are computed on (pixels).
INTENSITY_SIZE = 64
PSI_BINS = 10
_PSI_EPS = 1e-4
_UNNAMED = re.compile(r"Unnamed: \d+")


def metadata_schema() -> "pa.DataFrameSchema":
    """The pandera schema of the upstream ``metadata.csv`` (ieee8023 covid-chestxray-dataset).

    The columns ``relabel`` needs (``patientid``, ``finding``, ``view``, ``modality``,
    ``filename``) must exist and hold text; ``patientid`` and ``filename`` must be non-empty.
    Other columns may come and go (the upstream added ``RT_PCR_positive`` after June 2020).

    Returns:
        A non-strict ``DataFrameSchema`` that coerces the required columns to text.
    """
    import pandera.pandas as pa

    def non_empty(s: "pd.Series") -> "pd.Series":
        return s.astype(str).str.strip().str.len() > 0

    columns = {}
    for name in METADATA_COLUMNS:
        required_text = name in ("patientid", "filename")
        checks = [pa.Check(non_empty, error="non-empty")] if required_text else []
        columns[name] = pa.Column(str, nullable=not required_text, coerce=True, checks=checks,
                                  required=True)
    return pa.DataFrameSchema(columns, strict=False, name="covid-chestxray metadata.csv")


def read_metadata(path: str | Path) -> "pd.DataFrame":
    """Read ``metadata.csv`` as text (no type guessing, empty cells as ``""``).

    Args:
        path: the file.

    Returns:
        The table, every column of dtype ``str``.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"metadata file {p} not found")
    return pd.read_csv(p, dtype=str, keep_default_na=False, encoding="utf-8-sig")


def schema_summary(metadata: "pd.DataFrame") -> dict[str, Any]:
    """Validate ``metadata`` with :func:`metadata_schema` and summarise the outcome.

    Args:
        metadata: the upstream table (best read with :func:`read_metadata`).

    Returns:
        ``{"columns", "n_rows", "missing_required", "invalid_rows", "invalid_by_check"}``
        (``columns`` without the unnamed ones pandas makes of empty header cells):
        ``invalid_rows`` counts the rows failing any value check, ``invalid_by_check`` maps
        ``"column: check"`` to its row count.
    """
    import pandera.pandas as pa

    missing: list[str] = []
    invalid: dict[str, int] = {}
    bad_rows: set[Any] = set()
    try:
        metadata_schema().validate(metadata, lazy=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
        for row in cases.itertuples(index=False):
            if row.check == "column_in_dataframe":
                missing.append(str(row.failure_case))
            elif row.column is not None:
                key = f"{row.column}: {row.check}"
                invalid[key] = invalid.get(key, 0) + 1
                bad_rows.add(row.index)
    # pandas names an empty header cell "Unnamed: <position>" (upstream's header ends with a comma)
    named = [str(c) for c in metadata.columns if not _UNNAMED.fullmatch(str(c))]
    return {"columns": named, "n_rows": int(len(metadata)),
            "missing_required": sorted(set(missing), key=list(METADATA_COLUMNS).index),
            "invalid_rows": len(bad_rows), "invalid_by_check": dict(sorted(invalid.items()))}


def _image_figures(path: Path) -> dict[str, Any]:
    """Width and height (header) and grey-level mean/std on a ``INTENSITY_SIZE`` px copy."""
    import numpy as np
    from PIL import Image

    from covid_tasks.dicom import is_dicom
    from covid_tasks.near_duplicates import dicom_grey, grey_image

    if is_dicom(path):  # display grey levels, as training sees them (a DicomError is a ValueError)
        grey = dicom_grey(path)
        height, width = grey.shape
        small = Image.fromarray(grey, mode="L")
        small.thumbnail((INTENSITY_SIZE, INTENSITY_SIZE), Image.Resampling.BILINEAR)
        levels = np.asarray(small, dtype=np.float64)
    else:
        with Image.open(path) as img:
            width, height = img.size
            img.draft("L", (INTENSITY_SIZE, INTENSITY_SIZE))  # JPEG: decode at 1/2..1/8 scale
            small = grey_image(img)
            small.thumbnail((INTENSITY_SIZE, INTENSITY_SIZE), Image.Resampling.BILINEAR)
            levels = np.asarray(small, dtype=np.float64)
    return {"width": int(width), "height": int(height), "mean": round(float(levels.mean()), 3),
            "std": round(float(levels.std()), 3)}


def summary(values: Sequence[float]) -> dict[str, float] | None:
    """``min``, ``p05``, ``median``, ``mean``, ``p95``, ``max`` of the values (``None`` if empty)."""
    import numpy as np

    if not len(values):
        return None
    arr = np.asarray(values, dtype=np.float64)
    q = np.percentile(arr, [5, 50, 95])
    return {"min": float(arr.min()), "p05": round(float(q[0]), 3), "median": round(float(q[1]), 3),
            "mean": round(float(arr.mean()), 3), "p95": round(float(q[2]), 3), "max": float(arr.max())}


def _counts(values: Iterable[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def statistics(labeled: "pd.DataFrame", images_dir: str | Path, metadata: "pd.DataFrame | None" = None,
               previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Statistics of one labelled dataset version (what :func:`compare` reads).

    Args:
        labeled: ``labeled.csv`` (``filename``, ``patientid``, ``finding``, ``view``, ``label``,
            ``sha256``; ``group_id`` and ``source`` used when present).
        images_dir: the folder of the images (``raw/images``).
        metadata: the upstream table, for each image's source and the schema summary; ``None``
            leaves sources ``unknown`` (unless ``labeled`` has ``source``) and ``schema`` null.
        previous: statistics of an earlier version; images with the same SHA-256 reuse its
            size and intensity figures instead of being decoded again.

    Returns:
        A JSON-able dict: ``n_images``, ``n_patients``, ``n_groups``, ``labels``, ``views``,
        ``sources``, ``source_labels`` (source -> label -> images), ``findings`` (finding ->
        images), ``image_stats`` (``width``, ``height``, ``mean``, ``std`` summaries),
        ``unreadable`` (file names Pillow cannot decode), ``images`` (file name -> ``sha256``,
        ``label``, ``source``, ``finding``, ``width``, ``height``, ``mean``, ``std``) and
        ``schema`` (:func:`schema_summary`, or ``None``).

    Raises:
        KeyError: ``labeled`` lacks a needed column.
    """
    from PIL import Image

    from covid_tasks.provenance import labeled_sources

    needed = ("filename", "patientid", "finding", "view", "label", "sha256")
    missing = [c for c in needed if c not in labeled.columns]
    if missing:
        raise KeyError(f"labeled table lacks column(s) {missing}")
    root = Path(images_dir)
    source = labeled_sources(labeled, metadata)
    cache = {v["sha256"]: v for v in (previous or {}).get("images", {}).values() if "mean" in v}
    images: dict[str, dict[str, Any]] = {}
    unreadable: list[str] = []
    for row, src in zip(labeled.itertuples(index=False), source.tolist(), strict=True):
        entry: dict[str, Any] = {"sha256": str(row.sha256), "label": str(row.label), "source": src,
                                 "finding": str(row.finding)}
        known = cache.get(entry["sha256"])
        if known is not None:
            entry.update({k: known[k] for k in ("width", "height", "mean", "std")})
        else:
            try:
                entry.update(_image_figures(root / str(row.filename)))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                unreadable.append(str(row.filename))
                logger.warning("data_checks: %s not readable: %s", row.filename, exc)
        images[str(row.filename)] = entry
    readable = [e for e in images.values() if "mean" in e]
    source_labels: dict[str, dict[str, int]] = {}
    for e in images.values():
        per = source_labels.setdefault(e["source"], {})
        per[e["label"]] = per.get(e["label"], 0) + 1
    stats = {
        "version": STATS_VERSION,
        "n_images": len(images),
        "n_patients": int(labeled["patientid"].nunique()),
        "n_groups": int(labeled["group_id"].nunique()) if "group_id" in labeled.columns else None,
        "labels": _counts(labeled["label"]),
        "views": _counts(labeled["view"]),
        "sources": _counts(source),
        "source_labels": {s: dict(sorted(v.items())) for s, v in sorted(source_labels.items())},
        "findings": _counts(labeled["finding"]),
        "image_stats": {k: summary([e[k] for e in readable]) for k in ("width", "height", "mean", "std")},
        "unreadable": sorted(unreadable),
        "images": images,
        "schema": schema_summary(metadata) if metadata is not None else None,
    }
    logger.info("data_checks: statistics of %d images (%d patients, %d sources, %d unreadable)",
                stats["n_images"], stats["n_patients"], len(stats["sources"]), len(unreadable))
    return stats


def mutual_information(source_labels: Mapping[str, Mapping[str, int]]) -> float:
    """Mutual information between source and label, in bits (plug-in estimate).

    Args:
        source_labels: ``{source: {label: images}}``.

    Returns:
        I(source; label): how many bits of the label the source gives away (0 when every
        source holds the classes in the same proportions).
    """
    total = sum(n for per in source_labels.values() for n in per.values())
    if total == 0:
        return 0.0
    label_totals: dict[str, int] = {}
    for per in source_labels.values():
        for label, n in per.items():
            label_totals[label] = label_totals.get(label, 0) + n
    mi = 0.0
    for per in source_labels.values():
        n_source = sum(per.values())
        for label, n in per.items():
            if n:
                mi += n / total * math.log2(n * total / (n_source * label_totals[label]))
    return max(0.0, mi)


def psi(expected: Sequence[float], actual: Sequence[float], bins: int = PSI_BINS) -> float:
    """Population stability index of ``actual`` against ``expected``.

    Bins are the quantiles of ``expected`` (ties merged); each bin's share is floored at 1e-4.

    Args:
        expected: baseline values.
        actual: current values.
        bins: how many quantile bins.

    Returns:
        sum((a - e) * ln(a / e)) over bins; 0 for identical distributions, ~0.1 a moderate
        shift, above 0.25 a large one.

    Raises:
        ValueError: either sample is empty.
    """
    import numpy as np

    if not len(expected) or not len(actual):
        raise ValueError("psi needs two non-empty samples")
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    edges = np.unique(np.quantile(e, np.linspace(0, 1, bins + 1))[1:-1])
    e_share = np.bincount(np.searchsorted(edges, e, side="right"), minlength=len(edges) + 1) / len(e)
    a_share = np.bincount(np.searchsorted(edges, a, side="right"), minlength=len(edges) + 1) / len(a)
    e_share, a_share = np.maximum(e_share, _PSI_EPS), np.maximum(a_share, _PSI_EPS)
    return float(np.sum((a_share - e_share) * np.log(a_share / e_share)))
