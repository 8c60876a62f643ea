"""CLI: every step prints its result dict as JSON on the last line; errors are short and clear."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covid_tasks", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_pull_relabel_split_print_their_result_as_last_line(tmp_path):
    root = tmp_path / "data"
    pulled = _cli("pull", "--data-root", str(root), "--source", str(REPO / "sample_data"))
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    result = json.loads(pulled.stdout.strip().splitlines()[-1])
    assert result["new"] > 100 and result["has_changes"] is True
    relabelled = _cli("relabel", "--data-root", str(root))
    assert json.loads(relabelled.stdout.strip().splitlines()[-1])["class_counts"]["non_covid"] > 0
    split = _cli("split", "--data-root", str(root), "--set", "seed=7")
    counts = json.loads(split.stdout.strip().splitlines()[-1])["counts"]
    assert set(counts) == {"train", "val", "test"}


def test_missing_input_gives_a_clear_error(tmp_path):
    out = _cli("split", "--data-root", str(tmp_path))
    assert out.returncode == 1
    assert "labeled.csv" in out.stderr and "relabel" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_override_is_rejected(tmp_path):
    shutil.copytree(REPO / "sample_data", tmp_path / "src")
    out = _cli("relabel", "--data-root", str(tmp_path), "--set", "img_size=8")
    assert out.returncode == 1 and "img_size" in out.stderr


def test_predict_confidence_says_what_the_number_is():
    from covid_tasks.cli import confidence_note

    assert confidence_note(None, 0.9) == "uncalibrated model score, not the chance that this call is right"
    assert confidence_note({}, 0.3).endswith("; under 50%: the threshold below, not the larger score, "
                                             "sets the class")
    assert confidence_note({"method": "platt", "split": "val"}, 0.8) == (
        "calibrated probability: platt fitted on the val split")
    assert confidence_note("isotonic", 0.8) == "calibrated probability: isotonic"


def test_misspelt_override_is_refused_naming_the_valid_fields(tmp_path):
    out = _cli("relabel", "--data-root", str(tmp_path), "--set", "img_sise=32")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "unknown config field(s) 'img_sise'" in out.stderr
    assert "did you mean img_sise -> img_size" in out.stderr
