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
7. **evaluate**: threshold chosen on val; sensitivity and specificity on test, COVID positive;
   the current champion is scored on the same test images;
8. **register**: logs the run to MLflow; a model that passes the gate becomes a new version of
   `covid-xray-classifier` with the alias `challenger`, and takes the alias `champion` that
   services read only when it is not worse than the champion by more than **promotion_margin**.

Outputs of a run land in `<data_root>/runs/<run id>/` (models, plots, `metrics.json`,
`predictions.csv`); the registry holds the passing models.

#### Params
- **source_uri**: `s3://bucket/prefix`, `file:///path` or a folder; empty uses `COVID_SOURCE_URI`.
- **min_sensitivity** / **min_specificity**: the gate on the test split (0..1).
- **promotion_margin**: how much lower than the champion's test sensitivity or specificity a
  challenger may be and still be promoted.
- **epochs** / **finetune_epochs**: epochs of the frozen and the unfrozen phase.
- **img_size** / **batch_size**: square input size in pixels and images per batch (per GPU).
- **backbone**: `resnet50`, `mobilenet_v3_small` or `efficientnet_lite0`.
- **weights**: `imagenet`, `bundled` (efficientnet_lite0 only), `none`, or a weights file path.
- **force**: retrain even when the pull found nothing new.
"""

from __future__ import annotations

import logging
from typing import Any

import pendulum
from airflow.sdk import Param, dag, task

GPU = {"queue": "gpu", "pool": "gpu"}
log = logging.getLogger(__name__)


@dag(
    dag_id="covid_retraining",
    schedule="@weekly",
    start_date=pendulum.datetime(2026, 1, 5, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["covid", "retraining", "mlops"],
    default_args={"owner": "ml-team", "retries": 2, "retry_delay": pendulum.duration(minutes=2)},
    doc_md=__doc__,
    params={
        "source_uri": Param("", type="string", description="s3://bucket/prefix, file:// URI or folder; "
                            "empty uses COVID_SOURCE_URI"),
        "min_sensitivity": Param(0.80, type="number", minimum=0, maximum=1,
                                 description="Gate: minimum test sensitivity (COVID recall)"),
        "min_specificity": Param(0.70, type="number", minimum=0, maximum=1,
                                 description="Gate: minimum test specificity (non-COVID recall)"),
        "promotion_margin": Param(0.02, type="number", minimum=0, maximum=1,
                                  description="Allowed drop vs the champion on either gate metric"),
        "epochs": Param(5, type="integer", minimum=0, maximum=200, description="Frozen-backbone epochs"),
        "finetune_epochs": Param(10, type="integer", minimum=0, maximum=200,
                                 description="Fine-tuning epochs (early stopping may end sooner)"),
        "img_size": Param(224, type="integer", minimum=32, maximum=1024, description="Input size in pixels"),
        "batch_size": Param(16, type="integer", minimum=1, maximum=1024, description="Images per batch"),
        "backbone": Param("resnet50", type="string",
                          enum=["resnet50", "mobilenet_v3_small", "efficientnet_lite0"]),
        "weights": Param("imagenet", type="string", minLength=1,
                         description="imagenet, bundled (efficientnet_lite0), none, or a weights file path"),
        "force": Param(False, type="boolean", description="Retrain even when no new data arrived"),
    },
)
def covid_retraining() -> None:
    @task(retries=3, retry_delay=pendulum.duration(minutes=1), retry_exponential_backoff=True)
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

    @task
    def evaluate() -> dict[str, Any]:
        """Threshold on val, sensitivity/specificity on test, gate decision."""
        from covid_tasks.airflow_support import run_stage

        return run_stage("evaluate")

    @task
    def register(pulled: dict[str, Any], evaluated: dict[str, Any]) -> dict[str, Any]:
        """Log the run to MLflow; register and promote the model if it passed the gate."""
        from covid_tasks.airflow_support import run_stage

        return run_stage("register", context={"dataset_version": pulled["dataset_version"]})

    pulled = pull()
    relabelled = relabel()
    check_new_data(pulled) >> relabelled
    evaluated = evaluate()
    relabelled >> split() >> train() >> finetune() >> evaluated
    register(pulled, evaluated)


covid_retraining()
