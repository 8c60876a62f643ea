"""Sources and data checks on the real upstream data (skipped when ``../shared/data`` is absent).

The sources are recomputed here with the csv module and urllib, independently of
``covid_tasks.provenance``; the growth test replays the June 2020 set in its row order (about
40% in week 1, then 6% of the rows a week), which simulates arrival, not the real history.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd
import pytest

from covid_tasks import data_checks as dc
from covid_tasks.config import Config
from covid_tasks.provenance import labeled_sources, sources
from covid_tasks.stages.relabel import relabel

#: (covid, non_covid) images of the labelled June 2020 set per url host.
PINNED = {"radiopaedia.org": (54, 28), "eurorad.org": (27, 31), "github.com": (41, 7), "sirm.org": (35, 1),
          "pubs.rsna.org": (20, 11), "sciencedirect.com": (28, 2), "ncbi.nlm.nih.gov": (4, 5)}


def plain_host(url: str) -> str:
    host = (urlsplit(url.strip()).hostname or "").lower()
    return host[4:] if host.startswith("www.") else host


def root_with(metadata: str, full_dir: Path, root: Path) -> Path:
    (root / "raw").mkdir(parents=True)
    (root / "raw" / "images").symlink_to((full_dir / "images").resolve(), target_is_directory=True)
    (root / "raw" / "metadata.csv").write_text(metadata, encoding="utf-8", newline="")
    return root


def week_stats(root: Path, previous: dict | None = None) -> dict[str, Any]:
    relabel(Config(data_root=str(root)), "run")
    labeled = pd.read_csv(root / "labeled.csv", dtype=str, keep_default_na=False)
    meta = dc.read_metadata(root / "raw" / "metadata.csv")
    return json.loads(json.dumps(dc.statistics(labeled, root / "raw" / "images", meta, previous=previous)))


@pytest.fixture(scope="module")
def june(full_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = root_with((full_dir / "metadata.csv").read_text(encoding="utf-8"), full_dir,
                     tmp_path_factory.mktemp("june"))
    return {"root": root, "stats": week_stats(root)}


def test_sources_of_the_labelled_june_set(june: dict[str, Any], full_dir: Path) -> None:
    root = june["root"]
    labeled = pd.read_csv(root / "labeled.csv", dtype=str, keep_default_na=False)
    meta = pd.read_csv(full_dir / "metadata.csv", dtype=str, keep_default_na=False)
    got = labeled_sources(labeled, meta)
    with open(full_dir / "metadata.csv", newline="", encoding="utf-8") as fh:
        first_url: dict[str, str] = {}
        for row in csv.DictReader(fh):
            first_url.setdefault(row["filename"], row["url"])
    assert got.tolist() == [plain_host(first_url[f]) for f in labeled["filename"]]
    table = Counter(zip(got, labeled["label"], strict=True))
    assert got.nunique() == 35 and "unknown" not in set(got)
    for host, (n_covid, n_other) in PINNED.items():
        assert (table[(host, "covid")], table[(host, "non_covid")]) == (n_covid, n_other), host
    assert june["stats"]["source_labels"]["sirm.org"] == {"covid": 35, "non_covid": 1}


def test_sources_of_every_row(full_dir: Path, newest_meta: Path) -> None:
    for path in (full_dir / "metadata.csv", newest_meta):
        meta = pd.read_csv(path, dtype=str, keep_default_na=False)
        assert sources(meta).tolist() == [plain_host(u) for u in meta["url"]]
        assert "unknown" not in set(sources(meta))


def test_upstream_metadata_passes_the_schema(full_dir: Path, newest_meta: Path) -> None:
    for path in (full_dir / "metadata.csv", newest_meta):
        summary = dc.schema_summary(dc.read_metadata(path))
        assert summary["missing_required"] == [] and summary["invalid_rows"] == 0
        assert dc.check_schema(dc.read_metadata(path)) == []


def record_ends(text: str) -> list[int]:
    """The physical line each metadata record ends on (records may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    ends = []
    for _ in reader:
        ends.append(reader.line_num)
    return ends[1:]


@pytest.fixture(scope="module")
def season(full_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Statistics of 11 weeks: the first 40% of the rows, then 6% more a week."""
    text = (full_dir / "metadata.csv").read_text(encoding="utf-8")
    lines = io.StringIO(text, newline="").readlines()
    ends = record_ends(text)
    root = root_with("", full_dir, tmp_path_factory.mktemp("season"))
    weeks: list[dict[str, Any]] = []
    for step in range(11):
        n = min(len(ends), round((0.40 + 0.06 * step) * len(ends)))
        meta = root / "raw" / "metadata.csv"
        meta.write_text("".join(lines[: ends[n - 1]]), encoding="utf-8", newline="")
        weeks.append(week_stats(root, weeks[-1] if weeks else None))
    return weeks


def test_plain_growth_is_ok_every_week(season: list[dict[str, Any]]) -> None:
    sizes = [w["n_images"] for w in season]
    assert sizes == [196, 232, 254, 262, 282, 313, 339, 361, 391, 394, 394]
    baseline = None
    for week in season:
        assert dc.compare(week, baseline) == [], week["n_images"]
        baseline = week


@pytest.mark.parametrize("gap", [2, 3])
def test_returning_after_bad_weeks_is_ok(season: list[dict[str, Any]], gap: int) -> None:
    """After one or two blocked weeks the baseline is older; two or three weeks of growth are quiet."""
    for before, after in zip(season, season[gap:], strict=False):
        assert dc.compare(after, before) == [], (before["n_images"], after["n_images"])


def test_strict_findings_rule_trips_on_real_growth(season: list[dict[str, Any]]) -> None:
    """Warning on every new finding string would flag weeks 6 and 7: new non-COVID diseases
    (Varicella, Lipoid, Influenza...) with 1-4 images each; the default needs 10 images or a
    ``covid`` label."""
    strict = dc.Thresholds(check_new_finding_min_images=1)
    flagged = [i + 1 for i, (a, b) in enumerate(zip([None] + season, season, strict=False))
               if a is not None and dc.compare(b, a, strict)]
    assert flagged == [6, 7]
    new = set(season[5]["findings"]) - set(season[4]["findings"])
    assert {"Varicella", "Lipoid"} <= new


def test_newest_upstream_vocabulary_warns_but_does_not_block(june: dict[str, Any], full_dir: Path,
                                                             newest_meta: Path,
                                                             tmp_path: Path) -> None:
    """The newest metadata renames findings (``Pneumonia/Viral/COVID-19``) and corrects 7 labels."""
    root = root_with(newest_meta.read_text(encoding="utf-8"), full_dir, tmp_path / "newest")
    newest = week_stats(root)
    anomalies = dc.compare(newest, june["stats"])
    assert [(a.code, a.severity) for a in anomalies] == [("new_findings", "warn")]
    assert "Pneumonia/Viral/COVID-19" in anomalies[0].details["flagged"]
    rep = dc.report(anomalies, newest, june["stats"])
    assert rep["verdict"] == "warn" and rep["current"]["n_images"] == 431
