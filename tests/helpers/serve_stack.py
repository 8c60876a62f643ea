"""The inference service under test: a real ``mlflow server``, two registered versions, a real uvicorn.

``build_stack`` (behind the session fixture ``serve_stack`` in ``tests/code/conftest.py``):

1. registers two versions of :data:`MODEL` in the shared test ``mlflow server`` with the
   pipeline's own ``evaluate`` and ``register`` (EfficientNet-Lite0 with its bundled ImageNet
   weights at 64 px, two different heads, so every image has a different P(covid) per version);
   version 2's images carry the file names of ``sample_data/``, so register marks it a demo;
2. removes the ``champion`` alias, starts ``python -m covid_tasks.serve`` on a free loopback port
   and records what it answers while no version is champion;
3. points ``champion`` at version 1 and waits until the service serves it.

``expected(version, path)`` is P(covid) computed in the test process with the same Keras model,
so a test can tell which version produced an answer.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.helpers import tiny_run
from tests.helpers.mlflow_server import AVOID_PORTS, MlflowServer, shared_server
from tests.helpers.procs import stop_group

REPO = Path(__file__).resolve().parents[2]
MODEL = "covid-xray-classifier-serve-test"
IMG_SIZE = 64
SAMPLES = sorted((REPO / "sample_data" / "images").glob("*.jpg"))
#: Limits the service under test runs with (small, so the tests can exceed them cheaply).
LIMITS = {"COVID_SERVE_MAX_FILES": "4", "COVID_SERVE_MAX_FILE_MB": "1", "COVID_SERVE_MAX_REQUEST_MB": "3",
          "COVID_SERVE_MAX_PIXELS": "20000000", "COVID_SERVE_MAX_REQUEST_PIXELS": "30000000"}
POLL_S = "0.5"


def free_port(limit: int = 55000) -> int:
    """A free loopback port below ``limit`` (the project keeps every port under 55000)."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < limit and port not in AVOID_PORTS:
            return port
    raise RuntimeError(f"no free loopback port below {limit}")


class ServeProcess:
    """``python -m covid_tasks.serve`` in its own process group, logging to ``root/serve.log``."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = Path(root)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **env}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.root / "serve.log"

    def start(self) -> "ServeProcess":
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "covid_tasks.serve", "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, start_new_session=True)
        return self

    def wait_alive(self, timeout: float = 180.0) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"the service exited:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the service did not answer /healthz within {timeout:.0f}s:\n{self.tail()}")

    def wait_for(self, predicate: Any, timeout: float = 120.0, what: str = "condition") -> dict[str, Any]:
        """Poll ``/readyz`` until ``predicate(body)`` holds; return that body."""
        import requests

        deadline, body = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            body = requests.get(f"{self.url}/readyz", timeout=5).json()
            if predicate(body):
                return body
            time.sleep(0.25)
        raise AssertionError(f"{what} not reached within {timeout:.0f}s; /readyz: {body}\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_group(self.proc, 15.0)

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class Stack:
    """What the serve tests share."""

    registry: MlflowServer
    service: ServeProcess
    models: dict[str, Any]
    versions: dict[str, Any]
    early: dict[str, Any] = field(default_factory=dict)

    @property
    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.registry.url, registry_uri=self.registry.url)

    def set_champion(self, version: str) -> None:
        self.client.set_registered_model_alias(MODEL, "champion", version)

    def tag_validation(self, version: str, labels: str, run_id: str = "fake-validation-run") -> None:
        """Tag ``version`` with an external validation (as ``validate --log`` does) and render its
        model card again, so the card lists it."""
        import json

        from covid_tasks.model_card import VERSION_TAG_PREFIX, refresh

        summary = {"run_id": run_id, "date": "2026-01-02T00:00:00+00:00", "labels": labels, "n": 40,
                   "n_covid": 20, "n_non_covid": 20, "roc_auc": 0.625, "roc_auc_ci95": [0.45, 0.8],
                   "sensitivity": 0.6, "sensitivity_ci95": [0.39, 0.78], "specificity": 0.55,
                   "specificity_ci95": [0.34, 0.74], "ece": 0.1, "within_source_roc_auc": 0.6}
        tag = f"{VERSION_TAG_PREFIX}{run_id}"
        self.client.set_model_version_tag(MODEL, version, tag, json.dumps(summary))
        assert refresh(self.client, MODEL, version, self.registry.url)

    def expected(self, version: str, path: Path) -> float:
        """P(covid) of ``version`` for the image file ``path``, computed here."""
        from covid_tasks.images import load_image

        batch = load_image(path, IMG_SIZE)[None]
        return float(np.asarray(self.models[version](batch, training=False)).reshape(-1)[0])


def make_models() -> dict[str, Any]:
    """Versions "1" and "2": one Lite0 backbone, two fixed random heads of opposite sign."""
    import keras

    from covid_tasks.config import Config
    from covid_tasks.model import build_model

    base = build_model(Config(backbone="efficientnet_lite0", weights="bundled", img_size=IMG_SIZE))
    kernel, _ = base.get_layer("prob_covid").get_weights()
    head = np.random.default_rng(7).normal(0.0, 0.05, kernel.shape).astype("float32")
    models = {}
    for version, (sign, bias) in {"1": (1.0, 0.0), "2": (-1.0, 0.5)}.items():
        model = keras.models.clone_model(base)
        model.set_weights(base.get_weights())
        model.get_layer("prob_covid").set_weights([sign * head, np.array([bias], dtype="float32")])
        models[version] = model
    return models


def register_versions(root: Path, url: str, models: dict[str, Any]) -> dict[str, Any]:
    """Evaluate and register each model with the pipeline's code; no ``champion`` afterwards."""
    from mlflow import MlflowClient

    from covid_tasks.config import Config
    from covid_tasks.stages.evaluate import evaluate
    from covid_tasks.stages.register import register

    roots = {"1": tiny_run.make_data_root(root / "data"),
             "2": as_sample_names(tiny_run.make_data_root(root / "data_sample_names"))}
    client = MlflowClient(url, registry_uri=url)
    out = {}
    for version, model in models.items():
        data = roots[version]
        cfg = Config(data_root=str(data), mlflow_tracking_uri=url, model_name=MODEL,
                     experiment_name="serve-test", batch_size=8, img_size=IMG_SIZE,
                     backbone="efficientnet_lite0", min_sensitivity=0.0, min_specificity=0.0,
                     source_uri=str(data),
                     calibration="none")  # the served model is then exactly ``model`` (see expected)
        key = f"serve_v{version}"
        tiny_run.write_model_run(cfg, key, model)
        evaluate(cfg, key)
        context = {"dataset_version": f"ds-{key}", "airflow_run_id": f"manual__{key}"}
        result = register(cfg, key, context=context)
        assert str(result["version"]) == version, result
        client.delete_registered_model_alias(MODEL, "champion")  # the next evaluate needs no champion
        out[version] = client.get_model_version(MODEL, version)
    return out


def as_sample_names(data: Path) -> Path:
    """Give a tiny data root's images the file names of ``sample_data/`` (a copy of the sample)."""
    import pandas as pd

    sample = pd.read_csv(REPO / "sample_data" / "metadata.csv", dtype=str, keep_default_na=False)
    frame = pd.read_csv(data / "splits.csv", dtype=str, keep_default_na=False)
    names = sorted(sample["filename"])[:len(frame)]
    for old, new in zip(frame["filename"], names, strict=True):
        (data / "raw" / "images" / old).rename(data / "raw" / "images" / new)
    frame["filename"] = names
    frame.to_csv(data / "splits.csv", index=False)
    return data


def build_stack(tmp_path_factory: Any) -> Stack:
    """Registry, two versions, the service; the 503 answers before any champion are in ``early``."""
    import requests

    registry = shared_server(tmp_path_factory)
    root = tmp_path_factory.mktemp("serve")
    models = make_models()
    versions = register_versions(root, registry.url, models)
    env = {"COVID_MLFLOW_TRACKING_URI": registry.url, "COVID_MODEL_NAME": MODEL, "COVID_SERVE_POLL_S": POLL_S,
           **LIMITS}
    service = ServeProcess(root, env).start()
    stack = Stack(registry, service, models, versions)
    try:
        service.wait_alive()
        service.wait_for(lambda b: b["registry"]["last_check"] is not None, what="first registry look-up")
        files = {"file": (SAMPLES[0].name, SAMPLES[0].read_bytes())}
        predict = requests.post(f"{service.url}/v1/predict", files=files, timeout=30)
        stack.early = {"readyz": requests.get(f"{service.url}/readyz", timeout=5), "predict": predict,
                       "model": requests.get(f"{service.url}/v1/model", timeout=5)}
        stack.set_champion("1")
        service.wait_for(lambda b: (b["model"] or {}).get("version") == "1", what="version 1 served")
    except BaseException:
        service.stop()
        raise
    return stack
