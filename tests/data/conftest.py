"""Fixtures for the data tests: the shared upstream data sets, skipped cleanly where absent.

Users' clones have no ``../shared``; every fixture here skips then instead of failing.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
FULL = SHARED_DATA / "covid-chestxray"
NEWEST_META = SHARED_DATA / "covid-chestxray-newest-metadata" / "metadata.csv"


@pytest.fixture(scope="session")
def full_dir() -> Path:
    """``../shared/data/covid-chestxray`` (metadata.csv and images/)."""
    if not (FULL / "metadata.csv").is_file() or not (FULL / "images").is_dir():
        pytest.skip(f"shared data set not present at {FULL.resolve()}")
    return FULL


@pytest.fixture(scope="session")
def newest_meta() -> Path:
    """The newest upstream ``metadata.csv`` (hierarchical findings, no images)."""
    if not NEWEST_META.is_file():
        pytest.skip(f"newest upstream metadata not present at {NEWEST_META.resolve()}")
    return NEWEST_META


@pytest.fixture(scope="session")
def full_images(full_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One private copy of the shared images per session (the split hard-links to it)."""
    dst = tmp_path_factory.mktemp("full-images") / "images"
    shutil.copytree(full_dir / "images", dst)
    return dst


@pytest.fixture
def make_root(full_images: Path, tmp_path: Path) -> Callable[[str], Path]:
    """Build a data root whose ``raw/`` holds the given metadata text and the shared images."""

    def build(metadata: str, name: str = "root") -> Path:
        root = tmp_path / name
        (root / "raw").mkdir(parents=True)
        (root / "raw" / "images").symlink_to(full_images, target_is_directory=True)
        (root / "raw" / "metadata.csv").write_text(metadata, encoding="utf-8", newline="")
        return root

    return build
