"""Tests of covid_tasks.data_checks: statistics, each anomaly, quiet weeks and returns to normal.

A small synthetic data set (80 tiny PNG films from four sources, both classes in each) plays
the baseline; each test builds next week's rows from it, with ordinary growth and one fault.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covid_tasks import data_checks as dc

FINDING = {"covid": "COVID-19", "non_covid": "Pneumonia"}
BASE = {"radiopaedia.org": (12, 8), "eurorad.org": (10, 10), "sirm.org": (14, 6), "pubs.rsna.org": (12, 8)}
GROWTH = {"radiopaedia.org": (2, 1), "eurorad.org": (2, 2), "sirm.org": (2, 1), "pubs.rsna.org": (2, 1)}


class World:
    """Writes films into one folder and makes metadata/labelled rows for them."""

    def __init__(self, images: Path) -> None:
        self.images = images
        self.images.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def write(self, name: str, seed: int, level: float, size: tuple[int, int] = (24, 20)) -> str:
        rng = np.random.default_rng(seed)
        arr = np.clip(rng.normal(level, 20, size[::-1]), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, "PNG")
        (self.images / name).write_bytes(buf.getvalue())
        return hashlib.sha256(buf.getvalue()).hexdigest()

    def new(self, source: str, label: str, n: int, *, finding: str | None = None,
            shift: float = 0.0) -> list[dict[str, Any]]:
        rows = []
        for _ in range(n):
            self.n += 1
            name = f"img{self.n:04d}.png"
            level = 90 + float(np.random.default_rng(1000 + self.n).uniform(0, 80)) + shift
            rows.append({"filename": name, "patientid": f"p{self.n}", "finding": finding or FINDING[label],
                         "view": "PA", "modality": "X-ray", "label": label,
                         "sha256": self.write(name, self.n, level), "url": f"https://www.{source}/case/{self.n}",
                         "level": level})
        return rows

    def batch(self, counts: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
        out = []
        for source, (n_covid, n_other) in counts.items():
            out += self.new(source, "covid", n_covid) + self.new(source, "non_covid", n_other)
        return out


def stats(world: World, rows: list[dict[str, Any]], *, rename: dict[str, str] | None = None,
          drop: tuple[str, ...] = (), blank_filenames: int = 0, previous: dict | None = None) -> dict:
    labeled = pd.DataFrame([{**{k: r[k] for k in ("filename", "patientid", "finding", "view", "modality",
                                                  "label", "sha256")}, "group_id": r["patientid"]}
                            for r in rows])
    meta = pd.DataFrame([{k: r[k] for k in ("patientid", "finding", "view", "modality", "filename", "url")}
                         | {"license": "CC BY"} for r in rows])
    if blank_filenames:
        meta = pd.concat([meta, pd.DataFrame([{"patientid": "x", "filename": " ", "url": ""}]
                                             * blank_filenames)], ignore_index=True).fillna("")
    meta = meta.rename(columns=rename or {}).drop(columns=list(drop))
    return json.loads(json.dumps(dc.statistics(labeled, world.images, meta, previous=previous)))


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "images")


@pytest.fixture
def base_rows(world: World) -> list[dict[str, Any]]:
    return world.batch(BASE)


def codes(anomalies: list[dc.Anomaly]) -> list[tuple[str, str]]:
    return [(a.code, a.severity) for a in anomalies]


# --------------------------------------------------------------------------- statistics
def test_statistics_counts_and_images(world: World, base_rows: list[dict]) -> None:
    st = stats(world, base_rows)
    assert st["n_images"] == 80 and st["n_patients"] == 80 and st["n_groups"] == 80
    assert st["labels"] == {"covid": 48, "non_covid": 32}
    assert st["views"] == {"PA": 80}
    assert st["sources"] == {"radiopaedia.org": 20, "eurorad.org": 20, "pubs.rsna.org": 20, "sirm.org": 20}
    assert st["source_labels"]["sirm.org"] == {"covid": 14, "non_covid": 6}
    assert st["findings"] == {"COVID-19": 48, "Pneumonia": 32}
    assert st["image_stats"]["width"]["min"] == st["image_stats"]["width"]["max"] == 24
    assert st["image_stats"]["height"]["median"] == 20
    assert st["unreadable"] == [] and st["schema"]["missing_required"] == []
    first = base_rows[0]
    entry = st["images"][first["filename"]]
    assert entry["sha256"] == first["sha256"] and entry["source"] == "radiopaedia.org"
    assert entry["mean"] == pytest.approx(first["level"], abs=8)  # noise around the drawn level


def test_statistics_intensity_of_known_images(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (300, 200), 100).save(images / "flat.png")
    half = np.zeros((64, 64), np.uint8)
    half[:, 32:] = 200
    Image.fromarray(half).save(images / "half.png")
    Image.fromarray(np.full((40, 40), 100 * 257, np.uint16)).save(images / "deep.png")  # 16-bit
    Image.new("RGB", (50, 30), (100, 100, 100)).save(images / "rgb.jpg", quality=95)
    labeled = pd.DataFrame({"filename": ["flat.png", "half.png", "deep.png", "rgb.jpg"],
                            "patientid": list("abcd"), "finding": ["COVID-19"] * 4, "view": ["PA"] * 4,
                            "label": ["covid"] * 4, "sha256": list("1234")})
    st = dc.statistics(labeled, images, None)
    img = st["images"]
    assert (img["flat.png"]["width"], img["flat.png"]["height"]) == (300, 200)
    assert img["flat.png"]["mean"] == 100 and img["flat.png"]["std"] == 0
    assert img["half.png"]["mean"] == pytest.approx(100, abs=1)
    assert img["half.png"]["std"] == pytest.approx(100, abs=2)
    assert img["deep.png"]["mean"] == 100  # scaled from 16 bits, not clipped to 255
    assert img["rgb.jpg"]["mean"] == pytest.approx(100, abs=1)
    assert st["schema"] is None and set(st["sources"]) == {"unknown"}


def test_statistics_lists_unreadable_and_reuses_known_images(world: World, base_rows: list[dict]) -> None:
    bad = base_rows[3]["filename"]
    (world.images / bad).write_bytes((world.images / bad).read_bytes()[:60])  # truncated
    (world.images / base_rows[4]["filename"]).unlink()
    previous = {"images": {"old-name.png": {"sha256": base_rows[0]["sha256"], "width": 7, "height": 9,
                                             "mean": 1.5, "std": 0.5}}}
    st = stats(world, base_rows, previous=previous)
    assert st["unreadable"] == sorted([bad, base_rows[4]["filename"]])
    assert st["n_images"] == 80 and "mean" not in st["images"][bad]
    assert st["images"][base_rows[0]["filename"]]["mean"] == 1.5  # taken from the earlier statistics
    assert st["images"][base_rows[1]["filename"]]["mean"] != 1.5


def test_statistics_needs_columns(world: World) -> None:
    with pytest.raises(KeyError, match="sha256"):
        dc.statistics(pd.DataFrame({"filename": [], "patientid": [], "finding": [], "view": [], "label": []}),
                      world.images)


# --------------------------------------------------------------------------- quiet weeks
def test_first_week_and_unchanged_week_are_ok(world: World, base_rows: list[dict]) -> None:
    st = stats(world, base_rows)
    assert dc.compare(st, None) == []
    assert dc.compare(st, st) == []
    assert dc.compare(stats(world, base_rows, previous=st), st) == []


@pytest.mark.parametrize("share", [0.10, 0.15, 0.20])
def test_ordinary_growth_is_ok(world: World, base_rows: list[dict], share: float) -> None:
    base = stats(world, base_rows)
    extra = {s: (max(1, round(c * share)), max(1, round(o * share))) for s, (c, o) in BASE.items()}
    assert dc.compare(stats(world, base_rows + world.batch(extra)), base) == []


def test_ordinary_changes_are_ok(world: World, base_rows: list[dict]) -> None:
    """Rows removed upstream, an image replaced with new bytes, one finding corrected."""
    base = stats(world, base_rows)
    rows = [dict(r) for r in base_rows if int(r["patientid"][1:]) % 10 != 3]  # 8 removed
    rows[0]["sha256"] = world.write(rows[0]["filename"], 999, rows[0]["level"])  # replaced
    fix = next(r for r in rows if r["label"] == "non_covid")
    fix.update(finding="COVID-19", label="covid")  # 1 of 32 non_covid images corrected
    rows += world.batch(GROWTH)
    assert dc.compare(stats(world, rows), base) == []


# --------------------------------------------------------------------------- the faults
def fault_schema(world: World, rows: list[dict]) -> dict:
    return stats(world, rows, rename={"finding": "diagnosis"})


def fault_invalid_rows(world: World, rows: list[dict]) -> dict:
    return stats(world, rows, blank_filenames=40)


def fault_label_noise(world: World, rows: list[dict]) -> dict:
    rows = [dict(r) for r in rows]
    covid = [r for r in rows if r["label"] == "covid" and int(r["patientid"][1:]) <= 80]
    for r in covid[::5]:  # 20% of the existing covid images
        r.update(finding="Pneumonia", label="non_covid")
    return stats(world, rows)


def fault_class_collapse(world: World, rows: list[dict]) -> dict:
    other = [r for r in rows if r["label"] == "non_covid"]
    return stats(world, [r for r in rows if r not in other[: len(other) * 6 // 10]])


def fault_one_class_source(world: World, rows: list[dict]) -> dict:
    return stats(world, rows + world.new("newsource.org", "covid", 40))


def fault_new_covid_finding(world: World, rows: list[dict]) -> dict:
    return stats(world, rows + world.new("eurorad.org", "covid", 1, finding="SARS-CoV-2 pneumonia"))


def fault_vocabulary_change(world: World, rows: list[dict]) -> dict:
    renamed = [dict(r, finding="Pneumonia/Bacterial") if r["label"] == "non_covid" else r for r in rows]
    return stats(world, renamed)


def fault_intensity(world: World, rows: list[dict]) -> dict:
    """Every film re-exported 45 levels brighter (new bytes, same names); restored afterwards."""
    originals = {r["filename"]: (world.images / r["filename"]).read_bytes() for r in rows}
    brighter = [dict(r, sha256=world.write(r["filename"], 5000 + i, r["level"] + 45))
                for i, r in enumerate(rows)]
    out = stats(world, brighter)
    for name, data in originals.items():
        (world.images / name).write_bytes(data)
    return out


FAULTS: dict[str, tuple[Callable[[World, list[dict]], dict], str, str]] = {
    "schema change": (fault_schema, "schema_change", "block"),
    "blank file names": (fault_invalid_rows, "invalid_rows", "block"),
    "label noise": (fault_label_noise, "label_changes", "block"),
    "class collapse": (fault_class_collapse, "class_collapse", "block"),
    "one-class source": (fault_one_class_source, "source_label_jump", "warn"),
    "new covid finding": (fault_new_covid_finding, "new_findings", "warn"),
    "vocabulary change": (fault_vocabulary_change, "new_findings", "warn"),
    "intensity drift": (fault_intensity, "intensity_drift", "warn"),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_each_fault_is_caught_and_the_return_to_normal_is_quiet(world: World, base_rows: list[dict],
                                                                 name: str) -> None:
    make, code, severity = FAULTS[name]
    baseline = stats(world, base_rows)  # the last version that passed
    grown = base_rows + world.batch(GROWTH)
    bad = dc.compare(make(world, grown), baseline)
    assert codes(bad) == [(code, severity)], [a.message for a in bad]
    assert dc.verdict(bad) == severity
    # the next week: the injected change is gone and the data grew again; the baseline is still
    # the last version that passed, so the return is an ordinary week
    back = stats(world, grown + world.batch(GROWTH))
    assert dc.compare(back, baseline) == []


def test_schema_change_message_names_the_rename(world: World, base_rows: list[dict]) -> None:
    baseline = stats(world, base_rows)
    [anomaly] = dc.compare(fault_schema(world, base_rows), baseline)
    assert all(word in anomaly.message for word in ("'finding'", "'diagnosis'", "renamed"))
    assert anomaly.details["missing_required"] == ["finding"]


def test_check_schema_on_raw_metadata() -> None:
    good = pd.DataFrame({"patientid": ["1", "2"], "finding": ["COVID-19", ""], "view": ["PA", "AP"],
                         "modality": ["X-ray", "X-ray"], "filename": ["a.jpg", "b.jpg"], "url": ["", ""]})
    assert dc.check_schema(good) == [] and dc.require_schema(good) == []
    renamed = good.rename(columns={"filename": "file", "view": "projection"})
    with pytest.raises(dc.SchemaChangeError, match=r"\['view', 'filename'\].*renamed"):
        dc.require_schema(renamed, baseline_columns=list(good.columns))
    with pytest.raises(dc.SchemaChangeError, match="lacks required column"):
        dc.require_schema(good.drop(columns=["patientid"]))
    without_url = dc.check_schema(good.drop(columns=["url"]), list(good.columns))
    assert codes(without_url) == [("columns_removed", "warn")]
    numeric = good.assign(patientid=[1, 2])  # read with type guessing: still text after coercion
    assert dc.check_schema(numeric) == []


def test_check_schema_counts_invalid_rows() -> None:
    frame = pd.DataFrame({"patientid": ["1", "", None, "4", "5"], "finding": ["x"] * 5, "view": ["PA"] * 5,
                          "modality": ["X-ray"] * 5, "filename": ["a", "b", "c", "  ", "e"]})
    summary = dc.schema_summary(frame)
    assert summary["invalid_rows"] == 3
    assert summary["invalid_by_check"] == {"filename: non-empty": 1, "patientid: non-empty": 1,
                                           "patientid: not_nullable": 1}
    assert codes(dc.check_schema(frame)) == [("invalid_rows", "block")]
    assert dc.check_schema(frame, thresholds=dc.Thresholds(check_max_invalid_row_share=0.6)) == []


def test_first_week_without_a_class_blocks(world: World) -> None:
    only = world.new("sirm.org", "covid", 10)
    assert codes(dc.compare(stats(world, only), None)) == [("class_missing", "block")]


def test_label_changes_follow_renamed_files(world: World, base_rows: list[dict]) -> None:
    """A file renamed upstream is matched by its SHA-256; its label flip counts."""
    baseline = stats(world, base_rows)
    rows = [dict(r) for r in base_rows]
    for r in [r for r in rows if r["label"] == "non_covid"][:4]:  # 12.5% of non_covid
        new_name = "renamed-" + r["filename"]
        (world.images / new_name).write_bytes((world.images / r["filename"]).read_bytes())
        r.update(filename=new_name, label="covid", finding="COVID-19")
    [anomaly] = dc.compare(stats(world, rows), baseline)
    assert (anomaly.code, anomaly.details["from_label"], anomaly.details["changed"]) == ("label_changes",
                                                                                         "non_covid", 4)


def test_source_jump_needs_a_one_class_gain(world: World, base_rows: list[dict]) -> None:
    baseline = stats(world, base_rows)
    mixed = stats(world, base_rows + world.new("newsource.org", "covid", 20)
                  + world.new("newsource.org", "non_covid", 20))
    assert dc.compare(mixed, baseline) == []
    small = stats(world, base_rows + world.new("other.org", "non_covid", 19))
    assert dc.compare(small, baseline) == []
    # an existing one-class source growing: sirm.org without its non_covid images gains 20 covid
    sirm = [r for r in base_rows if not ("sirm.org" in r["url"] and r["label"] == "non_covid")]
    base2 = stats(world, sirm)
    grown = stats(world, sirm + world.new("sirm.org", "covid", 20))
    [anomaly] = dc.compare(grown, base2)
    assert anomaly.code == "source_label_jump" and anomaly.details["sources"][0]["source"] == "sirm.org"
    assert not anomaly.details["sources"][0]["new_source"]
    mi = anomaly.details["mutual_information"]
    assert mi["current"] > mi["baseline"]


def test_cross_split_duplicates(world: World, base_rows: list[dict]) -> None:
    st = stats(world, base_rows)
    pairs = [("img0001.png", "img0002.png", 2), ("img0003.png", "new.png", 5)]
    [anomaly] = dc.compare(st, st, cross_split_pairs=pairs)
    assert (anomaly.code, anomaly.severity) == ("cross_split_duplicates", "warn")
    assert anomaly.details["n_pairs"] == 2
    assert anomaly.details["examples"][1] == ["img0003.png", "new.png", 5]
    assert codes(dc.compare(st, st, cross_split_pairs=3)) == [("cross_split_duplicates", "warn")]
    assert dc.compare(st, st, cross_split_pairs=[]) == []
    lenient = dc.Thresholds(check_max_cross_split_duplicates=2)
    assert dc.compare(st, st, lenient, cross_split_pairs=pairs) == []


def test_new_findings_quiet_for_a_rare_new_disease(world: World, base_rows: list[dict]) -> None:
    baseline = stats(world, base_rows)
    rare = stats(world, base_rows + world.new("eurorad.org", "non_covid", 4, finding="Varicella"))
    assert dc.compare(rare, baseline) == []
    strict = dc.Thresholds(check_new_finding_min_images=1)
    assert codes(dc.compare(rare, baseline, strict)) == [("new_findings", "warn")]


# --------------------------------------------------------------------------- measures, verdict, report
def test_psi_and_mutual_information() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(120, 25, 2000)
    assert dc.psi(a, a) == pytest.approx(0, abs=1e-9)
    assert dc.psi(a, rng.normal(120, 25, 2000)) < 0.05
    assert dc.psi(a, a + 25) > 0.5
    with pytest.raises(ValueError):
        dc.psi([], [1.0])
    same_mix = {"a": {"covid": 10, "non_covid": 10}, "b": {"covid": 5, "non_covid": 5}}
    assert dc.mutual_information(same_mix) == 0
    assert dc.mutual_information({"a": {"covid": 10}, "b": {"non_covid": 10}}) == pytest.approx(1.0)
    assert dc.mutual_information({}) == 0


def test_verdict_and_report(world: World, base_rows: list[dict]) -> None:
    baseline = stats(world, base_rows)
    current = stats(world, base_rows + world.new("newsource.org", "non_covid", 40))
    anomalies = dc.compare(current, baseline, cross_split_pairs=[("a", "b", 1)])
    assert dc.verdict(anomalies) == "warn" and dc.verdict([]) == "ok"
    assert dc.verdict(anomalies + [dc.Anomaly("x", "block", "m")]) == "block"
    rep = dc.report(anomalies, current, baseline)
    json.dumps(rep)
    assert rep["verdict"] == "warn" and "\n" not in rep["summary"]
    assert rep["summary"].startswith("data checks: warn, 120 images (baseline 80): warn source_label_jump")
    assert "cross_split_duplicates" in rep["summary"]
    assert "images" not in rep["current"] and rep["current"]["labels"] == {"covid": 48, "non_covid": 72}
    assert rep["baseline"]["n_images"] == 80
    ok = dc.report([], baseline, None)
    assert ok["summary"] == "data checks: ok, 80 images, no anomaly" and ok["baseline"] is None
    assert dc.report(dc.check_schema(pd.DataFrame({"x": [1]})), None, None)["verdict"] == "block"


def test_anomaly_severity_is_checked() -> None:
    with pytest.raises(ValueError, match="severity"):
        dc.Anomaly("x", "info", "m")


def test_thresholds_from_mapping() -> None:
    t = dc.Thresholds.from_mapping({"check_intensity_psi": "0.3", "check_source_label_jump": 30, "seed": 1})
    assert (t.check_intensity_psi, t.check_source_label_jump) == (0.3, 30)
    assert t.check_min_class_share_kept == dc.Thresholds().check_min_class_share_kept
    with pytest.raises(ValueError, match="unknown"):
        dc.Thresholds.from_mapping({"check_intensity": 0.3})
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        dc.Thresholds(check_max_label_change_share=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        dc.Thresholds(check_source_label_jump=-1)
    with pytest.raises(dataclasses_frozen_error()):
        t.check_intensity_psi = 1.0  # type: ignore[misc]


def dataclasses_frozen_error() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_importing_the_check_modules_is_light() -> None:
    """pandas, numpy, Pillow, pandera and imagehash load only when a function needs them."""
    import subprocess
    import sys

    heavy = "('pandas', 'numpy', 'PIL', 'pandera', 'imagehash')"
    code = ("import sys, covid_tasks.data_checks, covid_tasks.near_duplicates, covid_tasks.provenance; "
            f"print(sorted(m for m in {heavy} if m in sys.modules))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"


def test_statistics_lists_images_over_pillows_pixel_limit(world: World, base_rows: list[dict],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    world.write("huge.png", 1, 100, size=(300, 200))
    rows = base_rows + [dict(base_rows[0], filename="huge.png", patientid="huge", sha256="h")]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 60,000 pixels: over twice the limit
    st = stats(world, rows)
    assert "huge.png" in st["unreadable"]


def test_the_thresholds_are_config_s_check_fields_with_its_defaults() -> None:
    """The pipeline builds Thresholds from Config; a caller without a Config gets the same values."""
    from covid_tasks.config import field_defaults

    defaults = {k: v for k, v in field_defaults().items() if k.startswith("check_")}
    assert dataclasses.asdict(dc.Thresholds()) == defaults  # every check_* field, each default
