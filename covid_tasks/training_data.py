"""What a model was trained on, in a few facts ``register`` records with each version.

:func:`training_data` counts the images of each split (``splits.csv``) by label and patient,
names the data set version and the source, and says whether the model is a **demo**: trained on
the repository's ``sample_data/`` (101 images, shipped to try the pipeline out), whether that
folder itself was the source or a copy of it (the stack's S3 bucket is seeded from it). Such a
model passes a lowered gate on a handful of test images; its answers mean nothing, and the
inference page says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from covid_tasks.config import CLASS_NAMES, POSITIVE_INDEX, redact_uri
from covid_tasks.layout import SPLITS, DataRoot

#: The repository's sample data, when the package runs from a checkout.
REPO_SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
#: Its image file names, shipped with the package (checked against ``sample_data/metadata.csv``).
SAMPLE_FILES = Path(__file__).resolve().parent / "assets" / "sample_data_files.txt"


def sample_file_names() -> frozenset[str]:
    """The file names of the sample data's images."""
    lines = SAMPLE_FILES.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def is_repository_sample(source_uri: str) -> bool:
    """Whether ``source_uri`` is the repository's ``sample_data`` folder (a path or ``file:`` URI)."""
    parsed = urlparse(source_uri)
    if parsed.scheme not in ("", "file"):
        return False
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else source_uri)
    try:
        return REPO_SAMPLE.is_dir() and path.resolve() == REPO_SAMPLE
    except OSError:
        return False


def training_data(root: DataRoot, source_uri: str, dataset_version: str | None) -> dict[str, Any]:
    """Images per split and label, data set version, source, and whether the model is a demo.

    Args:
        root: the data root holding ``splits.csv``.
        source_uri: where ``pull`` read the data (shown without credentials).
        dataset_version: ``pull``'s data set version, if known.

    Returns:
        ``{"images", "splits": {split: {"images", "covid", "non_covid", "patients"}},
        "dataset_version", "source", "demo", "demo_reason"}``; ``splits`` is empty (and
        ``images`` 0) without ``splits.csv``.
    """
    import pandas as pd

    path = root.splits
    frame = pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else None
    splits: dict[str, dict[str, int]] = {}
    names: set[str] = set()
    positive, negative = CLASS_NAMES[POSITIVE_INDEX], CLASS_NAMES[1 - POSITIVE_INDEX]
    if frame is not None:
        names = set(frame["filename"]) if "filename" in frame else set()
        for split in SPLITS:
            part = frame[frame["split"] == split]
            splits[split] = {"images": len(part), positive: int((part["label"] == positive).sum()),
                             negative: int((part["label"] == negative).sum()),
                             "patients": int(part["patientid"].nunique()) if "patientid" in part else 0}
    images = sum(s["images"] for s in splits.values())
    from_folder = is_repository_sample(source_uri)
    from_copy = bool(names) and names <= sample_file_names()
    reason = None
    if from_folder or from_copy:
        where = "the repository's sample_data/" if from_folder else "a copy of the repository's sample_data/"
        reason = (f"trained on {where} ({images} images), which is there to try the pipeline out, "
                  f"not to train a classifier")
    return {"images": images, "splits": splits, "dataset_version": dataset_version,
            "source": redact_uri(source_uri), "demo": reason is not None, "demo_reason": reason}
