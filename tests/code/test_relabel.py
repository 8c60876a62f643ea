"""relabel: the rule table, row by row, on tiny synthetic CSVs and on the shipped sample data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from covid_tasks.config import Config
from covid_tasks.findings import covid_like_unmatched, label_for
from covid_tasks.stages.relabel import REASONS, relabel

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data"
COLUMNS = ["patientid", "offset", "finding", "view", "modality", "folder", "filename", "clinical_notes", ""]


def write_meta(root: Path, rows: list[dict[str, str]], images: dict[str, bytes] | None = None,
               raw_lines: list[str] | None = None) -> Path:
    """Write ``raw/metadata.csv`` (upstream layout: the header ends with a comma) and the images.

    Every row's file is created with unique bytes unless ``images`` says otherwise; a row with
    ``"_absent": "1"`` gets no file. ``raw_lines`` are appended verbatim (malformed rows).
    """
    raw = root / "raw"
    (raw / "images").mkdir(parents=True, exist_ok=True)
    with open(raw / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([row.get(c, "images" if c == "folder" else "") for c in COLUMNS])
        for line in raw_lines or []:
            fh.write(line + "\r\n")
    for row in rows:
        name = row.get("filename", "")
        if name and not row.get("_absent") and ".." not in name and not name.startswith("/"):
            (raw / "images" / name).write_bytes(b"img:" + name.encode())
    for name, data in (images or {}).items():
        (raw / "images" / name).write_bytes(data)
    return root


def row(pid: str, finding: str, view: str, filename: str, modality: str = "X-ray",
        **extra: str) -> dict[str, str]:
    return {"patientid": pid, "finding": finding, "view": view, "modality": modality, "filename": filename,
            **extra}


def read_labeled(root: Path) -> list[dict[str, str]]:
    with open(root / "labeled.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def sample_root(tmp_path: Path) -> Path:
    shutil.copytree(SAMPLE / "images", tmp_path / "raw" / "images")
    shutil.copy(SAMPLE / "metadata.csv", tmp_path / "raw" / "metadata.csv")
    return tmp_path


@pytest.mark.parametrize(("finding", "label"), [
    ("COVID-19", "covid"),
    ("COVID-19, ARDS", "covid"),
    ("Pneumonia/Viral/COVID-19", "covid"),
    ("  covid-19 ", "covid"),
    ("SARS", "non_covid"),
    ("Pneumonia/Viral/SARS", "non_covid"),
    ("Pneumonia/Viral/MERS-CoV", "non_covid"),
    ("Pneumonia/Viral/Herpes ", "non_covid"),
    ("No Finding", "non_covid"),
    ("ARDS", "non_covid"),
    ("todo", None),
    ("Unknown", None),
    ("", None),
])
def test_label_for_both_vocabularies(finding: str, label: str | None) -> None:
    assert label_for(finding) == label


#: (finding, label, reported as "looks like COVID-19 but matches no rule")
SPELLINGS = [
    ("COVID-19", "covid", False),
    ("COVID 19", "covid", False),
    ("COVID19", "covid", False),
    ("covid", "covid", False),
    ("Covid", "covid", False),
    ("SARS-CoV-2", "covid", False),
    ("SARS-CoV2", "covid", False),
    ("sars cov 2", "covid", False),
    ("SARS_CoV_2", "covid", False),
    ("COVID-19 pneumonia", "covid", False),
    ("Covid-19;ARDS", "covid", False),
    ("COVID-19 | ARDS", "covid", False),
    ("2019-nCoV", "covid", False),
    ("HCoV-19", "covid", False),
    ("COVID\u201119", "covid", False),                            # non-breaking hyphen
    ("COVID\u201319", "covid", False),                            # en dash
    ("\uff23\uff2f\uff36\uff29\uff24-19", "covid", False),        # full-width letters
    ("\uff23\uff2f\uff36\uff29\uff24\uff0d\uff11\uff19", "covid", False),  # all full-width
    ("Pneumonia/Viral/COVID-19", "covid", False),
    ("COVID-19 (not intubated)", "covid", False),
    ("SARS", "non_covid", False),                                 # the 2003 epidemic
    ("Pneumonia/Viral/SARS", "non_covid", False),
    ("MERS-CoV", "non_covid", False),
    ("Pneumonia/Viral/MERS-CoV", "non_covid", False),
    ("HCoV-NL63", "non_covid", False),                            # a seasonal coronavirus
    ("No Finding", "non_covid", False),
    ("non-COVID pneumonia", "non_covid", True),
    ("COVID-19 negative", "non_covid", True),
    ("Negative for SARS-CoV-2", "non_covid", True),
    ("suspected COVID-19", "non_covid", True),
    ("COVID-19?", "non_covid", True),
    ("SARS-CoV", "non_covid", True),                              # 2003's virus, or a typo
    ("Coronavirus", "non_covid", True),
    ("covid19pneumonia", "non_covid", True),
    ("cov-19", "non_covid", True),
    ("todo", None, False),
    ("\uff54\uff4f\uff44\uff4f", None, False),                    # full-width "todo"
]


@pytest.mark.parametrize(("finding", "label", "warned"), SPELLINGS, ids=[f for f, *_ in SPELLINGS])
def test_covid_spellings(finding: str, label: str | None, warned: bool) -> None:
    assert label_for(finding) == label
    assert covid_like_unmatched(finding) is warned


def test_report_lists_every_finding_and_warns_about_covid_like_ones(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    findings = ["COVID 19", "COVID 19", "SARS-CoV2", "Pneumonia", "SARS", "MERS-CoV", "Coronavirus",
                "Coronavirus", "todo"]
    root = write_meta(tmp_path, [row(str(i), f, "PA", f"{i}.png") for i, f in enumerate(findings)])
    caplog.set_level("WARNING", logger="covid_tasks.stages.relabel")
    result = relabel(Config(data_root=str(root), min_images_per_class=0), "run")
    assert result["class_counts"] == {"non_covid": 5, "covid": 3} and result["covid_like_unmatched"] == 1
    report = json.loads(Path(result["report"]).read_text())
    assert report["findings"] == [
        {"finding": "COVID 19", "label": "covid", "rows": 2, "covid_like_unmatched": False},
        {"finding": "Coronavirus", "label": "non_covid", "rows": 2, "covid_like_unmatched": True},
        {"finding": "MERS-CoV", "label": "non_covid", "rows": 1, "covid_like_unmatched": False},
        {"finding": "Pneumonia", "label": "non_covid", "rows": 1, "covid_like_unmatched": False},
        {"finding": "SARS", "label": "non_covid", "rows": 1, "covid_like_unmatched": False},
        {"finding": "SARS-CoV2", "label": "covid", "rows": 1, "covid_like_unmatched": False},
        {"finding": "todo", "label": "placeholder", "rows": 1, "covid_like_unmatched": False},
    ]
    assert [f["finding"] for f in report["covid_like_unmatched"]] == ["Coronavirus"]
    assert "finding 'Coronavirus' (2 row(s)) looks like COVID-19 but matches no rule" in caplog.text


@pytest.mark.parametrize(("raw", "malformed", "kept"), [
    (['10,0,"COVID-19,PA,X-ray,images,q1.png,,',              # line 6: a quote never closed ...
      "11,0,Pneumonia,PA,X-ray,images,gone.png,,"], [6, 7], []),  # ... swallows the next row
    (['12,0,COVID-19,PA,X-ray,images,q2.png,"notes, then a quote',  # line 6: in the notes ...
      "13,0,Pneumonia,PA,X-ray,images,gone.png,,",                  # ... swallows line 7 ...
      '14,0,COVID-19,PA,X-ray,images,q3.png,"closed here",'], [6, 7, 8], []),  # ... to this quote
    (["15,0,COVID-19, ARDS,PA,X-ray,images,shift.png,,"], [6], []),    # an unquoted comma in finding
    (['16,0,COVID-19,PA,X-ray,images,multi.png,"a note on\ntwo lines",'], [], ["multi.png"]),  # legal
], ids=["quote-in-finding", "quote-in-notes", "shifted-by-comma", "multiline-notes"])
def test_unterminated_quote_and_shifted_rows_count_as_malformed(
        tmp_path: Path, raw: list[str], malformed: list[int], kept: list[str]) -> None:
    """An unterminated quote once swallowed the next row silently; a row shifted by an unquoted
    comma in ``finding`` was dropped under ``modality`` instead of ``malformed_row``."""
    rows = [row(str(i), "COVID-19" if i % 2 else "Pneumonia", "PA", f"ok{i}.png") for i in range(4)]
    root = write_meta(tmp_path, rows, raw_lines=raw)
    for name in ("q1.png", "q2.png", "q3.png", "gone.png", "shift.png", "multi.png"):
        (root / "raw" / "images" / name).write_bytes(name.encode())
    result = relabel(Config(data_root=str(root), min_images_per_class=1), "run")
    report = json.loads(Path(result["report"]).read_text())
    assert report["dropped_examples"].get("malformed_row", []) == malformed  # line numbers
    assert result["dropped"] == {**dict.fromkeys(REASONS, 0), "malformed_row": len(malformed)}
    assert report["kept"] + len(malformed) == report["source_rows"] == 4 + len(malformed) + len(kept)
    expected = sorted([f"ok{i}.png" for i in range(4)] + kept)
    assert sorted(r["filename"] for r in read_labeled(root)) == expected


def test_each_rule_counts_its_rows(tmp_path: Path) -> None:
    rows = [
        row("1", "COVID-19", "PA", "keep-pa.png"),
        row("2", "Pneumonia/Viral/COVID-19", "AP", "keep-ap.png"),
        row("3", "No Finding", "PA", "keep-nf.png"),
        row("", "COVID-19", "PA", "no-pid.png"),                       # missing_patientid
        row("4", "COVID-19", "PA", "../escape.png"),                   # unsafe_filename
        row("5", "COVID-19", "PA", ""),                                # unsafe_filename (empty)
        row("6", "COVID-19", "Axial", "ct.png", modality="CT"),        # modality
        row("7", "COVID-19", "PA", "mri.png", modality="MRI"),         # modality (unknown)
        row("8", "COVID-19", "PA", "nomod.png", modality=""),          # modality (empty)
        row("9", "todo", "PA", "todo.png"),                            # placeholder_finding
        row("10", "Unknown", "PA", "unknown.png"),                     # placeholder_finding
        row("11", "COVID-19", "L", "lateral.png"),                     # view
        row("12", "COVID-19", "AP Erect", "erect.png"),                # view
        row("13", "COVID-19", "?", "qmark.png"),                       # view
        row("14", "COVID-19", "PA", "absent.png", _absent="1"),        # missing_image
        row("15", "COVID-19", "AP Supine", "supine.png"),              # fallback_not_needed
    ]
    spill = "16,0,COVID-19,PA,X-ray,images,spill.png,notes with, an unquoted comma"
    root = write_meta(tmp_path, rows, raw_lines=[spill, "", "17,0,COVID-19"])
    (root / "raw" / "images" / "spill.png").write_bytes(b"spill")
    result = relabel(Config(data_root=str(root), min_images_per_class=1), "run")

    expected = dict.fromkeys(REASONS, 0)
    expected.update(missing_patientid=1, unsafe_filename=2, modality=3, placeholder_finding=2, view=3,
                    missing_image=1, fallback_not_needed=1, malformed_row=2)
    assert result["dropped"] == expected
    assert result["class_counts"] == {"non_covid": 1, "covid": 2}
    assert result["fallback_used"] == {"non_covid": False, "covid": False}
    report = json.loads(Path(result["report"]).read_text())
    assert report["source_rows"] == 18  # the blank line is not a row
    assert report["kept"] + sum(report["dropped"].values()) == report["source_rows"]
    assert [r["reason"] for r in report["rules"]] == list(REASONS)
    assert report["dropped_examples"]["malformed_row"] == [18, 20]  # line numbers in metadata.csv
    assert sorted(r["filename"] for r in read_labeled(root)) == ["keep-ap.png", "keep-nf.png", "keep-pa.png"]


def test_labeled_columns_and_values(tmp_path: Path) -> None:
    root = write_meta(tmp_path, [
        row("311a", "Pneumonia/Viral/COVID-19", " ap ", "a.png", modality="x-ray"),
        row("2", "Pneumonia/Bacterial/Streptococcus", "PA", "b.png"),
    ])
    relabel(Config(data_root=str(root), min_images_per_class=0), "run")
    got = {r["filename"]: r for r in read_labeled(root)}
    assert list(next(iter(got.values()))) == ["filename", "patientid", "group_id", "finding", "view",
                                             "modality", "label", "sha256", "source_line"]
    assert got["a.png"]["patientid"] == "311a" and got["a.png"]["label"] == "covid"
    assert got["a.png"]["view"] == "AP" and got["a.png"]["modality"] == "X-ray"  # normalised spelling
    assert got["b.png"]["label"] == "non_covid"


@pytest.mark.parametrize(("minimum", "fallback_used", "kept_supine"), [
    (1, {"non_covid": False, "covid": False}, {"non_covid": 0, "covid": 0}),
    (3, {"non_covid": True, "covid": False}, {"non_covid": 2, "covid": 0}),
    (4, {"non_covid": True, "covid": True}, {"non_covid": 2, "covid": 1}),
])
def test_ap_supine_fallback_per_class(tmp_path: Path, minimum: int, fallback_used: dict[str, bool],
                                      kept_supine: dict[str, int]) -> None:
    rows = [row(str(i), "COVID-19", "PA", f"c{i}.png") for i in range(3)]
    rows += [row("10", "COVID-19", "AP Supine", "c-supine.png")]
    rows += [row("20", "No Finding", "AP", "n0.png"), row("21", "SARS", "PA", "n1.png")]
    rows += [row("22", "Pneumocystis", "AP Supine", "n-supine1.png"),
             row("23", "No Finding", "AP Supine", "n-supine2.png")]
    root = write_meta(tmp_path, rows)
    result = relabel(Config(data_root=str(root), min_images_per_class=minimum), "run")
    assert result["fallback_used"] == fallback_used
    assert result["primary_counts"] == {"non_covid": 2, "covid": 3}
    supine = {c: sum(1 for r in read_labeled(root) if r["view"] == "AP Supine" and r["label"] == c)
              for c in ("non_covid", "covid")}
    assert supine == kept_supine
    assert result["dropped"]["fallback_not_needed"] == 3 - sum(kept_supine.values())


def test_duplicate_filename_is_kept_once_and_links_patients(tmp_path: Path) -> None:
    root = write_meta(tmp_path, [
        row("285", "Pneumonia", "AP Supine", "shared.jpg"),
        row("339", "Pneumonia", "PA", "shared.jpg"),       # the PA row of the shared file wins
        row("339", "Pneumonia", "PA", "other-339.jpg"),
        row("400", "COVID-19", "PA", "c.jpg"),
        row("500", "Legionella", "L", "lateral.jpg"),      # dropped by view, still links 500 and 501
        row("501", "Legionella", "PA", "lateral.jpg"),
        row("501", "Legionella", "PA", "own-501.jpg"),
        row("500", "Legionella", "PA", "own-500.jpg"),
    ])
    result = relabel(Config(data_root=str(root), min_images_per_class=0), "run")
    labeled = {r["filename"]: r for r in read_labeled(root)}
    assert result["dropped"]["duplicate_filename"] == 1
    assert result["dropped"]["view"] == 1
    assert labeled["shared.jpg"]["patientid"] == "339" and labeled["shared.jpg"]["view"] == "PA"
    assert labeled["other-339.jpg"]["group_id"] == labeled["shared.jpg"]["group_id"]
    assert labeled["own-500.jpg"]["group_id"] == labeled["own-501.jpg"]["group_id"] == "500"
    assert labeled["c.jpg"]["group_id"] == "400"
    report = json.loads(Path(result["report"]).read_text())
    assert report["shared_filenames"] == {"lateral.jpg": ["500", "501"], "shared.jpg": ["285", "339"]}
    assert ["500", "501"] in report["linked_patients"]
    assert result["n_groups"] == 3


def test_identical_bytes_under_two_names(tmp_path: Path) -> None:
    same = b"the same x-ray, twice"
    root = write_meta(tmp_path, [
        row("1", "COVID-19", "PA", "a.jpg"),
        row("2", "COVID-19", "PA", "b.jpg"),
        row("2", "COVID-19", "AP", "b2.jpg"),
        row("3", "No Finding", "PA", "n.jpg"),
    ], images={"a.jpg": same, "b.jpg": same})
    result = relabel(Config(data_root=str(root), min_images_per_class=0), "run")
    labeled = {r["filename"]: r for r in read_labeled(root)}
    assert result["dropped"]["duplicate_image"] == 1
    assert "a.jpg" in labeled and "b.jpg" not in labeled
    assert labeled["a.jpg"]["group_id"] == labeled["b2.jpg"]["group_id"] == "1"
    assert len({r["sha256"] for r in labeled.values()}) == len(labeled)


def test_conflicting_labels_drop_the_image(tmp_path: Path) -> None:
    root = write_meta(tmp_path, [
        row("1", "COVID-19", "PA", "x.jpg"),
        row("2", "No Finding", "PA", "x.jpg"),
        row("1", "COVID-19", "PA", "y.jpg"),
        row("2", "No Finding", "PA", "z.jpg"),
    ])
    result = relabel(Config(data_root=str(root), min_images_per_class=0), "run")
    assert result["dropped"]["conflicting_label"] == 2
    assert sorted(r["filename"] for r in read_labeled(root)) == ["y.jpg", "z.jpg"]


def test_sample_data_counts(tmp_path: Path) -> None:
    root = sample_root(tmp_path)
    result = relabel(Config(data_root=str(root)), "run")
    # 101 rows, all X-ray with real findings in PA, AP or AP Supine; both classes are below 50
    # PA/AP images, so both take their AP Supine images.
    assert result["n_images"] == 101
    assert result["class_counts"] == {"non_covid": 11, "covid": 90}
    assert result["primary_counts"] == {"non_covid": 10, "covid": 47}
    assert result["fallback_used"] == {"non_covid": True, "covid": True}
    assert sum(result["dropped"].values()) == 0
    assert set(result) >= {"labeled_csv", "n_images", "n_patients", "class_counts", "dropped",
                           "fallback_used", "report"}
    json.dumps(result)  # XCom-safe


def test_sample_data_without_fallback(tmp_path: Path) -> None:
    root = sample_root(tmp_path)
    result = relabel(Config(data_root=str(root), min_images_per_class=10), "run")
    assert result["fallback_used"] == {"non_covid": False, "covid": False}
    assert result["class_counts"] == {"non_covid": 10, "covid": 47}
    assert result["dropped"]["fallback_not_needed"] == 44
    assert {r["view"] for r in read_labeled(root)} == {"PA", "AP"}


def test_rerun_gives_identical_files(tmp_path: Path) -> None:
    root = sample_root(tmp_path)
    cfg = Config(data_root=str(root))
    relabel(cfg, "run")
    first = [(root / n).read_bytes() for n in ("labeled.csv", "relabel_report.json")]
    relabel(cfg, "run")
    assert [(root / n).read_bytes() for n in ("labeled.csv", "relabel_report.json")] == first


def test_missing_inputs_fail_early(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        relabel(Config(data_root=str(tmp_path)), "run")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "metadata.csv").write_text("patientid,finding,filename\n1,COVID-19,a.png\n")
    with pytest.raises(ValueError, match="view, modality"):
        relabel(Config(data_root=str(tmp_path)), "run")


def test_no_image_of_a_class_fails(tmp_path: Path) -> None:
    root = write_meta(tmp_path, [row("1", "COVID-19", "PA", "a.png"), row("2", "todo", "PA", "b.png")])
    with pytest.raises(ValueError, match=r"no image of class\(es\) \['non_covid'\]"):
        relabel(Config(data_root=str(root)), "run")
    assert not (root / "labeled.csv").exists()


def test_near_identical_films_link_their_patients(tmp_path: Path) -> None:
    """A film re-encoded as JPEG under another patient id joins that patient's split group; a
    different film stays apart; with the linking off (-1) nothing is linked."""
    import io

    from PIL import Image

    films = sorted((SAMPLE / "images").glob("*.jpg"))[:2]
    with Image.open(films[0]) as img:
        copy = io.BytesIO()
        img.convert("RGB").save(copy, "JPEG", quality=60)
    images = {"a.jpg": films[0].read_bytes(), "a-copy.jpg": copy.getvalue(), "b.jpg": films[1].read_bytes()}
    rows = [row("p1", "COVID-19", "PA", "a.jpg"), row("p2", "COVID-19", "PA", "a-copy.jpg"),
            row("p3", "No Finding", "PA", "b.jpg")]
    for distance, linked in ((20, True), (-1, False)):
        root = write_meta(tmp_path / str(distance), rows, images)
        result = relabel(Config(data_root=str(root), min_images_per_class=0,
                                near_duplicate_distance=distance), "run")
        groups = {r["patientid"]: r["group_id"] for r in read_labeled(root)}
        assert (groups["p1"] == groups["p2"]) is linked and groups["p3"] != groups["p1"]
        assert result["near_duplicate_pairs"] == (1 if linked else 0)
    report = json.loads((tmp_path / "20" / "relabel_report.json").read_text())
    [pair] = report["near_duplicates"]["pairs"]
    assert {pair["a"], pair["b"]} == {"a.jpg", "a-copy.jpg"} and pair["distance"] <= 20
    assert json.loads((tmp_path / "20" / "image_hashes.json").read_text())  # cached by SHA-256
