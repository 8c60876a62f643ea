"""The inference service: a FastAPI app that serves the registry's ``champion`` over HTTP.

Endpoints (see docs/serving.md for examples):

* ``POST /v1/predict[?explain=true]``: one or more image files (multipart: JPEG, PNG, DICOM, ...);
  per image the class, P(covid), the threshold, and the model name, version and run id that
  answered; with ``explain=true`` a Grad-CAM heat map (PNG, base64) and, for a DICOM film, the
  windowed image the model saw (``image_png``), which a browser cannot draw from the DICOM file.
* ``GET /v1/model``: the version served, its alias, gate metrics, data version and dates.
* ``GET /healthz`` (the process answers), ``GET /readyz`` (a model is loaded; why not, if not).
* ``GET /metrics``: Prometheus text.
* ``GET /``: the web page (``static/``).

Run it with ``python -m covid_tasks.serve`` (or ``make serve``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile

from covid_tasks.config import CLASS_NAMES, POSITIVE_INDEX
from covid_tasks.serve.inputs import ACCEPT, FORMATS_TEXT, BadInputError, Upload, decode_uploads
from covid_tasks.serve.limits import BodySizeLimit
from covid_tasks.serve.metrics import ServeMetrics
from covid_tasks.serve.model_holder import ModelHolder, ServedModel
from covid_tasks.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PREDICT_PATH = "/v1/predict"
_ENDPOINTS = frozenset({"/", "/healthz", "/readyz", "/metrics", "/v1/model", PREDICT_PATH})


def create_app(settings: ServeSettings | None = None, holder: ModelHolder | None = None) -> FastAPI:
    """Build the app; the registry poller starts with the app and stops with it.

    Args:
        settings: service settings (default: from the environment).
        holder: the model holder (default: one following ``settings``).

    Returns:
        The ASGI app.
    """
    settings = settings or ServeSettings.from_env()
    metrics = ServeMetrics()
    holder = holder or ModelHolder(settings, on_swap=metrics.swapped)
    limiter = anyio.CapacityLimiter(settings.inference_threads)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        holder.start()
        try:
            yield
        finally:
            holder.stop()

    app = FastAPI(title="COVID-19 chest X-ray classifier (research use only)", lifespan=lifespan,
                  version="1", docs_url="/docs", redoc_url=None)
    app.state.settings, app.state.holder, app.state.metrics = settings, holder, metrics
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(BadInputError, _bad_input)
    _routes(app, settings, holder, metrics, limiter)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes, paths=(PREDICT_PATH,))
    app.add_middleware(_Observe, metrics=metrics)
    return app


def _routes(app: FastAPI, settings: ServeSettings, holder: ModelHolder, metrics: ServeMetrics,
            limiter: anyio.CapacityLimiter) -> None:
    page_html = (STATIC / "index.html").read_text().replace("{{formats}}", FORMATS_TEXT).replace(
        "{{accept}}", ACCEPT)  # the formats from covid_tasks.images.FORMATS, the one list

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(page_html, headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is alive (says nothing about the model)."""
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """200 when a model is loaded, else 503; ``reason`` says why in words."""
        status = holder.status()
        return JSONResponse(status, status_code=200 if status["ready"] else 503)

    @app.get("/v1/model")
    def model_info() -> dict[str, Any]:
        """The version served: alias, run, gate metrics, data version, dates, threshold."""
        return {**_served_or_503(holder).info, "status": holder.status()["reason"]}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.render(holder.status()), media_type=metrics.content_type)

    @app.post(PREDICT_PATH)
    async def predict(request: Request, explain: bool = False) -> dict[str, Any]:
        """Classify the uploaded images (multipart, any field name, e.g. ``file``)."""
        started = time.perf_counter()
        served = _served_or_503(holder)  # one version for the whole request
        uploads = await _read_uploads(request, settings)
        if explain and served.gradcam is None:
            raise BadInputError(422, f"explain=true is unavailable for version {served.version}: "
                                     f"{served.gradcam_error}")
        work = functools.partial(classify, served, uploads, explain, settings)
        result = await anyio.to_thread.run_sync(work, limiter=limiter)
        for item in result["predictions"]:
            metrics.images.labels(item["class"], served.version).inc()
        result["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return result


def _served_or_503(holder: ModelHolder) -> ServedModel:
    served = holder.current
    if served is None:
        raise HTTPException(503, holder.status()["reason"], headers={"Retry-After": "10"})
    return served


async def _read_uploads(request: Request, settings: ServeSettings) -> list[Upload]:
    """The request's files, within the count limit (sizes are checked before decoding).

    Raises:
        BadInputError: not multipart (415), malformed (400), no file (400), too many files (413).
    """
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadInputError(415, "send the images as multipart/form-data, e.g. "
                                 "curl -F file=@xray.jpg http://HOST:PORT/v1/predict")
    too_many = BadInputError(413, f"too many files: at most {settings.max_files} images per request")
    try:
        form = await request.form(max_files=settings.max_files + 1, max_fields=100)
    except HTTPException as exc:
        if "too many files" in str(exc.detail).lower():
            raise too_many from None
        raise BadInputError(400, f"malformed multipart body: {exc.detail}") from None
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise BadInputError(400, "no image in the request: send one or more files as multipart "
                                     "form fields (e.g. -F file=@xray.jpg)")
        if len(files) > settings.max_files:
            raise too_many
        return [Upload(f.filename or f"file {i + 1}", await f.read(), f.content_type or "")
                for i, f in enumerate(files)]
    finally:
        await form.close()


def classify(served: ServedModel, uploads: list[Upload], explain: bool, settings: ServeSettings
             ) -> dict[str, Any]:
    """Decode, predict and (optionally) explain a request's images with one served version.

    Returns:
        ``{"model": {...}, "predictions": [{"filename", "class", "prob_covid", "threshold",
        "model_name", "model_version", "run_id"[, "heatmap_png", "heatmap_class"[, "image_png"]]}]}``;
        ``image_png`` (DICOM uploads with ``explain``) is the windowed image the model took.

    Raises:
        BadInputError: an upload fails a check or does not decode.
    """
    batch = decode_uploads(uploads, served.img_size, settings.max_file_bytes, settings.max_pixels,
                           settings.inference_threads)
    probs = served.predict(batch)
    positive = probs >= served.threshold
    out = []
    for upload, p, pos in zip(uploads, probs, positive, strict=True):
        out.append({"filename": upload.filename,
                    "class": CLASS_NAMES[POSITIVE_INDEX if pos else 1 - POSITIVE_INDEX],
                    "prob_covid": float(p), "threshold": served.threshold, "model_name": served.name,
                    "model_version": served.version, "run_id": served.run_id})
    if explain:
        _explain(served, batch, positive, out, uploads)
    model = {"name": served.name, "version": served.version, "run_id": served.run_id,
             "alias": served.info.get("alias"), "threshold": served.threshold,
             "calibrated": served.calibrated, "img_size": served.img_size}
    return {"model": model, "n_images": len(out), "predictions": out}


def _explain(served: ServedModel, batch: Any, positive: Any, out: list[dict[str, Any]],
             uploads: list[Upload]) -> None:
    import numpy as np

    from covid_tasks.serve.gradcam import colorize, png_base64

    cams = served.gradcam(batch, positive)
    for item, cam, image, upload in zip(out, cams, batch, uploads, strict=True):
        item["heatmap_png"] = png_base64(colorize(cam, served.img_size))
        item["heatmap_class"] = item["class"]
        if upload.dicom:  # a browser cannot draw DICOM: the windowed film, as the model took it
            item["image_png"] = png_base64(np.clip(np.rint(image), 0, 255).astype("uint8"))


async def _bad_input(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BadInputError)
    return JSONResponse({"detail": exc.message}, status_code=exc.status)


class _Observe:
    """ASGI middleware: count every request and its latency by endpoint and status."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "/static" if path.startswith("/static/") else "other"

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.observe(endpoint, scope.get("method", ""), status, time.perf_counter() - started)
