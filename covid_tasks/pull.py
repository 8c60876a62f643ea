"""Pull stage: bring new and changed images and ``metadata.csv`` from the source into ``raw/``.

The source (``s3://bucket/prefix``, ``file:///path`` or a folder, see :mod:`covid_tasks.sources`)
holds the upstream layout, ``metadata.csv`` plus ``images/``. What lands where::

    <data_root>/raw/metadata.csv      replaced atomically, last, once every image is in place
    <data_root>/raw/images/<name>     valid images only
    <data_root>/raw/manifest.json     key -> size, etag, sha256, pulled_at, status (atomic)
    <data_root>/quarantine/images/    images that failed validation (never read by training)
    <data_root>/pull_report.json      per-file details of the last pull
    <data_root>/.pull/                lock, staging area for downloads, journal of a running pull

Incremental: an object whose ETag (S3) or SHA-256 (folders) and size match the manifest, and
whose file is in place, is not transferred again. Quarantined objects are remembered by ETag so
an unchanged bad file is not downloaded every week.

Crash safety: downloads go to ``.pull/tmp`` (never under ``raw/``), are fsynced, validated and
renamed into place; each placed file is appended to ``.pull/journal.jsonl``. ``metadata.csv``
and the manifest are placed together, last, after every image and every clean-up. A pull
killed at any moment leaves ``raw/metadata.csv`` and every
image complete; the next pull replays the journal, so it does not download again what the killed
one already placed, and completes the work. One pull per data root runs at a time (file lock).

Refused before anything under ``raw/`` changes: a ``metadata.csv`` without the required columns
or without a single row, and a pull that needs more disk space than is free (a disk that fills
up during the pull ends in a :class:`DiskFullError` naming the path and the bytes needed).
Images are validated with Pillow *and* with TensorFlow, the decoder training uses, so a file only
Pillow reads (an RLE-compressed BMP) is quarantined rather than crashing ``train``.

Objects deleted upstream are reported; with ``cfg.pull_delete`` (default ``False``) their local
copies are removed, otherwise they are kept and stay part of the data set.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from covid_tasks import data
from covid_tasks.config import METADATA_COLUMNS, Config
from covid_tasks.sources import (
    METADATA_KEY,
    Fetched,
    Listing,
    PullError,
    Source,
    SourceObject,
    VanishedError,
    open_source,
)
from covid_tasks.storage import UnsafePathError, read_json, resolve_under, safe_relpath, write_json

logger = logging.getLogger(__name__)

__all__ = ["pull", "PullError", "DiskFullError", "REQUIRED_COLUMNS", "validate_image"]

MANIFEST = "manifest.json"
REPORT = "pull_report.json"
WORK_DIR = ".pull"
JOURNAL = "journal.jsonl"
QUARANTINE = "quarantine"
REQUIRED_COLUMNS = METADATA_COLUMNS
#: Formats the training pipeline (``tf.io.decode_image``) reads.
IMAGE_FORMATS = data.IMAGE_FORMATS
#: Seconds between progress lines in the task log.
PROGRESS_EVERY_S = 10.0
MANIFEST_FORMAT = 2
#: Disk space a pull keeps in hand beyond its downloads (manifest, journal, report): fixed part
#: and per listed object.
SPACE_MARGIN_BYTES = 1 << 20
SPACE_PER_OBJECT_BYTES = 512
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(PullError):
    """The data root's file system has not enough free space for the pull.

    Not retried by the DAG (``retryable = False``): space has to be freed, then the task cleared.
    """

    retryable = False


def pull(source_uri: str, data_root: str | Path, cfg: Config,
         s3_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bring what is new or changed from ``source_uri`` into ``<data_root>/raw``, validated.

    Args:
        source_uri: ``s3://bucket/prefix``, ``file:///path`` or a folder holding ``metadata.csv``
            and ``images/``.
        data_root: the data root; files land in ``raw/metadata.csv`` and ``raw/images/``.
        cfg: run configuration (``pull_workers``, ``pull_retries``, ``pull_delete``,
            ``pull_min_image_side``, ``max_image_pixels``).
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
        DiskFullError: the data root's file system lacks the space the pull needs (a
            ``PullError``); the message names the path, the bytes needed and the bytes free.
        PullError: the S3 endpoint cannot be reached, refuses the credentials, keeps failing
            after retries, or another pull holds the data root.
    """
    started = time.monotonic()
    root = Path(data_root)
    logger.info("pull: %s -> %s (workers=%d, retries=%d, delete=%s)", source_uri, root / "raw",
                cfg.pull_workers, cfg.pull_retries, cfg.pull_delete)
    source = open_source(source_uri, s3_options, retries=cfg.pull_retries,
                         max_connections=cfg.pull_workers + 2)
    with source, _Run(source, root, cfg) as run:
        result, report = run.execute()
        report["duration_s"] = round(time.monotonic() - started, 3)
        write_json(root / REPORT, {**result, **report})
    logger.info("pull: done in %.1fs %s", report["duration_s"], json.dumps(result, sort_keys=True))
    if not result["has_changes"]:
        logger.info("pull: no new or changed data (dataset_version %s); training and registration "
                    "are skipped unless the run is forced", result["dataset_version"])
    return result


# ----------------------------------------------------------------------------------- validation
def validate_image(path: str | Path, min_side: int, max_pixels: int) -> str | None:
    """Check one image file without trusting it.

    Reads the header first (the same reader as training), so a decompression bomb is refused
    before any pixel is decoded; then verifies the file's structure and decodes it fully with
    Pillow (which catches truncation), and once more with TensorFlow, the decoder training uses:
    a file only Pillow reads (an RLE-compressed BMP), or a BMP/GIF whose pixels TensorFlow reads
    differently (a colour palette read as grey levels), is refused.

    Args:
        path: the file to check.
        min_side: the smallest accepted width and height, in pixels.
        max_pixels: the largest accepted width times height.

    Returns:
        ``None`` when the image is usable, else a short reason: ``empty``, ``undecodable``,
        ``truncated``, ``too_small`` or ``pixel_limit``, followed by details.
    """
    from PIL import Image

    p = Path(path)
    if p.stat().st_size == 0:
        return "empty: 0 bytes"
    try:
        width, height = data.image_size(p, max_pixels)
    except data.ImageTooLargeError as exc:
        return f"pixel_limit: {exc.width}x{exc.height} exceeds {max_pixels} pixels"
    except ValueError as exc:
        text = str(exc).removeprefix(f"{p} is not a decodable image: ")
        return f"{'truncated' if 'truncated' in text else 'undecodable'}: {text[:160]}"
    if min(width, height) < min_side:
        return f"too_small: {width}x{height}, smaller side under {min_side} px"
    try:
        with Image.open(p, formats=IMAGE_FORMATS) as im:
            fmt = im.format or "image"
            if im.size != (width, height):
                return f"undecodable: header sizes disagree ({im.size[0]}x{im.size[1]} vs {width}x{height})"
            im.verify()
        with Image.open(p, formats=IMAGE_FORMATS) as im:
            im.load()
    except Image.DecompressionBombError as exc:
        return f"pixel_limit: {exc}"
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for hostile input
        text = str(exc) or type(exc).__name__
        kind = "truncated" if "truncat" in text.lower() or isinstance(exc, EOFError) else "undecodable"
        return f"{kind}: {text[:160]}"
    reason = _training_decoder_reason(p, fmt)
    if reason is None:
        logger.debug("pull: %s is a valid %s %dx%d", p.name, fmt, width, height)
    return reason


def _training_decoder_reason(path: Path, fmt: str) -> str | None:
    """Why TensorFlow (training's decoder) cannot use ``path``, or ``None`` when it can."""
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    try:
        pixels = data.decode_native(path.read_bytes())
    except (tf.errors.OpError, ValueError) as exc:
        return f"undecodable: TensorFlow, the decoder training uses, cannot read this {fmt}: " \
               f"{data.decoder_message(exc)[:160]}"
    if fmt in ("BMP", "GIF"):  # 8-bit: both decoders must give the same RGB pixels
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            expected = np.asarray(im.convert("RGB"))
        if pixels.shape != expected.shape or not np.array_equal(pixels.numpy(), expected):
            return (f"undecodable: TensorFlow, the decoder training uses, reads this {fmt} "
                    f"({im.mode} mode) with other pixel values than its own colours")
    return None


# ----------------------------------------------------------------------------------- the run
@dataclass
class _Outcome:
    """What happened to one fetched object."""

    key: str
    entry: dict[str, Any] | None  # None: vanished upstream during the pull
    reason: str | None = None  # quarantine reason


@dataclass
class _Plan:
    to_fetch: list[SourceObject] = field(default_factory=list)
    cached_quarantine: list[str] = field(default_factory=list)


class _Progress:
    """Thread-safe counters that log one line every ``PROGRESS_EVERY_S`` seconds, not per file."""

    def __init__(self, total_objects: int, total_bytes: int) -> None:
        self.total_objects = total_objects
        self.total_bytes = total_bytes
        self.objects = 0
        self.bytes = 0
        self.lines = 0
        self._start = time.monotonic()
        self._last = self._start
        self._lock = threading.Lock()

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n
        self._maybe_log()

    def done_object(self) -> None:
        with self._lock:
            self.objects += 1
        self._maybe_log()

    def _maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last < PROGRESS_EVERY_S:
                return
            self._last = now
            self.lines += 1
            objects, done = self.objects, self.bytes
        elapsed = max(now - self._start, 1e-6)
        pct = 100.0 * done / self.total_bytes if self.total_bytes else 100.0
        logger.info("pull: progress %d/%d objects, %.1f/%.1f MiB (%.0f%%), %.1f objects/s, %.2f MiB/s",
                    objects, self.total_objects, done / 2**20, self.total_bytes / 2**20, pct,
                    objects / elapsed, done / 2**20 / elapsed)

    def finish(self) -> None:
        self._maybe_log(force=True)


class _DiskSpace:
    """The pull's disk-space checks: up front, and "no space left" while writing, both named."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.work = root / WORK_DIR
        self.needed = 0

    def check(self, to_fetch: list[SourceObject], n_objects: int, raw: Path, workers: int) -> None:
        """Refuse, before downloading, a pull that needs more space than the data root has free."""
        needed = SPACE_MARGIN_BYTES + SPACE_PER_OBJECT_BYTES * n_objects
        for obj in to_fetch:
            try:  # a file replaced in place frees its old bytes
                needed += max(0, obj.size - (raw / obj.key).stat().st_size)
            except OSError:
                needed += obj.size
        needed += sum(sorted((o.size for o in to_fetch), reverse=True)[:max(1, workers)])  # staged copies
        self.needed = needed
        free = _free_bytes(self.work)
        if free is not None and needed > free:
            raise DiskFullError(
                f"pull: not enough space on the device holding {self.work}: this pull needs about "
                f"{needed} bytes ({needed / 2**20:.1f} MiB, {len(to_fetch)} object(s) to fetch) and "
                f"{free} bytes ({free / 2**20:.1f} MiB) are free; nothing was changed under {raw}")

    @contextlib.contextmanager
    def guard(self, what: str, path: Path, needed: int) -> Any:
        """Turn "no space left" while writing ``path`` into a :class:`DiskFullError` saying so."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            total = f"; this pull needs about {self.needed} bytes in all" if self.needed else ""
            raise DiskFullError(
                f"pull: no space left on the device holding {path} ({what}, {needed} bytes; "
                f"{_free_bytes(path)} bytes free there{total}): free space or move the data root "
                f"{self.root}; raw/metadata.csv and the manifest were not changed") from None


class _Run:
    """One pull into one data root; holds the lock and the state while it runs."""

    def __init__(self, source: Source, root: Path, cfg: Config) -> None:
        self.source = source
        self.root = root
        self.cfg = cfg
        self.raw = root / "raw"
        self.images = self.raw / "images"
        self.quarantine = root / QUARANTINE
        self.work = root / WORK_DIR
        self.tmp = self.work / "tmp"
        self.journal_path = self.work / JOURNAL
        self._journal_lock = threading.Lock()
        self._decode_slots = threading.BoundedSemaphore(max(1, min(cfg.pull_workers, os.cpu_count() or 1)))
        self._lock_fh: Any = None
        self.bytes_downloaded = 0
        self.disk = _DiskSpace(root)

    # -- lock, staging and journal -----------------------------------------------------------
    def __enter__(self) -> "_Run":
        import fcntl

        self.work.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.work / "lock", "a+")
        try:
            fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            raise PullError(f"another pull is running on {self.root} (lock {self.work / 'lock'})") from None
        shutil.rmtree(self.tmp, ignore_errors=True)  # leftovers of a killed pull
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._lock_fh is not None:
            self._lock_fh.close()  # releases the lock

    def _journal(self, key: str, entry: dict[str, Any]) -> None:
        line = json.dumps({"key": key, "entry": entry}, sort_keys=True) + "\n"
        with self._journal_lock, self.disk.guard("appending to the journal", self.journal_path, len(line)), \
                open(self.journal_path, "a", encoding="utf-8") as fh:
            fh.write(line)

    def _load_state(self) -> tuple[dict[str, dict[str, Any]], str | None, dict[str, dict[str, Any]], int]:
        """The committed manifest, its version, and the on-disk state (manifest + journal)."""
        committed: dict[str, dict[str, Any]] = {}
        version = None
        path = self.raw / MANIFEST
        if path.is_file():
            try:
                data = read_json(path)
            except ValueError as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); move it away to pull everything "
                                 f"again") from None
            version = data.get("dataset_version")
            for key, entry in data.get("objects", {}).items():
                entry = dict(entry)
                entry.setdefault("etag", entry.get("sha256", ""))  # baseline manifests: sha256 only
                entry.setdefault("status", "ok")
                committed[key] = entry
            if version is None:
                version = _version(committed)
        disk = {k: dict(v) for k, v in committed.items()}
        replayed = 0
        if self.journal_path.is_file():
            with open(self.journal_path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                        key, entry = rec["key"], rec["entry"]
                        target = resolve_under(self.raw, key)
                    except (ValueError, KeyError, TypeError, UnsafePathError):
                        continue  # a torn last line of a killed pull
                    if entry.get("status") == "ok" and not (
                            target.is_file() and target.stat().st_size == entry.get("size")):
                        continue
                    disk[key] = entry
                    replayed += 1
        return committed, version, disk, replayed

    # -- the steps -----------------------------------------------------------------------------
    def execute(self) -> tuple[dict[str, Any], dict[str, Any]]:
        committed, old_version, disk, replayed = self._load_state()
        if replayed:
            logger.info("pull: resuming an interrupted pull (%d file(s) already in place)", replayed)
        listing = self.source.list()
        listing.reject_nested()
        logger.info("pull: source lists %d wanted object(s), %d rejected key(s), %d ignored",
                    len(listing.objects), len(listing.rejected), listing.ignored)
        for rej in listing.rejected:
            logger.warning("pull: rejected key %r: %s", rej["key"], rej["reason"])
        if METADATA_KEY not in listing.objects:
            raise FileNotFoundError(f"source {self.source.uri!r} has no {METADATA_KEY}")

        # metadata.csv first: a bad one fails the task before any image is touched
        meta_obj = listing.objects[METADATA_KEY]
        meta_target = self.raw / METADATA_KEY
        staged_meta: Path | None = None
        meta_entry = disk.get(METADATA_KEY)
        if not self._in_place(meta_entry, meta_obj, meta_target):
            staged_meta = self.tmp / f"{uuid.uuid4().hex}.csv"
            with self.disk.guard(f"downloading {METADATA_KEY}", staged_meta, meta_obj.size):
                got = self._fetch(meta_obj.key, staged_meta, lambda n: None)
            if got is None:
                raise FileNotFoundError(f"source {self.source.uri!r} lost its {METADATA_KEY} during the pull")
            meta_entry = self._entry(meta_obj, got)
        _check_metadata(staged_meta or meta_target, self.source.uri)

        plan = self._plan(listing, disk)
        self.disk.check(plan.to_fetch, len(listing.objects), self.raw, self.cfg.pull_workers)
        self.images.mkdir(parents=True, exist_ok=True)
        outcomes = self._fetch_all(plan.to_fetch)
        for out in outcomes:
            if out.entry is not None:  # a vanished object keeps its previous entry, if any
                disk[out.key] = out.entry
        disk[METADATA_KEY] = meta_entry  # type: ignore[assignment]
        vanished = {o.key for o in outcomes if o.entry is None}
        deleted, removed = self._reconcile(disk, listing)

        # metadata.csv and the manifest together, last: nothing can fail between them but a crash,
        # and the journal replays that
        version = _version(disk)
        manifest = {"format": MANIFEST_FORMAT, "source_uri": self.source.uri, "dataset_version": version,
                    "objects": dict(sorted(disk.items()))}
        if staged_meta is not None:
            with self.disk.guard(f"placing {METADATA_KEY}", meta_target, meta_obj.size):
                self._place(staged_meta, meta_target)
            assert meta_entry is not None
            self._journal(METADATA_KEY, meta_entry)
        manifest_path = self.raw / MANIFEST
        if not manifest_path.is_file() or read_json(manifest_path) != json.loads(json.dumps(manifest)):
            with self.disk.guard("writing the manifest", manifest_path, len(json.dumps(manifest))):
                write_json(manifest_path, manifest)
        self.journal_path.unlink(missing_ok=True)

        return self._summarise(listing, committed, disk, old_version, version, plan, outcomes,
                               deleted, removed, vanished)

    def _reconcile(self, disk: dict[str, dict[str, Any]], listing: Listing) -> tuple[list[str], list[str]]:
        """Handle objects gone upstream and files that turned bad; return (deleted, removed) keys."""
        gone = sorted(k for k in disk if k not in listing.objects and k != METADATA_KEY)
        deleted, removed = [], []
        for key in gone:
            entry = disk[key]
            if entry.get("status") != "ok":
                disk.pop(key)  # a quarantined object that left upstream: forget it
                continue
            deleted.append(key)
            if self.cfg.pull_delete:
                with contextlib.suppress(FileNotFoundError, NotADirectoryError, UnsafePathError):
                    resolve_under(self.raw, key).unlink()
                disk.pop(key)
                removed.append(key)
            else:
                entry["deleted_upstream"] = True
        for key, entry in disk.items():
            if key in listing.objects:
                entry.pop("deleted_upstream", None)
            if entry.get("status") == "quarantined":  # a good file went bad upstream: stop using it
                with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                         UnsafePathError):
                    resolve_under(self.raw, key).unlink()
        return deleted, removed

    def _in_place(self, entry: dict[str, Any] | None, obj: SourceObject, target: Path) -> bool:
        """Whether ``obj`` needs no transfer: same ETag and size, and its file is complete."""
        if not entry or entry.get("etag") != obj.etag or entry.get("size") != obj.size:
            return False
        if entry.get("status") != "ok":
            return True
        try:
            return target.stat().st_size == obj.size
        except OSError:
            return False

    def _plan(self, listing: Listing, disk: dict[str, dict[str, Any]]) -> _Plan:
        plan = _Plan()
        for key, obj in sorted(listing.objects.items()):
            if key == METADATA_KEY:
                continue
            entry = disk.get(key)
            if self._in_place(entry, obj, self.raw / key):  # keys are validated by check_key
                if entry and entry.get("status") == "quarantined":
                    plan.cached_quarantine.append(key)
            else:
                plan.to_fetch.append(obj)
        return plan

    def _entry(self, obj: SourceObject, got: Fetched, reason: str | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "size": got.size, "etag": obj.etag, "sha256": got.sha256,
            "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "status": "quarantined" if reason else "ok",
        }
        if reason:
            entry["reason"] = reason
        return entry

    def _fetch(self, key: str, dest: Path, on_bytes: Any) -> Fetched | None:
        try:
            got = self.source.fetch(key, dest, on_bytes)
        except VanishedError as exc:
            logger.warning("pull: %s vanished upstream during the pull (%s)", key, exc)
            return None
        with self._journal_lock:
            self.bytes_downloaded += got.size
        return got

    def _fetch_one(self, obj: SourceObject, progress: _Progress) -> _Outcome:
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with self.disk.guard(f"downloading {obj.key}", tmp, obj.size):
                return self._fetch_validate_place(obj, tmp, progress)
        finally:
            tmp.unlink(missing_ok=True)
            progress.done_object()

    def _fetch_validate_place(self, obj: SourceObject, tmp: Path, progress: _Progress) -> _Outcome:
        """Download ``obj`` to ``tmp``, validate it, place it (or quarantine it) and journal it."""
        got = self._fetch(obj.key, tmp, progress.add_bytes)
        if got is None:
            return _Outcome(obj.key, None)
        with self._decode_slots:  # decoding is CPU- and memory-bound: at most one per core
            reason = validate_image(tmp, self.cfg.pull_min_image_side, self.cfg.max_image_pixels)
        entry = self._entry(obj, got, reason)
        target = resolve_under(self.quarantine if reason else self.raw, obj.key)
        try:
            self._place(tmp, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG):
                raise
            reason = f"unwritable: {exc.strerror} ({target.name})"
            entry = self._entry(obj, got, reason)
        if reason:
            logger.debug("pull: quarantined %s (%s)", obj.key, reason)
        else:
            # a fixed image leaves quarantine
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                resolve_under(self.quarantine, obj.key).unlink()
        self._journal(obj.key, entry)
        logger.debug("pull: fetched %s (%d bytes)", obj.key, got.size)
        return _Outcome(obj.key, entry, reason)

    def _fetch_all(self, objects: list[SourceObject]) -> list[_Outcome]:
        if not objects:
            return []
        total = sum(o.size for o in objects)
        workers = max(1, min(self.cfg.pull_workers, len(objects)))
        logger.info("pull: fetching %d object(s), %.1f MiB, with %d worker(s)", len(objects),
                    total / 2**20, workers)
        progress = _Progress(len(objects), total)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pull")
        try:
            futures: list[Future[_Outcome]] = [pool.submit(self._fetch_one, o, progress) for o in objects]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
            return [f.result() for f in futures]
        except BaseException:
            # a failed fetch, or the task being stopped: drop queued work, cut retries short
            self.source.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
            progress.finish()

    def _place(self, tmp: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            from covid_tasks.storage import atomic_path  # raw/ on another file system

            with atomic_path(target) as t:
                shutil.copyfile(tmp, t)

    # -- the result ------------------------------------------------------------------------------
    def _summarise(self, listing: Listing, committed: dict[str, dict[str, Any]],
                   disk: dict[str, dict[str, Any]], old_version: str | None, version: str,
                   plan: _Plan, outcomes: list[_Outcome], deleted: list[str], removed: list[str],
                   vanished: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        new, changed, unchanged, restored = [], [], [], []
        quarantined: list[dict[str, str]] = []
        for key in sorted(listing.objects):
            if key == METADATA_KEY or key in vanished:
                continue
            entry = disk[key]
            if entry.get("status") != "ok":
                quarantined.append({"key": key, "reason": str(entry.get("reason", "")),
                                    "path": str(resolve_under(self.quarantine, key))})
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

        rows = _scan_rows(self.raw)
        for rej in rows["rejected_rows"][:20]:
            logger.warning("pull: metadata.csv line %d: rejected file name %r: %s", rej["line"],
                           rej["filename"], rej["reason"])
        for q in quarantined[:20]:
            logger.warning("pull: quarantined %s: %s", q["key"], q["reason"])
        if rows["missing_files"]:
            logger.warning("pull: %d metadata row(s) name a file that is absent (see %s)",
                           len(rows["missing_files"]), self.root / REPORT)

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
            "bytes_downloaded": self.bytes_downloaded,
            "metadata_changed": metadata_changed,
            "has_changes": old_version != version,
            "n_images": sum(1 for k, e in disk.items() if k != METADATA_KEY and e.get("status") == "ok"),
            "raw_dir": str(self.raw),
            "report": str(self.root / REPORT),
        }
        report = {
            "source_uri": self.source.uri,
            "previous_dataset_version": old_version,
            "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "delete_option": "remove" if self.cfg.pull_delete else "keep",
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
def _check_metadata(path: Path, uri: str) -> None:
    """Parse ``metadata.csv`` once; fail naming the required columns it lacks, or if it has no row."""
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
    cols = {str(c).strip() for c in header}
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise ValueError(f"metadata.csv from {uri} lacks required column(s): {', '.join(missing)} "
                         f"(required: {', '.join(REQUIRED_COLUMNS)})")
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


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _version(objects: dict[str, dict[str, Any]]) -> str:
    """A hash over the manifest's usable entries (key and content hash), stable across sources."""
    usable = {k: v["sha256"] for k, v in sorted(objects.items()) if v.get("status", "ok") == "ok"}
    return hashlib.sha256(json.dumps(usable).encode()).hexdigest()[:16]

