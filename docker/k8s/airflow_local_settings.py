"""Airflow cluster policy for the Kubernetes route: tasks on queue ``gpu`` run in a GPU pod.

The DAG stays executor-agnostic (``queue="gpu"``, ``pool="gpu"``); on a cluster this policy adds
the ``pod_override`` that asks for ``nvidia.com/gpu`` and the GPU image. Install it as
``$AIRFLOW_HOME/config/airflow_local_settings.py`` in the image used by the scheduler and the
DAG processor (the official Helm chart: ``airflowLocalSettings: |`` with this file's content).

Environment, set in the chart's ``env``:
- ``COVID_K8S_GPU_IMAGE``: the GPU worker image (required for the policy to act);
- ``COVID_K8S_GPUS_PER_TASK``: GPUs per task pod (default 1);
- ``COVID_K8S_GPU_EXECUTOR``: e.g. ``KubernetesExecutor`` when the deployment runs the
  multiple-executor setting ``CeleryExecutor,KubernetesExecutor`` and only GPU tasks get pods.
"""

from __future__ import annotations

import os
from typing import Any


def task_policy(task: Any) -> None:
    """Give every task on queue ``gpu`` a pod with GPUs, a GPU toleration and the GPU image."""
    image = os.environ.get("COVID_K8S_GPU_IMAGE")
    if getattr(task, "queue", None) != "gpu" or not image:
        return
    from kubernetes.client import models as k8s

    gpus = os.environ.get("COVID_K8S_GPUS_PER_TASK", "1")
    task.executor_config = {
        "pod_override": k8s.V1Pod(
            spec=k8s.V1PodSpec(
                containers=[
                    k8s.V1Container(
                        name="base",  # the task container of Airflow's pod template
                        image=image,
                        resources=k8s.V1ResourceRequirements(
                            limits={"nvidia.com/gpu": gpus}, requests={"nvidia.com/gpu": gpus}
                        ),
                    )
                ],
                tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
            )
        )
    }
    executor = os.environ.get("COVID_K8S_GPU_EXECUTOR")
    if executor:
        task.executor = executor
