"""``python -m stack``: run docker-compose.yaml's topology as local processes.

    python -m stack up [--home .stack] [--port-base 41000]   start (or complete) the stack
    python -m stack down [--home .stack]                      stop every process it started
    python -m stack status                                    which recorded processes are alive
    python -m stack start|stop|kill|restart SERVICE           one service (kill = SIGKILL, a crash)

``make stack`` / ``make stack-down`` call ``up`` / ``down``. Everything lives in the home folder:
``stack.env`` (credentials and ports, mode 600), ``state.json`` (PIDs), ``logs/``, the databases,
the S3 data and the data root.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from stack import procs

if TYPE_CHECKING:  # the rest needs the virtual environment (PyYAML, Airflow's deps); `down` does not
    from stack import services
    from stack.settings import Settings

log = logging.getLogger("stack")
DEFAULT_HOME = Path(__file__).resolve().parents[1] / ".stack"
START_TIMEOUT_S = 240.0
#: How each service is stopped: signal to its leader, then SIGKILL to all of it after the timeout.
#: PostgreSQL: SIGINT = fast shutdown; Celery: SIGTERM = warm shutdown (lets a task finish).
STOP = {"postgres": (signal.SIGINT, 30.0), "s3": (signal.SIGTERM, 10.0),
        "airflow-worker": (signal.SIGTERM, 60.0), "airflow-worker-gpu": (signal.SIGTERM, 60.0)}


class StackError(RuntimeError):
    """The stack could not be brought to the requested state."""


def start(s: Settings, names: list[str], state: procs.State) -> list[services.Service]:
    """Start the named services that are not already running; returns their definitions."""
    from stack import services
    from stack.settings import REPO

    running = state.read()
    out = []
    for name in names:
        svc = services.build(s, name)
        rec = running.get(name)
        if rec is not None and rec.alive():
            log.info("%-22s already running (pid %d)", name, rec.pid)
        else:
            rec = procs.spawn(name, svc.argv, svc.env, s.home / "logs" / f"{name}.log", REPO, user=svc.user)
            state.add(rec)
            log.info("%-22s started (pid %d), log %s", name, rec.pid, rec.log)
        out.append(svc)
    return out


def wait_ready(s: Settings, svcs: list[services.Service], state: procs.State,
               timeout: float = START_TIMEOUT_S) -> None:
    """Wait until every service passes its probe; fail with the log tail of one that died or hung."""
    pending = {svc.name: svc for svc in svcs}
    deadline = time.monotonic() + timeout
    began = time.monotonic()
    while pending:
        recs = state.read()
        for name, svc in list(pending.items()):
            if not recs[name].alive():
                raise StackError(f"{name} exited during start-up; last lines of {recs[name].log}:\n"
                                 f"{recs[name].tail()}\n(`make stack-down` stops what did start)")
            if svc.ready():
                log.info("%-22s ready after %.0f s", name, time.monotonic() - began)
                del pending[name]
        if pending and time.monotonic() > deadline:
            name = next(iter(pending))
            raise StackError(f"{name} not ready after {timeout:.0f} s; last lines of {recs[name].log}:\n"
                             f"{recs[name].tail()}\n(`make stack-down` stops what did start)")
        time.sleep(0.5)


def api_token(s: Settings) -> str:
    """A JWT for the Airflow REST API, for the admin user of the env file."""
    body = json.dumps({"username": s.env.get("AIRFLOW_ADMIN_USER") or "admin",
                       "password": s.env["AIRFLOW_ADMIN_PASSWORD"]}).encode()
    req = urllib.request.Request(f"{s.url('airflow-apiserver')}/auth/token", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["access_token"]


def wait_dag(s: Settings, dag_id: str = "covid_retraining", timeout: float = 180.0) -> None:
    """Wait until the dag-processor has parsed ``dag_id`` (the REST API knows it)."""
    token = api_token(s)
    deadline = time.monotonic() + timeout
    while True:
        req = urllib.request.Request(f"{s.url('airflow-apiserver')}/api/v2/dags/{dag_id}",
                                     headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10):
                return
        except urllib.error.HTTPError as exc:
            if exc.code != 404 or time.monotonic() > deadline:
                raise StackError(f"DAG {dag_id} not available from the API: HTTP {exc.code}") from exc
        time.sleep(1.0)


def up(s: Settings) -> None:
    from stack import init, services

    state = procs.State(s.home)
    init.prepare(s)
    init.initdb(s)
    names = services.names(s)
    wait_ready(s, start(s, ["postgres", "redis", "s3"], state), state)
    init.postgres_sql(s)
    log.info("airflow-init: migrate, admin user, pool, connections, buckets, sample data")
    init.airflow_init(s)
    rest = [n for n in names if n not in ("postgres", "redis", "s3")]
    wait_ready(s, start(s, rest, state), state)
    wait_dag(s)
    summary(s)


def summary(s: Settings) -> None:
    env = s.env
    print(f"""
The stack is up (home {s.home}; credentials in {s.home / 'stack.env'}, mode 600):
  Airflow UI/API  {s.url('airflow-apiserver')}   user {env.get('AIRFLOW_ADMIN_USER') or 'admin'}, \
password AIRFLOW_ADMIN_PASSWORD
  MLflow          {s.url('mlflow')}   users {env.get('MLFLOW_ADMIN_USER')} (admin), \
{env.get('MLFLOW_VIEWER_USER')} (read)
  S3 (SeaweedFS)  {s.url('s3')}   key S3_ACCESS_KEY / S3_SECRET_KEY; buckets {', '.join(s.buckets)}
  Postgres        127.0.0.1:{s.port('STACK_PORT_POSTGRES')}   Redis 127.0.0.1:{s.port('STACK_PORT_REDIS')}
  Workers         {', '.join(f'{w} (queue {",".join(sorted(q))})' for w, q in s.workers().items())}
  Logs            {s.home / 'logs'}
Stop everything with `make stack-down`.""")


#: Services `down` stops last, one tier at a time, after everything that uses them.
BACKENDS = (("mlflow",), ("s3", "redis"), ("postgres",))


def down(home: Path) -> bool:
    """Stop every recorded process: the Airflow components together, then the services they
    use, tier by tier (``BACKENDS``). True when none is left."""
    from concurrent.futures import ThreadPoolExecutor

    state = procs.State(home)
    recs = state.read()
    last = {n for tier in BACKENDS for n in tier}
    tiers = [[n for n in recs if n not in last]] + [[n for n in tier if n in recs] for tier in BACKENDS]

    def stop(name: str) -> bool:
        svc_signal, timeout = STOP.get(name, (signal.SIGTERM, 30.0))
        began = time.monotonic()
        if recs[name].stop(svc_signal, timeout):
            log.info("%-22s stopped in %.1f s", name, time.monotonic() - began)
            return True
        log.error("%-22s still has processes: %s", name, sorted(recs[name].members()))
        return False

    ok = True
    with ThreadPoolExecutor(max_workers=8) as pool:
        for tier in filter(None, tiers):
            for name, done in zip(tier, pool.map(stop, tier), strict=True):
                if done:
                    state.remove(name)
                ok = ok and done
    return ok


def status(s: Settings) -> int:
    from stack import services

    recs = procs.State(s.home).read()
    for name in services.names(s):
        rec = recs.get(name)
        print(f"{name:22s} {'running pid %d' % rec.pid if rec and rec.alive() else 'stopped'}")
    return 0


def one(s: Settings, action: str, name: str) -> None:
    from stack import services

    if name not in services.names(s):
        raise StackError(f"unknown service {name!r}; the stack runs {', '.join(services.names(s))}")
    state = procs.State(s.home)
    rec = state.read().get(name)
    if action == "kill" and (rec is None or not rec.alive()):
        raise StackError(f"{name} is not running")
    if action in ("stop", "kill", "restart") and rec is not None:
        done = rec.kill() if action == "kill" else rec.stop(*STOP.get(name, (signal.SIGTERM, 30.0)))
        if not done:
            raise StackError(f"{name}: processes left after {action}: {sorted(rec.members())}")
        state.remove(name)
        log.info("%s: %s", name, "killed (SIGKILL)" if action == "kill" else "stopped")
    if action in ("start", "restart"):
        wait_ready(s, start(s, [name], state), state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status", "start", "stop", "kill", "restart"])
    parser.add_argument("service", nargs="?")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help="state folder (default .stack)")
    parser.add_argument("--port-base", type=int, default=None,
                        help="first port, used only when the env file is written (default 41000)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="stack: %(message)s")
    if args.action == "down":
        if not (args.home / "state.json").exists():
            print(f"stack: nothing to stop ({args.home} records no process)")
            return 0
        return 0 if down(args.home) else 1
    if args.action != "up" and not (args.home / "stack.env").exists():
        print(f"stack: {args.home} holds no stack (run `make stack` first)", file=sys.stderr)
        return 1
    from stack import init, services
    from stack.settings import Settings

    s = Settings.load(args.home, args.port_base)
    try:
        if args.action == "up":
            up(s)
        elif args.action == "status":
            return status(s)
        else:
            if not args.service:
                parser.error(f"{args.action} needs a SERVICE ({', '.join(services.names(s))})")
            one(s, args.action, args.service)
    except (StackError, init.StepFailed, FileNotFoundError) as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
