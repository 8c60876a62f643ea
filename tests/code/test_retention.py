"""Retention: run folders lose their models beyond the last N (registered runs keep theirs), and
registry versions that are neither champion nor challenger are archived after K weeks."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from covid_tasks.layout import DataRoot
from covid_tasks.retention import archive_versions, prune_runs


def _runs(root: DataRoot, keys: list[str]) -> None:
    """Run folders with models and metrics, the first key the oldest."""
    for age, key in enumerate(reversed(keys)):
        run = root.run(key)
        run.path.mkdir(parents=True)
        for f in (run.train_model, run.finetune_model, run.model):
            f.write_bytes(b"x" * 1000)
        run.metrics.write_text("{}")
        stamp = time.time() - 3600 * (age + 1)
        for f in run.path.iterdir():
            os.utime(f, (stamp, stamp))


def test_models_beyond_the_last_runs_go_registered_ones_stay(tmp_path: Path) -> None:
    root = DataRoot(tmp_path)
    keys = [f"w{i}" for i in range(1, 7)]
    _runs(root, keys)
    out = prune_runs(root, keep_last=2, registered_keys={"w2"}, current_key="w6")
    assert sorted(out["runs_pruned"]) == ["w1", "w3", "w4"]
    assert out["files_removed"] == 9 and out["bytes_freed"] == 9000
    for key in keys:
        run = root.run(key)
        assert run.metrics.is_file()  # every week stays readable
        assert run.model.is_file() == (key in ("w2", "w5", "w6"))
    note = json.loads(root.run("w1").retention.read_text())
    assert note["bytes_freed"] == 3000 and "model.keras" in note["removed"]
    # The note does not make a pruned run "recent": a second pass removes nothing more.
    assert prune_runs(root, keep_last=2, registered_keys={"w2"}, current_key="w6")["runs_pruned"] == []
    assert prune_runs(root, keep_last=0, registered_keys=set(), current_key="w6")["runs_pruned"] == []


class _Version:
    def __init__(self, version: str, logical_date: str) -> None:
        self.version, self.tags = version, {"logical_date": logical_date}
        self.creation_timestamp = 0


class _Client:
    """The registry calls archive_versions makes, recorded (the season exercises the real store)."""

    def __init__(self, versions: list[_Version], aliases: dict[str, str]) -> None:
        self.versions, self.aliases, self.tags = versions, aliases, []

    def get_registered_model(self, name: str):
        return type("Model", (), {"aliases": self.aliases})()

    def search_model_versions(self, query: str):
        return self.versions

    def set_model_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self.tags.append((version, key, value))
        next(v for v in self.versions if v.version == version).tags[key] = value


def test_old_versions_without_an_alias_are_archived_never_the_champion() -> None:
    now = datetime(2026, 3, 1, tzinfo=timezone.utc)
    week = lambda n: (now - timedelta(weeks=n)).isoformat()  # noqa: E731
    client = _Client([_Version("1", week(9)), _Version("2", week(6)), _Version("3", week(5)),
                      _Version("4", week(1))], {"champion": "1", "challenger": "4"})
    assert archive_versions(client, "m", after_weeks=4, now=now) == ["2", "3"]
    assert ("2", "archived", "true") in client.tags and not any(v == "1" for v, _, _ in client.tags)
    assert archive_versions(client, "m", after_weeks=4, now=now) == []  # already archived
    assert archive_versions(client, "m", after_weeks=0, now=now) == []
