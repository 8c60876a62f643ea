"""Tests of covid_tasks.provenance: an image's source is the ``source`` column, else the url host."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

from covid_tasks.provenance import UNKNOWN, image_source, labeled_sources, sources, url_host

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data" / "metadata.csv"


@pytest.mark.parametrize("url, host", [
    ("https://radiopaedia.org/cases/covid-19-pneumonia-7", "radiopaedia.org"),
    ("https://www.Radiopaedia.org/cases/x?lang=us", "radiopaedia.org"),
    ("http://WWW.EURORAD.ORG/case/16660", "eurorad.org"),
    ("https://pubs.rsna.org/doi/10.1148/radiol.2020200432", "pubs.rsna.org"),
    ("https://www.sirm.org:443/2020/03/19/covid-19-caso-54/", "sirm.org"),
    ("https://user:secret@github.com/ieee8023/covid-chestxray-dataset", "github.com"),
    ("https://www.sciencedirect.com./science/article/pii/S1", "sciencedirect.com"),
    ("www.sirm.org/2020/03/19/covid-19-caso-54/", "sirm.org"),  # no scheme
    ("  https://www.nejm.org/doi/full/x https://eurorad.org/y", "nejm.org"),  # two URLs: the first
    ("https://eurorad.org/a;https://sirm.org/b", "eurorad.org"),
    ("https://www2.example.org/x", "www2.example.org"),  # only a leading "www." goes
    ("", ""),
    ("   ", ""),
    ("n/a", ""),
    ("http://localhost:8080/x", ""),
    ("http://[::1", ""),  # unparsable
])
def test_url_host(url: str, host: str) -> None:
    assert url_host(url) == host


@pytest.mark.parametrize("row, source", [
    ({"source": "Hospital A", "url": "https://radiopaedia.org/x"}, "Hospital A"),
    ({"source": "  Hospital A ", "url": ""}, "Hospital A"),
    ({"source": "", "url": "https://www.radiopaedia.org/x"}, "radiopaedia.org"),
    ({"source": "   ", "url": "https://eurorad.org/x"}, "eurorad.org"),
    ({"source": None, "url": "https://eurorad.org/x"}, "eurorad.org"),
    ({"source": float("nan"), "url": "https://eurorad.org/x"}, "eurorad.org"),
    ({"source": pd.NA, "url": "https://eurorad.org/x"}, "eurorad.org"),
    ({"url": "https://sirm.org/x"}, "sirm.org"),
    ({"url": ""}, UNKNOWN),
    ({"url": float("nan")}, UNKNOWN),
    ({"url": "see paper"}, UNKNOWN),
    ({}, UNKNOWN),
])
def test_image_source(row: dict, source: str) -> None:
    assert image_source(row) == source
    assert image_source(pd.Series(row, dtype=object)) == source


def test_sources_is_image_source_on_every_row() -> None:
    frame = pd.DataFrame({
        "filename": list("abcdef"),
        "source": ["", "Hospital A", None, "  ", float("nan"), ""],
        "url": ["https://www.Sirm.org/x", "https://radiopaedia.org/y", "eurorad.org/z", "",
                "https://github.com/q", None],
    }, index=[10, 11, 12, 13, 14, 15])
    got = sources(frame)
    assert got.name == "source" and list(got.index) == list(frame.index)
    assert got.tolist() == [image_source(r) for _, r in frame.iterrows()]
    assert got.tolist() == ["sirm.org", "Hospital A", "eurorad.org", UNKNOWN, "github.com", UNKNOWN]


def test_sources_without_source_or_url_columns() -> None:
    assert sources(pd.DataFrame({"filename": ["a", "b"]})).tolist() == [UNKNOWN, UNKNOWN]
    only_source = pd.DataFrame({"source": ["x", ""]})
    assert sources(only_source).tolist() == ["x", UNKNOWN]
    assert sources(pd.DataFrame({"url": []})).tolist() == []


def test_labeled_sources_join_on_filename_first_row_wins() -> None:
    metadata = pd.DataFrame({
        "filename": ["a.jpg", "b.jpg", "a.jpg", "c.jpg"],
        "url": ["https://eurorad.org/1", "https://www.sirm.org/2", "https://radiopaedia.org/3", ""],
    })
    labeled = pd.DataFrame({"filename": ["c.jpg", "a.jpg", "b.jpg", "gone.jpg"]}, index=[5, 6, 7, 8])
    got = labeled_sources(labeled, metadata)
    assert got.tolist() == [UNKNOWN, "eurorad.org", "sirm.org", UNKNOWN]
    assert list(got.index) == [5, 6, 7, 8]
    assert labeled_sources(labeled, None).tolist() == [UNKNOWN] * 4


def test_labeled_sources_own_column_wins() -> None:
    metadata = pd.DataFrame({"filename": ["a.jpg", "b.jpg"], "url": ["https://eurorad.org/1", ""]})
    labeled = pd.DataFrame({"filename": ["a.jpg", "b.jpg"], "source": ["Site 7", ""]})
    assert labeled_sources(labeled, metadata).tolist() == ["Site 7", UNKNOWN]
    assert labeled_sources(labeled, None).tolist() == ["Site 7", UNKNOWN]


def test_labeled_sources_needs_filename() -> None:
    with pytest.raises(KeyError, match="filename"):
        labeled_sources(pd.DataFrame({"x": [1]}), None)
    with pytest.raises(KeyError, match="metadata"):
        labeled_sources(pd.DataFrame({"filename": ["a"]}), pd.DataFrame({"url": ["x"]}))


def test_sample_metadata_sources_match_a_plain_reading() -> None:
    """Each sample row's source is its url's host, computed here with the csv module."""
    with open(SAMPLE, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    expected = []
    for r in rows:
        host = r["url"].split("//", 1)[1].split("/", 1)[0].split(":")[0].lower()
        expected.append(host.removeprefix("www."))
    frame = pd.read_csv(SAMPLE, dtype=str, keep_default_na=False)
    assert sources(frame).tolist() == expected
    assert UNKNOWN not in expected and len(set(expected)) > 3


def test_a_literal_text_cell_is_kept() -> None:
    assert image_source({"source": "nan", "url": "https://eurorad.org/x"}) == "nan"
    assert image_source({"source": pd.NaT, "url": "https://eurorad.org/x"}) == "eurorad.org"
