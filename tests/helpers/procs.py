"""Stopping the servers the tests start in their own process group (``start_new_session=True``)."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, term_wait: float, kill_wait: float = 5.0) -> None:
    """SIGTERM ``proc``'s process group, then SIGKILL it if ``proc`` outlives ``term_wait`` seconds.

    A group already gone is not an error; a process that survives SIGKILL for ``kill_wait``
    seconds raises ``subprocess.TimeoutExpired``.
    """
    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, kill_wait)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            if sig == signal.SIGKILL:
                raise
