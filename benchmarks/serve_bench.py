"""Serving benchmark: our inference service vs ``mlflow models serve`` on the same registered version.

Both servers run on this machine, one process each, and serve one registered version:

* ours (``python -m covid_tasks.serve``) gets the JPEG files as multipart uploads and decodes
  them itself with ``load_image`` (as training does);
* the peer (``mlflow models serve --env-manager local``) gets the equivalent tensors, decoded
  beforehand by this script with the same ``load_image``, as MLflow's JSON ``{"inputs": ...}``.

Request bodies are prepared before timing; one client sends requests one after another. Printed:
p50 and p95 latency of a one-image request, and images per second for requests of 1, 8 and 32
images, side by side, with the ratio (ours / peer for throughput, peer / ours for latency, so
above 1 means ours is faster). This is a script, not a test.

By default it registers EfficientNet-Lite0 (bundled ImageNet weights, the ``make run`` backbone)
at 224 px with the pipeline's own evaluate and register into a temporary SQLite store; or
point it at a registry whose champion to use::

    python benchmarks/serve_bench.py
    python benchmarks/serve_bench.py --tracking-uri sqlite:///$PWD/mlflow/mlflow.db   # after make run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
BATCHES = (1, 8, 32)


def _register_bench_model(root: Path, img_size: int, name: str) -> str:
    """Register Lite0 at ``img_size`` into a SQLite store under ``root``; return the tracking URI."""
    from covid_tasks.config import Config
    from covid_tasks.model import build_model
    from covid_tasks.stages.evaluate import evaluate
    from covid_tasks.stages.register import register
    from tests.helpers import tiny_run

    uri = f"sqlite:///{root / 'mlflow.db'}"
    data = tiny_run.make_data_root(root / "data")
    cfg = Config(data_root=str(data), mlflow_tracking_uri=uri, model_name=name, experiment_name="serve-bench",
                 backbone="efficientnet_lite0", weights="bundled", img_size=img_size, batch_size=16,
                 min_sensitivity=0.0, min_specificity=0.0)
    tiny_run.write_model_run(cfg, "bench", build_model(cfg))
    evaluate(cfg, "bench")
    register(cfg, "bench")
    return uri


def _start_peer(uri: str, name: str, version: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", f"models:/{name}/{version}",
           "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300.0) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def _timed(send: Callable[[], Any], n: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        send()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        send()
        times.append(time.perf_counter() - start)
    return times


def _senders(ours: str, peer: str, images: list[Path], img_size: int) -> dict[str, Callable[[int], Any]]:
    """Per server, a function ``batch -> sender`` with the request body prepared in advance."""
    import numpy as np
    import requests

    from covid_tasks.images import load_image

    files = [(p.name, p.read_bytes()) for p in images]
    tensors = [load_image(p, img_size) for p in images]
    session = requests.Session()

    def pick(items: list[Any], n: int) -> list[Any]:
        return [items[i % len(items)] for i in range(n)]

    def ours_sender(n: int) -> Callable[[], Any]:
        body = [("file", f) for f in pick(files, n)]

        def send() -> Any:
            r = session.post(f"{ours}/v1/predict", files=body, timeout=300)
            r.raise_for_status()
            assert len(r.json()["predictions"]) == n
        return send

    def peer_sender(n: int) -> Callable[[], Any]:
        body = json.dumps({"inputs": np.stack(pick(tensors, n)).tolist()}).encode()

        def send() -> Any:
            r = session.post(f"{peer}/invocations", data=body, headers={"Content-Type": "application/json"},
                             timeout=300)
            r.raise_for_status()
            assert len(r.json()["predictions"]) == n
        return send

    return {"ours": ours_sender, "peer": peer_sender}


def _measure(senders: dict[str, Callable[[int], Any]], latency_n: int, images_per_batch: int
             ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for who, make in senders.items():
        lat = sorted(_timed(make(1), latency_n))
        out[(who, "p50")] = statistics.median(lat) * 1000
        out[(who, "p95")] = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))] * 1000
        for batch in BATCHES:
            reps = max(3, images_per_batch // batch)
            out[(who, batch)] = batch * reps / sum(_timed(make(batch), reps, warmup=1))
    return out


def _table(m: dict[str, Any], explain_p50: float, img_size: int) -> str:
    rows = [f"| one request at {img_size} px | ours (image files) | `mlflow models serve` (tensors) "
            "| ours vs peer |", "|---|---:|---:|---:|"]
    for key, label in (("p50", "latency p50, 1 image (ms)"), ("p95", "latency p95, 1 image (ms)")):
        ours, peer = m["ours", key], m["peer", key]
        rows.append(f"| {label} | {ours:.1f} | {peer:.1f} | {peer / ours:.2f}x |")
    for batch in BATCHES:
        ours, peer = m["ours", batch], m["peer", batch]
        rows.append(f"| throughput, {batch} image{'s' if batch > 1 else ''} per request (images/s) | "
                    f"{ours:.1f} | {peer:.1f} | {ours / peer:.2f}x |")
    rows.append(f"| latency p50, 1 image with `explain=true` (ms) | {explain_p50:.1f} | - | - |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table.

    Returns:
        0 (the figures are for reading; the goal is stated beside the table).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri",
                        help="registry to use (default: register a fresh model in a temporary store)")
    parser.add_argument("--model-name", default="covid-xray-classifier")
    parser.add_argument("--img-size", type=int, default=224, help="input size of the model registered here")
    parser.add_argument("--latency-requests", type=int, default=60)
    parser.add_argument("--images-per-batch-size", type=int, default=96, help="images sent per batch size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import requests

    from covid_tasks.registry import alias_version
    from tests.helpers.serve_stack import ServeProcess, free_port

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        root = Path(tmp)
        uri = args.tracking_uri or _register_bench_model(root, args.img_size, args.model_name)
        champion = alias_version(args.model_name, "champion", uri)
        if champion is None:
            raise SystemExit(f"no champion of {args.model_name} in {uri}; make run, or omit --tracking-uri")
        env = {"COVID_MLFLOW_TRACKING_URI": uri, "COVID_MODEL_NAME": args.model_name}
        ours = ServeProcess(root, env).start()
        port = free_port()
        peer = _start_peer(uri, args.model_name, str(champion.version), port, root / "peer.log")
        try:
            ours.wait_alive()
            ours.wait_for(lambda b: b["ready"], timeout=300, what="our service ready")
            _wait(f"http://127.0.0.1:{port}/ping", peer, root / "peer.log")
            info = requests.get(f"{ours.url}/v1/model", timeout=10).json()
            images = sorted((REPO / "sample_data" / "images").glob("*.jpg"))
            senders = _senders(ours.url, f"http://127.0.0.1:{port}", images, info["img_size"])
            figures = _measure(senders, args.latency_requests, args.images_per_batch_size)
            one = {"file": (images[0].name, images[0].read_bytes())}
            url = f"{ours.url}/v1/predict?explain=true"
            explain_times = _timed(lambda: requests.post(url, files=one, timeout=60).raise_for_status(),
                                   args.latency_requests // 2)
        finally:
            ours.stop()
            os.killpg(peer.pid, signal.SIGTERM)
            peer.wait(30)
    print(f"model {args.model_name} version {champion.version} ({info['backbone']}, {info['img_size']} px), "
          f"{len(images)} sample JPEGs, {os.cpu_count()} CPUs, one client, sequential requests")
    print(_table(figures, statistics.median(explain_times) * 1000, info["img_size"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
