"""DICOM test films written from grey images, and a decoder that cannot hang a test.

:func:`film_dicom` writes a chest film as a CR or DX object in any photometric interpretation,
bit depth, transfer syntax and display rule (window, VOI LUT, rescale, none) this project decodes,
choosing the stored values so that the standard display pipeline gives back the grey levels it
was given. Patient tags are set to the distinctive :data:`PHI` values unless told otherwise, so a
test can grep every output for them. :class:`BoundedDecoder` runs ``covid_tasks.dicom`` in a
worker process and kills it when one call outlives its timeout.
"""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.helpers.procs import stop_group

REPO = Path(__file__).resolve().parents[2]
CR_SOP = "1.2.840.10008.5.1.4.1.1.1"
DX_SOP = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
#: Patient tags every film carries unless told otherwise: no output may ever contain them.
PHI = {"PatientName": "Quixote^Dulcinea^Xavier", "PatientID": "MRN-77310-ZQ", "PatientBirthDate": "19380417",
       "AccessionNumber": "ACCN-5519-QQ"}
#: Transfer syntaxes :func:`film_dicom` writes: uncompressed ones by pydicom, RLE, JPEG-LS and
#: JPEG 2000 by pydicom's encoders (pylibjpeg-rle, pyjpegls, pylibjpeg-openjpeg), JPEG Baseline
#: by Pillow (8 bits, lossy).
WRITABLE = {
    "explicit": "1.2.840.10008.1.2.1",
    "implicit": "1.2.840.10008.1.2",
    "big_endian": "1.2.840.10008.1.2.2",
    "deflated": "1.2.840.10008.1.2.1.99",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg_ls": "1.2.840.10008.1.2.4.80",
    "jpeg_ls_near": "1.2.840.10008.1.2.4.81",
    "j2k_lossless": "1.2.840.10008.1.2.4.90",
    "jpeg_baseline": "1.2.840.10008.1.2.4.50",
}


def stored_values(grey: np.ndarray, photometric: str, bits_stored: int, signed: bool) -> np.ndarray:
    """The stored values of ``grey`` (0..255) at ``bits_stored``: linear, the top level at full scale.

    MONOCHROME1 stores ``255 - grey`` (white is the minimum); signed data is offset by half the range.
    """
    level = grey.astype(np.int64) if photometric == "MONOCHROME2" else 255 - grey.astype(np.int64)
    step = ((1 << bits_stored) - 1) // 255
    return level * step - ((1 << (bits_stored - 1)) if signed else 0)


def film_dicom(grey: np.ndarray, *, transfer_syntax: str = WRITABLE["explicit"], modality: str = "DX",
               photometric: str = "MONOCHROME2", bits_stored: int = 8, bits_allocated: int | None = None,
               signed: bool = False, voi: str | None = "window", rescale: tuple[float, float] = (1.0, 0.0),
               high_bit_noise: bool = False, view_position: str | None = "PA",
               patient: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> bytes:
    """A DICOM Part 10 file of the film ``grey`` whose standard display gives back ``grey``.

    Args:
        grey: ``(rows, columns)`` uint8 display grey levels (bone bright).
        transfer_syntax: a UID from :data:`WRITABLE`.
        modality: ``DX`` (Digital X-Ray For Presentation) or ``CR`` (Computed Radiography); any
            other code is written as a DX object with that Modality.
        photometric: ``MONOCHROME1`` (stored inverted) or ``MONOCHROME2``.
        bits_stored: 8, 12, 16, ...; ``bits_allocated`` defaults to 8 or 16 to hold them.
        signed: Pixel Representation 1 (two's complement), values offset by half the range.
        voi: ``"window"`` (a linear window spanning the film's range), ``"lut"`` (a linear VOI LUT
            Sequence; unsigned, integer rescale only), or ``None`` (no VOI: the decoder's own rule).
        rescale: Rescale Slope and Intercept (slope > 0).
        high_bit_noise: fill the bits above Bits Stored with noise (a decoder must ignore them).
        view_position: ViewPosition, or ``None`` to leave it out.
        patient: PatientName/PatientID/PatientBirthDate/AccessionNumber values; default :data:`PHI`.
        extra: more elements by keyword (e.g. ``{"PatientPosition": "HFS"}``).

    Returns:
        The file's bytes: the same arguments give the same bytes (UIDs derived from them).
    """
    seed = [grey.tobytes().hex(), repr(sorted((k, v) for k, v in locals().items() if k != "grey"))]
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import UID, generate_uid

    alloc = bits_allocated or (8 if bits_stored <= 8 else 16)
    stored = stored_values(grey, photometric, bits_stored, signed)
    slope, intercept = rescale
    ds = Dataset()
    sop = CR_SOP if modality == "CR" else DX_SOP
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[*seed, "instance"])
    ds.file_meta.TransferSyntaxUID = UID(WRITABLE["explicit"])
    ds.SOPClassUID, ds.SOPInstanceUID = sop, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*seed, "series"])
    ds.Modality, ds.BodyPartExamined = modality, "CHEST"
    for key, value in (PHI if patient is None else patient).items():
        setattr(ds, key, value)
    if view_position is not None:
        ds.ViewPosition = view_position
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = alloc, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if sop == DX_SOP:
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    if rescale != (1.0, 0.0):
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "US"
    ends = stored_values(np.array([0, 255], np.uint8), "MONOCHROME2", bits_stored, signed)
    low, high = (slope * int(v) + intercept for v in ends)  # the film's black and white after rescale
    if voi == "window":
        ds.WindowCenter, ds.WindowWidth = f"{(low + high) / 2 + 0.5:.6g}", f"{high - low + 1:.6g}"
    elif voi == "lut":
        item = Dataset()
        entries = int(high - low) + 1
        item.add_new(0x00283002, "US", [entries % 65536, int(low), 16])  # LUT Descriptor (0 = 65536)
        table = np.rint(np.arange(entries) * (65535 / (entries - 1))).astype(np.uint16)
        if entries * 2 < 65535:  # LUT Data: US, or OW (bytes in the file's byte order) above 64 KiB
            item.add_new(0x00283006, "US", table.tolist())
        else:
            big = transfer_syntax == WRITABLE["big_endian"]
            item.add_new(0x00283006, "OW", table.astype(">u2" if big else "<u2").tobytes())
        ds.VOILUTSequence = Sequence([item])
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    _set_pixels(ds, stored, alloc, bits_stored, signed, high_bit_noise, transfer_syntax)
    buf = io.BytesIO()
    big = transfer_syntax == WRITABLE["big_endian"]
    ds.save_as(buf, enforce_file_format=True, implicit_vr=transfer_syntax == WRITABLE["implicit"],
               little_endian=not big)
    return buf.getvalue()


def _set_pixels(ds: Any, stored: np.ndarray, alloc: int, bits: int, signed: bool, noise: bool,
                ts: str) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    dtype = {(8, False): "u1", (8, True): "i1", (16, False): "u2", (16, True): "i2", (32, False): "u4",
             (32, True): "i4"}[(alloc, signed)]
    raw = stored.astype(np.int64) & ((1 << alloc) - 1)
    if noise and bits < alloc:
        rng = np.random.default_rng(7)
        raw = (raw & ((1 << bits) - 1)) | (rng.integers(0, 1 << (alloc - bits), raw.shape) << bits)
    arr = raw.astype(dtype.replace("i", "u")).view(dtype)
    if ts == WRITABLE["jpeg_baseline"]:
        from PIL import Image

        jpeg = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8), mode="L").save(jpeg, format="JPEG", quality=95)
        ds.PixelData = encapsulate([jpeg.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
        ds.file_meta.TransferSyntaxUID = UID(ts)
        return
    big = ts == WRITABLE["big_endian"]
    ds.PixelData = arr.astype(arr.dtype.newbyteorder(">" if big else "<")).tobytes()
    ds["PixelData"].VR = "OB" if alloc == 8 else "OW"
    if ts in (WRITABLE["rle"], WRITABLE["jpeg_ls"], WRITABLE["j2k_lossless"], WRITABLE["jpeg_ls_near"]):
        # pydicom's encoders take the values (not the noisy high bits) from an array
        kwargs = {"jls_error": 1} if ts == WRITABLE["jpeg_ls_near"] else {}
        ds.compress(ts, stored.astype(dtype), generate_instance_uid=False, **kwargs)
    else:
        ds.file_meta.TransferSyntaxUID = UID(ts)


def write_film(path: str | Path, grey: np.ndarray, **kwargs: Any) -> Path:
    """:func:`film_dicom` written to ``path``; returns the path."""
    path = Path(path)
    path.write_bytes(film_dicom(grey, **kwargs))
    return path


def bomb_dicom(rows: int = 65000, columns: int = 65000) -> bytes:
    """A DX header declaring ``rows`` x ``columns`` 16-bit pixels, followed by 64 bytes of pixel data."""
    from pydicom.filereader import dcmread

    ds = dcmread(io.BytesIO(film_dicom(np.zeros((4, 8), np.uint8), bits_stored=16)))
    ds.Rows, ds.Columns = rows, columns
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def grey_film(path: str | Path) -> np.ndarray:
    """A grey image's levels (``(rows, columns)`` uint8); refuses one whose channels differ."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])):
        raise ValueError(f"{path} is not grey")
    return arr[..., 0].copy()


_WORKER = r"""
import json, sys
import numpy as np
from covid_tasks import dicom
for line in sys.stdin:
    req = json.loads(line)
    try:
        if req["op"] == "decode":
            arr = dicom.decode_dicom(open(req["path"], "rb").read(), req["max_pixels"])
            np.save(req["out"], arr, allow_pickle=False)
            out = {"ok": True}
        elif req["op"] == "header":
            out = {"ok": True, "header": dicom.read_header(req["path"]).as_dict(),
                   "metadata": dicom.header_metadata(req["path"])}
        else:  # pydicom's own values, for "constant only when the source is"
            import pydicom
            from pydicom.pixels.processing import apply_modality_lut
            ds = pydicom.dcmread(req["path"])
            values = apply_modality_lut(pydicom.pixels.pixel_array(ds, index=0), ds)
            out = {"ok": True, "min": float(values.min()), "max": float(values.max())}
    except BaseException as exc:
        out = {"ok": False, "type": type(exc).__name__, "value_error": isinstance(exc, ValueError),
               "reason": getattr(exc, "reason", None), "message": str(exc)[:1000]}
    sys.stdout.write("@@" + json.dumps(out) + "\n")
    sys.stdout.flush()
"""


class BoundedDecoder:
    """``covid_tasks.dicom`` in a worker process, each call bounded by a timeout.

    A call that outlives ``timeout_s`` kills the worker (a new one starts on the next call) and
    raises ``TimeoutError``, so a hanging decoder fails its test instead of blocking the suite.
    """

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="dicom-worker-")

    def decode(self, path: str | Path, max_pixels: int | None = 50_000_000) -> dict[str, Any]:
        """``decode_dicom`` of the file: ``{"ok": True, "image": array}`` or the refusal's fields."""
        out = Path(self._tmp.name) / "decoded.npy"
        result = self._call({"op": "decode", "path": str(path), "max_pixels": max_pixels, "out": str(out)})
        if result["ok"]:
            result["image"] = np.load(out, allow_pickle=False)
            out.unlink()
        return result

    def header(self, path: str | Path) -> dict[str, Any]:
        """``read_header(...).as_dict()`` and ``header_metadata`` of the file, or the refusal."""
        return self._call({"op": "header", "path": str(path)})

    def source_range(self, path: str | Path) -> dict[str, Any]:
        """Min and max of pydicom's own modality-LUT values of frame 0."""
        return self._call({"op": "source_range", "path": str(path)})

    def close(self) -> None:
        """Stop the worker and remove its scratch folder."""
        if self._proc is not None:
            self._proc.stdin.close()  # type: ignore[union-attr]
            stop_group(self._proc, term_wait=5)
            self._proc = None
        self._tmp.cleanup()

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._proc is None or self._proc.poll() is not None:
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            self._proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                          env=env, cwd=REPO, start_new_session=True)
        proc = self._proc
        proc.stdin.write(json.dumps(request) + "\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            ready = select.select([proc.stdout], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                stop_group(proc, term_wait=1)
                self._proc = None
                raise TimeoutError(f"{request['op']} of {request['path']} still running after "
                                   f"{self.timeout_s}s")
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                self._proc = None
                raise RuntimeError(f"the decoder worker died during {request['op']} of {request['path']}")
            if line.startswith("@@"):
                return json.loads(line[2:])
