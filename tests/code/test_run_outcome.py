"""A run's outcome in one word: from the task states, the data-check verdict and register's result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from covid_tasks.config import Config
from covid_tasks.layout import DataRoot
from covid_tasks.run_outcome import decide, outcome


@pytest.mark.parametrize(("states", "verdict", "registered", "expected"), [
    ({"pull": "failed"}, "block", None, "blocked"),
    ({"check_data": "failed"}, "block", None, "blocked"),
    ({"relabel": "skipped", "check_new_data": "success"}, None, None, "skipped"),
    ({"evaluate": "success", "register": "success"}, "ok", {"decision": "promote"}, "promote"),
    ({"evaluate": "success", "register": "success"}, "warn", {"decision": "challenger"}, "challenger"),
    ({"evaluate": "success", "register": "skipped"}, "ok", {"decision": "reject"}, "reject"),
    ({"train": "failed", "finetune": "upstream_failed"}, "ok", None, "failed"),
])
def test_a_run_s_decision(states: dict, verdict: str | None, registered: dict | None, expected: str) -> None:
    assert decide(states, verdict, registered) == expected


def test_the_summary_says_why(tmp_path: Path) -> None:
    cfg = Config(data_root=str(tmp_path))
    skipped = outcome(cfg, "w1", {"relabel": "skipped"}, {"dataset_version": "abc"}, None)
    assert skipped["decision"] == "skipped" and "no new or changed data" in skipped["summary"]
    assert "abc" in skipped["summary"]
    failed = outcome(cfg, "w2", {"pull": "success", "train": "failed"}, None, None)
    assert failed["failed_task"] == "train" and "failed at task train" in failed["summary"]
    run = DataRoot.of(cfg).run("w3")
    run.path.mkdir(parents=True)
    report = {"verdict": "block", "summary": "data checks: block, label_changes"}
    run.data_checks.write_text(json.dumps(report))
    blocked = outcome(cfg, "w3", {"check_data": "failed"}, None, None)
    assert blocked["decision"] == "blocked" and "label_changes" in blocked["summary"]
    promoted = outcome(cfg, "w4", {"evaluate": "success", "register": "success"}, None,
                       {"registered": True, "promoted": True, "version": 3, "decision": "promote"})
    assert promoted["version"] == 3 and "promoted to @champion" in promoted["summary"]
