"""DICOM headers: read a Part 10 file's header without decoding pixels, and keep patient data out.

The reading half of :mod:`covid_tasks.dicom` (which decides what to refuse and decodes):
:func:`read_header` parses a file with pydicom (values over 64 KiB are not even read) into a
:class:`DicomHeader` of geometry, coding and a few exam facts, refusing what cannot be parsed
(``empty``, ``undecodable``, ``truncated``, a deflate bomb as ``pixel_limit``). :func:`quiet`
drops pydicom's and pylibjpeg's log records and warnings while a file is read, since they quote
header values; the patient ID leaves this module only as :func:`patient_hash`, a keyed one-way hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import logging
import re
import struct
import threading
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from covid_tasks.dicom_pixels import SUPPORTED_TRANSFER_SYNTAXES, DicomError, is_truncation

logger = logging.getLogger(__name__)

#: What the readers take: a file's bytes, or its path.
Source = bytes | bytearray | memoryview | str | Path

#: HMAC-SHA256 key of :func:`patient_hash`; pass a secret key for protection against guessing.
PATIENT_HASH_KEY = b"covid-xray-retrain/dicom/patient-id/v1"
#: The shortest site key :func:`load_patient_hash_key` accepts.
MIN_KEY_BYTES = 16
#: Header values longer than this are skipped, never read (:func:`read_header`).
DEFER_BYTES = 64 * 1024
#: A deflated dataset that inflates to more than this is refused (a zip bomb) before pydicom reads it.
MAX_INFLATED_BYTES = 256 * 1024**2
_DEFLATED = "1.2.840.10008.1.2.1.99"
_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
_QUIET = threading.local()
_FILTER_LOCK = threading.Lock()
#: Warnings raised from these modules are ignored: pydicom's quote header values.
_WARNING_MODULES = r"(pydicom|pylibjpeg|covid_tasks\.dicom)"


@dataclass(frozen=True)
class DicomHeader:
    """What :func:`read_header` keeps from a header: image geometry, coding and a few exam facts.

    Text values are printable ASCII, at most 64 characters, ``""`` when absent; numbers are
    ``None`` when absent or not numbers. The patient ID is kept only as :func:`patient_hash`.
    """

    rows: int | None
    columns: int | None
    frames: int | None  # 1 when (0028,0008) is absent, None when it is not a number
    samples_per_pixel: int | None
    photometric: str
    bits_allocated: int | None
    bits_stored: int | None
    pixel_representation: int | None
    sop_class_uid: str
    sop_class: str  # the SOP class's name, or its UID when unknown
    transfer_syntax_uid: str
    modality: str
    view_position: str
    patient_position: str
    patient_orientation: str  # code meanings of the Patient Orientation Code Sequence, e.g. "erect"
    view_code: str  # code meaning of the View Code Sequence, e.g. "postero-anterior"
    body_part: str
    pixel_data: str  # "PixelData", "FloatPixelData", "DoubleFloatPixelData" or "" when absent
    patient_hash: str | None

    def as_dict(self) -> dict[str, Any]:
        """The header as a JSON-able dict."""
        return asdict(self)


def patient_hash(patient_id: str, key: bytes = PATIENT_HASH_KEY) -> str:
    """A one-way, keyed hash of a patient ID, to group a patient's images without keeping the ID.

    HMAC-SHA256 of the stripped ID (UTF-8), first 16 hex digits, prefixed ``dcm-`` so that it is
    never read as a number. The issuer of the ID is left out on purpose: two hospitals' equal IDs
    become one group (harmless for a patient-wise split), one patient never becomes two.

    Args:
        patient_id: the clear ID; never stored or logged here.
        key: the HMAC key. The default is public, so a small ID space (a hospital's numeric
            MRNs) can be guessed back by hashing every candidate; pass a site secret to prevent it.

    Returns:
        e.g. ``"dcm-3f9c0a1b2c3d4e5f"``.
    """
    digest = hmac.new(key, patient_id.strip().encode("utf-8", "replace"), hashlib.sha256).hexdigest()
    return f"dcm-{digest[:16]}"


def load_patient_hash_key(path: str | Path) -> bytes:
    """A site's secret key for :func:`patient_hash`, read from a file (trailing whitespace dropped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the key is shorter than :data:`MIN_KEY_BYTES` bytes, or is the public default.
            Messages give the length, never the key.
    """
    key = Path(path).read_bytes().rstrip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the patient hash key in {path} has {len(key)} bytes; a site secret needs at "
                         f"least {MIN_KEY_BYTES} (e.g. `openssl rand -hex 32 > {Path(path).name}`)")
    if key == PATIENT_HASH_KEY:
        raise ValueError(f"the patient hash key in {path} is the public default; write a site secret")
    return key


def read_header(source: Source, key: bytes = PATIENT_HASH_KEY) -> DicomHeader:
    """Read a DICOM file's header without decoding (or, for values over 64 KiB, reading) pixels.

    Args:
        source: the file's bytes, or its path.
        key: HMAC key for the patient hash (:func:`patient_hash`).

    Returns:
        The :class:`DicomHeader`; refusals are left to :func:`check_header`.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        DicomError: empty, not a Part 10 file, truncated or unparseable header.
    """
    with opened(source) as (fh, size):
        header, _ = _parse(fh, size, header_only=True, key=key)
    return header


def read_dataset(source: Source, key: bytes = PATIENT_HASH_KEY) -> tuple[DicomHeader, Any]:
    """Read a whole DICOM file: its header and the pydicom dataset, pixels read but not decoded.

    Args:
        source: the file's bytes, or its path.
        key: HMAC key for the patient hash (:func:`patient_hash`).

    Returns:
        ``(header, dataset)``; refusals are left to the caller (``covid_tasks.dicom.check_header``).

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        DicomError: empty, not a Part 10 file, truncated or unparseable.
    """
    with opened(source) as (fh, size):
        return _parse(fh, size, header_only=False, key=key)


@contextlib.contextmanager
def opened(source: Source) -> Iterator[tuple[BinaryIO, int]]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        yield io.BytesIO(data), len(data)
        return
    with open(source, "rb") as fh:
        fh.seek(0, io.SEEK_END)
        size = fh.tell()
        fh.seek(0)
        yield fh, size


@contextlib.contextmanager
def quiet() -> Iterator[list[str]]:
    """Keep pydicom's log records and warnings (they quote header values) out of every output.

    Yields the messages of the log records pydicom and pylibjpeg emit in this thread meanwhile;
    they are dropped, not logged. Their warnings are ignored process-wide (a filter put first in
    ``warnings.filters`` on every call, so a test harness resetting the filters does not undo it).
    """
    _installquiet()
    messages: list[str] = []
    outer = getattr(_QUIET, "messages", None)
    _QUIET.messages = messages
    try:
        yield messages
    finally:
        _QUIET.messages = outer


class _DropWhileQuiet(logging.Filter):
    """Drops (and keeps the message of) each record emitted in a thread inside :func:`quiet`."""

    def filter(self, record: logging.LogRecord) -> bool:
        messages = getattr(_QUIET, "messages", None)
        if messages is None:
            return True
        messages.append(record.getMessage())
        return False


def _installquiet() -> None:
    import pydicom  # noqa: F401 - registers its loggers
    import pydicom.pixels.decoders.base  # noqa: F401

    with _FILTER_LOCK:
        if not any(f[0] == "ignore" and getattr(f[3], "pattern", None) == _WARNING_MODULES
                   for f in warnings.filters[:1]):
            warnings.filterwarnings("ignore", module=_WARNING_MODULES)
        names = ["pydicom", "pylibjpeg"] + [n for n in logging.root.manager.loggerDict
                                            if n.startswith(("pydicom.", "pylibjpeg."))]
        for name in names:
            lg = logging.getLogger(name)
            if not any(isinstance(f, _DropWhileQuiet) for f in lg.filters):
                lg.addFilter(_DropWhileQuiet())


def _parse(fh: BinaryIO, size: int, *, header_only: bool, key: bytes) -> tuple[DicomHeader, Any]:
    """Read the dataset (pixels not decoded) and its header; refuse what cannot be parsed."""
    if size == 0:
        raise DicomError("empty", "0 bytes")
    fh.seek(128)
    if size < 132 or fh.read(4) != b"DICM":
        raise DicomError("undecodable", "not a DICOM Part 10 file (no 'DICM' after a 128-byte preamble;"
                                        " raw datasets without file meta are not read)")
    fh.seek(132)
    head = fh.read(12)
    has_length = len(head) == 12 and head[:6] == b"\x02\x00\x00\x00UL"  # (0002,0000) UL
    meta_end = 144 + struct.unpack("<I", head[8:])[0] if has_length else None
    if len(head) < 12 or (meta_end or 0) > size:
        raise DicomError("truncated", "the file ends inside its file meta header")
    deflated = meta_end is not None and _check_inflated_size(fh, meta_end)
    header_only = header_only and not deflated  # pydicom inflates a deflated dataset whole anyway
    fh.seek(0)
    import pydicom

    with quiet() as logged:
        try:
            ds = pydicom.dcmread(fh, stop_before_pixels=header_only,
                                 defer_size=DEFER_BYTES if header_only else None)
            pixel_tag = _next_pixel_tag(fh, ds) if header_only else next(
                (name for tag, name in _PIXEL_TAGS.items() if tag in ds), "")
            truncated = _looks_cut(ds, None if deflated else size, logged, bool(pixel_tag)) or (
                not len(ds)) or (  # nothing after the file meta, or less than one element
                not pixel_tag and "Image Storage" in uid_name(_text(ds.get("SOPClassUID", ""))))
            header = _header(ds, pixel_tag, key)
        except DicomError:
            raise
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on hostile input
            kind = "truncated" if is_truncation(exc) else "undecodable"
            raise DicomError(kind, f"the header cannot be parsed ({type(exc).__name__})") from None
    if truncated:
        raise DicomError("truncated", "the file ends inside an element")
    return header, ds


def _check_inflated_size(fh: BinaryIO, meta_end: int) -> bool:
    """Whether the dataset is deflated; refuse one that inflates past :data:`MAX_INFLATED_BYTES`."""
    fh.seek(144)
    if _DEFLATED.encode() not in fh.read(min(max(0, meta_end - 144), DEFER_BYTES)):
        return False
    inflater, total, pending = zlib.decompressobj(-zlib.MAX_WBITS), 0, b""
    fh.seek(meta_end)
    try:
        while not inflater.eof:
            pending = pending or fh.read(1 << 20)
            if not pending:
                break
            total += len(inflater.decompress(pending, 1 << 24))
            pending = inflater.unconsumed_tail
            if total > MAX_INFLATED_BYTES:
                raise DicomError("pixel_limit", f"the deflated dataset inflates past {MAX_INFLATED_BYTES} "
                                                "bytes")
    except zlib.error:
        raise DicomError("undecodable", "the deflated dataset is not valid deflate data") from None
    return True


def _next_pixel_tag(fh: BinaryIO, ds: Any) -> str:
    """After a ``stop_before_pixels`` read: the pixel data element the file holds next, or ``""``."""
    raw = fh.read(4)
    if len(raw) < 4:
        return ""
    group, elem = struct.unpack(">HH" if ds.original_encoding[1] is False else "<HH", raw)
    return _PIXEL_TAGS.get(group << 16 | elem, "")


def _looks_cut(ds: Any, size: int | None, logged: list[str], has_pixels: bool) -> bool:
    """Whether pydicom met the end of the data inside an element (it only logs, reads short, or stops).

    ``size`` is the file's size, ``None`` when element positions are not file offsets (deflated).
    Without pixel data, bytes after the last element are the start of one cut short.
    """
    if any(is_truncation(message) for message in logged):
        return True
    last = next(reversed(list(ds.elements())), None) if len(ds) else None
    length, tell = getattr(last, "length", None), getattr(last, "value_tell", None)
    if length is None or tell is None or length == 0xFFFFFFFF:
        return False
    value = getattr(last, "value", None)
    if isinstance(value, bytes) and len(value) < length:
        return True
    return size is not None and (tell + length > size or (not has_pixels and tell + length < size))


def _header(ds: Any, pixel_tag: str, key: bytes) -> DicomHeader:
    meta = getattr(ds, "file_meta", None)
    ts = _text(meta.get("TransferSyntaxUID", "") if meta else "")
    sop = _text(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    try:
        pid = str(ds.get("PatientID", "") or "").strip()  # hashed as written (non-ASCII included)
    except Exception:  # noqa: BLE001 - an ID pydicom cannot decode counts as absent
        pid = ""
    frames = _int(ds, "NumberOfFrames") if "NumberOfFrames" in ds else 1
    return DicomHeader(
        rows=_int(ds, "Rows"), columns=_int(ds, "Columns"), frames=frames,
        samples_per_pixel=_int(ds, "SamplesPerPixel"),
        photometric=_text(ds.get("PhotometricInterpretation", "")),
        bits_allocated=_int(ds, "BitsAllocated"), bits_stored=_int(ds, "BitsStored"),
        pixel_representation=_int(ds, "PixelRepresentation"), sop_class_uid=sop, sop_class=uid_name(sop),
        transfer_syntax_uid=ts, modality=_text(ds.get("Modality", "")),
        view_position=_text(ds.get("ViewPosition", "")).upper(),
        patient_position=_text(ds.get("PatientPosition", "")).upper(),
        patient_orientation=" ".join(_code_meanings(ds, "PatientOrientationCodeSequence")),
        view_code=" ".join(_code_meanings(ds, "ViewCodeSequence")),
        body_part=_text(ds.get("BodyPartExamined", "")).upper(), pixel_data=pixel_tag,
        patient_hash=patient_hash(pid, key) if pid else None)


def _text(value: Any, limit: int = 64) -> str:
    """A header value as printable ASCII, at most ``limit`` characters; ``""`` on any failure."""
    try:
        return re.sub(r"[^\x20-\x7e]", "", str(value)).strip()[:limit]
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert
        return ""


def _int(ds: Any, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except Exception:  # noqa: BLE001 - malformed numbers ("1A"), multi-values, deferred reads
        return None


def _code_meanings(ds: Any, keyword: str) -> list[str]:
    try:
        items = list(ds.get(keyword) or [])[:4]
        found = [_text(item.get("CodeMeaning", "")).lower() for item in items]
        for item in items:  # modifiers, e.g. "supine" under "recumbent"
            found += [_text(m.get("CodeMeaning", "")).lower() for m in list(
                item.get("PatientOrientationModifierCodeSequence") or [])[:4]]
        return [f for f in found if f]
    except Exception:  # noqa: BLE001 - malformed sequences count as absent
        return []


def uid_name(uid: str) -> str:
    """A UID's registered name, else the UID itself when it is digits and dots, else ``unknown``."""
    if uid in SUPPORTED_TRANSFER_SYNTAXES:
        return SUPPORTED_TRANSFER_SYNTAXES[uid]
    from pydicom.uid import UID

    if not re.fullmatch(r"[0-9.]{1,64}", uid):
        return "unknown" if uid else ""
    return str(UID(uid).name)
