#!/usr/bin/env python3
"""Start ``mlflow server`` with MLflow's basic auth and the stack's users from the environment.

    python mlflow_auth.py mlflow server --app-name=covid-basic-auth --host=... [more server options]

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
                                                          experiment; may create others
   MLFLOW_INFERENCE_USER     MLFLOW_INFERENCE_PASSWORD    services: read only (resolve ``champion``,
                                                          download the model)
   MLFLOW_VIEWER_USER        MLFLOW_VIEWER_PASSWORD       people browsing the UI: read only
   ========================  ===========================  ==========================================

4. creates the pipeline's experiment (``COVID_EXPERIMENT_NAME``) and registered model
   (``COVID_MODEL_NAME``) unless they exist, and gives the ``airflow`` user MANAGE on both, so no
   other user can create them first and own them;
5. registers docker/mlflow_app.py as the server app ``covid-basic-auth``: MLflow's basic-auth app
   that answers 403 to every change (any request but GET/HEAD/OPTIONS and searches) from the
   read-only users (inference, viewer), who would otherwise create experiments, runs and models.

Anonymous requests get 401 everywhere except ``/health``. Needs mlflow (the airflow image has it).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mlflow_app  # noqa: E402  (next to this file; the server imports it too)

#: (user variable, default user name, password variable, permission on the pipeline's model and
#: experiment). READ users are read-only: mlflow_app refuses every change they request.
ROLES = (
    ("MLFLOW_AIRFLOW_USER", "airflow", "MLFLOW_AIRFLOW_PASSWORD", "MANAGE"),
    ("MLFLOW_INFERENCE_USER", "inference", "MLFLOW_INFERENCE_PASSWORD", "READ"),
    ("MLFLOW_VIEWER_USER", "viewer", "MLFLOW_VIEWER_PASSWORD", "READ"),
)
ADMIN = ("MLFLOW_AUTH_ADMIN_USERNAME", "mlflow-admin", "MLFLOW_AUTH_ADMIN_PASSWORD")
REQUIRED = ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_FLASK_SERVER_SECRET_KEY")
MODEL_NAME = os.environ.get("COVID_MODEL_NAME", "covid-xray-classifier")
EXPERIMENT_NAME = os.environ.get("COVID_EXPERIMENT_NAME", "covid-retraining")
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


def read_only_users(env: dict[str, str]) -> list[str]:
    """Names of the READ roles: the users mlflow_app refuses every change."""
    return [env.get(user_var) or default for user_var, default, _, perm in ROLES if perm == "READ"]


def artifact_root(argv: list[str], backend_uri: str) -> str:
    """The default artifact root the server will use (``--default-artifact-root``, else MLflow's rule)."""
    from mlflow.utils.server_cli_utils import resolve_default_artifact_root

    root = next((a.split("=", 1)[1] for a in argv if a.startswith("--default-artifact-root=")), None)
    if root is None and "--default-artifact-root" in argv:
        root = argv[argv.index("--default-artifact-root") + 1]
    return resolve_default_artifact_root("--no-serve-artifacts" not in argv, root, backend_uri)


def ensure_registry(backend_uri: str, root: str, env: dict[str, str]) -> str:
    """Create the pipeline's experiment and registered model unless they exist, owned by the
    pipeline's user (MANAGE on both); returns a line for the log."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore as AuthStore
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    tracking = TrackingStore(backend_uri, root)
    experiment = tracking.get_experiment_by_name(EXPERIMENT_NAME)
    made = []
    if experiment is None:
        experiment_id = tracking.create_experiment(EXPERIMENT_NAME)
        made.append(f"experiment {EXPERIMENT_NAME}")
    else:
        experiment_id = experiment.experiment_id
    registry = RegistryStore(backend_uri)
    try:
        registry.get_registered_model(MODEL_NAME)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        registry.create_registered_model(
            MODEL_NAME, description="Created by the stack; covid_retraining registers its versions.")
        made.append(f"registered model {MODEL_NAME}")
    auth = AuthStore()
    auth.init_db(backend_uri)
    owner = next(env.get(var) or default for var, default, _, perm in ROLES if perm == "MANAGE")
    try:
        auth.create_experiment_permission(experiment_id, owner, "MANAGE")
    except MlflowException:
        auth.update_experiment_permission(experiment_id, owner, "MANAGE")
    return (f"created {' and '.join(made)}" if made else "experiment and registered model exist") + \
        f"; {owner} has MANAGE on experiment {experiment_id} and model {MODEL_NAME}"


def register_app(folder: Path, env: dict[str, str]) -> dict[str, str]:
    """Make mlflow_app.create_app the ``mlflow.app`` entry point ``covid-basic-auth``.

    Writes a minimal distribution (``*.dist-info`` with ``entry_points.txt``) into ``folder`` and
    returns the environment the server needs: PYTHONPATH with ``folder`` and this directory,
    and the read-only users.
    """
    dist = folder / "covid_mlflow_app-1.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: covid-mlflow-app\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[mlflow.app]\n{mlflow_app.APP_NAME} = mlflow_app:create_app\n")
    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(filter(None, [str(folder), here, env.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, mlflow_app.USERS_VAR: ",".join(read_only_users(env))}


def main(argv: list[str]) -> int:
    wanted = f"--app-name={mlflow_app.APP_NAME}"
    if not argv or wanted not in argv and mlflow_app.APP_NAME not in argv:
        print(f"usage: mlflow_auth.py mlflow server {wanted} [server options] (the app refuses changes "
              "by read-only users; MLflow's plain basic-auth app does not)", file=sys.stderr)
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
    registry = ensure_registry(database_uri, artifact_root(argv, database_uri), env)
    os.environ.update(register_app(Path(config).parent / "app", env))
    print(f"mlflow-auth: basic auth on, users {', '.join(users)}; anonymous requests are refused, "
          f"read-only users ({', '.join(read_only_users(env))}) may change nothing; {registry}", flush=True)
    os.execvp(argv[0], argv)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
