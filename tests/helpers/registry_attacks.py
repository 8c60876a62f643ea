"""Attempts to take over the MLflow registry as a read-only user (issue 19, item 2).

``take_over(url, login)`` replays what a read-only user (``inference``, ``viewer``) did on a fresh
stack before the pipeline's first registration: create an experiment, a run, upload an artifact,
create a logged model, create the pipeline's registered model (and another one), add a version,
set the ``champion`` alias and delete the model. It returns each call's HTTP status; every one
must be 403. ``snapshot(url, admin)`` is what must not change: the registered model, its
versions and aliases, and the experiments.

Used by tests/deploy/test_security.py (a real ``mlflow server`` started by docker/mlflow_auth.py)
and tests/deploy/stack (the process stack's MLflow).
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

API = "/api/2.0/mlflow"
MODEL = "covid-xray-classifier"
EXPERIMENT = "covid-retraining"


def call(url: str, method: str, path: str, login: tuple[str, str] | None, body: Any = None,
         data: bytes | None = None) -> tuple[int, Any]:
    """(HTTP status, parsed JSON body or ``None``) of one request as ``login`` (``None``: anonymous)."""
    headers = {}
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if login:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw.strip().startswith(b"{") else None
    except ValueError:
        return status, None


def take_over(url: str, login: tuple[str, str], model: str = MODEL) -> dict[str, int]:
    """Every take-over step as ``login``; returns ``step -> HTTP status``.

    Steps that need an id from an earlier step use what that step returned when it succeeded
    (the attack on an unprotected server), else the pipeline's experiment and a made-up run id.
    """
    tag = uuid.uuid4().hex[:8]
    out: dict[str, int] = {}
    out["experiments/create"], created = call(url, "POST", f"{API}/experiments/create", login,
                                              {"name": f"takeover-{login[0]}-{tag}"})
    experiment_id = (created or {}).get("experiment_id") or _experiment_id(url, login) or "0"
    out["runs/create"], run = call(url, "POST", f"{API}/runs/create", login, {"experiment_id": experiment_id})
    run_id = ((run or {}).get("run") or {}).get("info", {}).get("run_id") or uuid.uuid4().hex
    artifact = f"{experiment_id}/{run_id}/artifacts/model/planted-{tag}.txt"
    out["artifact upload"], _ = call(url, "PUT", f"/api/2.0/mlflow-artifacts/artifacts/{artifact}", login,
                                     data=b"planted by a read-only user")
    out["logged-models/create"], _ = call(url, "POST", f"{API}/logged-models", login,
                                          {"experiment_id": experiment_id, "name": f"takeover-{tag}"})
    out["registered-models/create (pipeline's)"], _ = call(url, "POST", f"{API}/registered-models/create",
                                                           login, {"name": model})
    out["registered-models/create (other)"], _ = call(url, "POST", f"{API}/registered-models/create", login,
                                                      {"name": f"takeover-{tag}"})
    source = f"mlflow-artifacts:/{experiment_id}/{run_id}/artifacts/model"
    out["model-versions/create"], version = call(url, "POST", f"{API}/model-versions/create", login,
                                                 {"name": model, "source": source, "run_id": run_id})
    number = ((version or {}).get("model_version") or {}).get("version") or "1"
    out["registered-models/alias champion"], _ = call(url, "POST", f"{API}/registered-models/alias", login,
                                                      {"name": model, "alias": "champion", "version": number})
    out["registered-models/delete"], _ = call(url, "DELETE", f"{API}/registered-models/delete", login,
                                              {"name": model})
    return out


def _experiment_id(url: str, login: tuple[str, str]) -> str | None:
    query = urllib.parse.urlencode({"experiment_name": EXPERIMENT})
    status, body = call(url, "GET", f"{API}/experiments/get-by-name?{query}", login)
    return body["experiment"]["experiment_id"] if status == 200 else None


def snapshot(url: str, admin: tuple[str, str], model: str = MODEL) -> dict[str, Any]:
    """The registry as the admin sees it: the model (``None`` when absent), versions, experiments."""
    status, got = call(url, "GET", f"{API}/registered-models/get?name={urllib.parse.quote(model)}", admin)
    assert status in (200, 404), (status, got)
    registered = None
    if status == 200:
        rm = got["registered_model"]
        registered = {"name": rm["name"], "aliases": sorted((a["alias"], a["version"])
                                                            for a in rm.get("aliases", []))}
    query = urllib.parse.urlencode({"filter": f"name='{model}'"})
    status, found = call(url, "GET", f"{API}/model-versions/search?{query}", admin)
    assert status == 200, (status, found)
    versions = sorted((v["version"], v["source"], v.get("run_id"))
                      for v in (found or {}).get("model_versions", []))
    status, models = call(url, "GET", f"{API}/registered-models/search?max_results=1000", admin)
    assert status == 200, (status, models)
    status, exps = call(url, "POST", f"{API}/experiments/search", admin, {"max_results": 1000})
    assert status == 200, (status, exps)
    return {"model": registered, "versions": versions,
            "models": sorted(m["name"] for m in (models or {}).get("registered_models", [])),
            "experiments": sorted(e["name"] for e in (exps or {}).get("experiments", []))}


def permission(url: str, admin: tuple[str, str], resource_type: str, resource_id: str, user: str) -> str:
    """The permission that governs ``user`` on a resource (``resource_type`` ``registered_model`` with
    the model's name, or ``experiment`` with its id), as MLflow resolves it."""
    query = urllib.parse.urlencode({"username": user, "resource_type": resource_type,
                                    "resource_id": resource_id})
    status, body = call(url, "GET", f"/api/3.0/mlflow/users/permissions/get?{query}", admin)
    assert status == 200, (status, body)
    return body["permission"]
