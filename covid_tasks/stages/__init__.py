"""The eight DAG steps, one module each, behind one call shape: ``stage(cfg, run_key, **extra)``.

Every stage takes the run's :class:`~covid_tasks.config.Config` (the data root, the source URI
and every setting come from it) and the run key, and returns a small JSON-able dict, the one
XCom stores. Extras are keyword-only: ``pull`` takes ``s3_options``, ``register`` ``context``.
The Airflow adapter (:mod:`covid_tasks.airflow_support`) and the CLI (:mod:`covid_tasks.cli`)
both call :func:`run`. Importing this package is cheap: the stages import TensorFlow, pandas and
MLflow inside their functions.
"""

from __future__ import annotations

from typing import Any, Callable

from covid_tasks.config import Config
from covid_tasks.stages.check_data import check_data
from covid_tasks.stages.evaluate import evaluate
from covid_tasks.stages.finetune import finetune
from covid_tasks.stages.pull import pull
from covid_tasks.stages.register import register
from covid_tasks.stages.relabel import relabel
from covid_tasks.stages.split import split
from covid_tasks.stages.train import train

#: The stages in pipeline order, by task id.
STAGES: dict[str, Callable[..., dict[str, Any]]] = {
    "pull": pull, "relabel": relabel, "check_data": check_data, "split": split, "train": train,
    "finetune": finetune, "evaluate": evaluate, "register": register,
}


def run(name: str, cfg: Config, run_key: str, **extra: Any) -> dict[str, Any]:
    """Run the stage ``name`` with the run's config and key.

    Raises:
        ValueError: ``name`` is not a stage.
    """
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name](cfg, run_key, **extra)
