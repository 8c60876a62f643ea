"""Settings of the inference service, read once from the environment at start.

Every setting has a default except the registry URI. MLflow's own HTTP retry and timeout
variables get the pipeline's short defaults (:func:`covid_tasks.registry.bound_mlflow_http`,
only when unset), so a registry that is down costs the poller seconds, not minutes. MLflow basic
auth uses MLflow's standard ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from covid_tasks.config import CHAMPION_ALIAS, MODEL_NAME

_MB = 1024 * 1024
#: Per-image pixel limit: a 4,000 x 5,000 px digital radiograph is 20 Mpx and the largest chest
#: detectors (43 x 43 cm at 100 um) about 18.5 Mpx; 25 Mpx admits them with room to spare.
DEFAULT_MAX_PIXELS = 25_000_000
#: Per-request pixel budget: five films of 20 Mpx, or 32 images of 3 Mpx. Decoding costs about
#: 20-25 bytes per pixel (a 49 Mpx PNG: about 1.1 GB) and 0.5-4 s per 49 Mpx on a CPU; two
#: concurrent requests at the budget (5 x 20 Mpx each) measured 2.9 GB peak (from 0.9 GB), 8 s.
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}


@dataclass(frozen=True)
class ServeSettings:
    """What the service serves and the limits it enforces.

    Attributes:
        tracking_uri: MLflow tracking and registry URI (``COVID_MLFLOW_TRACKING_URI``, else
            ``MLFLOW_TRACKING_URI``).
        model_name: registered model name (``COVID_MODEL_NAME``).
        alias: the alias followed (``COVID_SERVE_ALIAS``, default ``champion``).
        poll_interval_s: seconds between registry look-ups (``COVID_SERVE_POLL_S``).
        max_files: images per request (``COVID_SERVE_MAX_FILES``).
        max_file_bytes: bytes per image file (``COVID_SERVE_MAX_FILE_MB``, in MiB).
        max_request_bytes: bytes per request body (``COVID_SERVE_MAX_REQUEST_MB``, in MiB).
        max_pixels: width x height per image, checked on the header before decoding
            (``COVID_SERVE_MAX_PIXELS``, default 25 Mpx; decompression bombs); 413 above it.
        max_request_pixels: the sum of width x height over a request's images, from their
            headers, before decoding (``COVID_SERVE_MAX_REQUEST_PIXELS``, default 100 Mpx); 413
            above it.
        inference_threads: requests computed at once (``COVID_SERVE_INFERENCE_THREADS``).
        docs: serve Swagger UI at ``/docs`` (``COVID_SERVE_DOCS``, default off). Its page loads
            scripts and styles from a CDN, so it is off unless asked for, and only ``/docs`` then
            allows that CDN in its Content-Security-Policy; ``/openapi.json`` is always served.
    """

    tracking_uri: str
    model_name: str = MODEL_NAME
    alias: str = CHAMPION_ALIAS
    poll_interval_s: float = 30.0
    max_files: int = 32
    max_file_bytes: int = 20 * _MB
    max_request_bytes: int = 64 * _MB
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    inference_threads: int = 2
    docs: bool = False

    def __post_init__(self) -> None:
        errors = []
        if not self.tracking_uri:
            errors.append("no registry: set COVID_MLFLOW_TRACKING_URI (or MLFLOW_TRACKING_URI)")
        for name in ("poll_interval_s", "max_files", "max_file_bytes", "max_request_bytes", "max_pixels",
                     "max_request_pixels", "inference_threads"):
            if getattr(self, name) <= 0:
                errors.append(f"{name} must be positive, got {getattr(self, name)}")
        if errors:
            raise ValueError("invalid serve settings: " + "; ".join(errors))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ServeSettings":
        """Build the settings from ``env`` (default ``os.environ``).

        Raises:
            ValueError: a value is missing, malformed or out of range.
        """
        env = os.environ if env is None else env

        def number(key: str, default: float, scale: float = 1.0) -> float:
            raw = env.get(key, "").strip()
            try:
                return float(raw) * scale if raw else default
            except ValueError:
                raise ValueError(f"{key} must be a number, got {raw!r}") from None

        def flag(key: str) -> bool:
            raw = env.get(key, "").strip().lower()
            if raw not in _TRUE | _FALSE:
                raise ValueError(f"{key} must be on or off (1/0, true/false), got {raw!r}")
            return raw in _TRUE

        return cls(
            tracking_uri=env.get("COVID_MLFLOW_TRACKING_URI") or env.get("MLFLOW_TRACKING_URI", ""),
            model_name=env.get("COVID_MODEL_NAME") or MODEL_NAME,
            alias=env.get("COVID_SERVE_ALIAS") or CHAMPION_ALIAS,
            poll_interval_s=number("COVID_SERVE_POLL_S", cls.poll_interval_s),
            max_files=int(number("COVID_SERVE_MAX_FILES", cls.max_files)),
            max_file_bytes=int(number("COVID_SERVE_MAX_FILE_MB", cls.max_file_bytes, _MB)),
            max_request_bytes=int(number("COVID_SERVE_MAX_REQUEST_MB", cls.max_request_bytes, _MB)),
            max_pixels=int(number("COVID_SERVE_MAX_PIXELS", cls.max_pixels)),
            max_request_pixels=int(number("COVID_SERVE_MAX_REQUEST_PIXELS", cls.max_request_pixels)),
            inference_threads=int(number("COVID_SERVE_INFERENCE_THREADS", cls.inference_threads)),
            docs=flag("COVID_SERVE_DOCS"),
        )
