"""Hostname callable of the process stack's Celery workers (``[core] hostname_callable``).

In docker-compose every worker container has its own hostname, which Airflow records on each
task instance. The process stack runs both workers on one machine, so each reports its compose
service name instead (``STACK_WORKER_HOSTNAME``, set by the launcher).
"""

from __future__ import annotations

import os
import socket


def get_hostname() -> str:
    """``STACK_WORKER_HOSTNAME`` when set, else the machine's FQDN (Airflow's default)."""
    return os.environ.get("STACK_WORKER_HOSTNAME") or socket.getfqdn()
