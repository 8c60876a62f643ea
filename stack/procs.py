"""Start, identify and stop the stack's processes by the PIDs recorded when they were started.

Each service runs in its own session (its PID is its process group). ``HOME/state.json`` records
its PID and the kernel's start time of that PID, so a recycled PID is never mistaken for it.
Stopping signals the recorded group and every recorded descendant, waits, then escalates to
SIGKILL: nothing is ever looked up or killed by name. Standard library only (Linux ``/proc``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (index 0 is the state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """The kernel start time of ``pid`` (clock ticks since boot), ``None`` when it is gone."""
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def snapshot() -> dict[int, tuple[int, int]]:
    """Every live process: PID -> (parent PID, process group)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields and fields[0] not in ("Z", "X"):
                out[int(name)] = (int(fields[1]), int(fields[2]))
    return out


def tree(root: int, procs: dict[int, tuple[int, int]] | None = None) -> set[int]:
    """The live processes of a service started as group leader ``root``.

    Its process group, and while ``root`` lives every descendant of it together with the groups
    those descendants lead (Airflow runs each task in a process group of its own).
    """
    procs = snapshot() if procs is None else procs
    members = {pid for pid, (_, pgid) in procs.items() if pgid == root}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(members)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in members:
                members.add(child)
                todo.append(child)
    groups = {procs[pid][1] for pid in members if pid in procs}
    members |= {pid for pid, (_, pgid) in procs.items() if pgid in groups and pgid in members}
    return members


@dataclass
class Proc:
    """One recorded service process."""

    name: str
    pid: int
    started: int
    log: str

    def alive(self) -> bool:
        return start_time(self.pid) == self.started

    def members(self) -> set[int]:
        """The service's live processes (see :func:`tree`)."""
        if self.alive():
            return tree(self.pid)
        if start_time(self.pid) is not None:
            return set()  # the PID was reused: that process and its group are not ours
        # The leader is gone. Linux does not reuse a PID while a group of that id exists, so
        # processes still in the group are ours (orphans of a crashed leader).
        return {pid for pid, (_, pgid) in snapshot().items() if pgid == self.pid}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> bool:
        """Send ``sig`` to the service's leader; after ``timeout`` s SIGKILL every process of it.

        Returns:
            True when none of the service's processes is left.
        """
        targets = self._targets()
        leader = targets.get(self.pid)
        _send({self.pid: leader} if leader is not None else targets, sig)
        if _wait_gone(targets, timeout, reap=self.pid):
            return True
        _send(targets, signal.SIGKILL)
        return _wait_gone(targets, 10.0, reap=self.pid)

    def kill(self) -> bool:
        """SIGKILL every process of the service at once, as a crash of its machine would."""
        targets = self._targets()
        _send(targets, signal.SIGKILL)
        return _wait_gone(targets, 10.0, reap=self.pid)

    def _targets(self) -> dict[int, int]:
        """PID -> start time of the service's processes now (re-checked before each signal)."""
        out = {}
        for pid in self.members():
            started = start_time(pid)
            if started is not None:
                out[pid] = started
        return out

    def tail(self, lines: int = 40) -> str:
        try:
            text = Path(self.log).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class State:
    """``HOME/state.json``: the processes this stack started, in start order."""

    def __init__(self, home: Path) -> None:
        self.path = home / "state.json"

    def read(self) -> dict[str, Proc]:
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text())
        return {name: Proc(name=name, **rec) for name, rec in data.items()}

    def write(self, procs: dict[str, Proc]) -> None:
        data = {p.name: {"pid": p.pid, "started": p.started, "log": p.log} for p in procs.values()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path)

    def add(self, proc: Proc) -> None:
        procs = self.read()
        procs.pop(proc.name, None)
        procs[proc.name] = proc
        self.write(procs)

    def remove(self, name: str) -> None:
        procs = self.read()
        if procs.pop(name, None) is not None:
            self.write(procs)


def spawn(name: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path,
          user: Any | None = None) -> Proc:
    """Start ``argv`` in a new session with stdout/stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}: {argv[0]}\n".encode())
        fh.flush()
        kwargs: dict[str, Any] = {}
        if user is not None:
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
    started = None
    for _ in range(50):
        started = start_time(proc.pid)
        if started is not None:
            break
        time.sleep(0.01)
    return Proc(name=name, pid=proc.pid, started=started or 0, log=str(log))


def _send(targets: dict[int, int], sig: int) -> None:
    for pid, started in targets.items():
        if start_time(pid) == started:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _wait_gone(targets: dict[int, int], timeout: float, reap: int) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:  # reap the leader when this process started it
            os.waitpid(reap, os.WNOHANG)
        except ChildProcessError:
            pass
        if not any(start_time(pid) == started for pid, started in targets.items()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
