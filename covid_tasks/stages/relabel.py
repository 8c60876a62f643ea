"""Relabel stage: turn upstream ``metadata.csv`` rows into a two-class table, ``labeled.csv``.

The rules are declarative: ``RULES`` is the one table (docs/data.md repeats it), applied in its
order, and each dropped row is counted under the first rule it fails, so
``kept + sum(dropped) == source_rows`` always holds. Findings become labels by
:mod:`covid_tasks.findings`; the report lists every distinct finding with its label and row
count, and warns about findings that look like COVID-19 but match no rule.

Images are identified by content as well as by name: each kept file's SHA-256 is recorded, a
byte-identical copy under a second name is dropped, and patients are linked into one split group
(``group_id``, :mod:`covid_tasks.groups`) when they share a file name in any row, an identical
image, or a near-identical film (perceptual hashes within ``cfg.near_duplicate_distance`` bits,
:mod:`covid_tasks.near_duplicates`). ``split`` keeps each group in one split, so one film never
sits in two splits.

DICOM images fill the cells the CSV leaves empty (:data:`HEADER_RULE`): ``view`` and ``modality``
from the header (ViewPosition, Modality), ``patientid`` with the header's one-way patient hash;
rows whose images share a header patient hash are linked. The report counts the filled cells.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from covid_tasks.config import CLASS_NAMES, Config
from covid_tasks.findings import COVID_SYNONYMS, LABEL_RULE, finding_inventory, label_for
from covid_tasks.groups import group_members, link_groups
from covid_tasks.layout import DataRoot
from covid_tasks.metadata import read_metadata
from covid_tasks.storage import (
    UnsafePathError,
    file_sha256,
    require_file,
    safe_relpath,
    write_csv,
    write_json,
)

logger = logging.getLogger(__name__)

KEEP_MODALITY = "X-ray"
#: Columns of ``labeled.csv``; ``split`` adds ``split``.
LABELED_COLUMNS = ("filename", "patientid", "group_id", "finding", "view", "modality", "label",
                   "sha256", "source_line")
#: How many offending line numbers the report lists per reason (the counts are always complete).
_MAX_EXAMPLES = 20

#: The rule table, in the order the rules apply; each row is dropped by the first rule it fails.
#: ``(reason key, rule)``; docs/data.md repeats this table with the counts on the full data set.
RULES: tuple[tuple[str, str], ...] = (
    ("malformed_row", "drop rows with text past the header's named columns, fewer fields than"
                      " them, or more fields than the file's usual row (unquoted commas shift fields);"
                      " and every line of a record an unterminated quote ran across: no field is trusted"),
    ("missing_patientid", "drop rows with an empty patientid"),
    ("unsafe_filename", "drop rows whose filename is empty, absolute or contains '..'"),
    ("modality", f"keep modality '{KEEP_MODALITY}' only (CT, empty and any other modality are dropped)"),
    ("placeholder_finding", "drop findings 'todo', 'Unknown' and empty"),
    ("view", "keep the configured views (default PA, AP) and the fallback views (default AP Supine);"
             " drop L, Axial, Coronal, AP Erect, '?', empty and any other view"),
    ("missing_image", "drop rows whose image is not a file under raw/images"),
    ("conflicting_label", "drop every row of an image (same name or same bytes) whose rows disagree"
                          " on the class"),
    ("duplicate_filename", "keep one row per file name (a PA/AP row before a fallback-view row, then"
                           " file order); the file's patients are linked into one split group"),
    ("duplicate_image", "keep one file per image content (SHA-256): a byte-identical copy under"
                        " another name is dropped and its patients are linked"),
    ("fallback_not_needed", "drop fallback-view (AP Supine) rows of a class that has at least"
                            " min_images_per_class PA/AP images; a class below it keeps them"),
)
REASONS = tuple(reason for reason, _ in RULES)
#: How a DICOM image's header fills a row, before the rules apply (docs/dicom.md).
HEADER_RULE = ("a filled CSV cell wins; an empty view or modality cell of a row whose image is DICOM takes"
               " the header's ViewPosition (0018,5101) or Modality (0008,0060; CR, DX -> X-ray), an empty"
               " patientid its one-way patient hash (dcm-...); rows whose images share a patient hash are"
               " linked into one split group; the label always comes from the CSV's finding")


@dataclass
class _Drops:
    """Rows dropped per reason of ``RULES``, with the first line numbers of each."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    examples: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def drop(self, row: dict[str, Any], reason: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < _MAX_EXAMPLES:
            self.examples[reason].append(row["source_line"])


@dataclass
class _Views:
    """The configured views by normalised spelling: PA/AP first, then the fallback views."""

    primary: dict[str, str]
    fallback: dict[str, str]

    @classmethod
    def of(cls, cfg: Config) -> _Views:
        primary = {_norm_view(v): v for v in cfg.views}
        return cls(primary, {_norm_view(v): v for v in cfg.fallback_views if _norm_view(v) not in primary})


def relabel(cfg: Config, run_key: str) -> dict[str, Any]:
    """Apply the rule table to ``raw/metadata.csv``; write ``labeled.csv`` and ``relabel_report.json``.

    Args:
        cfg: run configuration (``data_root``, ``views``, ``fallback_views``, ``min_images_per_class``).
        run_key: this run's key (unused: ``labeled.csv`` is shared by every run).

    Returns:
        ``{"labeled_csv", "n_images", "n_patients", "n_groups", "class_counts", "dropped",
        "fallback_used", "primary_counts", "covid_like_unmatched", "near_duplicate_pairs",
        "from_header", "report"}``: ``class_counts``
        and ``primary_counts`` (PA/AP images, which decide the fallback) map each class to an
        image count, ``dropped`` maps every reason of ``RULES`` to a row count, ``fallback_used``
        each class to a bool, ``covid_like_unmatched`` counts the distinct findings that look
        like COVID-19 but are not labelled ``covid`` (each one is logged as a warning),
        ``from_header`` the cells DICOM headers filled per column (:data:`HEADER_RULE`). The
        report (``relabel_report.json``) lists every distinct finding with its label and counts.

    Raises:
        FileNotFoundError: ``raw/metadata.csv`` is missing.
        ValueError: the file is not UTF-8 CSV, required columns are missing, or no image of some
            class is left.
    """
    root = DataRoot.of(cfg)
    meta_path = require_file(root.metadata, "pull")
    logger.info("relabel: reading %s (views=%s, fallback=%s, min_images_per_class=%d)", meta_path,
                list(cfg.views), list(cfg.fallback_views), cfg.min_images_per_class)
    header, rows = read_metadata(meta_path)
    from_header = _fill_from_headers(rows, root.images, cfg.patient_hash_key_file)
    drops = _Drops()
    candidates, file_patients = _apply_row_rules(rows, _Views.of(cfg), root.images, drops)
    unique = _one_row_per_image(candidates, root.images, drops)
    kept, primary_counts, fallback_used = _apply_fallback(unique, cfg, drops)
    near = _near_duplicates(candidates, root, cfg.near_duplicate_distance)
    groups = _link_patients(kept, candidates, file_patients, near, from_header.pop("links"))

    class_counts = {c: sum(1 for r in kept if r["label"] == c) for c in CLASS_NAMES}
    if any(n == 0 for n in class_counts.values()):
        empty = [c for c, n in class_counts.items() if n == 0]
        raise ValueError(f"relabel left no image of class(es) {empty} in {meta_path}; "
                         f"rows dropped by reason: {drops.counts}")

    import pandas as pd

    table = [[r[c] for c in LABELED_COLUMNS] for r in kept]
    write_csv(root.labeled, pd.DataFrame(table, columns=list(LABELED_COLUMNS)))
    report = _report(cfg, root, meta_path, header, rows, kept, drops, groups, file_patients,
                     {"class_counts": class_counts, "primary_counts": primary_counts,
                      "fallback_used": fallback_used, "near_duplicates": near, "from_header": from_header})
    write_json(root.relabel_report, report)
    result = {
        "labeled_csv": str(root.labeled),
        "n_images": len(kept),
        "n_patients": report["n_patients"],
        "n_groups": report["n_groups"],
        "class_counts": class_counts,
        "dropped": drops.counts,
        "fallback_used": fallback_used,
        "primary_counts": primary_counts,
        "covid_like_unmatched": len(report["covid_like_unmatched"]),
        "near_duplicate_pairs": len(near["pairs"]),
        "from_header": from_header["filled"],
        "report": str(root.relabel_report),
    }
    logger.info("relabel: done %s", json.dumps(result))
    return result


def _fill_from_headers(rows: list[dict[str, Any]], images: Path, key_file: str) -> dict[str, Any]:
    """Fill the empty ``view``, ``modality`` and ``patientid`` cells of rows whose image is DICOM.

    Only the header is read (no pixel); a header that cannot be read fills nothing (pull has
    quarantined such files already). Patient IDs are only ever seen as their one-way hash.

    Returns:
        ``{"rule", "dicom_images", "filled": {"view", "modality", "patientid"},
        "linked_by_patient_hash", "patient_hash_key", "patient_of_file", "links"}``:
        ``patient_hash_key`` says which key hashed the IDs (never the key itself);
        ``patient_of_file`` maps each file whose empty patient cell the header filled to that
        (hashed) patient; ``links`` are the sets of patients whose images share a header patient
        hash.
    """
    from covid_tasks import dicom

    hash_key = dicom.load_patient_hash_key(key_file) if key_file else dicom.PATIENT_HASH_KEY
    facts: dict[str, dict[str, Any] | None] = {}
    filled = dict.fromkeys(("view", "modality", "patientid"), 0)
    patients: dict[str, str] = {}  # file -> the header's patient hash, where it filled the cell
    for row in rows:
        name = row["filename"]
        if row["malformed"] or not _is_safe(name):
            continue
        if name not in facts:
            facts[name] = None
            path = images / name
            try:
                if path.is_file() and dicom.is_dicom(path):
                    facts[name] = dicom.header_metadata(path, hash_key)
            except (dicom.DicomError, OSError) as exc:
                logger.warning("relabel: the DICOM header of %s cannot be read (%s); the CSV alone counts",
                               name, exc)
        meta = facts[name]
        for column, key in (("view", "view"), ("modality", "modality"), ("patientid", "patient_hash")):
            if meta and not row[column] and meta[key]:
                row[column] = meta[key]
                filled[column] += 1
                if column == "patientid":
                    patients[name] = meta[key]
    by_hash: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        meta = facts.get(row["filename"])
        if meta and meta["patient_hash"] and row["patientid"] and not row["malformed"]:
            by_hash[meta["patient_hash"]].add(row["patientid"])
    links = [pids for pids in by_hash.values() if len(pids) > 1]
    dicom_images = sum(1 for meta in facts.values() if meta)
    if dicom_images:
        logger.info("relabel: %d DICOM image(s); header cells filled %s; %d patient-hash link(s)",
                    dicom_images, filled, len(links))
    if not key_file and (patients or links):
        logger.warning("relabel: DICOM patient IDs were hashed with the public default key, which lets "
                       "anyone with the code hash a small ID space back; set patient_hash_key_file "
                       "(COVID_PATIENT_HASH_KEY_FILE) to a file holding a site secret (docs/dicom.md)")
    return {"rule": HEADER_RULE, "dicom_images": dicom_images, "filled": filled,
            "linked_by_patient_hash": len(links),
            "patient_hash_key": "site secret" if key_file else "public default",
            "patient_of_file": patients, "links": links}


def _apply_row_rules(rows: list[dict[str, Any]], views: _Views, images: Path, drops: _Drops
                     ) -> tuple[list[dict[str, Any]], dict[str, set[str]]]:
    """The per-row rules of ``RULES``, in order; return the candidates and every file's patients.

    Every trusted row (well-formed, with a patient and a safe file name) links its patient to its
    file name, whether or not the row is kept.
    """
    file_patients: dict[str, set[str]] = defaultdict(set)
    candidates: list[dict[str, Any]] = []
    for row in rows:
        if row["malformed"]:
            drops.drop(row, "malformed_row")
            continue
        if not row["patientid"]:
            drops.drop(row, "missing_patientid")
            continue
        if not _is_safe(row["filename"]):
            drops.drop(row, "unsafe_filename")
            continue
        file_patients[row["filename"]].add(row["patientid"])
        if row["modality"].casefold() != KEEP_MODALITY.casefold():
            drops.drop(row, "modality")
            continue
        row["modality"] = KEEP_MODALITY
        row["label"] = label_for(row["finding"])
        if row["label"] is None:
            drops.drop(row, "placeholder_finding")
            continue
        view = _norm_view(row["view"])
        if view not in views.primary and view not in views.fallback:
            drops.drop(row, "view")
            continue
        row["primary"] = view in views.primary
        row["view"] = views.primary.get(view) or views.fallback[view]
        if not (images / row["filename"]).is_file():
            drops.drop(row, "missing_image")
            continue
        candidates.append(row)
    return candidates, file_patients


def _one_row_per_image(candidates: list[dict[str, Any]], images: Path, drops: _Drops) -> list[dict[str, Any]]:
    """Hash every candidate's file; keep one row per image (same name or same bytes).

    Rows of the same content must agree on the class; then the first row (PA/AP first, then file
    order) of each content stays.
    """
    digests = {f: file_sha256(images / f) for f in sorted({r["filename"] for r in candidates})}
    for row in candidates:
        row["sha256"] = digests[row["filename"]]
    labels_by_digest: dict[str, set[str]] = defaultdict(set)
    for row in candidates:
        labels_by_digest[row["sha256"]].add(row["label"])
    unique: list[dict[str, Any]] = []
    seen_names: set[str] = set()
    seen_digests: set[str] = set()
    for row in sorted(candidates, key=lambda r: (not r["primary"], r["source_line"])):
        if len(labels_by_digest[row["sha256"]]) > 1:
            drops.drop(row, "conflicting_label")
        elif row["filename"] in seen_names:
            drops.drop(row, "duplicate_filename")
        elif row["sha256"] in seen_digests:
            drops.drop(row, "duplicate_image")
        else:
            seen_names.add(row["filename"])
            seen_digests.add(row["sha256"])
            unique.append(row)
    return unique


def _apply_fallback(unique: list[dict[str, Any]], cfg: Config, drops: _Drops
                    ) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, bool]]:
    """Keep fallback-view rows only for a class with fewer than ``min_images_per_class`` PA/AP images.

    Returns:
        The kept rows (file order), PA/AP images per class, and whether each class used the fallback.
    """
    primary_counts = {c: sum(1 for r in unique if r["primary"] and r["label"] == c) for c in CLASS_NAMES}
    fallback_used = {c: bool(cfg.fallback_views) and primary_counts[c] < cfg.min_images_per_class
                     for c in CLASS_NAMES}
    kept: list[dict[str, Any]] = []
    for row in sorted(unique, key=lambda r: r["source_line"]):
        if row["primary"] or fallback_used[row["label"]]:
            kept.append(row)
        else:
            drops.drop(row, "fallback_not_needed")
    return kept, primary_counts, fallback_used


def _near_duplicates(candidates: list[dict[str, Any]], root: DataRoot, max_distance: int) -> dict[str, Any]:
    """Near-identical films among the candidates: one hash per distinct image, cached by SHA-256.

    Returns:
        ``{"max_distance", "pairs": [{"a", "b", "distance"}]}`` with file names (the first row's
        name of each content), and ``"unhashed"``: files the hash could not read.
    """
    from covid_tasks import near_duplicates as nd
    from covid_tasks.storage import read_json

    out: dict[str, Any] = {"max_distance": max_distance, "pairs": [], "unhashed": []}
    if max_distance < 0:
        return out
    name_of: dict[str, str] = {}
    for row in candidates:
        name_of.setdefault(row["sha256"], row["filename"])
    cached = read_json(root.image_hashes) if root.image_hashes.is_file() else {}
    hashes = {sha: nd.to_int(cached[sha]) for sha in name_of if sha in cached}
    todo = {name_of[sha]: sha for sha in name_of if sha not in cached}
    fresh, errors = nd.hash_files(root.images, todo)
    hashes.update({todo[name]: value for name, value in fresh.items()})
    if fresh:
        write_json(root.image_hashes, {**cached, **{sha: nd.to_hex(h) for sha, h in hashes.items()}})
    pairs = nd.near_duplicate_pairs(hashes, max_distance)
    out["pairs"] = [{"a": name_of[a], "b": name_of[b], "distance": int(d)} for a, b, d in pairs]
    out["unhashed"] = sorted(errors)
    if pairs:
        logger.info("relabel: %d near-duplicate pair(s) within %d bits, e.g. %s", len(pairs), max_distance,
                    out["pairs"][:3])
    return out


def _link_patients(kept: list[dict[str, Any]], candidates: list[dict[str, Any]],
                   file_patients: dict[str, set[str]], near: dict[str, Any],
                   header_links: list[set[str]]) -> dict[str, str]:
    """Set each kept row's ``group_id``: patients sharing a file name (any trusted row), an image, a
    film or a DICOM header's patient hash.

    Sorts ``kept`` by group, patient and file name; returns ``{patient: group}``.
    """
    links: list[Iterable[str]] = [pids for pids in file_patients.values() if len(pids) > 1]
    links += header_links
    by_digest: dict[str, set[str]] = defaultdict(set)
    for row in candidates:
        by_digest[row["sha256"]].add(row["patientid"])
    links += [pids for pids in by_digest.values() if len(pids) > 1]
    sha_of = {row["filename"]: row["sha256"] for row in candidates}
    links += [by_digest[sha_of[p["a"]]] | by_digest[sha_of[p["b"]]] for p in near["pairs"]]
    groups = link_groups({r["patientid"] for r in kept}, links)
    for row in kept:
        row["group_id"] = groups[row["patientid"]]
    kept.sort(key=lambda r: (r["group_id"], r["patientid"], r["filename"]))
    return groups


def _report(cfg: Config, root: DataRoot, meta_path: Path, header: list[str], rows: list[dict[str, Any]],
            kept: list[dict[str, Any]], drops: _Drops, groups: dict[str, str],
            file_patients: dict[str, set[str]], counts: dict[str, Any]) -> dict[str, Any]:
    """``relabel_report.json``: rules, counts, links and every finding; logs the warnings it holds."""
    images = root.images
    findings = finding_inventory(row["finding"] for row in rows if not row["malformed"])
    on_disk = {p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file()} \
        if images.is_dir() else set()
    named = {r["filename"] for r in rows}
    report = {
        "source": str(meta_path),
        "columns": header,
        "source_rows": len(rows),
        "kept": len(kept),
        "dropped": drops.counts,
        "dropped_examples": {k: sorted(v) for k, v in sorted(drops.examples.items())},
        **counts,
        "min_images_per_class": cfg.min_images_per_class,
        "views": list(cfg.views),
        "fallback_views": list(cfg.fallback_views),
        "view_counts": {c: dict(sorted(Counter(r["view"] for r in kept if r["label"] == c).items()))
                        for c in CLASS_NAMES},
        "n_patients": len({r["patientid"] for r in kept}),
        "n_groups": len(set(groups.values())),
        "linked_patients": sorted(sorted(m) for m in group_members(groups).values() if len(m) > 1),
        "shared_filenames": {f: sorted(p) for f, p in sorted(file_patients.items()) if len(p) > 1},
        "images_without_row": len(on_disk - named),
        "rules": [{"reason": r, "rule": t} for r, t in RULES],
        "label_rule": LABEL_RULE,
        "covid_synonyms": list(COVID_SYNONYMS),
        "findings": findings,
        "covid_like_unmatched": [f for f in findings if f["covid_like_unmatched"]],
    }
    for f in report["covid_like_unmatched"]:
        logger.warning("relabel: finding %r (%d row(s)) looks like COVID-19 but matches no rule: labelled "
                       "%s; fix the finding upstream or extend COVID_SYNONYMS",
                       f["finding"], f["rows"], f["label"])
    if drops.counts["malformed_row"]:
        logger.warning("relabel: %d malformed row(s) dropped in %s, lines %s", drops.counts["malformed_row"],
                       meta_path, drops.examples["malformed_row"])
    return report


def _norm_view(view: str) -> str:
    """Compare views case- and whitespace-insensitively (``ap  supine`` is ``AP Supine``)."""
    return " ".join(view.split()).casefold()


def _is_safe(name: str) -> bool:
    try:
        safe_relpath(name)
        return True
    except UnsafePathError:
        return False
