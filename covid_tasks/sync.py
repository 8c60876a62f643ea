"""Pull's incremental engine: lock, journal, manifest, plan, fetch-validate-place, reconcile.

:mod:`covid_tasks.stages.pull` drives it; this module knows how a pull stays incremental and
crash-safe (the paths come from :mod:`covid_tasks.layout`):

* **Incremental**: an object whose ETag (S3) or SHA-256 (folders) and size match the manifest, and
  whose file is in place, is not transferred again (:func:`plan`). Quarantined objects are
  remembered by ETag, so an unchanged bad file is not downloaded every week.
* **Crash-safe**: downloads go to ``.pull/tmp`` (never under ``raw/``), are fsynced, validated and
  renamed into place; each placed file is appended to ``.pull/journal.jsonl``
  (:class:`Workspace`). ``metadata.csv`` and the manifest are placed together, last
  (:meth:`Workspace.commit`). A pull killed at any moment leaves ``raw/metadata.csv`` and every
  image complete; the next pull replays the journal, so it does not download again what the
  killed one already placed. One pull per data root runs at a time (file lock).
* **Disk space**: a pull that needs more than is free is refused before anything changes, and a
  disk that fills up while writing ends in a :class:`DiskFullError` naming the path.
"""

from __future__ import annotations

import contextlib
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

from covid_tasks.config import Config
from covid_tasks.images import validate_image
from covid_tasks.layout import DataRoot
from covid_tasks.sources import METADATA_KEY, Fetched, Listing, PullError, Source, SourceObject, VanishedError
from covid_tasks.storage import UnsafePathError, atomic_path, read_json, resolve_under, write_json

logger = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"
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


@dataclass
class Outcome:
    """What happened to one fetched object."""

    key: str
    entry: dict[str, Any] | None  # None: vanished upstream during the pull
    reason: str | None = None  # quarantine reason


@dataclass
class Plan:
    """What a pull must fetch, and the quarantined objects it need not fetch again."""

    to_fetch: list[SourceObject] = field(default_factory=list)
    cached_quarantine: list[str] = field(default_factory=list)


@dataclass
class State:
    """The committed manifest (and its version) and the on-disk state: manifest plus journal."""

    committed: dict[str, dict[str, Any]]
    version: str | None
    disk: dict[str, dict[str, Any]]
    replayed: int


class Progress:
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


class DiskSpace:
    """The pull's disk-space checks: up front, and "no space left" while writing, both named."""

    def __init__(self, root: DataRoot) -> None:
        self.root = root.root
        self.work = root.pull_work
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
        free = free_bytes(self.work)
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
                f"{free_bytes(path)} bytes free there{total}): free space or move the data root "
                f"{self.root}; raw/metadata.csv and the manifest were not changed") from None


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def dataset_version(objects: dict[str, dict[str, Any]]) -> str:
    """A hash over the manifest's usable entries (key and content hash), stable across sources."""
    usable = {k: v["sha256"] for k, v in sorted(objects.items()) if v.get("status", "ok") == "ok"}
    return hashlib.sha256(json.dumps(usable).encode()).hexdigest()[:16]


class Workspace:
    """One pull's hold on a data root: the lock, the staging folder, the journal and the manifest."""

    def __init__(self, root: DataRoot, source_uri: str) -> None:
        self.root = root
        self.source_uri = source_uri
        self.work = root.pull_work
        self.tmp = self.work / "tmp"
        self.journal_path = self.work / JOURNAL
        self.disk = DiskSpace(root)
        self._journal_lock = threading.Lock()
        self._lock_fh: Any = None

    def __enter__(self) -> Workspace:
        import fcntl

        self.work.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.work / "lock", "a+")  # noqa: SIM115 - held until __exit__
        try:
            fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            raise PullError(f"another pull is running on {self.root.root} "
                            f"(lock {self.work / 'lock'})") from None
        shutil.rmtree(self.tmp, ignore_errors=True)  # leftovers of a killed pull
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._lock_fh is not None:
            self._lock_fh.close()  # releases the lock

    def staging(self, suffix: str = ".part") -> Path:
        """A fresh path in the staging folder."""
        return self.tmp / f"{uuid.uuid4().hex}{suffix}"

    def journal(self, key: str, entry: dict[str, Any]) -> None:
        """Record one placed (or quarantined) object, so a killed pull's successor keeps it."""
        line = json.dumps({"key": key, "entry": entry}, sort_keys=True) + "\n"
        with self._journal_lock, self.disk.guard("appending to the journal", self.journal_path, len(line)), \
                open(self.journal_path, "a", encoding="utf-8") as fh:
            fh.write(line)

    def load_state(self) -> State:
        """The committed manifest, its version, and the on-disk state (manifest + journal replayed)."""
        committed: dict[str, dict[str, Any]] = {}
        version = None
        path = self.root.manifest
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
                version = dataset_version(committed)
        disk = {k: dict(v) for k, v in committed.items()}
        replayed = 0
        if self.journal_path.is_file():
            with open(self.journal_path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                        key, entry = rec["key"], rec["entry"]
                        target = resolve_under(self.root.raw, key)
                    except (ValueError, KeyError, TypeError, UnsafePathError):
                        continue  # a torn last line of a killed pull
                    if entry.get("status") == "ok" and not (
                            target.is_file() and target.stat().st_size == entry.get("size")):
                        continue
                    disk[key] = entry
                    replayed += 1
        return State(committed, version, disk, replayed)

    def commit(self, disk: dict[str, dict[str, Any]], staged_meta: Path | None,
               meta_entry: dict[str, Any] | None) -> str:
        """Place ``metadata.csv`` (when a new one was staged) and write the manifest, together and last.

        Nothing can fail between the two but a crash, and the journal replays that.

        Returns:
            The new dataset version.
        """
        version = dataset_version(disk)
        manifest = {"format": MANIFEST_FORMAT, "source_uri": self.source_uri, "dataset_version": version,
                    "objects": dict(sorted(disk.items()))}
        meta_target = self.root.metadata
        if staged_meta is not None:
            assert meta_entry is not None
            with self.disk.guard(f"placing {METADATA_KEY}", meta_target, int(meta_entry["size"])):
                place(staged_meta, meta_target)
            self.journal(METADATA_KEY, meta_entry)
        manifest_path = self.root.manifest
        if not manifest_path.is_file() or read_json(manifest_path) != json.loads(json.dumps(manifest)):
            with self.disk.guard("writing the manifest", manifest_path, len(json.dumps(manifest))):
                write_json(manifest_path, manifest)
        self.journal_path.unlink(missing_ok=True)
        return version


class Fetcher:
    """Downloads objects in parallel, validates each with the training decoder, places or quarantines it."""

    def __init__(self, source: Source, workspace: Workspace, cfg: Config) -> None:
        self.source = source
        self.ws = workspace
        self.cfg = cfg
        self.bytes_downloaded = 0
        self._count_lock = threading.Lock()
        self._decode_slots = threading.BoundedSemaphore(max(1, min(cfg.pull_workers, os.cpu_count() or 1)))

    def fetch(self, key: str, dest: Path, on_bytes: Any) -> Fetched | None:
        """Download ``key`` to ``dest``; ``None`` when it vanished upstream meanwhile."""
        try:
            got = self.source.fetch(key, dest, on_bytes)
        except VanishedError as exc:
            logger.warning("pull: %s vanished upstream during the pull (%s)", key, exc)
            return None
        with self._count_lock:
            self.bytes_downloaded += got.size
        return got

    def fetch_all(self, objects: list[SourceObject]) -> list[Outcome]:
        """Fetch, validate and place every object; the first error stops the rest and is raised."""
        if not objects:
            return []
        total = sum(o.size for o in objects)
        workers = max(1, min(self.cfg.pull_workers, len(objects)))
        logger.info("pull: fetching %d object(s), %.1f MiB, with %d worker(s)", len(objects),
                    total / 2**20, workers)
        progress = Progress(len(objects), total)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pull")
        try:
            futures: list[Future[Outcome]] = [pool.submit(self._fetch_one, o, progress) for o in objects]
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

    def _fetch_one(self, obj: SourceObject, progress: Progress) -> Outcome:
        tmp = self.ws.staging()
        try:
            with self.ws.disk.guard(f"downloading {obj.key}", tmp, obj.size):
                return self._fetch_validate_place(obj, tmp, progress)
        finally:
            tmp.unlink(missing_ok=True)
            progress.done_object()

    def _fetch_validate_place(self, obj: SourceObject, tmp: Path, progress: Progress) -> Outcome:
        """Download ``obj`` to ``tmp``, validate it, place it (or quarantine it) and journal it."""
        got = self.fetch(obj.key, tmp, progress.add_bytes)
        if got is None:
            return Outcome(obj.key, None)
        with self._decode_slots:  # decoding is CPU- and memory-bound: at most one per core
            reason = validate_image(tmp, self.cfg.pull_min_image_side, self.cfg.max_image_pixels)
        entry = manifest_entry(obj, got, reason)
        root = self.ws.root
        target = resolve_under(root.quarantine if reason else root.raw, obj.key)
        try:
            place(tmp, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG):
                raise
            reason = f"unwritable: {exc.strerror} ({target.name})"
            entry = manifest_entry(obj, got, reason)
        if reason:
            logger.debug("pull: quarantined %s (%s)", obj.key, reason)
        else:
            # a fixed image leaves quarantine
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                resolve_under(root.quarantine, obj.key).unlink()
        self.ws.journal(obj.key, entry)
        logger.debug("pull: fetched %s (%d bytes)", obj.key, got.size)
        return Outcome(obj.key, entry, reason)


def manifest_entry(obj: SourceObject, got: Fetched, reason: str | None = None) -> dict[str, Any]:
    """The manifest's record of one fetched object (``status`` ``quarantined`` with a ``reason``)."""
    entry: dict[str, Any] = {
        "size": got.size, "etag": obj.etag, "sha256": got.sha256,
        "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "quarantined" if reason else "ok",
    }
    if reason:
        entry["reason"] = reason
    return entry


def place(tmp: Path, target: Path) -> None:
    """Move a staged file into place atomically (a copy then rename across file systems)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with atomic_path(target) as t:  # raw/ on another file system
            shutil.copyfile(tmp, t)


def in_place(entry: dict[str, Any] | None, obj: SourceObject, target: Path) -> bool:
    """Whether ``obj`` needs no transfer: same ETag and size, and its file is complete."""
    if not entry or entry.get("etag") != obj.etag or entry.get("size") != obj.size:
        return False
    if entry.get("status") != "ok":
        return True
    try:
        return target.stat().st_size == obj.size
    except OSError:
        return False


def plan(listing: Listing, disk: dict[str, dict[str, Any]], raw: Path) -> Plan:
    """The objects to fetch (new, changed or incomplete) and the quarantined ones already known."""
    out = Plan()
    for key, obj in sorted(listing.objects.items()):
        if key == METADATA_KEY:
            continue
        entry = disk.get(key)
        if in_place(entry, obj, raw / key):  # keys are validated by check_key
            if entry and entry.get("status") == "quarantined":
                out.cached_quarantine.append(key)
        else:
            out.to_fetch.append(obj)
    return out


def reconcile(disk: dict[str, dict[str, Any]], listing: Listing, raw: Path, delete: bool
              ) -> tuple[list[str], list[str]]:
    """Handle objects gone upstream and files that turned bad; return (deleted, removed) keys.

    An object deleted upstream is kept (and flagged ``deleted_upstream``) unless ``delete``.
    """
    gone = sorted(k for k in disk if k not in listing.objects and k != METADATA_KEY)
    deleted, removed = [], []
    for key in gone:
        entry = disk[key]
        if entry.get("status") != "ok":
            disk.pop(key)  # a quarantined object that left upstream: forget it
            continue
        deleted.append(key)
        if delete:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, UnsafePathError):
                resolve_under(raw, key).unlink()
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
                resolve_under(raw, key).unlink()
    return deleted, removed
