"""The stack's MLflow server app: MLflow's basic-auth app, and read-only users that can change nothing.

MLflow's basic auth lets every user create experiments, runs and registered models (the creator
then holds MANAGE on them), whatever ``default_permission`` says. This app wraps MLflow's
``basic-auth`` app and answers 403 to every change requested by a user of
``COVID_MLFLOW_READ_ONLY_USERS`` (comma-separated; docker/mlflow_auth.py sets it to the
inference and viewer users): a change is any request that is not GET, HEAD or OPTIONS, except the
POST endpoints that only search (:data:`READ_POSTS`). Everything else is left to MLflow's
permissions (the admin may do anything, the pipeline's user what its grants allow).

docker/mlflow_auth.py registers :func:`create_app` as the ``mlflow.app`` entry point
:data:`APP_NAME`, so the server runs as ``mlflow server --app-name=covid-basic-auth``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
from typing import Any

APP_NAME = "covid-basic-auth"
USERS_VAR = "COVID_MLFLOW_READ_ONLY_USERS"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: POST endpoints that change nothing (searches; GraphQL, whose mutations are searches in MLflow 3.17).
_SEARCHES = ("experiments/search", "runs/search", "logged-models/search",
             "registered-models/get-latest-versions", "datasets/search", "issues/search",
             "prompt-optimization/jobs/search", "traces/search", "traces/batchGetInfos", "traces/metrics",
             "traces/calculate-filter-correlation")
READ_POSTS = frozenset(
    [f"/{prefix}/{v}/mlflow/{s}" for prefix in ("api", "ajax-api") for v in ("2.0", "3.0") for s in _SEARCHES]
    + ["/api/2.0mlflow/experiments/search-datasets", "/ajax-api/2.0mlflow/experiments/search-datasets",
       "/ajax-api/3.0/jobs/search", "/graphql"])
GRAPHQL_READ_FIELDS = re.compile(r"mlflowSearch\w*|mlflowGet\w*|mlflowList\w*|test|testMutation")
log = logging.getLogger("covid.mlflow_app")


def is_change(method: str, path: str) -> bool:
    """Whether a request may change something: not a read method and not one of :data:`READ_POSTS`."""
    method = method.upper()
    if method in READ_METHODS:
        return False
    return not (method == "POST" and path in READ_POSTS)


def read_only_users(env: dict[str, str] | None = None) -> frozenset[str]:
    """The users of ``COVID_MLFLOW_READ_ONLY_USERS``; raises when none is named (nothing would be guarded)."""
    value = (os.environ if env is None else env).get(USERS_VAR, "")
    users = frozenset(u.strip() for u in value.split(",") if u.strip())
    if not users:
        raise RuntimeError(f"{USERS_VAR} names no user; start the server through docker/mlflow_auth.py")
    return users


def basic_login(header: str | None) -> tuple[str, str] | None:
    """(user, password) of an ``Authorization: Basic ...`` header, ``None`` for anything else."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        user, sep, pw = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, pw) if sep else None


def _authentic(user: str, pw: str) -> bool:
    from mlflow.server.auth import store

    return bool(store.authenticate_user(user, pw))


def refused(user: str, method: str, path: str) -> tuple[int, bytes]:
    """The 403 answer (MLflow's error format) to a change requested by a read-only user."""
    log.warning("refused %s %s: user %s is read-only", method, path, user)
    body = {"error_code": "PERMISSION_DENIED",
            "message": f"Permission denied: user {user} is read-only on this server ({method} {path})."}
    return 403, json.dumps(body).encode()


class ReadOnlyGuard:
    """ASGI middleware around the whole app (MLflow's Flask routes and its FastAPI routes alike).

    A change requested with the valid password of a read-only user gets 403; any other request,
    a wrong password included (MLflow answers 401), goes on to MLflow untouched.
    """

    def __init__(self, app: Any, users: frozenset[str]) -> None:
        self.app, self.users = app, users

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        kind = scope.get("type")
        method, path = scope.get("method", "GET"), scope.get("path", "")
        if kind == "websocket" or (kind == "http" and is_change(method, path)):
            headers = dict(scope.get("headers") or [])
            login = basic_login(headers.get(b"authorization", b"").decode("latin-1"))
            if login and login[0] in self.users and await asyncio.to_thread(_authentic, *login):
                status, body = refused(login[0], method, path)
                if kind == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def guard_flask(app: Any, users: frozenset[str]) -> Any:
    """The same rule as a Flask ``before_request`` hook run before MLflow's (gunicorn, waitress)."""
    from flask import Response, request

    def refuse_read_only_changes() -> Response | None:
        if not is_change(request.method, request.path):
            return None
        login = basic_login(request.headers.get("Authorization"))
        if login and login[0] in users and _authentic(*login):
            status, body = refused(login[0], request.method, request.path)
            return Response(body, status=status, mimetype="application/json")
        return None

    app.before_request_funcs.setdefault(None, []).insert(0, refuse_read_only_changes)
    return app


def _check_graphql() -> None:
    """Refuse to start when MLflow's GraphQL schema has a mutation that is not a search."""
    from mlflow.server.graphql.graphql_schema_extensions import schema

    mutation = schema.graphql_schema.mutation_type
    writes = [f for f in (mutation.fields if mutation else {}) if not GRAPHQL_READ_FIELDS.fullmatch(f)]
    if writes:
        raise RuntimeError(f"MLflow's GraphQL has mutations {writes}: /graphql is no longer read-only; "
                           "remove it from READ_POSTS in docker/mlflow_app.py")


def create_app() -> Any:
    """MLflow's basic-auth app (ASGI under uvicorn, else Flask) behind the read-only guard."""
    from flask import Flask
    from mlflow.server.auth import create_app as basic_auth_app

    users = read_only_users()
    _check_graphql()
    app = basic_auth_app()
    log.info("read-only MLflow users (every change refused): %s", ", ".join(sorted(users)))
    if isinstance(app, Flask):
        return guard_flask(app, users)
    return ReadOnlyGuard(app, users)
