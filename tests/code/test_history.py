"""The run history: a line per run, replaced by a re-run of its key, and the timeline figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from covid_tasks import history
from covid_tasks.layout import DataRoot


def test_lines_are_kept_in_order_and_a_rerun_replaces_its_line(tmp_path: Path) -> None:
    root = DataRoot(tmp_path)
    history.record(root, run_key="w1", decision="promote", version=1, champion_version=1, roc_auc=0.7,
                   roc_auc_ci95=[0.6, 0.8], n_labelled=100, data_check="ok")
    history.record(root, run_key="w2", decision="blocked", data_check="block")
    history.record(root, run_key="w1", decision="challenger", version=2, champion_version=1)
    lines = history.load(root)
    assert [(e["run_key"], e["decision"]) for e in lines] == [("w2", "blocked"), ("w1", "challenger")]
    assert all(e["recorded_at"] for e in lines)
    root.history.write_text(root.history.read_text() + "{torn\n")
    assert len(history.load(root)) == 2
    out = history.timeline_figure(lines, tmp_path / "timeline.png")
    assert Path(out).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("bad", [{"decision": "promote"}, {"run_key": "w", "decision": "maybe"},
                                 {"run_key": "w", "decision": "reject", "colour": "red"}])
def test_a_bad_line_is_refused(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError, match="history line"):
        history.record(DataRoot(tmp_path), **bad)
