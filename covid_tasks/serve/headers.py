"""Security headers on every answer, and the optional Swagger UI page with its own policy.

Every response gets, unless the route set its own:

* ``Content-Security-Policy`` (:data:`PAGE_CSP`): scripts, styles, images and fetches from this
  origin only (plus ``data:`` and ``blob:`` images: the heat map and the local preview), no
  plugins, forms posting only here, and ``frame-ancestors 'none'`` (no framing, no clickjacking);
* ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` (for browsers without
  ``frame-ancestors``) and ``Referrer-Policy: no-referrer``.

Swagger UI (``/docs``) loads its script and style from a CDN, so it is off by default
(``COVID_SERVE_DOCS``); when on, only its page allows that CDN and its one inline script (by hash).
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

from fastapi.responses import HTMLResponse

#: The policy of the page and of every other answer.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", PAGE_CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
#: Where FastAPI's Swagger UI page loads its files from.
SWAGGER_CDN = "https://cdn.jsdelivr.net"


class SecurityHeaders:
    """ASGI middleware: add :data:`SECURITY_HEADERS` to every HTTP response that lacks them."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def swagger_page(title: str, openapi_url: str) -> HTMLResponse:
    """FastAPI's Swagger UI page with a policy that allows its CDN and its inline script only."""
    from fastapi.openapi.docs import get_swagger_ui_html

    page = get_swagger_ui_html(openapi_url=openapi_url, title=title)
    html = bytes(page.body).decode()
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                      for s in re.findall(r"<script>(.*?)</script>", html, flags=re.S))
    csp = (f"default-src 'none'; script-src {SWAGGER_CDN} {hashes}; style-src {SWAGGER_CDN}; "
           f"img-src 'self' data: https://fastapi.tiangolo.com; connect-src 'self'; "
           f"frame-ancestors 'none'; base-uri 'none'")
    return HTMLResponse(html, headers={"Content-Security-Policy": csp})
