"""DICOM chest films: header facts without pixels, and one decoder to the model's raw 0..255 RGB.

Only DICOM Part 10 files are read (``DICM`` at byte 128, then a file meta header naming the
transfer syntax); raw datasets without it are refused. :func:`read_header` never decodes pixels
(values over 64 KiB are not even read); :func:`check_header` applies every refusal a header can
decide, including the pixel limit (rows x columns against ``max_pixels``), so
:func:`decode_dicom` refuses a bomb before any pixel is decoded. The display pipeline is the
standard one: modality LUT (rescale), then the VOI LUT or the first window, else a robust
min-max; MONOCHROME1 is inverted so that bone is bright, as in the PNGs. docs/dicom.md has the
rules, the supported transfer syntaxes and the refusal reasons.

Every refusal is a :class:`DicomError` (a ``ValueError``) whose message starts with a reason from
:data:`REASONS` and a colon, like ``pull``'s reasons for other formats. No message, log record or
returned value carries a patient's name, ID, birth date or accession number: pydicom's own log
records (which quote header values) are dropped while this module reads, its warnings are
ignored, and the patient ID is only ever returned as a keyed one-way hash (:func:`patient_hash`).
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

from covid_tasks.dicom_pixels import (
    MINMAX_PERCENTILES,
    REASONS,
    SUPPORTED_TRANSFER_SYNTAXES,
    DicomError,
    display_grey,
    is_truncation,
    stored_pixels,
)

logger = logging.getLogger(__name__)

__all__ = ["DicomError", "DicomHeader", "DicomTooLargeError", "MINMAX_PERCENTILES", "PATIENT_HASH_KEY",
           "REASONS", "SUPPORTED_TRANSFER_SYNTAXES", "check_header", "decode_dicom", "dicom_size",
           "header_metadata", "is_dicom", "load_dicom", "patient_hash", "read_header"]
#: What the readers take: a file's bytes, or its path.
Source = bytes | bytearray | memoryview | str | Path

#: HMAC-SHA256 key of :func:`patient_hash`; pass a secret key for protection against guessing.
PATIENT_HASH_KEY = b"covid-xray-retrain/dicom/patient-id/v1"
#: Header values longer than this are skipped, never read (:func:`read_header`).
DEFER_BYTES = 64 * 1024
#: A deflated dataset that inflates to more than this is refused (a zip bomb) before pydicom reads it.
MAX_INFLATED_BYTES = 256 * 1024**2
_DEFLATED = "1.2.840.10008.1.2.1.99"
_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
_XRAY_SOP = ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1")
_QUIET = threading.local()
_FILTER_LOCK = threading.Lock()
#: Warnings raised from these modules are ignored: pydicom's quote header values.
_WARNING_MODULES = r"(pydicom|pylibjpeg|covid_tasks\.dicom)"


class DicomTooLargeError(DicomError):
    """A header that declares more pixels than the limit; refused before decoding.

    Attributes:
        width: columns declared in the header.
        height: rows declared in the header.
        max_pixels: the limit it exceeds (width x height).
    """

    def __init__(self, width: int, height: int, max_pixels: int) -> None:
        super().__init__("pixel_limit", f"{width}x{height} = {width * height} pixels exceeds the limit of "
                                        f"{max_pixels} pixels; refused before decoding")
        self.width, self.height, self.max_pixels = width, height, max_pixels


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


def is_dicom(source: Source) -> bool:
    """Whether ``source`` is a DICOM Part 10 file: ``DICM`` at byte 128, after the preamble.

    Args:
        source: the file's bytes, or its path.

    Returns:
        ``True`` for a Part 10 file; ``False`` for anything else, raw datasets without file meta
        included (:func:`decode_dicom` refuses those).

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[128:132]) == b"DICM"
    with open(source, "rb") as fh:
        fh.seek(128)
        return fh.read(4) == b"DICM"


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
    with _opened(source) as (fh, size):
        header, _ = _parse(fh, size, header_only=True, key=key)
    return header


def check_header(header: DicomHeader, max_pixels: int | None) -> None:
    """Refuse what a header alone shows this decoder cannot or must not decode.

    Args:
        header: from :func:`read_header`.
        max_pixels: the most pixels (rows x columns) accepted; ``None`` for no limit.

    Raises:
        DicomTooLargeError: more pixels than ``max_pixels`` (reason ``pixel_limit``).
        DicomError: a non-image SOP class or no pixel data (``not_image``), a header that ends
            before its pixel data (``truncated``), bad dimensions (``undecodable``), an unknown
            transfer syntax, float pixels, several frames, colour or an odd bit depth
            (``unsupported``).
    """
    name = header.sop_class
    if name != header.sop_class_uid and "Image Storage" not in name:
        raise DicomError("not_image", f"SOP class {name} holds no image")
    if header.pixel_data in ("FloatPixelData", "DoubleFloatPixelData"):
        raise DicomError("unsupported", f"{header.pixel_data} (float pixels, not a film)")
    if not header.pixel_data:
        if header.rows is not None:
            raise DicomError("truncated", "the file ends before its pixel data")
        raise DicomError("not_image", "no pixel data")
    ts = header.transfer_syntax_uid
    if not ts:
        raise DicomError("unsupported", "the file meta header names no transfer syntax")
    if ts not in SUPPORTED_TRANSFER_SYNTAXES:
        raise DicomError("unsupported", f"transfer syntax {_uid_name(ts)}")
    rows, cols = header.rows, header.columns
    if not rows or not cols or rows < 0 or cols < 0:
        raise DicomError("undecodable", "Rows or Columns missing, zero or not a number")
    if max_pixels is not None and rows * cols > max_pixels:
        raise DicomTooLargeError(cols, rows, max_pixels)
    if header.frames is None or header.frames < 1:
        raise DicomError("undecodable", "Number of Frames is not a positive number")
    if header.frames > 1:
        raise DicomError("unsupported", f"{header.frames} frames (a chest film has one)")
    if header.samples_per_pixel != 1 or header.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        shown = header.photometric if re.fullmatch(r"[A-Z0-9_ ]{1,16}", header.photometric) else "unknown"
        raise DicomError("unsupported", f"colour image ({shown}, {header.samples_per_pixel} samples per "
                                        "pixel); chest films are grey")
    alloc, stored = header.bits_allocated, header.bits_stored
    if alloc not in (8, 16, 32) or stored is None or not 1 <= stored <= alloc:
        raise DicomError("unsupported", f"bit depth {stored} stored in {alloc} allocated")
    if header.pixel_representation not in (0, 1):
        raise DicomError("undecodable", "Pixel Representation is neither 0 nor 1")


def dicom_size(source: Source, max_pixels: int | None) -> tuple[int, int]:
    """Width and height of a decodable DICOM film, from its header only (like ``image_size``).

    Args:
        source: the file's bytes, or its path.
        max_pixels: the most pixels accepted; ``None`` for no limit.

    Returns:
        ``(width, height)`` = ``(Columns, Rows)``.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        DicomError: see :func:`read_header` and :func:`check_header`.
    """
    header = read_header(source)
    check_header(header, max_pixels)
    return int(header.columns or 0), int(header.rows or 0)


def header_metadata(source: Source | DicomHeader, key: bytes = PATIENT_HASH_KEY) -> dict[str, Any]:
    """The header's answers to ``metadata.csv``'s questions, in its vocabulary (docs/dicom.md).

    Args:
        source: the file's bytes or path, or a header from :func:`read_header`.
        key: HMAC key for the patient hash, when ``source`` is not a header.

    Returns:
        ``{"view", "modality", "body_part", "patient_hash"}``: ``view`` is ``PA``, ``AP``,
        ``AP Supine``, ``AP Erect``, ``L``, another ViewPosition as written or ``""``;
        ``modality`` is ``X-ray`` (CR, DX, RG), ``CT``, another code as written or ``""``;
        ``patient_hash`` is ``None`` without a patient ID.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        DicomError: see :func:`read_header`.
    """
    header = source if isinstance(source, DicomHeader) else read_header(source, key)
    modality = header.modality.upper()
    if modality in ("CR", "DX", "DR", "RG") or (not modality and header.sop_class_uid in _XRAY_SOP):
        modality = "X-ray"
    return {"view": _view(header), "modality": modality, "body_part": header.body_part,
            "patient_hash": header.patient_hash}


def decode_dicom(data: bytes | bytearray | memoryview, max_pixels: int | None) -> Any:
    """Decode a DICOM film to the raw 0..255 RGB the model takes (grey in all three channels).

    Args:
        data: the file's bytes.
        max_pixels: the most pixels (rows x columns) accepted, checked on the header before any
            pixel is decoded; ``None`` for no limit.

    Returns:
        A numpy uint8 array ``(rows, columns, 3)``.

    Raises:
        DicomTooLargeError: more pixels than ``max_pixels``.
        DicomError: anything else this decoder refuses, with its reason (never another type).
    """
    import numpy as np

    with _opened(data) as (fh, size):
        header, ds = _parse(fh, size, header_only=False, key=PATIENT_HASH_KEY)
    check_header(header, max_pixels)
    rows, columns, bits = int(header.rows or 0), int(header.columns or 0), int(header.bits_stored or 0)
    signed = header.pixel_representation == 1
    with _quiet():
        arr = stored_pixels(ds, header.transfer_syntax_uid, rows, columns, bits, signed)
        grey = display_grey(arr, ds, header.photometric, bits, signed)
    logger.debug("dicom: decoded %dx%d %s %s", columns, rows, header.photometric,
                 SUPPORTED_TRANSFER_SYNTAXES[header.transfer_syntax_uid])
    return np.repeat(grey[:, :, None], 3, axis=2)


def load_dicom(path: str | Path, max_pixels: int | None) -> Any:
    """:func:`decode_dicom` for a file, whose header is checked before the rest is read.

    Args:
        path: the DICOM file.
        max_pixels: the most pixels accepted; ``None`` for no limit.

    Returns:
        A numpy uint8 array ``(rows, columns, 3)``.

    Raises:
        FileNotFoundError: the file does not exist.
        DicomError: see :func:`decode_dicom`.
    """
    dicom_size(path, max_pixels)
    return decode_dicom(Path(path).read_bytes(), max_pixels)


@contextlib.contextmanager
def _opened(source: Source) -> Iterator[tuple[BinaryIO, int]]:
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
def _quiet() -> Iterator[list[str]]:
    """Keep pydicom's log records and warnings (they quote header values) out of every output.

    Yields the messages of the log records pydicom and pylibjpeg emit in this thread meanwhile;
    they are dropped, not logged. Their warnings are ignored process-wide (a filter put first in
    ``warnings.filters`` on every call, so a test harness resetting the filters does not undo it).
    """
    _install_quiet()
    messages: list[str] = []
    outer = getattr(_QUIET, "messages", None)
    _QUIET.messages = messages
    try:
        yield messages
    finally:
        _QUIET.messages = outer


class _DropWhileQuiet(logging.Filter):
    """Drops (and keeps the message of) each record emitted in a thread inside :func:`_quiet`."""

    def filter(self, record: logging.LogRecord) -> bool:
        messages = getattr(_QUIET, "messages", None)
        if messages is None:
            return True
        messages.append(record.getMessage())
        return False


def _install_quiet() -> None:
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

    with _quiet() as logged:
        try:
            ds = pydicom.dcmread(fh, stop_before_pixels=header_only,
                                 defer_size=DEFER_BYTES if header_only else None)
            pixel_tag = _next_pixel_tag(fh, ds) if header_only else next(
                (name for tag, name in _PIXEL_TAGS.items() if tag in ds), "")
            truncated = _looks_cut(ds, None if deflated else size, logged, bool(pixel_tag)) or (
                not len(ds)) or (  # nothing after the file meta, or less than one element
                not pixel_tag and "Image Storage" in _uid_name(_text(ds.get("SOPClassUID", ""))))
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
        pixel_representation=_int(ds, "PixelRepresentation"), sop_class_uid=sop, sop_class=_uid_name(sop),
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


def _uid_name(uid: str) -> str:
    """A UID's registered name, else the UID itself when it is digits and dots, else ``unknown``."""
    if uid in SUPPORTED_TRANSFER_SYNTAXES:
        return SUPPORTED_TRANSFER_SYNTAXES[uid]
    from pydicom.uid import UID

    if not re.fullmatch(r"[0-9.]{1,64}", uid):
        return "unknown" if uid else ""
    return str(UID(uid).name)


def _view(header: DicomHeader) -> str:
    """ViewPosition (or the View Code Sequence) in metadata.csv's vocabulary."""
    view = {"PA": "PA", "AP": "AP", "LL": "L", "RL": "L", "L": "L", "LAT": "L", "LATERAL": "L"}.get(
        header.view_position, header.view_position)
    if not view:
        code = header.view_code.replace("-", "").replace(" ", "")
        view = next((v for word, v in (("posteroanterior", "PA"), ("anteroposterior", "AP"), ("lateral", "L"))
                     if word in code), "")
    if view == "AP":
        orientation = header.patient_orientation
        if header.patient_position in ("HFS", "FFS") or "supine" in orientation:
            return "AP Supine"
        if any(word in orientation for word in ("erect", "standing", "upright")):
            return "AP Erect"
    return view
