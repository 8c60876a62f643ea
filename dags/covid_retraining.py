"""
### COVID-19 chest X-ray classifier: weekly retraining

Each run takes the newest chest X-rays and `metadata.csv` (the layout of the public
ieee8023 covid-chestxray-dataset) and, step by step:

1. **pull**: copies new and changed files from the source into `<data_root>/raw/` (incremental);
2. **check_new_data**: skips the rest when nothing changed, unless **force** is on;
3. **relabel**: keeps X-ray PA/AP views (AP Supine as a per-class fallback), drops `todo`,
   `Unknown` and CT; COVID-19 findings become `covid`, all others `non_covid` (`labeled.csv`);
4. **split**: train/val/test, stratified by label, grouped by patient, stable week to week;
5. **train**: the head on a frozen ImageNet backbone (queue and pool `gpu`);
6. **finetune**: all layers unfrozen (BatchNorm frozen), class weights, lr 1e-5,
   best-epoch checkpoint and early stopping (queue and pool `gpu`);
7. **evaluate**: calibration and threshold fitted on val; sensitivity and specificity on test,
   COVID positive; the current champion is scored on the same test images; a shortcut audit
   scores test with the lungs hidden; the gate's verdict (passed or rejected, and why) is an
   event of the asset `covid-xray-evaluation`;
8. **register**: logs the run to MLflow; a model that passes the gate becomes a new version of
   `covid-xray-classifier` with the alias `challenger`, and takes the alias `champion` that
   services read only when a paired bootstrap shows it non-inferior to the champion within
   **promotion_margin**; the decision (promoted or challenger) is an event of the asset
   `covid-xray-classifier`. **A rejected model ends `register` as skipped** (the reason is in its
   log and XCom); the run still succeeds.

Outputs of a run land in `<data_root>/runs/<run id>/` (models, plots, `metrics.json`,
`predictions.csv`); the registry holds the passing models.

**Schedule:** Sundays 00:00 UTC, one run at a time. Unpausing never starts a run for a week that
has already begun; after a pause across a Sunday, the latest missed week runs at once.
**Failures:** errors no retry can fix (a bad Param, missing weights or inputs, an empty data set or
class, a corrupt file) fail the task at once; S3 or MLflow outages are retried.

#### Params
Defaults are those of `covid_tasks.config.Config`; a Param overrides the `COVID_<FIELD>` variable.

- **source_uri**: `s3://bucket/prefix`, `file:///path` or a folder; empty uses `COVID_SOURCE_URI`.
- **min_sensitivity** / **min_specificity**: the gate on the test split (0..1).
- **gate_on**: `point` (the test estimates) or `lower_bound` (their 95% Wilson lower bounds).
- **promotion_margin**: non-inferiority margin: promote when the lower 95% bound of challenger minus
  champion in ROC AUC, sensitivity and specificity is at least minus this.
- **shortcut_blocks_promotion**: a shortcut-audit warning also blocks promotion.
- **epochs** / **finetune_epochs**: epochs of the frozen and the unfrozen phase.
- **img_size** / **batch_size**: square input size in pixels and images per batch (per GPU).
- **backbone**: `efficientnet_lite0`, `efficientnet_lite1`, `efficientnet_lite2`, `resnet50` or
  `mobilenet_v3_small`.
- **weights**: `imagenet` (for the EfficientNet-Lite backbones the bundled copy, no download; the
  others download it or read the Keras cache), `bundled` (EfficientNet-Lite only), `none`, or a
  weights file path.
- **multiscale** / **lung_gate** / **head** / **finetune_top_blocks**: the recipe (see
  docs/model-quality.md): mid-level features pooled with the top ones; everything outside the lungs
  greyed out by a frozen segmenter inside the model; the head fitted as an L2 logistic regression
  (`probe`) or with Adam (`adam`); fine-tune the whole backbone (0) or its last n blocks.
- **force**: retrain even when the pull found nothing new.
"""

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

    @task.short_circuit
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
