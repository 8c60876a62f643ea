"""Near-duplicate films in the June 2020 set (skipped when ``../shared/data`` is absent).

Pins the facts behind ``near_duplicates.DEFAULT_MAX_DISTANCE`` (docs/data-checks.md): the same
film under two patients (issue 23's four eurorad/radiopaedia pairs and a radiologyassistant.nl
film republished with a caption) is linked, and every pair of different films stays further
apart than the threshold.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from covid_tasks import near_duplicates as nd
from covid_tasks.config import Config
from covid_tasks.stages.relabel import relabel

ARDS = "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-"
#: Issue 23's pairs: patient 178 (eurorad) and patient 97 (radiopaedia), the same four films.
KNOWN = {("16660_2_1.jpg", ARDS + "admission.jpg"), ("16660_3_1.jpg", ARDS + "day-1.jpg"),
         ("16660_4_1.jpg", ARDS + "day-2.jpg"), ("16660_5_1.jpg", ARDS + "day-3.jpg")}
#: Every labelled pair within the default threshold, with its distance (read by eye: all the same film).
LABELLED_PAIRS = [
    ("16660_2_1.jpg", ARDS + "admission.jpg", 1), ("16660_4_1.jpg", ARDS + "day-2.jpg", 1),
    ("16660_3_1.jpg", ARDS + "day-1.jpg", 2), ("16660_5_1.jpg", ARDS + "day-3.jpg", 2),
    ("AR-1.jpg", "AR-2.jpg", 2),  # patient 192: "day 0" and "day 4" are one film
    ("E63574A7-4188-4C8D-8D17-9D67A18A1AFA.jpeg", "F4341CE7-73C9-45C6-99C8-8567A5484B63.jpeg", 13),
    ("AR-1.jpg", "extubation-1.jpg", 18), ("AR-2.jpg", "extubation-1.jpg", 18),  # 192's film, 196's caption
]


@pytest.fixture(scope="module")
def labelled(full_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """``labeled.csv`` of the June 2020 set (relabel only reads the images: a symlink will do)."""
    root = tmp_path_factory.mktemp("nd-real")
    (root / "raw").mkdir()
    (root / "raw" / "images").symlink_to((full_dir / "images").resolve(), target_is_directory=True)
    (root / "raw" / "metadata.csv").write_bytes((full_dir / "metadata.csv").read_bytes())
    relabel(Config(data_root=str(root)), "run")
    return pd.read_csv(root / "labeled.csv", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def hashes(labelled: pd.DataFrame, full_dir: Path) -> dict[str, int]:
    out, errors = nd.hash_files(full_dir / "images", labelled["filename"])
    assert not errors
    return out


def test_the_known_pairs_are_one_to_two_bits_apart(labelled: pd.DataFrame, hashes: dict[str, int]) -> None:
    assert len(labelled) == 394
    patient = dict(zip(labelled["filename"], labelled["patientid"], strict=True))
    for a, b in KNOWN:
        assert 1 <= nd.hamming(hashes[a], hashes[b]) <= 2
        assert (patient[a], patient[b]) == ("178", "97")


def test_labelled_pairs_within_the_default(hashes: dict[str, int]) -> None:
    assert nd.DEFAULT_MAX_DISTANCE == 20
    assert nd.near_duplicate_pairs(hashes) == sorted(
        [(*sorted((a, b)), d) for a, b, d in LABELLED_PAIRS], key=lambda p: (p[2], p[0], p[1]))
    groups = nd.near_duplicate_groups(hashes)
    assert {"AR-1.jpg", "AR-2.jpg", "extubation-1.jpg"} in groups
    assert all({a, b} in groups for a, b in KNOWN) and len(groups) == 6


def test_different_labelled_films_are_27_bits_or_more_apart(hashes: dict[str, int]) -> None:
    same = {frozenset(p[:2]) for p in LABELLED_PAIRS}
    nearest_other = min(d for a, b, d in nd.near_duplicate_pairs(hashes, 40) if frozenset((a, b)) not in same)
    assert nearest_other == 27  # margin of 7 bits over the default


def test_relabel_links_the_near_duplicate_patients_into_one_split_group(labelled: pd.DataFrame) -> None:
    """relabel itself: patients 178 and 97 (and 192 and 196) share a group_id, so split keeps them
    in one split; no other patients are merged by the films."""
    group = dict(zip(labelled["patientid"], labelled["group_id"], strict=False))
    assert group["178"] == group["97"] and group["192"] == group["196"]
    assert labelled["group_id"].nunique() == labelled["patientid"].nunique() - 2


def test_without_near_duplicate_linking_the_patients_stay_apart(full_dir: Path,
                                                                tmp_path: Path) -> None:
    """The control: with the linking off (-1) the same relabel leaves 178 and 97 in two groups."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "images").symlink_to((full_dir / "images").resolve(), target_is_directory=True)
    (tmp_path / "raw" / "metadata.csv").write_bytes((full_dir / "metadata.csv").read_bytes())
    relabel(Config(data_root=str(tmp_path), near_duplicate_distance=-1), "run")
    off = pd.read_csv(tmp_path / "labeled.csv", dtype=str, keep_default_na=False)
    group = dict(zip(off["patientid"], off["group_id"], strict=False))
    assert group["178"] != group["97"] and group["192"] != group["196"]


def test_all_724_images(full_dir: Path) -> None:
    """Over every image (CT, lateral and AP Supine films too): 14 pairs within 20 bits, the
    nearest different films 24 (two CT slices) and 26 apart; one copy at 21 is missed."""
    names = sorted(p.name for p in (full_dir / "images").iterdir())
    every, errors = nd.hash_files(full_dir / "images", names)
    assert not errors and len(every) == 724
    pairs = nd.near_duplicate_pairs(every, 26)
    within = [p for p in pairs if p[2] <= nd.DEFAULT_MAX_DISTANCE]
    assert len(within) == 14 and max(p[2] for p in within) == 18
    assert ("353889E0-A1E8-4F9E-A0B8-F24F36BCFBFB.jpeg", "case_72_RX-TORACE1.jpg", 0) in within  # SIRM twice
    assert [p[2] for p in pairs if p[2] > nd.DEFAULT_MAX_DISTANCE] == [21, 24, 26]
    assert pairs[-3][:2] == ("A7E260CE-8A00-4C5F-A7F5-27336527A981.jpeg", "case_76_1-3.png")


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf)


TRANSFORMS: dict[str, Callable[[Image.Image], Any]] = {
    "jpeg q70": lambda im: _jpeg(im, 70),
    "half size": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR),
    "10 levels brighter": lambda im: im.convert("L").point(lambda v: min(255, v + 10)),
    "brightness x0.9": lambda im: ImageEnhance.Brightness(im.convert("L")).enhance(0.9),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_every_labelled_film_finds_its_copy(name: str, labelled: pd.DataFrame, hashes: dict[str, int],
                                            full_dir: Path) -> None:
    worst = 0
    for filename in labelled["filename"]:
        with Image.open(full_dir / "images" / filename) as img:
            img.load()
            worst = max(worst, nd.hamming(hashes[filename], nd.dhash_image(TRANSFORMS[name](img))))
    assert worst <= nd.DEFAULT_MAX_DISTANCE
