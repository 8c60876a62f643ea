"""Data checks between weekly dataset versions, in the spirit of TFX StatisticsGen/ExampleValidator.

Three steps, each a plain function:

1. :func:`statistics` (from :mod:`covid_tasks.data_statistics`, re-exported here) summarises one
   labelled dataset version as a JSON-able dict: rows per label, view and source
   (:mod:`covid_tasks.provenance`), finding strings, image sizes and grey-level intensities, and
   the upstream ``metadata.csv``'s schema (:func:`metadata_schema`, pandera).
2. :func:`compare` checks it against the statistics of the last version that passed and returns
   :class:`Anomaly` objects, each ``block`` (nothing is trained or registered) or ``warn`` (the
   model may become challenger, never champion, until a person promotes it).
3. :func:`verdict` and :func:`report` turn them into ``ok``/``warn``/``block`` and the JSON of
   ``<run>/data_checks.json``.

:func:`check_schema` (and :func:`require_schema`, which raises) runs the schema check alone on the
raw metadata, before ``relabel`` needs the columns. Every check, its severity and default
threshold, and why, are in docs/data-checks.md.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from covid_tasks.config import (
    CLASS_NAMES,
    METADATA_COLUMNS,
    POSITIVE_CLASS,
    field_defaults,
    threshold_problems,
)
from covid_tasks.data_statistics import (
    PSI_BINS,
    metadata_schema,
    mutual_information,
    psi,
    read_metadata,
    schema_summary,
    statistics,
    summary,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Anomaly", "SchemaChangeError", "Thresholds", "check_schema", "compare", "metadata_schema",
           "mutual_information", "psi", "read_metadata", "report", "require_schema", "schema_summary",
           "statistics", "verdict"]

logger = logging.getLogger(__name__)

BLOCK, WARN, OK = "block", "warn", "ok"
#: How many file names, findings or rows an anomaly's details list (counts are always complete).
MAX_EXAMPLES = 20
_DEFAULTS = field_defaults()


class SchemaChangeError(ValueError):
    """The upstream ``metadata.csv`` no longer has the columns the pipeline needs."""


@dataclass(frozen=True)
class Thresholds:
    """Limits of the checks; flat scalars so each maps to a Config field or a DAG Param.

    Attributes:
        check_max_label_change_share: block when, in some class, more than this share of the
            baseline's images (matched by file name, else SHA-256) now carry another label.
            Upstream corrected 7 of 526 labels (5 of them ``No Finding`` to COVID-19, about 4%
            of that class) between June 2020 and its newest metadata; 20% of a class flipped
            is label noise.
        check_min_class_share_kept: block when a class keeps less than this share of its
            baseline image count (a class vanishing or collapsing); images removed upstream
            stay below this in a normal week.
        check_max_invalid_row_share: block when more than this share of the metadata rows fail
            a value check of :func:`metadata_schema` (empty file names or patient ids: a column
            emptied or shifted is a schema change in disguise).
        check_source_label_jump: warn when one source gains at least this many images since the
            baseline and both its gain and its images are one class (``check_source_purity``):
            a one-class source grows, or a new one arrives (it counts from 0). Real growth of
            the June 2020 set gains at most 17 one-class images per source and week.
        check_source_purity: the share of one class that makes a gain, or a source, one-class.
        check_intensity_psi: warn when the population stability index of the per-image mean
            grey level, current set vs baseline set, exceeds this. Real growth moves it by at
            most 0.02 a week and 0.13 over four weeks; 0.2 is crossed when, e.g., every image
            is 15 levels brighter or a fifth of them 60 levels darker.
        check_max_cross_split_duplicates: warn when more near-duplicate pairs than this straddle
            two splits (the caller counts them with :mod:`covid_tasks.near_duplicates`).
        check_new_finding_min_images: warn about a finding string the baseline did not have when
            it is labelled ``covid`` (a new spelling decides positives) or carries at least this
            many images (a vocabulary change); rare new diseases (the real growth brings
            ``Varicella``, ``Lipoid``... with 1-4 images each) stay quiet.
    """

    # The defaults are Config's (one place to change them): a caller without a Config agrees with the DAG.
    check_max_label_change_share: float = _DEFAULTS["check_max_label_change_share"]
    check_min_class_share_kept: float = _DEFAULTS["check_min_class_share_kept"]
    check_max_invalid_row_share: float = _DEFAULTS["check_max_invalid_row_share"]
    check_source_label_jump: int = _DEFAULTS["check_source_label_jump"]
    check_source_purity: float = _DEFAULTS["check_source_purity"]
    check_intensity_psi: float = _DEFAULTS["check_intensity_psi"]
    check_max_cross_split_duplicates: int = _DEFAULTS["check_max_cross_split_duplicates"]
    check_new_finding_min_images: int = _DEFAULTS["check_new_finding_min_images"]

    def __post_init__(self) -> None:
        errors = threshold_problems(dataclasses.asdict(self))
        if errors:
            raise ValueError("; ".join(errors))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "Thresholds":
        """Build from a mapping (Config fields, DAG params); keys not named ``check_*`` are ignored.

        Args:
            values: e.g. ``{"check_intensity_psi": 0.2, "seed": 1}``.

        Returns:
            The thresholds, defaults where a key is absent.

        Raises:
            ValueError: a ``check_*`` key that is no field, or a value out of range.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k.startswith("check_") and k not in names)
        if unknown:
            raise ValueError(f"unknown data-check threshold(s) {unknown}; known: {sorted(names)}")
        return cls(**{f.name: type(f.default)(values[f.name]) for f in dataclasses.fields(cls)
                      if f.name in values})


@dataclass(frozen=True)
class Anomaly:
    """One finding of :func:`compare`.

    Attributes:
        code: a stable identifier (``schema_change``, ``class_collapse``, ``label_changes``...).
        severity: ``block`` or ``warn``.
        message: one sentence for a person, with the figures and the threshold.
        details: JSON-able figures behind the message.
    """

    code: str
    severity: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in (BLOCK, WARN):
            raise ValueError(f"severity must be {BLOCK!r} or {WARN!r}, got {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        """The anomaly as a JSON-able dict."""
        return dataclasses.asdict(self)


def _schema_anomalies(current: Mapping[str, Any] | None, baseline: Mapping[str, Any] | None,
                      t: Thresholds) -> list[Anomaly]:
    if not current:
        return []
    out: list[Anomaly] = []
    base_cols = list(baseline["columns"]) if baseline else []
    new_cols = [c for c in current["columns"] if base_cols and c not in base_cols]
    missing = list(current["missing_required"])
    if missing:
        hint = f"; new column(s) {new_cols} appeared since the baseline (renamed?)" if new_cols else ""
        out.append(Anomaly("schema_change", BLOCK,
                           f"metadata.csv lacks required column(s) {missing}{hint}; required: "
                           f"{list(METADATA_COLUMNS)}",
                           {"missing_required": missing, "new_columns": new_cols,
                            "columns": list(current["columns"])}))
    gone = [c for c in base_cols if c not in current["columns"] and c not in missing]
    if gone:
        out.append(Anomaly("columns_removed", WARN,
                           f"metadata.csv lost column(s) {gone} that the baseline had"
                           + (f"; new column(s) {new_cols}" if new_cols else ""),
                           {"removed": gone, "new_columns": new_cols}))
    n_rows = max(1, int(current["n_rows"]))
    share = current["invalid_rows"] / n_rows
    if share > t.check_max_invalid_row_share:
        out.append(Anomaly("invalid_rows", BLOCK,
                           f"{current['invalid_rows']} of {n_rows} metadata rows ({share:.0%}) fail a "
                           f"value check (limit {t.check_max_invalid_row_share:.0%}): "
                           f"{current['invalid_by_check']}",
                           {"invalid_rows": current["invalid_rows"], "n_rows": n_rows,
                            "by_check": current["invalid_by_check"]}))
    return out


def check_schema(metadata: "pd.DataFrame", baseline_columns: Sequence[str] | None = None,
                 thresholds: Thresholds | None = None) -> list[Anomaly]:
    """The schema checks alone, on the raw metadata (before ``relabel``).

    Args:
        metadata: the upstream table.
        baseline_columns: the columns of the last version that passed, to name renames.
        thresholds: the limits (defaults when ``None``).

    Returns:
        The schema anomalies (``schema_change``, ``invalid_rows``, ``columns_removed``).
    """
    base = {"columns": list(baseline_columns)} if baseline_columns is not None else None
    return _schema_anomalies(schema_summary(metadata), base, thresholds or Thresholds())


def require_schema(metadata: "pd.DataFrame", baseline_columns: Sequence[str] | None = None,
                   thresholds: Thresholds | None = None) -> list[Anomaly]:
    """:func:`check_schema`, raising on a blocking schema anomaly.

    Args:
        metadata: the upstream table.
        baseline_columns: see :func:`check_schema`.
        thresholds: the limits (defaults when ``None``).

    Returns:
        The warnings (no blocking anomaly).

    Raises:
        SchemaChangeError: a required column is missing or too many rows fail; the message
            names the columns.
    """
    found = check_schema(metadata, baseline_columns, thresholds)
    blocking = [a.message for a in found if a.severity == BLOCK]
    if blocking:
        raise SchemaChangeError("; ".join(blocking))
    return found


def _class_anomalies(cur: Mapping[str, Any], base: Mapping[str, Any] | None, t: Thresholds) -> list[Anomaly]:
    labels = cur["labels"]
    if base is None:
        absent = [c for c in CLASS_NAMES if not labels.get(c)]
        return [Anomaly("class_missing", BLOCK, f"no image of class(es) {absent} ({labels})",
                        {"labels": dict(labels)})] if absent else []
    out = []
    for label in sorted(set(CLASS_NAMES) | set(base["labels"])):
        before, now = int(base["labels"].get(label, 0)), int(labels.get(label, 0))
        if before and now < t.check_min_class_share_kept * before:
            out.append(Anomaly("class_collapse", BLOCK,
                               f"class {label!r} fell from {before} to {now} images ({now / before:.0%} "
                               f"kept; at least {t.check_min_class_share_kept:.0%} must stay)",
                               {"label": label, "baseline": before, "current": now}))
        elif not before and not now and label in CLASS_NAMES:
            out.append(Anomaly("class_missing", BLOCK, f"no image of class {label!r}", {"label": label}))
    return out


def _label_changes(cur: Mapping[str, Any], base: Mapping[str, Any], t: Thresholds) -> list[Anomaly]:
    by_name = base["images"]
    by_sha = {e["sha256"]: e for e in by_name.values()}
    matched: dict[str, int] = {}
    changed: dict[str, list[str]] = {}
    for name, e in cur["images"].items():
        old = by_name.get(name) or by_sha.get(e["sha256"])
        if old is None:
            continue
        matched[old["label"]] = matched.get(old["label"], 0) + 1
        if old["label"] != e["label"]:
            changed.setdefault(old["label"], []).append(name)
    out = []
    for label, names in sorted(changed.items()):
        share = len(names) / matched[label]
        if share > t.check_max_label_change_share:
            out.append(Anomaly("label_changes", BLOCK,
                               f"{len(names)} of {matched[label]} existing {label!r} images ({share:.0%}) "
                               f"changed label (limit {t.check_max_label_change_share:.0%})",
                               {"from_label": label, "changed": len(names), "matched": matched[label],
                                "share": round(share, 4), "examples": sorted(names)[:MAX_EXAMPLES]}))
    return out


def _new_findings(cur: Mapping[str, Any], base: Mapping[str, Any], t: Thresholds) -> list[Anomaly]:
    new: dict[str, dict[str, int]] = {}
    for e in cur["images"].values():
        if e["finding"] not in base["findings"]:
            per = new.setdefault(e["finding"], {})
            per[e["label"]] = per.get(e["label"], 0) + 1
    flagged = {f: per for f, per in new.items()
               if per.get(POSITIVE_CLASS, 0) or sum(per.values()) >= t.check_new_finding_min_images}
    if not flagged:
        return []
    listed = ", ".join(f"{f!r} ({sum(per.values())} {'/'.join(sorted(per))})"
                       for f, per in list(flagged.items())[:8]) + (" ..." if len(flagged) > 8 else "")
    return [Anomaly("new_findings", WARN,
                    f"{len(flagged)} new finding string(s) labelled {POSITIVE_CLASS!r} or with "
                    f"{t.check_new_finding_min_images}+ images: {listed}; check relabel's mapping",
                    {"flagged": dict(list(flagged.items())[:MAX_EXAMPLES]), "n_flagged": len(flagged),
                     "n_new": len(new), "new_images": sum(sum(per.values()) for per in new.values())})]


def _source_label(cur: Mapping[str, Any], base: Mapping[str, Any], t: Thresholds) -> list[Anomaly]:
    jumps = []
    for source, per in cur["source_labels"].items():
        old = base["source_labels"].get(source, {})
        gain = {label: n - old.get(label, 0) for label, n in per.items() if n > old.get(label, 0)}
        total = sum(gain.values())
        if not total or total < t.check_source_label_jump:
            continue
        label, n = max(gain.items(), key=lambda kv: kv[1])
        if n / total >= t.check_source_purity and per[label] / sum(per.values()) >= t.check_source_purity:
            jumps.append({"source": source, "new_source": not old, "label": label, "gained": n,
                          "gained_total": total, "baseline": dict(old), "current": dict(per)})
    if not jumps:
        return []
    mi_before, mi_now = mutual_information(base["source_labels"]), mutual_information(cur["source_labels"])
    text = "; ".join(f"{'new source ' if j['new_source'] else ''}{j['source']} gained {j['gained']} "
                     f"{j['label']!r} images of {j['gained_total']} and holds {j['current']}" for j in jumps)
    return [Anomaly("source_label_jump", WARN,
                    f"{text}: a one-class source grew by {t.check_source_label_jump}+ images, so the "
                    f"source gives the label away more (mutual information {mi_before:.3f} -> "
                    f"{mi_now:.3f} bits)",
                    {"sources": jumps, "mutual_information": {"baseline": round(mi_before, 4),
                                                              "current": round(mi_now, 4)}})]


def _intensity(cur: Mapping[str, Any], base: Mapping[str, Any], t: Thresholds) -> list[Anomaly]:
    before = [e["mean"] for e in base["images"].values() if "mean" in e]
    now = [e["mean"] for e in cur["images"].values() if "mean" in e]
    if len(before) < PSI_BINS or len(now) < PSI_BINS:
        return []
    value = psi(before, now)
    if value <= t.check_intensity_psi:
        return []
    return [Anomaly("intensity_drift", WARN,
                    f"the per-image mean grey level moved: PSI {value:.3f} > {t.check_intensity_psi} "
                    f"(median {summary(before)['median']:.1f} -> {summary(now)['median']:.1f})",
                    {"psi": round(value, 4), "baseline": summary(before), "current": summary(now)})]


def _cross_split(pairs: Sequence[Any] | int | None, t: Thresholds) -> list[Anomaly]:
    if pairs is None:
        return []
    n = pairs if isinstance(pairs, int) else len(pairs)
    if n <= t.check_max_cross_split_duplicates:
        return []
    examples = [] if isinstance(pairs, int) else [list(p) for p in list(pairs)[:MAX_EXAMPLES]]
    return [Anomaly("cross_split_duplicates", WARN,
                    f"{n} new image(s) are near-duplicates of held-out (val/test) films of other patients "
                    f"(limit {t.check_max_cross_split_duplicates}); relabel linked them into those "
                    "patients' split groups, so no film straddles two splits",
                    {"n_pairs": n, "examples": examples})]


def compare(current: Mapping[str, Any], baseline: Mapping[str, Any] | None,
            thresholds: Thresholds | None = None,
            cross_split_pairs: Sequence[Any] | int | None = None) -> list[Anomaly]:
    """Check a version's statistics against the last version that passed.

    Only gains and changes count: images removed upstream, a source that shrinks or vanishes,
    and the injected images of a bad week disappearing again raise nothing (a class collapsing
    excepted), so a normal week after a bad one is quiet when the bad one never became the
    baseline.

    Args:
        current: :func:`statistics` of the new version.
        baseline: :func:`statistics` of the last version that passed, or ``None`` (first run:
            only the schema and both classes are checked).
        thresholds: the limits (defaults when ``None``).
        cross_split_pairs: near-duplicate pairs that straddle splits (a list of
            ``(a, b, distance)``, see :func:`covid_tasks.near_duplicates.straddling_pairs`) or
            their count; ``None`` skips that check.

    Returns:
        The anomalies, blocking ones first.
    """
    t = thresholds or Thresholds()
    out = _schema_anomalies(current.get("schema"), (baseline or {}).get("schema"), t)
    out += _class_anomalies(current, baseline, t)
    if baseline is not None:
        out += _label_changes(current, baseline, t)
        out += _new_findings(current, baseline, t)
        out += _source_label(current, baseline, t)
        out += _intensity(current, baseline, t)
    out += _cross_split(cross_split_pairs, t)
    out.sort(key=lambda a: a.severity != BLOCK)
    for a in out:
        (logger.error if a.severity == BLOCK else logger.warning)("data_checks: %s: %s", a.code, a.message)
    return out


def verdict(anomalies: Iterable[Anomaly]) -> str:
    """``block`` if any anomaly blocks, else ``warn`` if any warns, else ``ok``."""
    severities = {a.severity for a in anomalies}
    return BLOCK if BLOCK in severities else WARN if WARN in severities else OK


def _brief(stats: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if stats is None:
        return None
    keep = ("n_images", "n_patients", "n_groups", "labels", "views", "sources", "source_labels",
            "findings", "image_stats")
    out = {k: stats.get(k) for k in keep}
    out["n_unreadable"] = len(stats.get("unreadable", []))
    out["unreadable"] = list(stats.get("unreadable", []))[:MAX_EXAMPLES]
    out["source_label_mutual_information"] = round(mutual_information(stats.get("source_labels", {})), 4)
    schema = stats.get("schema")
    out["metadata_columns"] = list(schema["columns"]) if schema else None
    return out


def report(anomalies: Sequence[Anomaly], current: Mapping[str, Any] | None,
           baseline: Mapping[str, Any] | None) -> dict[str, Any]:
    """The JSON of ``<run>/data_checks.json`` (also an MLflow artifact).

    Args:
        anomalies: from :func:`compare` (or :func:`check_schema` when no statistics exist).
        current: the statistics checked, or ``None`` (a schema change stopped the run first).
        baseline: the statistics compared with, or ``None``.

    Returns:
        ``{"verdict", "summary", "anomalies", "current", "baseline"}``; ``summary`` is one line
        (``data checks: warn: source_label_jump (...)``), ``current``/``baseline`` are the counts
        and summaries of the statistics without the per-image table.
    """
    result = verdict(anomalies)
    size = f"{current['n_images']} images" if current else "no statistics"
    if baseline:
        size += f" (baseline {baseline['n_images']})"
    if anomalies:
        listed = "; ".join(f"{a.severity} {a.code}: {a.message}" for a in anomalies)
        summary = f"data checks: {result}, {size}: {listed}"
    else:
        summary = f"data checks: ok, {size}, no anomaly"
    return {"verdict": result, "summary": summary, "anomalies": [a.to_dict() for a in anomalies],
            "current": _brief(current), "baseline": _brief(baseline)}
