"""The registered model also works with ``mlflow models serve`` (its pyfunc flavour and signature).

Some teams serve registered versions with MLflow's own scoring server, fed tensors instead of
image files. This starts ``mlflow models serve`` on version 1 from the test registry (with the
virtual environment's ``bin/`` on PATH: MLflow runs ``uvicorn`` from PATH) and checks that it
answers the same P(covid) as the Keras model for images decoded with ``load_image``, and that
its signature refuses a tensor of the wrong shape.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests

from tests.helpers.procs import stop_group
from tests.helpers.serve_stack import IMG_SIZE, MODEL, SAMPLES, free_port

pytestmark = pytest.mark.mlflow_server


@pytest.fixture(scope="module")
def scoring_server(serve_stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("pyfunc") / "models-serve.log"
    bin_dir = str(Path(sys.executable).parent)
    # Both URIs: mlflow.set_registry_uri (register calls it) exports MLFLOW_REGISTRY_URI to this
    # process's environment, so an earlier test's SQLite registry would otherwise be inherited.
    env = {**os.environ, "MLFLOW_TRACKING_URI": serve_stack.registry.url,
           "MLFLOW_REGISTRY_URI": serve_stack.registry.url,
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "2",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}/1",
           "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"mlflow models serve exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /ping answer:\n{log_path.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        yield url
    finally:
        stop_group(proc, 15.0)


def test_mlflow_models_serve_answers_the_keras_model_s_probabilities(scoring_server: str,
                                                                    serve_stack: Any) -> None:
    from covid_tasks.images import load_image

    images = SAMPLES[:3]
    batch = np.stack([load_image(p, IMG_SIZE) for p in images])
    response = requests.post(f"{scoring_server}/invocations", json={"inputs": batch.tolist()}, timeout=120)
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["predictions"], dtype=float).reshape(-1)
    want = [serve_stack.expected("1", p) for p in images]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_mlflow_models_serve_enforces_the_signature(scoring_server: str) -> None:
    response = requests.post(f"{scoring_server}/invocations", json={"inputs": [[1.0, 2.0, 3.0]]}, timeout=60)
    assert response.status_code == 400
    assert f"(-1, {IMG_SIZE}, {IMG_SIZE}, 3)" in response.json()["message"]
