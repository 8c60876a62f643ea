"""Relabel stage: turn upstream ``metadata.csv`` rows into a two-class table, ``labeled.csv``.

The rules are declarative: ``RULES`` is the one table (the README repeats it), applied in its
order, and each dropped row is counted under the first rule it fails, so
``kept + sum(dropped) == source_rows`` always holds. Labels follow torchxrayvision's
COVID19_Dataset: a finding is split into tokens on ``/``, ``,``, ``;``, ``|`` and ``+``, so the
old flat vocabulary (``COVID-19``, ``COVID-19, ARDS``) and the new hierarchical one
(``Pneumonia/Viral/COVID-19``) both work. Each token is normalised (Unicode NFKC, case-folded,
every dash, underscore, dot or space one separator) and compared with ``COVID_SYNONYMS``
(``COVID 19``, ``SARS-CoV2``, ``2019-nCoV``, full-width or non-breaking-hyphen spellings...); a
token naming COVID-19 makes the row ``covid`` unless the token negates it (``non-COVID``,
``COVID-19 negative``), every other real finding ``non_covid`` (``SARS`` of 2003 and ``MERS-CoV``
too). The report lists every distinct finding with its label and row count, and warns about
findings that look like COVID-19 (``covid``, ``corona``, ``ncov``, ``sars-cov``...) but match no
rule.

Images are identified by content as well as by name: each kept file's SHA-256 is recorded, a
byte-identical copy under a second name is dropped, and patients are linked into one split group
(``group_id``) when they share a file name in any row or an identical image. ``split`` keeps each
group in one split, so one image never sits in two splits.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from covid_tasks.config import CLASS_NAMES, METADATA_COLUMNS, Config
from covid_tasks.storage import (
    UnsafePathError,
    file_sha256,
    require_file,
    safe_relpath,
    write_csv,
    write_json,
)

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = METADATA_COLUMNS
#: Names of COVID-19 and of its virus, as normalised words (:func:`normalise_finding`); the
#: separators between words are optional (``covid19``, ``sars cov2`` and ``sarscov2`` all match).
COVID_SYNONYMS: tuple[str, ...] = ("covid 19", "covid", "sars cov 2", "2019 ncov", "ncov 2019", "hcov 19")
#: Words right before (``non-COVID``, ``suspected COVID-19``) or right after (``COVID-19
#: negative``) a COVID-19 name that deny or question it: no ``covid`` label (and a warning).
NEGATED_BEFORE: tuple[str, ...] = ("non", "not", "no", "negative for", "without", "excluded", "rule out",
                                   "ruled out", "suspected", "suspect", "possible", "probable", "query",
                                   "unlikely", "post", "history of")
NEGATED_AFTER: tuple[str, ...] = ("negative", "neg", "excluded", "ruled out", "unlikely", "suspected",
                                  "not confirmed", "not detected", "pcr negative")
#: Fragments of a normalised finding (spaces removed) that suggest COVID-19: a finding holding one
#: without matching a synonym is reported (``covid_like_unmatched``) and logged as a warning.
COVID_LIKE: tuple[str, ...] = ("covid", "corona", "ncov", "cov2", "cov19", "sarscov")
PLACEHOLDER_FINDINGS = frozenset({"todo", "unknown", ""})
_TOKEN_SEPARATORS = re.compile(r"[/,;|+]")
_NON_WORD = re.compile(r"[\W_]+")


def _phrases(phrases: tuple[str, ...]) -> str:
    """A regex alternation of normalised phrases whose inner spaces are optional."""
    return "|".join(r"\s?".join(map(re.escape, ph.split())) for ph in phrases)


def _words_pattern(phrases: tuple[str, ...]) -> re.Pattern[str]:
    """Whole-word alternatives over normalised text; the spaces inside a phrase are optional."""
    return re.compile(rf"(?<![^\W_])(?:{_phrases(phrases)})(?![^\W_])")


_COVID = _words_pattern(COVID_SYNONYMS)
_NEGATED = re.compile(rf"(?<![^\W_])(?:(?:{_phrases(NEGATED_BEFORE)})\s(?:{_phrases(COVID_SYNONYMS)})"
                      rf"|(?:{_phrases(COVID_SYNONYMS)})\s(?:{_phrases(NEGATED_AFTER)}))(?![^\W_])")
KEEP_MODALITY = "X-ray"
#: Columns of ``labeled.csv``; ``split`` adds ``split``.
LABELED_COLUMNS = ("filename", "patientid", "group_id", "finding", "view", "modality", "label",
                   "sha256", "source_line")
#: How many offending line numbers the report lists per reason (the counts are always complete).
_MAX_EXAMPLES = 20

#: The rule table, in the order the rules apply; each row is dropped by the first rule it fails.
#: ``(reason key, rule)``; the README repeats this table with the counts on the full data set.
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
#: The labelling rule applied to every row that survives the table.
LABEL_RULE = ("label 'covid' when any finding token (split on '/', ',', ';', '|', '+'; Unicode NFKC,"
              " case, dashes and separators normalised) names COVID-19 by one of COVID_SYNONYMS"
              " ('COVID-19', 'COVID 19', 'covid', 'SARS-CoV-2', 'SARS-CoV2', '2019-nCoV', 'HCoV-19')"
              " and does not negate it ('non-COVID', 'COVID-19 negative', 'suspected COVID-19');"
              " every other finding 'non_covid' (including 'SARS' and 'MERS-CoV')")
REASONS = tuple(reason for reason, _ in RULES)


def normalise_finding(text: str) -> str:
    """Unicode NFKC, case-folded, every run of non-letters/digits one space.

    ``"ＣＯＶＩＤ‑19"`` (full-width letters, a non-breaking hyphen) becomes ``"covid 19"``.
    """
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text or "").casefold())
    return _NON_WORD.sub(" ", text).strip()


def finding_tokens(finding: str) -> list[str]:
    """Split a finding on ``/ , ; | +`` into normalised, non-empty tokens.

    Args:
        finding: a ``finding`` cell, flat (``COVID-19, ARDS``) or hierarchical
            (``Pneumonia/Viral/COVID-19``).

    Returns:
        The tokens, e.g. ``["pneumonia", "viral", "covid 19"]``.
    """
    return [t for t in (normalise_finding(raw) for raw in _raw_tokens(finding)) if t]


def _raw_tokens(finding: str) -> list[str]:
    return _TOKEN_SEPARATORS.split(unicodedata.normalize("NFKC", finding or ""))


def _names_covid(raw_token: str) -> bool:
    """A token naming COVID-19, not negated or questioned (``COVID-19?``)."""
    token = normalise_finding(raw_token)
    return bool(_COVID.search(token)) and not _NEGATED.search(token) and "?" not in raw_token


def label_for(finding: str) -> str | None:
    """Map a finding to a class name.

    Args:
        finding: a ``finding`` cell.

    Returns:
        ``"covid"`` when a token names COVID-19 (``COVID_SYNONYMS``, not negated), ``None`` for
        placeholders (``todo``, ``Unknown``, empty), else ``"non_covid"``.
    """
    tokens = finding_tokens(finding)
    if not tokens or all(t in PLACEHOLDER_FINDINGS for t in tokens):
        return None
    return CLASS_NAMES[1] if any(_names_covid(t) for t in _raw_tokens(finding)) else CLASS_NAMES[0]


def covid_like_unmatched(finding: str) -> bool:
    """Whether a finding looks like COVID-19 (``COVID_LIKE``) yet is not labelled ``covid``."""
    compact = normalise_finding(finding).replace(" ", "")
    return any(f in compact for f in COVID_LIKE) and label_for(finding) != CLASS_NAMES[1]


def relabel(data_root: str | Path, cfg: Config) -> dict[str, Any]:
    """Apply the rule table to ``raw/metadata.csv``; write ``labeled.csv`` and ``relabel_report.json``.

    Args:
        data_root: the data root holding ``raw/metadata.csv`` and ``raw/images/``.
        cfg: run configuration (``views``, ``fallback_views``, ``min_images_per_class``).

    Returns:
        ``{"labeled_csv", "n_images", "n_patients", "n_groups", "class_counts", "dropped",
        "fallback_used", "primary_counts", "covid_like_unmatched", "report"}``: ``class_counts``
        and ``primary_counts`` (PA/AP images, which decide the fallback) map each class to an
        image count, ``dropped`` maps every reason of ``RULES`` to a row count, ``fallback_used``
        each class to a bool, ``covid_like_unmatched`` counts the distinct findings that look
        like COVID-19 but are not labelled ``covid`` (each one is logged as a warning). The
        report (``relabel_report.json``) lists every distinct finding with its label and counts.

    Raises:
        FileNotFoundError: ``raw/metadata.csv`` is missing.
        ValueError: the file is not UTF-8 CSV, required columns are missing, or no image of some
            class is left.
    """
    root = Path(data_root)
    meta_path = require_file(root / "raw" / "metadata.csv", "pull")
    images = root / "raw" / "images"
    logger.info("relabel: reading %s (views=%s, fallback=%s, min_images_per_class=%d)", meta_path,
                list(cfg.views), list(cfg.fallback_views), cfg.min_images_per_class)

    header, rows = _read_metadata(meta_path)
    findings = _finding_inventory(rows)
    dropped: dict[str, int] = {reason: 0 for reason in REASONS}
    examples: dict[str, list[int]] = defaultdict(list)

    def drop(row: dict[str, Any], reason: str) -> None:
        dropped[reason] += 1
        if len(examples[reason]) < _MAX_EXAMPLES:
            examples[reason].append(row["source_line"])

    primary_views = {_norm_view(v): v for v in cfg.views}
    fallback_views = {_norm_view(v): v for v in cfg.fallback_views if _norm_view(v) not in primary_views}
    file_patients: dict[str, set[str]] = defaultdict(set)  # every trusted row links its patient
    candidates: list[dict[str, Any]] = []
    for row in rows:
        if row["malformed"]:
            drop(row, "malformed_row")
            continue
        if not row["patientid"]:
            drop(row, "missing_patientid")
            continue
        if not _is_safe(row["filename"]):
            drop(row, "unsafe_filename")
            continue
        file_patients[row["filename"]].add(row["patientid"])
        if row["modality"].casefold() != KEEP_MODALITY.casefold():
            drop(row, "modality")
            continue
        row["modality"] = KEEP_MODALITY
        row["label"] = label_for(row["finding"])
        if row["label"] is None:
            drop(row, "placeholder_finding")
            continue
        view = _norm_view(row["view"])
        if view not in primary_views and view not in fallback_views:
            drop(row, "view")
            continue
        row["primary"] = view in primary_views
        row["view"] = primary_views.get(view) or fallback_views[view]
        if not (images / row["filename"]).is_file():
            drop(row, "missing_image")
            continue
        candidates.append(row)

    digests = {f: file_sha256(images / f) for f in sorted({r["filename"] for r in candidates})}
    for row in candidates:
        row["sha256"] = digests[row["filename"]]

    # One image, one row: rows of the same content (same name, or identical bytes) must agree on
    # the class; then the first row (PA/AP first, then file order) of each content stays.
    labels_by_digest: dict[str, set[str]] = defaultdict(set)
    for row in candidates:
        labels_by_digest[row["sha256"]].add(row["label"])
    unique: list[dict[str, Any]] = []
    seen_names: set[str] = set()
    seen_digests: dict[str, str] = {}
    for row in sorted(candidates, key=lambda r: (not r["primary"], r["source_line"])):
        if len(labels_by_digest[row["sha256"]]) > 1:
            drop(row, "conflicting_label")
        elif row["filename"] in seen_names:
            drop(row, "duplicate_filename")
        elif row["sha256"] in seen_digests:
            drop(row, "duplicate_image")
        else:
            seen_names.add(row["filename"])
            seen_digests[row["sha256"]] = row["filename"]
            unique.append(row)

    primary_counts = {c: sum(1 for r in unique if r["primary"] and r["label"] == c) for c in CLASS_NAMES}
    fallback_used = {c: bool(fallback_views) and primary_counts[c] < cfg.min_images_per_class
                     for c in CLASS_NAMES}
    kept: list[dict[str, Any]] = []
    for row in sorted(unique, key=lambda r: r["source_line"]):
        if row["primary"] or fallback_used[row["label"]]:
            kept.append(row)
        else:
            drop(row, "fallback_not_needed")

    # Split groups: patients sharing a file name (in any trusted row) or an identical image.
    links: list[Iterable[str]] = [pids for pids in file_patients.values() if len(pids) > 1]
    by_digest: dict[str, set[str]] = defaultdict(set)
    for row in candidates:
        by_digest[row["sha256"]].add(row["patientid"])
    links += [pids for pids in by_digest.values() if len(pids) > 1]
    groups = link_groups({r["patientid"] for r in kept}, links)
    for row in kept:
        row["group_id"] = groups[row["patientid"]]
    kept.sort(key=lambda r: (r["group_id"], r["patientid"], r["filename"]))

    class_counts = {c: sum(1 for r in kept if r["label"] == c) for c in CLASS_NAMES}
    if any(n == 0 for n in class_counts.values()):
        empty = [c for c, n in class_counts.items() if n == 0]
        raise ValueError(f"relabel left no image of class(es) {empty} in {meta_path}; "
                         f"rows dropped by reason: {dropped}")

    import pandas as pd

    out = root / "labeled.csv"
    table = [[r[c] for c in LABELED_COLUMNS] for r in kept]
    write_csv(out, pd.DataFrame(table, columns=list(LABELED_COLUMNS)))
    n_groups = len(set(groups.values()))
    linked = sorted(sorted(m) for m in _members(groups).values() if len(m) > 1)
    on_disk = {p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file()} \
        if images.is_dir() else set()
    named = {r["filename"] for r in rows}
    report = {
        "source": str(meta_path),
        "columns": header,
        "source_rows": len(rows),
        "kept": len(kept),
        "dropped": dropped,
        "dropped_examples": {k: sorted(v) for k, v in sorted(examples.items())},
        "class_counts": class_counts,
        "primary_counts": primary_counts,
        "fallback_used": fallback_used,
        "min_images_per_class": cfg.min_images_per_class,
        "views": list(cfg.views),
        "fallback_views": list(cfg.fallback_views),
        "view_counts": {c: dict(sorted(Counter(r["view"] for r in kept if r["label"] == c).items()))
                        for c in CLASS_NAMES},
        "n_patients": len({r["patientid"] for r in kept}),
        "n_groups": n_groups,
        "linked_patients": linked,
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
    if dropped["malformed_row"]:
        logger.warning("relabel: %d malformed row(s) dropped in %s, lines %s", dropped["malformed_row"],
                       meta_path, examples["malformed_row"])
    write_json(root / "relabel_report.json", report)
    result = {
        "labeled_csv": str(out),
        "n_images": len(kept),
        "n_patients": report["n_patients"],
        "n_groups": n_groups,
        "class_counts": class_counts,
        "dropped": dropped,
        "fallback_used": fallback_used,
        "primary_counts": primary_counts,
        "covid_like_unmatched": len(report["covid_like_unmatched"]),
        "report": str(root / "relabel_report.json"),
    }
    logger.info("relabel: done %s", json.dumps(result))
    return result


def link_groups(members: Iterable[str], links: Iterable[Iterable[str]]) -> dict[str, str]:
    """Union-find: map each member to its group id, the smallest member id linked to it.

    Args:
        members: the ids to map (e.g. patient ids).
        links: sets of ids that must share a group; ids not in ``members`` still link others.

    Returns:
        ``{member: group id}`` for every id in ``members``.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for link in links:
        ids = sorted(link)
        for other in ids[1:]:
            a, b = find(ids[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {m: find(m) for m in members}


def _members(groups: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for member, group in groups.items():
        out[group].append(member)
    return out


def _finding_inventory(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every distinct finding of the trusted (not malformed) rows: label, row count, COVID-like flag."""
    counts = Counter(row["finding"] for row in rows if not row["malformed"])
    out = []
    for finding, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        label = label_for(finding)
        out.append({"finding": finding, "label": label or "placeholder", "rows": n,
                    "covid_like_unmatched": covid_like_unmatched(finding)})
    return out


def _read_metadata(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Read ``metadata.csv``; flag rows whose fields do not line up with the header.

    The upstream header ends with a comma, so it has an unnamed last column. A row is malformed
    when it has text under an unnamed column or past the header's end, fewer fields than the
    named columns, or more fields than the file's usual row (an unquoted comma in ``finding``
    shifted its fields). A record spanning several lines is malformed when a used column holds
    a line break, when its field count is not the usual one, or when a line inside a field reads
    as a whole row: an unterminated quote swallowed the rows that follow. Each line of such a
    record then counts as one malformed row, with its own line number, so no row vanishes.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason})") from None
    lines = list(io.StringIO(text, newline=""))  # physical lines, split as the csv reader splits
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        records: list[tuple[int, int, list[str]]] = []  # (first line, last line, fields)
        line = reader.line_num + 1
        for cells in reader:
            start, line = line, reader.line_num + 1
            if any(c.strip() for c in cells):
                records.append((start, reader.line_num, cells))
    except csv.Error as exc:
        raise ValueError(f"{path} is not valid CSV near line {reader.line_num}: {exc}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path} lacks required column(s): {', '.join(missing)} "
                         f"(required: {', '.join(REQUIRED_COLUMNS)})")
    index = {c: header.index(c) for c in REQUIRED_COLUMNS}
    used = sorted({*index.values(), *([header.index("folder")] if "folder" in header else [])})
    n_named = [i for i, h in enumerate(header) if h][-1] + 1
    width = _usual_width([len(cells) for _, _, cells in records], len(header))
    rows: list[dict[str, Any]] = []
    for start, end, cells in records:
        spill = any(c.strip() for i, c in enumerate(cells) if i >= len(header) or not header[i])
        malformed = spill or len(cells) < n_named or len(cells) > width
        if end > start:
            malformed = malformed or len(cells) != width or any(
                "\n" in cells[i] or "\r" in cells[i] for i in used if i < len(cells)) or any(
                _reads_as_row(part, n_named) for c in cells for part in c.splitlines()[1:])
        row: dict[str, Any] = {c: cells[i].strip() if i < len(cells) else "" for c, i in index.items()}
        row["source_line"] = start
        row["malformed"] = malformed
        rows.append(row)
        if malformed:  # each further line of the record was a row of its own
            rows += [{**dict.fromkeys(index, ""), "source_line": n, "malformed": True}
                     for n in range(start + 1, end + 1) if lines[n - 1].strip()]
    return header, rows


def _usual_width(widths: list[int], header_width: int) -> int:
    """The field count of most rows (ties: the header's, else the smallest)."""
    if not widths:
        return header_width
    counts = Counter(widths)
    top = max(counts.values())
    tied = [w for w, n in counts.items() if n == top]
    return header_width if header_width in tied else min(tied)


def _reads_as_row(line: str, n_named: int) -> bool:
    """Whether one line of text inside a field parses as a whole metadata row."""
    return len(next(csv.reader([line]), [])) >= n_named


def _norm_view(view: str) -> str:
    """Compare views case- and whitespace-insensitively (``ap  supine`` is ``AP Supine``)."""
    return " ".join(view.split()).casefold()


def _is_safe(name: str) -> bool:
    try:
        safe_relpath(name)
        return True
    except UnsafePathError:
        return False
