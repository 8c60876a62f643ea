"""`make run`'s report: one readable line per task, the settings line and the error lines."""

from __future__ import annotations

import pytest

from covid_tasks.run_report import error_lines, key_result, report_lines, settings_line, task_line

PULL = {"n_images": 101, "new": 101, "changed": 0, "quarantined": 0, "dataset_version": "5d41402a",
        "has_changes": True}
RELABEL = {"n_images": 69, "n_patients": 41, "class_counts": {"covid": 40, "non_covid": 29},
           "dropped": {"modality": 20, "view": 12}}
SPLIT = {"counts": {s: {"covid": {"images": c, "patients": 1}, "non_covid": {"images": n, "patients": 1}}
                    for s, c, n in (("train", 28, 20), ("val", 6, 5), ("test", 6, 4))}}
EVALUATED = {"passed": False, "reasons": ["sensitivity 0.500 < 0.80"], "sensitivity": 0.5,
             "specificity": 0.75, "threshold": 0.4123}
REJECTED = {"registered": False, "promoted": False, "passed": False, "version": None,
            "reasons": ["sensitivity 0.500 < 0.80"], "champion_version": 2}


@pytest.mark.parametrize("task_id,result,expected", [
    ("pull", PULL, "101 images: 101 new, 0 changed, 0 quarantined; dataset 5d41402a"),
    ("check_new_data", True, "continue"),
    ("check_new_data", False, "no new data and force off: the rest is skipped"),
    ("relabel", RELABEL, "69 images of 41 patients: covid 40, non_covid 29; 32 rows dropped"),
    ("split", SPLIT, "images: train 48 (28 covid), val 11 (6 covid), test 10 (6 covid)"),
    ("train", {"epochs_run": 2, "best_val_auc": 0.71234}, "2 epochs, best val AUC 0.712"),
    ("train", {"head": "probe", "probe_c": 0.01, "epochs_run": 1, "best_val_auc": 0.7},
     "linear-probe head (C=0.01), val AUC 0.700"),
    ("evaluate", EVALUATED, "test sensitivity 0.500, specificity 0.750 at threshold 0.412: "
                            "gate REJECTED: sensitivity 0.500 < 0.80"),
    ("register", REJECTED, "rejected by the gate (sensitivity 0.500 < 0.80); nothing registered, "
                           "champion stays version 2"),
    ("register", {"registered": True, "promoted": True, "version": 3}, "version 3 registered and promoted "
                                                                       "to @champion"),
    ("register", {"registered": True, "promoted": False, "version": 3, "champion_version": 2,
                  "promotion_reasons": ["specificity 0.60 is 0.10 below the champion's 0.70"]},
     "version 3 registered as @challenger; champion stays version 2 (specificity 0.60 is 0.10 below the "
     "champion's 0.70)"),
])
def test_key_result_per_task(task_id, result, expected):
    assert key_result(task_id, result) == expected


def test_an_unexpected_result_is_shown_raw_not_crashing():
    assert key_result("split", {"counts": "odd"}) == '{"counts": "odd"}'
    assert key_result("other", [1, 2]) == "[1, 2]"
    assert key_result("pull", None) == ""


def test_task_line_columns_and_failed_tries():
    assert task_line("train", "success", 45.04, {"epochs_run": 2, "best_val_auc": 0.7}) == (
        "  train           success            45.0s  2 epochs, best val AUC 0.700")
    assert task_line("train", "failed", 3.2, None, tries=1) == (
        "  train           failed              3.2s  after 1 try; see the log below")
    assert task_line("relabel", "skipped", None) == "  relabel         skipped                -"
    assert task_line("register", None, None) == "  register        not run                -"


def test_report_has_one_line_per_task_and_the_run():
    run = {"run_id": "manual__1", "state": "success", "seconds": 61.4, "tasks": [
        {"task_id": "pull", "state": "success", "seconds": 1.0, "tries": 1, "result": PULL},
        {"task_id": "check_new_data", "state": "success", "seconds": 0.1, "tries": 1, "result": False},
        {"task_id": "relabel", "state": "skipped", "seconds": None, "tries": 0, "result": None}]}
    lines = report_lines(run)
    assert [line.split()[0] for line in lines[:3]] == ["pull", "check_new_data", "relabel"]
    assert lines[-1] == "DAG run manual__1: success in 61s"
    assert report_lines({}) == ["no run of covid_retraining in this Airflow home"]


def test_settings_line_layers_param_defaults_env_and_conf(monkeypatch):
    monkeypatch.setenv("COVID_SOURCE_URI", "/data/in")
    monkeypatch.setenv("COVID_EPOCHS", "9")  # a Param: the form's default wins over the environment
    line = settings_line({"img_size": 64})
    assert line.startswith("source_uri=/data/in, backbone=efficientnet_lite0, weights=imagenet, "
                           "multiscale=True, lung_gate=True, head=probe, img_size=64,")
    assert "epochs=5," in line and "force=False" in line


def test_error_lines_keep_the_final_message_of_each_failure():
    log = "\n".join([
        "2026-01-01T00:00:00Z [error ] Task failed with exception",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in f',
        "ValueError: invalid config: img_size must be >= 32, got 8",
        "",
        "The above exception was the direct cause of the following exception:",
        "airflow.sdk.exceptions.AirflowFailException: train: ValueError: invalid config: img_size must be "
        ">= 32, got 8 [not retried: bad configuration or data]",
        "covid_tasks.registry.RegistryUnavailableError: cannot reach http://mlflow:5000",
        "covid_tasks.registry.RegistryUnavailableError: cannot reach http://mlflow:5000",
    ])
    assert error_lines(log) == [
        "airflow.sdk.exceptions.AirflowFailException: train: ValueError: invalid config: img_size must be "
        ">= 32, got 8 [not retried: bad configuration or data]",
        "covid_tasks.registry.RegistryUnavailableError: cannot reach http://mlflow:5000",
    ]
