"""Regenerate the examples the README and docs/serving.md show, from one real run.

    .venv/bin/python scripts/readme_examples.py

runs ``make run`` (a full DAG run on the sample data), then ``predict`` on two sample films, then the
inference service on the registered champion, and writes their real output between the markers
``<!-- example:NAME -->`` and ``<!-- /example:NAME -->``. tests/code/test_docs.py checks that the
examples agree with each other (one threshold, one version, one P(covid) per film), so an example
from an older run cannot stay behind unnoticed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
SHOWN = "/path/to/covid-xray-retrain"
FILMS = ("sample_data/images/00cfd1c1.jpg", "sample_data/images/00870a9c.jpg")
STORE = f"sqlite:///{REPO / 'mlflow' / 'mlflow.db'}"


def _shorten(text: str) -> str:
    return text.replace(str(REPO), SHOWN)


def make_run() -> str:
    out = subprocess.run(["make", "run"], cwd=REPO, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"make run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    lines = out.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("make run:"))
    last = next(i for i, line in enumerate(lines) if line.startswith("DAG run "))
    return _shorten("\n".join(lines[first:last + 1]))


def predict() -> tuple[str, dict]:
    env = {**os.environ, "COVID_MLFLOW_TRACKING_URI": STORE}
    args = [str(BIN / "python"), "-m", "covid_tasks", "predict", *FILMS,
            "--model", "models:/covid-xray-classifier@champion"]
    text = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(subprocess.run([*args, "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                                       check=True).stdout.splitlines()[-1])
    command = ("$ COVID_MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow/mlflow.db .venv/bin/python -m covid_tasks "
               "predict \\\n      " + " ".join(FILMS) + " --model models:/covid-xray-classifier@champion")
    return command + "\n" + text.strip(), result


def serve() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "COVID_MLFLOW_TRACKING_URI": STORE, "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen([str(BIN / "python"), "-m", "covid_tasks.serve", "--port", str(port)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(180):
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(1)
        boundary = uuid.uuid4().hex
        film = REPO / FILMS[0]
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{film.name}\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n")
        body = head.encode() + film.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(f"{base}/v1/predict", body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.load(resp)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _service_block(answer: dict) -> str:
    answer["model"]["run_id"] = answer["model"]["run_id"][:6] + "..."
    for item in answer["predictions"]:
        item["run_id"] = item["run_id"][:6] + "..."
    text = json.dumps(answer, indent=1)
    lines = ["make run      # trains and registers a champion in the embedded store (mlflow/mlflow.db)",
             "make serve    # http://127.0.0.1:8000/ (SERVE_PORT=... to change); Ctrl-C stops it",
             f"curl -F file=@{FILMS[0]} 127.0.0.1:8000/v1/predict"]
    return "\n".join(lines + [f"# {line}" for line in text.splitlines()])


def replace(path: Path, name: str, fenced: str, lang: str = "text") -> None:
    text = path.read_text()
    pattern = re.compile(rf"(<!-- example:{name} -->\n)```[a-z]*\n.*?\n```(\n<!-- /example:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no example:{name} block")
    path.write_text(pattern.sub(lambda m: f"{m.group(1)}```{lang}\n{fenced}\n```{m.group(2)}", text))


def main() -> int:
    run = make_run()
    shown, result = predict()
    answer = serve()
    replace(REPO / "README.md", "make-run", run)
    replace(REPO / "README.md", "predict", shown)
    replace(REPO / "docs" / "serving.md", "serve", _service_block(answer), "bash")
    prob = next(p["prob_covid"] for p in result["predictions"] if p["image"].endswith(Path(FILMS[0]).name))
    replace(REPO / "docs" / "serving.md", "models-serve", f"{{'predictions': [[{prob}]]}}")
    print("examples regenerated from one real run: README.md, docs/serving.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
