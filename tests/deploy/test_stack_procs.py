"""stack/procs.py: `make stack-down` stops exactly what `make stack` started, by recorded PIDs.

Real processes, no mocks: a service whose child runs in a process group of its own (as Airflow
runs each task), a service that ignores SIGTERM (as SeaweedFS can linger), and an unrelated
process that must survive.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from stack import procs

# A "service": its child sleeps in a new session (own process group), the leader waits.
SLEEP = [sys.executable, "-c", "import time; time.sleep(300)"]
TREE = "import subprocess, sys, time\n" \
       f"subprocess.Popen({SLEEP!r}, start_new_session=True)\n" \
       "time.sleep(300)\n"
STUBBORN = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" \
           "print('ready', flush=True)\ntime.sleep(300)\n"


def _spawn(tmp_path: Path, name: str, code: str) -> procs.Proc:
    proc = procs.spawn(name, [sys.executable, "-c", code], {}, tmp_path / f"{name}.log", tmp_path)
    deadline = time.monotonic() + 10
    def ready() -> bool:
        if code is TREE:
            return len(proc.members()) >= 2
        return "ready" in Path(proc.log).read_text()

    while not ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


def test_stop_ends_the_whole_tree_and_nothing_else(tmp_path):
    outsider = subprocess.Popen(SLEEP)
    try:
        svc = _spawn(tmp_path, "svc", TREE)
        members = svc.members()
        assert svc.pid in members and len(members) == 2, members
        child = next(p for p in members if p != svc.pid)
        assert procs._stat(child)[2] == str(child), "the child must lead its own process group"
        assert svc.stop(signal.SIGTERM, timeout=5)
        assert all(procs.start_time(p) is None for p in members)
        assert outsider.poll() is None, "an unrelated process was stopped"
    finally:
        outsider.kill()
        outsider.wait()


def test_stop_escalates_to_sigkill(tmp_path):
    svc = _spawn(tmp_path, "stubborn", STUBBORN)
    began = time.monotonic()
    assert svc.stop(signal.SIGTERM, timeout=1.0)
    assert 1.0 <= time.monotonic() - began < 10
    assert not svc.alive()


def test_kill_is_immediate_and_takes_the_children(tmp_path):
    svc = _spawn(tmp_path, "crash", TREE)
    members = svc.members()
    assert svc.kill()
    assert all(procs.start_time(p) is None for p in members)


def test_a_reused_pid_is_never_signalled(tmp_path):
    outsider = subprocess.Popen(SLEEP, start_new_session=True)
    try:
        # A record whose PID now belongs to another process (different start time).
        stale = procs.Proc(name="old", pid=outsider.pid, started=procs.start_time(outsider.pid) - 1, log="")
        assert not stale.alive() and stale.members() == set()
        assert stale.stop(signal.SIGTERM, timeout=0.5)
        assert outsider.poll() is None
    finally:
        outsider.kill()
        outsider.wait()


def test_state_records_start_order(tmp_path):
    state = procs.State(tmp_path)
    for i, name in enumerate(("postgres", "redis", "mlflow")):
        state.add(procs.Proc(name=name, pid=100 + i, started=5, log=""))
    state.remove("redis")
    assert list(state.read()) == ["postgres", "mlflow"]
