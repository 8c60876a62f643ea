"""The inference service: a FastAPI app that serves the registry's ``champion`` over HTTP.

Endpoints (see docs/serving.md for examples):

* ``POST /v1/predict[?explain=true]``: one or more image files (multipart: JPEG, PNG, DICOM, ...);
  per image the class, P(covid), the threshold, and the model name, version and run id that
  answered; with ``explain=true`` a Grad-CAM heat map (PNG, base64) and, for a DICOM film, the
  windowed image the model saw (``image_png``), which a browser cannot draw from the DICOM file.
* ``GET /v1/model``: the version served, its alias, gate metrics, data version and dates, and
  ``model_card``, the link to ``GET /v1/model/card``: the version's model card (Markdown).
* ``GET /v1/history``: every registered version of the model, in order, with the tags of its week
  (:mod:`.registry_views`); ``GET /v1/history/timeline.png``: the champion's run's timeline.
* ``GET /healthz`` (the process answers), ``GET /readyz`` (a model is loaded; why not, if not).
* ``GET /metrics``: Prometheus text.
* ``GET /``: the web page (``static/``); ``/openapi.json``: the API's schema; ``/docs``: Swagger
  UI, only with ``COVID_SERVE_DOCS=on`` (it loads files from a CDN; see :mod:`.headers`).

Every answer carries the security headers of :mod:`.headers`. Run it with
``python -m covid_tasks.serve`` (or ``make serve``).
"""

from __future__ import annotations

import contextlib
import functools
import html
import logging
import math
import string
import time
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.datastructures import UploadFile

from covid_tasks.config import CLASS_NAMES, POSITIVE_INDEX
from covid_tasks.serve import inputs
from covid_tasks.serve.headers import SecurityHeaders, swagger_page
from covid_tasks.serve.inputs import BadInputError, Upload, check_request, decode_uploads
from covid_tasks.serve.limits import BodySizeLimit
from covid_tasks.serve.metrics import ServeMetrics
from covid_tasks.serve.model_holder import ModelHolder, ServedModel
from covid_tasks.serve.registry_views import CARD_PATH, HISTORY_PATH, TIMELINE_PATH, RegistryViews
from covid_tasks.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PREDICT_PATH = "/v1/predict"
_ENDPOINTS = frozenset({"/", "/healthz", "/readyz", "/metrics", "/v1/model", PREDICT_PATH, CARD_PATH,
                        HISTORY_PATH, TIMELINE_PATH})


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
    title = "COVID-19 chest X-ray classifier (research use only)"

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        holder.start()
        try:
            yield
        finally:
            holder.stop()

    app = FastAPI(title=title, lifespan=lifespan, version="1", docs_url=None, redoc_url=None)
    app.state.settings, app.state.holder, app.state.metrics = settings, holder, metrics
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(BadInputError, _bad_input)
    _routes(app, settings, holder, metrics, limiter)
    _registry_routes(app, holder, RegistryViews(settings), settings)
    if settings.docs:
        app.add_api_route("/docs", lambda: swagger_page(title, app.openapi_url or "/openapi.json"),
                          include_in_schema=False)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes, paths=(PREDICT_PATH,))
    app.add_middleware(_Observe, metrics=metrics)
    app.add_middleware(SecurityHeaders)
    return app


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer: ``detail`` says what was wrong in words (a list of problems for
    a malformed query parameter, FastAPI's validation format)."""

    detail: str | list[dict[str, Any]]


def _predict_docs(settings: ServeSettings) -> dict[str, Any]:
    """``/v1/predict``'s request body and error answers for the OpenAPI schema (the body is read
    by hand, to enforce the limits before parsing, so FastAPI cannot infer it)."""
    names, budget = inputs.accepted_names(), settings.max_request_pixels / 1e6
    media = ", ".join(m for f in inputs.ACCEPTED_FORMATS for m in f.media_types)
    body = {"type": "object", "required": ["file"], "properties": {"file": {
        "type": "array", "minItems": 1, "maxItems": settings.max_files,
        "items": {"type": "string", "format": "binary"},
        "description": f"one or more chest X-rays ({names}); any field name is accepted"}}}
    retry = {"Retry-After": {"description": "seconds to wait before asking again",
                             "schema": {"type": "integer"}}}

    def error(text: str, **extra: Any) -> dict[str, Any]:
        return {"model": ErrorBody, "description": text, **extra}

    return {
        "openapi_extra": {"requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": body, "encoding": {"file": {"contentType": media}}}}}},
        "responses": {
            400: error("an empty file, no file at all, or a malformed multipart body"),
            413: error(f"too many files (over {settings.max_files}), a file over "
                       f"{settings.max_file_bytes / 2**20:g} MiB, a body over "
                       f"{settings.max_request_bytes / 2**20:g} MiB, an image over "
                       f"{settings.max_pixels / 1e6:g} Mpx, or more than {budget:g} Mpx in all"),
            415: error(f"not multipart/form-data, or a file that is not a {names} image"),
            422: error("an image that does not decode, explain=true for a version without Grad-CAM, "
                       "or a malformed query parameter"),
            503: error("no model is loaded yet; ``detail`` says why", headers=retry),
        },
    }


def render_page(settings: ServeSettings) -> str:
    """``static/index.html`` with the accepted formats and limits filled in (one source for the
    drop zone, the file picker and the page without JavaScript)."""
    template = string.Template((STATIC / "index.html").read_text(encoding="utf-8"))
    return template.substitute(accepted_names=html.escape(inputs.accepted_names()),
                               accept=html.escape(inputs.accept_attribute()),
                               max_files=settings.max_files)


def _routes(app: FastAPI, settings: ServeSettings, holder: ModelHolder, metrics: ServeMetrics,
            limiter: anyio.CapacityLimiter) -> None:
    page_html = render_page(settings)
    retry_after = {"Retry-After": str(max(1, math.ceil(settings.poll_interval_s)))}
    not_ready = {503: {"model": ErrorBody, "description": "no model loaded (``reason`` says why)",
                       "headers": {"Retry-After": {"schema": {"type": "integer"}}}}}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(page_html, headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is alive (says nothing about the model)."""
        return {"status": "alive"}

    @app.get("/readyz", responses={503: {"description": "no model loaded; ``reason`` says why",
                                         "headers": not_ready[503]["headers"]}})
    def readyz() -> JSONResponse:
        """200 when a model is loaded, else 503 (with ``Retry-After``); ``reason`` says why in words."""
        status = holder.status()
        if status["ready"]:
            return JSONResponse(status)
        return JSONResponse(status, status_code=503, headers=retry_after)

    @app.get("/v1/model", responses=not_ready)
    def model_info() -> dict[str, Any]:
        """The version served: alias, run, gate metrics, what it was trained on (and whether it is
        a demo), dates, threshold."""
        return {**_served_or_503(holder, retry_after).info, "status": holder.status()["reason"]}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.render(holder.status()), media_type=metrics.content_type)

    @app.post(PREDICT_PATH, **_predict_docs(settings))
    async def predict(request: Request, explain: bool = False) -> dict[str, Any]:
        """Classify the uploaded images (multipart, any field name, e.g. ``file``)."""
        started = time.perf_counter()
        served = _served_or_503(holder, retry_after)  # one version for the whole request
        uploads = await _read_uploads(request, settings)
        # Sizes, headers and the pixel budget before taking an inference slot: nothing is decoded.
        await anyio.to_thread.run_sync(check_request, uploads, settings.max_file_bytes, settings.max_pixels,
                                       settings.max_request_pixels)
        if explain and served.gradcam is None:
            raise BadInputError(422, f"explain=true is unavailable for version {served.version}: "
                                     f"{served.gradcam_error}")
        work = functools.partial(classify, served, uploads, explain, settings)
        result = await anyio.to_thread.run_sync(work, limiter=limiter)
        for item in result["predictions"]:
            metrics.images.labels(item["class"], served.version).inc()
        result["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return result


def _registry_routes(app: FastAPI, holder: ModelHolder, views: RegistryViews,
                     settings: ServeSettings) -> None:
    """The model card, the lineage and the timeline: read from the registry, cached a poll interval."""
    from covid_tasks.registry import RegistryUnavailableError

    retry_after = {"Retry-After": str(max(1, math.ceil(settings.poll_interval_s)))}
    errors = {404: {"model": ErrorBody, "description": "nothing of the kind was registered"},
              503: {"model": ErrorBody, "description": "no model loaded, or the registry cannot be read"}}

    @app.get(CARD_PATH, responses={200: {"content": {"text/markdown": {}}}, **errors})
    def model_card() -> Response:
        """The served version's model card: Markdown (``text/markdown``), plain text throughout."""
        served = _served_or_503(holder, retry_after)
        try:
            text = views.card(served.version)
        except RegistryUnavailableError as exc:
            if served.card is None:
                raise HTTPException(503, str(exc), headers=retry_after) from None
            text = served.card  # the card as it was when the version was loaded
        if text is None:
            raise HTTPException(404, f"version {served.version} has no model card (registered before "
                                     "model cards)")
        return Response(text, media_type="text/markdown; charset=utf-8",
                        headers={"Cache-Control": "no-cache", "X-Model-Version": served.version})

    @app.get(HISTORY_PATH, responses={503: errors[503]})
    def history() -> dict[str, Any]:
        """Every registered version of the model, in order: its week's tags, figures and aliases."""
        try:
            found = views.history()
        except RegistryUnavailableError as exc:
            raise HTTPException(503, str(exc), headers=retry_after) from None
        served = holder.current
        return {**found, "served": served.version if served else None}

    @app.get(TIMELINE_PATH, responses={200: {"content": {"image/png": {}}}, **errors})
    def timeline() -> Response:
        """The timeline figure ``register`` logged with the champion's MLflow run (PNG)."""
        try:
            found = views.history()
            champion = next((v for v in found["versions"] if v["version"] == found["champion"]), None)
            png = views.timeline(champion["run_id"]) if champion and champion["run_id"] else None
        except RegistryUnavailableError as exc:
            raise HTTPException(503, str(exc), headers=retry_after) from None
        if png is None:
            raise HTTPException(404, "the champion's run has no timeline figure (history/timeline.png)")
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})


def _served_or_503(holder: ModelHolder, retry_after: dict[str, str]) -> ServedModel:
    served = holder.current
    if served is None:
        raise HTTPException(503, holder.status()["reason"], headers=retry_after)
    return served


async def _read_uploads(request: Request, settings: ServeSettings) -> list[Upload]:
    """The request's files, within the count limit (sizes are checked before decoding).

    Raises:
        BadInputError: not multipart (415), malformed (400), no file (400), too many files (413).
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "multipart/form-data":  # media types are case-insensitive (RFC 9110)
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
            fields = sorted({k for k, v in form.multi_items() if not isinstance(v, UploadFile)})
            hint = f" (the fields {', '.join(fields)} have no filename, so are not files)" if fields else ""
            raise BadInputError(400, f"no image in the request{hint}: send one or more files as multipart "
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

    The uploads have passed :func:`covid_tasks.serve.inputs.check_request` (sizes, headers, pixels).

    Returns:
        ``{"model": {..., "demo"}, "n_images", "predictions": [{"filename", "class", "prob_covid",
        "threshold", "model_name", "model_version", "run_id"[, "heatmap_png", "heatmap_class"
        [, "image_png"]]}]}``; ``image_png`` (DICOM uploads with ``explain``) is the windowed image
        the model took.

    Raises:
        BadInputError: an upload does not decode (422).
    """
    batch = decode_uploads(uploads, served.img_size, settings.max_pixels, settings.inference_threads)
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
             "calibrated": served.calibrated, "img_size": served.img_size,
             "demo": (served.info.get("training_data") or {}).get("demo")}
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
