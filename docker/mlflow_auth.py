#!/usr/bin/env python3
"""Start ``mlflow server`` with MLflow's basic auth and the stack's users from the environment.

    python mlflow_auth.py mlflow server --app-name=basic-auth --host=... [more server options]

Before it replaces itself with the given command (same PID, so dumb-init and ``make stack`` see
the server), it

1. refuses a missing, placeholder or short password, naming the variable to set in ``.env``;
2. writes the auth configuration (``MLFLOW_AUTH_CONFIG_PATH``; mode 600, it holds the database
   URI): users live in the tracking database (``MLFLOW_BACKEND_STORE_URI``, own version table),
   and every authenticated user may read (``default_permission = READ``);
3. creates or updates the users, so ``.env`` stays the one place their passwords are set:

   ========================  ===========================  ==========================================
   user (``.env``)           password (``.env``)          role
   ========================  ===========================  ==========================================
   MLFLOW_ADMIN_USER         MLFLOW_ADMIN_PASSWORD        admin: users, permissions, any change
   MLFLOW_AIRFLOW_USER       MLFLOW_AIRFLOW_PASSWORD      the DAG: MANAGE on the registered model
                                                          (new versions, aliases) and on the
                                                          experiments it creates
   MLFLOW_INFERENCE_USER     MLFLOW_INFERENCE_PASSWORD    services: READ (resolve ``champion``,
                                                          download the model)
   MLFLOW_VIEWER_USER        MLFLOW_VIEWER_PASSWORD       people browsing the UI: READ
   ========================  ===========================  ==========================================

Anonymous requests get 401 everywhere except ``/health``. Needs mlflow (the airflow image has it).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

#: (user variable, default user name, password variable, permission on the registered model).
ROLES = (
    ("MLFLOW_AIRFLOW_USER", "airflow", "MLFLOW_AIRFLOW_PASSWORD", "MANAGE"),
    ("MLFLOW_INFERENCE_USER", "inference", "MLFLOW_INFERENCE_PASSWORD", "READ"),
    ("MLFLOW_VIEWER_USER", "viewer", "MLFLOW_VIEWER_PASSWORD", "READ"),
)
ADMIN = ("MLFLOW_AUTH_ADMIN_USERNAME", "mlflow-admin", "MLFLOW_AUTH_ADMIN_PASSWORD")
REQUIRED = ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_FLASK_SERVER_SECRET_KEY")
MODEL_NAME = os.environ.get("COVID_MODEL_NAME", "covid-xray-classifier")
MIN_LENGTH = 12
PLACEHOLDERS = ("change-me", "changeme", "password", "secret", "admin", "password1234")


def problems(env: dict[str, str]) -> list[str]:
    """One message per unusable setting (an empty list when all are fine)."""
    out = [f"{name} is empty" for name in REQUIRED if not env.get(name)]
    for _, _, password_var, *_ in (ADMIN, *ROLES):
        value = env.get(password_var, "")
        if not value:
            out.append(f"{password_var} is empty")
        elif value.lower() in PLACEHOLDERS or "change-me" in value.lower():
            out.append(f"{password_var} is still a placeholder")
        elif len(value) < MIN_LENGTH:
            out.append(f"{password_var} is shorter than {MIN_LENGTH} characters")
    names = [env.get(user_var) or default for user_var, default, *_ in (ADMIN, *ROLES)]
    if len(set(names)) != len(names):
        out.append(f"the MLflow user names must differ, got {names}")
    return out


def write_config(path: Path, database_uri: str) -> None:
    """The auth ini MLflow reads (``MLFLOW_AUTH_CONFIG_PATH``), readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database_uri}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def ensure_users(database_uri: str, env: dict[str, str]) -> list[str]:
    """Create or update the admin and the role users; returns ``user:role`` lines for the log."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(database_uri)
    admin = env.get(ADMIN[0]) or ADMIN[1]
    _upsert(store, admin, env[ADMIN[2]], is_admin=True)
    done = [f"{admin}:admin"]
    for user_var, default, password_var, permission in ROLES:
        name = env.get(user_var) or default
        _upsert(store, name, env[password_var], is_admin=False)
        try:
            store.create_registered_model_permission(MODEL_NAME, name, permission)
        except MlflowException:
            store.update_registered_model_permission(MODEL_NAME, name, permission)
        done.append(f"{name}:{permission}")
    return done


def _upsert(store, name: str, pw: str, is_admin: bool) -> None:
    if store.has_user(name, use_primary=True):
        store.update_user(name, pw, is_admin)
    else:
        store.create_user(name, pw, is_admin=is_admin)


def main(argv: list[str]) -> int:
    if not argv or "--app-name=basic-auth" not in argv and "basic-auth" not in argv:
        print("usage: mlflow_auth.py mlflow server --app-name=basic-auth [server options]", file=sys.stderr)
        return 2
    env = dict(os.environ)
    found = problems(env)
    for p in found:
        print(f"mlflow-auth: {p}; set it in .env (see .env.example)", file=sys.stderr)
    if found:
        return 1
    config = env.get("MLFLOW_AUTH_CONFIG_PATH")
    if not config:
        config = str(Path(tempfile.mkdtemp(prefix="mlflow-auth-")) / "basic_auth.ini")
        os.environ["MLFLOW_AUTH_CONFIG_PATH"] = config
    database_uri = env["MLFLOW_BACKEND_STORE_URI"]
    write_config(Path(config), database_uri)
    users = ensure_users(database_uri, env)
    print(f"mlflow-auth: basic auth on, users {', '.join(users)}; anonymous requests are refused",
          flush=True)
    os.execvp(argv[0], argv)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
