"""Pull sources: where the upstream layout (``metadata.csv`` plus ``images/``) is read from.

Two kinds, chosen by URI:

* ``s3://bucket/prefix``: any S3 API (AWS, MinIO, SeaweedFS) through boto3. Client options
  (``endpoint_url``, ``region_name``, ``aws_access_key_id``, ``aws_secret_access_key``) come from
  the caller, typically an Airflow connection; empty options use the standard AWS environment
  (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``,
  profiles). Every S3 call is retried with exponential backoff and jitter on transient errors
  (connection failures, timeouts, throttling, 5xx); refused credentials and an unreachable
  endpoint end in a short :class:`PullError` naming the endpoint.
* a local folder, ``file:///path`` or a plain path. Its "ETag" is the file's SHA-256.

A listing yields keys relative to the source root. Only ``metadata.csv`` and files under
``images/`` are wanted; a key that is absolute, has ``..``/``.``/empty segments, a backslash or a
control character is *rejected* (reported, never fetched) by :func:`check_key`, and so is a key
under another object's key (:meth:`Listing.reject_nested`); anything else (other folders, hidden
files, folder markers) is *ignored*.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlparse

from covid_tasks.layout import IMAGES, METADATA
from covid_tasks.storage import UnsafePathError, file_sha256, safe_relpath

logger = logging.getLogger(__name__)

METADATA_KEY = METADATA
IMAGES_PREFIX = "images/"
CHUNK = 1 << 20
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 20.0
MAX_NAME_BYTES = 255

#: S3 error codes that mean "the credentials (or their rights) were refused".
AUTH_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
    "AuthorizationHeaderMalformed", "InvalidClientTokenId", "UnrecognizedClientException", "403",
})
#: S3 error codes worth retrying.
TRANSIENT_CODES = frozenset({
    "RequestTimeout", "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "InternalError", "ServiceUnavailable", "BandwidthLimitExceeded", "500", "502", "503", "504",
})


class PullError(RuntimeError):
    """A pull that cannot go on: endpoint unreachable, credentials refused, or retries exhausted."""


class VanishedError(Exception):
    """An object listed a moment ago is gone (deleted upstream during the pull)."""


@dataclass(frozen=True)
class SourceObject:
    """One wanted object of a listing.

    Attributes:
        key: path relative to the source root (``metadata.csv`` or ``images/...``), validated.
        size: size in bytes as listed.
        etag: the S3 ETag without quotes, or the SHA-256 hex digest of a local file.
    """

    key: str
    size: int
    etag: str


@dataclass
class Listing:
    """What a source holds: wanted objects, rejected keys with reasons, and an ignored count."""

    objects: dict[str, SourceObject] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    ignored: int = 0

    def add(self, rel: str, size: int, etag: str | Callable[[], str]) -> None:
        """Classify one key relative to the source root and record it.

        Args:
            rel: the key relative to the source root, as the source spells it.
            size: its size in bytes.
            etag: its ETag, or a callable computing it (only called for wanted keys).
        """
        try:
            key = check_key(rel)
        except UnsafePathError as exc:
            self.rejected.append({"key": rel, "reason": str(exc)})
            return
        if key is None:
            self.ignored += 1
            return
        self.objects[key] = SourceObject(key, int(size), etag() if callable(etag) else etag)

    def reject_nested(self) -> None:
        """Reject keys that lie under another object's key (``images/x.jpg/inner.jpg`` beside
        ``images/x.jpg``): S3 holds both, but a file and a folder cannot share a name on disk.
        The object itself is kept; each key under it is rejected with the reason.
        """
        for key in sorted(self.objects):
            parts = key.split("/")
            parent = next((p for p in ("/".join(parts[:i]) for i in range(1, len(parts)))
                           if p in self.objects), None)
            if parent is not None:
                del self.objects[key]
                self.rejected.append({"key": key, "reason": f"key {key!r} lies under {parent!r}, which is "
                                      f"also an object: a file and a folder cannot share a name on disk"})


@dataclass(frozen=True)
class Fetched:
    """What one fetch wrote: bytes and SHA-256 of the content."""

    size: int
    sha256: str


def check_key(rel: str) -> str | None:
    """Validate a key relative to the source root.

    Args:
        rel: e.g. ``metadata.csv``, ``images/a.png``, ``images/../../etc/passwd``.

    Returns:
        The key when it is wanted (``metadata.csv`` or a safe path under ``images/``), ``None``
        when it is harmless but not wanted (other folders, hidden files, folder markers).

    Raises:
        UnsafePathError: the key is absolute, or has ``..``, ``.`` or empty segments, a
            backslash, a NUL or control character, or a segment longer than 255 bytes.
    """
    if rel == "":
        return None  # the prefix's own "folder" marker
    if rel.endswith("/"):
        check_key(rel.rstrip("/") or "/")
        return None  # a "folder" marker object
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in rel):
        raise UnsafePathError(f"key {rel!r} contains a control character")
    if "" in rel.split("/"):
        if rel.startswith("/"):
            raise UnsafePathError(f"key {rel!r} is absolute")
        raise UnsafePathError(f"key {rel!r} has an empty path segment")
    norm = safe_relpath(rel)
    if norm != rel:
        raise UnsafePathError(f"key {rel!r} is not in normal form")
    parts = rel.split("/")
    try:
        too_long = any(len(p.encode("utf-8")) > MAX_NAME_BYTES for p in parts)
    except UnicodeEncodeError as exc:
        raise UnsafePathError(f"key {rel!r} is not valid UTF-8") from exc
    if too_long:
        raise UnsafePathError(f"key {rel!r} has a segment longer than {MAX_NAME_BYTES} bytes")
    if any(p.startswith(".") for p in parts):
        return None  # hidden files (.DS_Store, ._x.png): never data
    if rel == METADATA_KEY:
        return rel
    if rel.startswith(IMAGES_PREFIX) and len(parts) > 1:
        return rel
    return None


class Source:
    """Base class: a read-only view of the upstream layout."""

    uri: str

    def list(self) -> Listing:
        """List the source.

        Returns:
            The wanted objects, rejected keys and ignored count.
        """
        raise NotImplementedError

    def fetch(self, key: str, dest: Path, on_bytes: Callable[[int], None]) -> Fetched:
        """Write the object's bytes to ``dest`` (a temporary file) and fsync it.

        Args:
            key: a key from :meth:`list`.
            dest: the file to create or overwrite.
            on_bytes: called with each chunk's length, for progress.

        Returns:
            Bytes written and their SHA-256.
        """
        raise NotImplementedError

    def cancel(self) -> None:
        """Stop pending retries quickly (another fetch failed for good)."""

    def close(self) -> None:
        """Release connections."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(uri: str, s3_options: dict[str, Any] | None = None, *, retries: int = 4,
                max_connections: int = 10) -> Source:
    """Build the source for ``uri``.

    Args:
        uri: ``s3://bucket/prefix``, ``file:///path`` or a plain folder path.
        s3_options: boto3 client keyword arguments for ``s3://`` (ignored for folders); ``None``
            or ``{}`` uses the standard AWS environment.
        retries: attempts per S3 call (1 = no retry).
        max_connections: HTTP connection pool size (at least the number of download threads).

    Returns:
        A :class:`LocalSource` or :class:`S3Source`.

    Raises:
        FileNotFoundError: a local folder does not exist.
        ValueError: the URI scheme is unsupported or the bucket is missing.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return S3Source(uri, s3_options or {}, retries=retries, max_connections=max_connections)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URI {uri!r} names a remote host {parsed.netloc!r}")
        return LocalSource(uri, Path(unquote(parsed.path)))
    if parsed.scheme == "":
        return LocalSource(uri, Path(uri))
    raise ValueError(f"unsupported source URI scheme {parsed.scheme!r} in {uri!r} "
                     f"(use s3://, file:// or a path)")


# --------------------------------------------------------------------------------- local folder
class LocalSource(Source):
    """A folder holding ``metadata.csv`` and ``images/``; symlinks are rejected, not followed."""

    def __init__(self, uri: str, root: Path) -> None:
        if not root.is_dir():
            raise FileNotFoundError(f"source folder {uri!r} does not exist ({root})")
        self.uri = uri
        self.root = root

    def list(self) -> Listing:
        listing = Listing()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            base = Path(dirpath)
            for name in sorted(filenames) + sorted(d for d in dirnames if (base / d).is_symlink()):
                path = base / name
                rel = path.relative_to(self.root).as_posix()
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    if rel == IMAGES or check_key_quiet(rel) or check_key_quiet(rel + "/x"):
                        listing.rejected.append({"key": rel, "reason": f"key {rel!r} is a symbolic link"})
                    else:
                        listing.ignored += 1
                    continue
                if not stat.S_ISREG(st.st_mode):
                    listing.ignored += 1
                    continue
                listing.add(rel, st.st_size, lambda p=path: file_sha256(p))
        return listing

    def fetch(self, key: str, dest: Path, on_bytes: Callable[[int], None]) -> Fetched:
        src = self.root / key
        try:  # O_NOFOLLOW: a file swapped for a symlink since the listing is not read
            fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError as exc:
            raise VanishedError(str(exc)) from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise VanishedError(f"{src} became a symbolic link") from exc
            raise
        with os.fdopen(fd, "rb") as fh_in:
            return _copy_stream(iter(lambda: fh_in.read(CHUNK), b""), dest, on_bytes)


def check_key_quiet(rel: str) -> bool:
    """Whether ``rel`` would be a wanted key (unsafe or ignored keys give ``False``)."""
    try:
        return check_key(rel) is not None
    except UnsafePathError:
        return False


# --------------------------------------------------------------------------------- S3
class S3Source(Source):
    """``s3://bucket/prefix`` through one thread-safe boto3 client with retries and backoff."""

    def __init__(self, uri: str, options: dict[str, Any], *, retries: int = 4,
                 max_connections: int = 10) -> None:
        import boto3
        from botocore.config import Config as BotoConfig

        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ValueError(f"S3 URI {uri!r} has no bucket (expected s3://bucket/prefix)")
        self.uri = uri
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.attempts = max(1, int(retries))
        self._cancelled = threading.Event()
        opts = {k: v for k, v in options.items() if v not in (None, "")}
        custom_endpoint = bool(opts.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3")
                               or os.environ.get("AWS_ENDPOINT_URL"))
        config = BotoConfig(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"total_max_attempts": 1, "mode": "standard"},  # we retry, with logging
            max_pool_connections=max(10, max_connections),
            signature_version="s3v4",
            s3={"addressing_style": "path"} if custom_endpoint else None,
        )
        self.client = boto3.session.Session().client("s3", config=config, **opts)
        self.endpoint = self.client.meta.endpoint_url

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def list(self) -> Listing:
        listing = Listing()
        prefix = f"{self.prefix}/" if self.prefix else ""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list", lambda kw=kwargs: self.client.list_objects_v2(**kw))
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                listing.add(rel, obj.get("Size", 0), str(obj.get("ETag", "")).strip('"'))
            if not page.get("IsTruncated"):
                return listing
            token = page.get("NextContinuationToken")

    def fetch(self, key: str, dest: Path, on_bytes: Callable[[int], None]) -> Fetched:
        def once() -> Fetched:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            body = resp["Body"]
            try:
                got = _copy_stream(body.iter_chunks(CHUNK), dest, on_bytes)
            finally:
                body.close()
            expected = resp.get("ContentLength")
            if expected is not None and got.size != int(expected):
                from botocore.exceptions import IncompleteReadError

                raise IncompleteReadError(actual_bytes=got.size, expected_bytes=int(expected))
            return got

        return self._call(f"get {key}", once)

    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        self.client.close()

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one S3 call with retries; translate final errors into short, clear exceptions."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised if unknown
                kind = _classify(exc)
                if kind == "auth":
                    raise PullError(
                        f"S3 endpoint {self.endpoint} refused the credentials for {self.uri} "
                        f"({_code(exc)}); check the Airflow connection or AWS_ACCESS_KEY_ID/"
                        f"AWS_SECRET_ACCESS_KEY") from None
                if kind == "nocreds":
                    raise PullError(f"no S3 credentials found for {self.uri}: set them in the Airflow "
                                    f"connection or the AWS_* environment variables") from None
                if kind == "nobucket":
                    raise FileNotFoundError(
                        f"bucket {self.bucket!r} does not exist at {self.endpoint}") from None
                if kind == "nokey":
                    raise VanishedError(f"{self.uri}: {what}: object vanished") from exc
                if kind != "transient":
                    raise
                if attempt == self.attempts or self._cancelled.is_set():
                    raise PullError(self._unreachable(what, exc, attempt)) from None
                delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                logger.warning("pull: %s failed (%s); retry %d/%d in %.1fs", what, _short(exc),
                               attempt, self.attempts - 1, delay)
                if self._cancelled.wait(delay):
                    raise PullError(self._unreachable(what, exc, attempt)) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _unreachable(self, what: str, exc: BaseException, attempts: int) -> str:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            return (f"S3 endpoint {self.endpoint} kept failing for {self.uri} ({what}: {_code(exc)}, "
                    f"{attempts} attempt(s))")
        return (f"cannot reach S3 endpoint {self.endpoint} for {self.uri} ({what}: {_short(exc)}, "
                f"{attempts} attempt(s))")


def _code(exc: BaseException) -> str:
    resp = getattr(exc, "response", None) or {}
    err = resp.get("Error", {}) if isinstance(resp, dict) else {}
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(resp, dict) else None
    return str(err.get("Code") or status or type(exc).__name__)


def _short(exc: BaseException) -> str:
    from botocore import exceptions as bex

    if isinstance(exc, bex.ConnectTimeoutError):
        return "connect timeout"
    if isinstance(exc, bex.EndpointConnectionError):
        return "could not connect"
    if isinstance(exc, bex.ReadTimeoutError):
        return "read timeout"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _classify(exc: BaseException) -> str:
    """``auth``, ``nocreds``, ``nobucket``, ``nokey``, ``transient`` or ``other``."""
    from botocore import exceptions as bex

    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover
        Urllib3Error = OSError  # noqa: N806
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return "nocreds"
    if isinstance(exc, bex.ClientError):
        code = _code(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in AUTH_CODES:
            return "auth"
        if code == "NoSuchBucket":
            return "nobucket"
        if code in ("NoSuchKey", "404"):
            return "nokey"
        if code in TRANSIENT_CODES or status >= 500 or status == 429:
            return "transient"
        return "other"
    if isinstance(exc, (bex.HTTPClientError, bex.ConnectionError, bex.IncompleteReadError,
                        bex.ResponseStreamingError, Urllib3Error, ConnectionError, TimeoutError)):
        return "transient"
    return "other"


# --------------------------------------------------------------------------------- helpers
def _copy_stream(chunks: Iterator[bytes], dest: Path, on_bytes: Callable[[int], None]) -> Fetched:
    h = hashlib.sha256()
    size = 0
    with open(dest, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
            h.update(chunk)
            size += len(chunk)
            on_bytes(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    return Fetched(size, h.hexdigest())


