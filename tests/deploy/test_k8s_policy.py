"""The Kubernetes cluster policy gives exactly the DAG's GPU tasks a GPU pod."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("kubernetes")


def _policy():
    path = REPO / "docker" / "k8s" / "airflow_local_settings.py"
    spec = importlib.util.spec_from_file_location("covid_k8s_policy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.task_policy


@pytest.fixture
def dag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags")).dags["covid_retraining"]


def test_gpu_tasks_get_a_gpu_pod(dag, monkeypatch):
    monkeypatch.setenv("COVID_K8S_GPU_IMAGE", "registry.example/covid-xray-airflow-gpu:3.3.2")
    monkeypatch.setenv("COVID_K8S_GPUS_PER_TASK", "2")
    policy = _policy()
    for task in dag.tasks:
        policy(task)
    with_pod = {t.task_id for t in dag.tasks if "pod_override" in (t.executor_config or {})}
    assert with_pod == {"train", "finetune"}
    pod = dag.get_task("train").executor_config["pod_override"]
    container = pod.spec.containers[0]
    assert container.name == "base"
    assert container.image.endswith("covid-xray-airflow-gpu:3.3.2")
    assert container.resources.limits == {"nvidia.com/gpu": "2"}
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu"


def test_policy_is_inert_without_the_gpu_image(dag, monkeypatch):
    monkeypatch.delenv("COVID_K8S_GPU_IMAGE", raising=False)
    policy = _policy()
    for task in dag.tasks:
        policy(task)
    assert not any("pod_override" in (t.executor_config or {}) for t in dag.tasks)
