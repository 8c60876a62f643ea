"""Pull stage: bring new and changed images and ``metadata.csv`` from the source into ``raw/``.

The source (``cfg.source_uri``: ``s3://bucket/prefix``, ``file:///path`` or a folder, see
:mod:`covid_tasks.sources`) holds the upstream layout, ``metadata.csv`` plus ``images/``. Valid
images land in ``raw/images/``, refused ones in ``quarantine/images/``; ``metadata.csv`` and
``raw/manifest.json`` are replaced together, last (paths: :mod:`covid_tasks.layout`). The
incremental, crash-safe engine is :mod:`covid_tasks.sync`.

Refused before anything under ``raw/`` changes: a ``metadata.csv`` without the required columns
or without a single row, and a pull that needs more disk space than is free. Images are validated
with Pillow *and* with TensorFlow, the decoder training uses (:func:`covid_tasks.images.validate_image`).
Objects deleted upstream are reported; with ``cfg.pull_delete`` (default ``False``) their local
copies are removed, otherwise they are kept and stay part of the data set.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from covid_tasks.config import METADATA_COLUMNS, Config
from covid_tasks.data_checks import SchemaChangeError
from covid_tasks.layout import DataRoot
from covid_tasks.sources import METADATA_KEY, Listing, open_source
from covid_tasks.storage import UnsafePathError, read_json, resolve_under, safe_relpath, write_json
from covid_tasks.sync import (
    Fetcher,
    Outcome,
    Plan,
    State,
    Workspace,
    in_place,
    manifest_entry,
    plan,
    reconcile,
)

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = METADATA_COLUMNS


def pull(cfg: Config, run_key: str, *, s3_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bring what is new or changed from ``cfg.source_uri`` into ``<data_root>/raw``, validated.

    Args:
        cfg: configuration (``source_uri``, ``data_root``, ``pull_workers``, ``pull_retries``,
            ``pull_delete``, ``pull_min_image_side``, ``max_image_pixels``).
        run_key: this run's key (unused: ``raw/`` is shared by every run).
        s3_options: boto3 client options for ``s3://`` sources (``endpoint_url``, ``region_name``,
            ``aws_access_key_id``, ``aws_secret_access_key``); ``None`` or ``{}`` uses the
            standard AWS environment.

    Returns:
        A small JSON-able dict: ``dataset_version`` (hash over the manifest), image counts
        ``new``, ``changed``, ``unchanged``, ``deleted`` (gone upstream), ``rejected`` (unsafe
        keys, quarantined images and metadata rows with unsafe file names), ``quarantined``,
        ``missing`` (metadata rows whose file is absent), ``bytes_downloaded``,
        ``metadata_changed``, ``has_changes`` (the dataset version moved), ``n_images``,
        ``raw_dir`` and ``report`` (path of ``pull_report.json``).

    Raises:
        FileNotFoundError: the source folder, bucket or its ``metadata.csv`` does not exist.
        ValueError: ``metadata.csv`` lacks required columns or has no row, or the URI scheme is
            unknown.
        covid_tasks.sync.DiskFullError: the data root's file system lacks the space the pull needs
            (a ``PullError``); the message names the path, the bytes needed and the bytes free.
        covid_tasks.sources.PullError: the S3 endpoint cannot be reached, refuses the credentials,
            keeps failing after retries, or another pull holds the data root.
    """
    started = time.monotonic()
    root = DataRoot.of(cfg)
    source_uri = cfg.source_uri
    logger.info("pull: %s -> %s (workers=%d, retries=%d, delete=%s)", source_uri, root.raw,
                cfg.pull_workers, cfg.pull_retries, cfg.pull_delete)
    source = open_source(source_uri, s3_options, retries=cfg.pull_retries,
                         max_connections=cfg.pull_workers + 2)
    try:
        with source, Workspace(root, source.uri) as ws:
            pulled = _execute(Fetcher(source, ws, cfg), ws, cfg)
            result, report = _summarise(pulled, cfg, source.uri)
            report["duration_s"] = round(time.monotonic() - started, 3)
            write_json(root.pull_report, {**result, **report})
    except SchemaChangeError as exc:
        _report_schema_change(root, run_key, str(exc))
        raise
    logger.info("pull: done in %.1fs %s", report["duration_s"], json.dumps(result, sort_keys=True))
    if not result["has_changes"]:
        logger.info("pull: no new or changed data (dataset_version %s); training and registration "
                    "are skipped unless the run is forced", result["dataset_version"])
    return result


@dataclass
class _Pulled:
    """What one pull did, for its summary."""

    root: DataRoot
    listing: Listing
    state: State
    todo: Plan
    outcomes: list[Outcome]
    deleted: list[str]
    removed: list[str]
    vanished: set[str]
    version: str
    bytes_downloaded: int


def _execute(fetcher: Fetcher, ws: Workspace, cfg: Config) -> _Pulled:
    """List, check ``metadata.csv``, plan, fetch, reconcile, then commit metadata and manifest last."""
    root, source = ws.root, fetcher.source
    state = ws.load_state()
    if state.replayed:
        logger.info("pull: resuming an interrupted pull (%d file(s) already in place)", state.replayed)
    listing = source.list()
    listing.reject_nested()
    logger.info("pull: source lists %d wanted object(s), %d rejected key(s), %d ignored",
                len(listing.objects), len(listing.rejected), listing.ignored)
    for rej in listing.rejected:
        logger.warning("pull: rejected key %r: %s", rej["key"], rej["reason"])
    if METADATA_KEY not in listing.objects:
        raise FileNotFoundError(f"source {source.uri!r} has no {METADATA_KEY}")

    # metadata.csv first: a bad one fails the task before any image is touched
    disk = state.disk
    meta_obj = listing.objects[METADATA_KEY]
    staged_meta: Path | None = None
    meta_entry = disk.get(METADATA_KEY)
    if not in_place(meta_entry, meta_obj, root.metadata):
        staged_meta = ws.staging(".csv")
        with ws.disk.guard(f"downloading {METADATA_KEY}", staged_meta, meta_obj.size):
            got = fetcher.fetch(meta_obj.key, staged_meta, lambda n: None)
        if got is None:
            raise FileNotFoundError(f"source {source.uri!r} lost its {METADATA_KEY} during the pull")
        meta_entry = manifest_entry(meta_obj, got)
    _check_metadata(staged_meta or root.metadata, source.uri, _baseline_columns(root))

    todo = plan(listing, disk, root.raw)
    ws.disk.check(todo.to_fetch, len(listing.objects), root.raw, cfg.pull_workers)
    root.images.mkdir(parents=True, exist_ok=True)
    outcomes = fetcher.fetch_all(todo.to_fetch)
    for out in outcomes:
        if out.entry is not None:  # a vanished object keeps its previous entry, if any
            disk[out.key] = out.entry
    disk[METADATA_KEY] = meta_entry  # type: ignore[assignment]
    vanished = {o.key for o in outcomes if o.entry is None}
    deleted, removed = reconcile(disk, listing, root.raw, cfg.pull_delete)
    version = ws.commit(disk, staged_meta, meta_entry)
    return _Pulled(root, listing, state, todo, outcomes, deleted, removed, vanished, version,
                   fetcher.bytes_downloaded)


def _summarise(run: _Pulled, cfg: Config, source_uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stage's small result and the full report (``pull_report.json``)."""
    root, listing, disk, committed = run.root, run.listing, run.state.disk, run.state.committed
    outcomes, deleted, removed, vanished = run.outcomes, run.deleted, run.removed, run.vanished
    old_version, version = run.state.version, run.version
    new, changed, unchanged, restored = [], [], [], []
    quarantined: list[dict[str, str]] = []
    for key in sorted(listing.objects):
        if key == METADATA_KEY or key in vanished:
            continue
        entry = disk[key]
        if entry.get("status") != "ok":
            quarantined.append({"key": key, "reason": str(entry.get("reason", "")),
                                "path": str(resolve_under(root.quarantine, key))})
            continue
        old = committed.get(key)
        if old is None:
            new.append(key)
        elif old.get("etag") != entry.get("etag") or old.get("status") != "ok":
            changed.append(key)
        else:
            unchanged.append(key)
    fetched = {o.key for o in outcomes if o.entry is not None}
    restored = [k for k in unchanged if k in fetched]
    old_meta = committed.get(METADATA_KEY)
    metadata_changed = old_meta is None or old_meta.get("etag") != disk[METADATA_KEY].get("etag")

    rows = _scan_rows(root.raw)
    for rej in rows["rejected_rows"][:20]:
        logger.warning("pull: metadata.csv line %d: rejected file name %r: %s", rej["line"],
                       rej["filename"], rej["reason"])
    for q in quarantined[:20]:
        logger.warning("pull: quarantined %s: %s", q["key"], q["reason"])
    if rows["missing_files"]:
        logger.warning("pull: %d metadata row(s) name a file that is absent (see %s)",
                       len(rows["missing_files"]), root.pull_report)

    rejected = len(listing.rejected) + len(quarantined) + len(rows["rejected_rows"])
    result = {
        "dataset_version": version,
        "new": len(new),
        "changed": len(changed),
        "unchanged": len(unchanged),
        "deleted": len(deleted),
        "rejected": rejected,
        "quarantined": len(quarantined),
        "missing": len(rows["missing_files"]),
        "bytes_downloaded": run.bytes_downloaded,
        "metadata_changed": metadata_changed,
        "has_changes": old_version != version,
        "n_images": sum(1 for k, e in disk.items() if k != METADATA_KEY and e.get("status") == "ok"),
        "raw_dir": str(root.raw),
        "report": str(root.pull_report),
    }
    report = {
        "source_uri": source_uri,
        "previous_dataset_version": old_version,
        "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "delete_option": "remove" if cfg.pull_delete else "keep",
        "new_keys": new,
        "changed_keys": changed,
        "restored_keys": restored,
        "deleted_upstream": deleted,
        "removed_keys": removed,
        "vanished_keys": sorted(vanished),
        "rejected_keys": listing.rejected,
        "quarantined_files": quarantined,
        "rejected_rows": rows["rejected_rows"],
        "missing_files": rows["missing_files"],
        "ignored_keys": listing.ignored,
        "rejected_breakdown": {"keys": len(listing.rejected), "images": len(quarantined),
                               "rows": len(rows["rejected_rows"])},
    }
    return result, report


# ----------------------------------------------------------------------------------- metadata
def _baseline_columns(root: DataRoot) -> list[str] | None:
    """The metadata columns of the last dataset version that passed the data checks, if any."""
    if not root.checks_baseline.is_file():
        return None
    schema = read_json(root.checks_baseline).get("schema") or {}
    return list(schema.get("columns") or []) or None


def _report_schema_change(root: DataRoot, run_key: str, message: str) -> None:
    """The run's ``data_checks.json`` for a schema change found by pull: verdict ``block``."""
    from covid_tasks.data_checks import BLOCK, Anomaly, report

    run_dir = root.run(run_key)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    found = report([Anomaly("schema_change", BLOCK, message, {"stage": "pull"})], None, None)
    write_json(run_dir.data_checks, found)
    logger.error("pull: %s", found["summary"])
    from covid_tasks import history

    history.record(root, run_key=run_dir.key, data_check=BLOCK, decision="blocked")


def _check_metadata(path: Path, uri: str, baseline_columns: list[str] | None = None) -> None:
    """Parse ``metadata.csv`` once; fail naming the required columns it lacks, or if it has no row.

    Raises:
        covid_tasks.data_checks.SchemaChangeError: a required column is missing (a ``ValueError``).
        ValueError: not UTF-8 CSV, or a header without rows.
    """
    rows = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            for row in reader:
                rows += any(cell.strip() for cell in row)
    except UnicodeDecodeError as exc:
        raise ValueError(f"metadata.csv from {uri} is not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise ValueError(f"metadata.csv from {uri} is not valid CSV "
                         f"(line {reader.line_num}: {exc})") from None
    cols = [str(c).strip() for c in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        new = [c for c in cols if c and baseline_columns and c not in baseline_columns]
        hint = f"; column(s) {new} are new since the last dataset that passed (renamed?)" if new else ""
        raise SchemaChangeError(f"metadata.csv from {uri} lacks required column(s): {', '.join(missing)} "
                                f"(required: {', '.join(REQUIRED_COLUMNS)}){hint}; nothing under raw/ "
                                "was changed")
    if rows == 0:
        raise ValueError(f"metadata.csv from {uri} has a header but no rows; refusing to replace "
                         f"the data set with an empty one (nothing under raw/ was changed)")


def _scan_rows(raw: Path) -> dict[str, list[dict[str, Any]]]:
    """Rows with unsafe file names or folders, and rows whose file is not under ``raw/``.

    A row's file is ``raw/<folder>/<filename>`` (``folder`` defaults to ``images``); only
    ``images/`` is pulled, so rows of other folders (e.g. CT ``volumes``) count as missing.
    """
    rejected: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    with open(raw / METADATA_KEY, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        fi = header.index("filename")
        fo = header.index("folder") if "folder" in header else None
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            name = row[fi].strip() if fi < len(row) else ""
            folder = (row[fo].strip() if fo is not None and fo < len(row) else "") or "images"
            try:
                path = raw / safe_relpath(folder) / safe_relpath(name)  # only read, never written
            except UnsafePathError as exc:
                rejected.append({"line": reader.line_num, "filename": name, "folder": folder,
                                 "reason": str(exc)})
                continue
            if not path.is_file():
                missing.append({"line": reader.line_num, "filename": name, "folder": folder})
    return {"rejected_rows": rejected, "missing_files": missing}
