"""``python -m covid_tasks.serve [--host H] [--port P]``: run the inference service with uvicorn.

Settings come from the environment (:mod:`covid_tasks.serve.settings`); ``make serve`` sets the
registry to the embedded store that ``make run`` fills.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covid_tasks.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("COVID_SERVE_HOST", "127.0.0.1"),
                        help="address to listen on (default $COVID_SERVE_HOST or 127.0.0.1; "
                             "0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("COVID_SERVE_PORT", "8000")),
                        help="port (default $COVID_SERVE_PORT or 8000)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)  # credentials in a URI never reach the log
    handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])

    import mlflow
    import uvicorn

    from covid_tasks.config import redact_uri
    from covid_tasks.registry import bound_mlflow_http
    from covid_tasks.serve.app import create_app
    from covid_tasks.serve.settings import ServeSettings

    try:
        settings = ServeSettings.from_env()
    except ValueError as exc:
        parser.error(str(exc))
    http = bound_mlflow_http()
    mlflow.set_tracking_uri(settings.tracking_uri)  # this process serves one registry
    mlflow.set_registry_uri(settings.tracking_uri)
    logging.getLogger(__name__).info("serving models:/%s@%s from %s on http://%s:%d (MLflow HTTP %s)",
                                     settings.model_name, settings.alias, redact_uri(settings.tracking_uri),
                                     args.host, args.port, http)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                workers=1, timeout_graceful_shutdown=10)
    return 0


class _RedactingFormatter(logging.Formatter):
    """Format the record, then hide the credentials of every URI in the line (tracebacks
    of MLflow errors quote the tracking URI with its user name and password)."""

    def format(self, record: logging.LogRecord) -> str:
        from covid_tasks.config import redact_uri

        return redact_uri(super().format(record))


if __name__ == "__main__":
    sys.exit(main())
