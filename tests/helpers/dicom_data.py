"""DICOM data sets for end-to-end tests: the sample films as a hospital would export them.

:func:`dicom_source` rewrites ``sample_data`` as a source folder of DICOM films (``images/*.dcm``,
written by :func:`tests.helpers.dicom_files.film_dicom` in a rotation of photometric
interpretations, bit depths, transfer syntaxes and display rules) whose ``metadata.csv`` leaves
``view`` and ``modality`` empty: each film's header carries them instead (ViewPosition, Patient
Position for supine films, Modality CR or DX). Every header holds distinctive patient data
(:func:`phi_for`), which no output may contain (:data:`PHI_MARKERS`).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from tests.helpers.dicom_files import WRITABLE, film_dicom

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data"
#: Substrings of every patient tag :func:`phi_for` writes; none may appear in any output.
PHI_MARKERS = ("Quixote", "Dulcinea", "MRN-77310", "19380417", "ACCN-5519")
#: How the films are written, in rotation: (photometric, bits stored, transfer syntax, VOI, modality).
ROTATION = (
    {"photometric": "MONOCHROME1", "bits_stored": 16, "transfer_syntax": WRITABLE["explicit"],
     "voi": "window", "modality": "DX"},
    {"photometric": "MONOCHROME2", "bits_stored": 12, "transfer_syntax": WRITABLE["jpeg_ls"],
     "voi": "window", "modality": "CR", "high_bit_noise": True},
    {"photometric": "MONOCHROME1", "bits_stored": 8, "transfer_syntax": WRITABLE["rle"], "voi": None,
     "modality": "CR"},
    {"photometric": "MONOCHROME2", "bits_stored": 12, "transfer_syntax": WRITABLE["explicit"], "voi": "lut",
     "modality": "DX"},
    {"photometric": "MONOCHROME2", "bits_stored": 16, "transfer_syntax": WRITABLE["j2k_lossless"],
     "voi": "window", "modality": "DX", "signed": True, "rescale": (2.0, -100.0)},
)
#: metadata.csv's view -> the header that says it (ViewPosition, and Patient Position for supine).
VIEW_HEADERS: dict[str, dict[str, Any]] = {
    "PA": {"view_position": "PA"},
    "AP": {"view_position": "AP"},
    "AP Supine": {"view_position": "AP", "extra": {"PatientPosition": "HFS"}},
    "L": {"view_position": "LL"},
}


def phi_for(key: str) -> dict[str, str]:
    """Distinctive patient tags for patient ``key``: name, ID, birth date and accession number."""
    return {"PatientName": f"Quixote^Dulcinea^{key}", "PatientID": f"MRN-77310-{key}",
            "PatientBirthDate": "19380417", "AccessionNumber": f"ACCN-5519-{key}"}


def grey_of(path: Path) -> np.ndarray:
    """A film's grey levels (``(rows, columns)`` uint8), colour files converted to grey."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L")).copy()


def read_rows(metadata: Path) -> tuple[list[str], list[list[str]]]:
    """``metadata.csv`` as its header and rows of cells, exactly as written."""
    rows = list(csv.reader(io.StringIO(metadata.read_text(encoding="utf-8"), newline="")))
    return rows[0], rows[1:]


def write_rows(metadata: Path, header: list[str], rows: Iterable[list[str]]) -> None:
    """Write ``metadata.csv`` back (every cell quoted only where needed)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    metadata.write_text(buf.getvalue(), encoding="utf-8")


def dicom_source(dst: Path, blank: tuple[str, ...] = ("view", "modality"), limit: int | None = None,
                 same_patient: dict[str, str] | None = None) -> Path:
    """Write ``sample_data`` as a DICOM source folder: ``dst/metadata.csv`` and ``dst/images/*.dcm``.

    Args:
        dst: the folder to create.
        blank: metadata.csv columns emptied in every row (the headers carry view and modality;
            an emptied ``patientid`` leaves the header's patient hash as the only patient key).
        limit: only the first ``limit`` rows.
        same_patient: file name -> the key whose patient tags its header carries instead of its
            own ``patientid`` (to link films by their headers).

    Returns:
        ``dst``.
    """
    header, rows = read_rows(SAMPLE / "metadata.csv")
    col = {name: header.index(name) for name in ("patientid", "view", "modality", "filename")}
    images = dst / "images"
    images.mkdir(parents=True)
    out = []
    for i, row in enumerate(rows[:limit]):
        source = SAMPLE / "images" / row[col["filename"]]
        name = f"{Path(row[col['filename']]).stem}.dcm"
        key = (same_patient or {}).get(name, row[col["patientid"]])
        view = VIEW_HEADERS[row[col["view"]]]
        style = dict(ROTATION[i % len(ROTATION)])
        film = film_dicom(grey_of(source), patient=phi_for(key), view_position=view["view_position"],
                          extra=view.get("extra"), **style)
        (images / name).write_bytes(film)
        row = list(row)
        row[col["filename"]] = name
        for column in blank:
            row[col[column]] = ""
        out.append(row)
    write_rows(dst / "metadata.csv", header, out)
    return dst


def phi_hits(roots: Iterable[Path], inputs: Iterable[Path] = ()) -> list[str]:
    """Every file under ``roots`` holding a :data:`PHI_MARKERS` string, except the input films.

    Args:
        roots: folders (or files) to search, binary files included.
        inputs: folders of the pulled films themselves (``raw/images``, ``quarantine``); their
            files, and hard links to them elsewhere (``split/``), are not searched.

    Returns:
        ``"<path>: <marker>"`` for each hit; empty when nothing leaked.
    """
    same = {(st.st_dev, st.st_ino) for folder in inputs if Path(folder).is_dir()
            for st in (p.stat() for p in Path(folder).rglob("*") if p.is_file())}
    hits = []
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            st = path.stat()
            if (st.st_dev, st.st_ino) in same:
                continue
            data = path.read_bytes()
            hits += [f"{path}: {m}" for m in PHI_MARKERS
                     if m.encode() in data or m.encode("utf-16-le") in data]
    return hits


def phi_in_text(text: str) -> list[str]:
    """The :data:`PHI_MARKERS` found in ``text``."""
    return [m for m in PHI_MARKERS if m in text]
