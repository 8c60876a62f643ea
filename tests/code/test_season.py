"""The season replay's parts on the sample data: weekly snapshots in row order, events that stay,
faults that last one week, and how a week's outcome is named (the full replay is `make season`)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import season_data as sd  # noqa: E402

SAMPLE = REPO / "sample_data"


def _rows(snapshot: Path) -> list[dict[str, str]]:
    with open(snapshot / "metadata.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_plans_have_a_normal_week_after_every_fault() -> None:
    for plan in (sd.full_plan(), sd.quick_plan()):
        faults = [w.number for w in plan if w.fault]
        assert faults and all(plan[n].fault is None for n in faults)  # the week after each is normal
        assert [w.fraction for w in plan] == sorted(w.fraction for w in plan) and plan[-1].fraction == 1.0
    full = sd.full_plan()
    assert {w.fault for w in full if w.fault} == set(sd.FAULTS)
    assert {w.event for w in full if w.event} == set(sd.EVENTS) and full[0].fraction == 0.4
    assert sum(1 for w in sd.quick_plan() if w.fault) >= 2


def test_snapshots_grow_in_row_order_and_events_stay(tmp_path: Path) -> None:
    builder = sd.SnapshotBuilder(SAMPLE, tmp_path / "work", tmp_path / "data")
    first, _ = builder.build(sd.Week(1, 0.5))
    second, done = builder.build(sd.Week(2, 0.7, event="replace_image"))
    a, b = _rows(first), _rows(second)
    assert b[: len(a)] == a and len(b) > len(a)  # the first rows, in order, and more of them
    name = done["event"]["filename"]
    assert (second / "images" / name).read_bytes() != (SAMPLE / "images" / name).read_bytes()
    _, removal = builder.build(sd.Week(3, 0.8, event="rows_removed"))
    fourth, _ = builder.build(sd.Week(4, 0.9))
    assert (fourth / "images" / name).read_bytes() == (second / "images" / name).read_bytes()  # stays
    gone = set(removal["event"]["filenames"])
    assert gone and not gone & {r["filename"] for r in _rows(fourth)}  # removed rows stay removed
    assert len(_rows(fourth)) == round(len(builder.rows) * 0.9) - len(gone)


def test_faults_last_one_week(tmp_path: Path) -> None:
    builder = sd.SnapshotBuilder(SAMPLE, tmp_path / "work", tmp_path / "data")
    renamed, _ = builder.build(sd.Week(1, 0.6, fault="schema_change"))
    assert "finding" not in _rows(renamed)[0] and "diagnosis" in _rows(renamed)[0]
    source, done = builder.build(sd.Week(2, 0.8, fault="one_class_source"))
    new = [r for r in _rows(source) if r["url"].startswith(sd.NEW_SOURCE_URL)]
    assert len(new) == done["fault_details"]["images"] > 0 and {r["finding"] for r in new} == {"COVID-19"}
    assert len({r["patientid"] for r in new}) == len(new)
    normal, _ = builder.build(sd.Week(3, 0.8))
    assert "finding" in _rows(normal)[0] and not any(r["url"].startswith(sd.NEW_SOURCE_URL)
                                                     for r in _rows(normal))
    truncated, done = builder.build(sd.Week(4, 0.9, fault="truncated_images"))
    for name in done["fault_details"]["truncated"]:
        assert (truncated / "images" / name).stat().st_size < (SAMPLE / "images" / name).stat().st_size


def test_near_duplicates_copy_the_pipeline_s_test_films(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with open(SAMPLE / "metadata.csv", newline="", encoding="utf-8") as fh:
        meta = list(csv.DictReader(fh))
    test_rows = [r for r in meta if r["modality"] == "X-ray"][:3]
    (data / "labeled.csv").write_text("filename,patientid\n" + "".join(
        f"{r['filename']},{r['patientid']}\n" for r in test_rows))
    (data / "split_assignments.json").write_text(json.dumps({"patients": {r["patientid"]: "test"
                                                                          for r in test_rows}}))
    builder = sd.SnapshotBuilder(SAMPLE, tmp_path / "work", data)
    snapshot, done = builder.build(sd.Week(1, 1.0, fault="near_duplicates_of_test"))
    copies = done["fault_details"]["copies"]
    assert copies and {c[0] for c in copies} <= {r["filename"] for r in test_rows}
    from covid_tasks import near_duplicates as nd

    for original, copy in copies:
        distance = nd.hamming(nd.dhash_file(SAMPLE / "images" / original),
                              nd.dhash_file(snapshot / "images" / copy))
        assert distance <= nd.DEFAULT_MAX_DISTANCE
    with pytest.raises(ValueError, match="no test film"):
        sd.SnapshotBuilder(SAMPLE, tmp_path / "w2", tmp_path / "empty").build(
            sd.Week(1, 1.0, fault="near_duplicates_of_test"))


def test_a_finding_corrected_is_one_pulled_in_an_earlier_week(tmp_path: Path) -> None:
    """The correction touches a 'todo' row the pipeline already holds, and it stays corrected."""
    source = tmp_path / "source"
    (source / "images").mkdir(parents=True)
    header = ["patientid", "finding", "view", "modality", "folder", "filename", "url"]
    rows = [[f"p{i}", "todo" if i in (1, 3) else "COVID-19", "PA", "X-ray", "images", f"f{i}.png", ""]
            for i in range(6)]
    for r in rows:
        (source / "images" / r[5]).write_bytes(b"x")
    with open(source / "metadata.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    data = tmp_path / "data"
    builder = sd.SnapshotBuilder(source, tmp_path / "work", data)
    with pytest.raises(ValueError, match="pulled in an earlier week"):
        builder.build(sd.Week(1, 1.0, event="finding_corrected"))  # nothing pulled yet
    (data / "raw").mkdir(parents=True)
    (data / "raw" / "manifest.json").write_text(json.dumps({"objects": {
        "images/f0.png": {"status": "ok"}, "images/f3.png": {"status": "ok"}}}))
    snapshot, done = builder.build(sd.Week(2, 1.0, event="finding_corrected"))
    assert done["event"]["filename"] == "f3.png" and done["event"]["from"] == "todo"
    later, _ = builder.build(sd.Week(3, 1.0))
    assert {r["filename"]: r["finding"] for r in _rows(later)}["f3.png"] == "COVID-19"
    assert {r["filename"]: r["finding"] for r in _rows(later)}["f1.png"] == "todo"


RESULTS = REPO / "benchmarks" / "results" / "season"


def _weeks() -> list[dict[str, str]]:
    with open(RESULTS / "weeks.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_the_committed_season_redraws_from_its_weeks(tmp_path: Path) -> None:
    import season

    (tmp_path / "weeks.csv").write_bytes((RESULTS / "weeks.csv").read_bytes())
    assert season.main(["--replot", str(tmp_path)]) == 0
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_set_adds_json_params_to_the_season_s() -> None:
    import season

    assert season._settings(["threshold_margin=0.1", "min_roc_auc=0.5", "gate_on=lower_bound",
                             "force=true"]) == {"threshold_margin": 0.1, "min_roc_auc": 0.5,
                                                "gate_on": "lower_bound", "force": True}
    with pytest.raises(SystemExit, match="PARAM=VALUE"):
        season._settings(["threshold_margin"])


def _weeks_of(results: Path) -> dict[str, dict[str, str]]:
    with open(results / "weeks.csv", newline="", encoding="utf-8") as fh:
        return {w["week"]: w for w in csv.DictReader(fh)}


def _table(doc: str, heading: str, weeks: dict[str, dict[str, str]]) -> list[list[str]]:
    """The cells of each week's row in the table under ``heading`` (up to the next ``## ``)."""
    text = (REPO / doc).read_text(encoding="utf-8")
    assert f"\n{heading}\n" in text, f"{doc} has no section {heading!r}"
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 4 and cells[0] in weeks:
            rows.append(cells)
    assert [r[0] for r in rows] == list(weeks), f"{doc}, {heading}: not one row per week"
    return rows


def _check_auc(week: dict[str, str], cells: list[str]) -> None:
    auc = next((c for c in cells[1:] if c[:2] in ("0.", "- ") or c == "-"), None)
    if week["roc_auc"]:
        assert auc is not None and auc.startswith(f"{float(week['roc_auc']):.3f}"), cells
    else:
        assert auc == "-", cells


@pytest.mark.parametrize("doc, heading", [("README.md", "## A season, replayed through the scheduler"),
                                          ("docs/season.md", "## Results")])
def test_the_season_tables_match_the_committed_results(doc: str, heading: str) -> None:
    """Each week's ROC AUC and decision in the docs' season table is the committed run's."""
    weeks = _weeks_of(RESULTS)
    for cells in _table(doc, heading, weeks):
        week = weeks[cells[0]]
        _check_auc(week, cells)
        text = " ".join(cells).lower()
        assert week["decision"] in text, (doc, cells)
        if week["version"]:
            assert f"v{week['version']}" in text, (doc, cells)


def test_the_second_season_table_matches_both_seasons_results() -> None:
    """docs/season.md's second table: the gate season's figures and decision, the first season's in
    brackets."""
    first, gate = _weeks_of(RESULTS), _weeks_of(RESULTS.parent / "season-gate")
    for cells in _table("docs/season.md", "## A second season: a threshold margin and a ranking floor", gate):
        week, before = gate[cells[0]], first[cells[0]]
        _check_auc(week, cells)
        assert week["roc_auc"] == before["roc_auc"]  # the same models: training is deterministic
        rates, decision = cells[2], cells[-1].replace("*", "").lower()
        if week["sensitivity"]:  # "s / s' (s0 / s0')", to 3 digits of weeks.csv's 4
            shown = [float(x) for x in rates.replace("(", " ").replace(")", " ").replace("/", " ").split()]
            wanted = [float(w[k]) for w in (week, before) for k in ("sensitivity", "specificity")]
            assert shown == pytest.approx(wanted, abs=6e-4), cells
        now_text, _, then_text = decision.rpartition("(")
        assert now_text.startswith(week["decision"]) and then_text.startswith(before["decision"]), cells
        for w, text in ((week, now_text), (before, then_text)):
            if w["version"]:
                assert f"v{w['version']}" in text, cells
