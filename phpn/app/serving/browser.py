"""The browser key as an HttpOnly cookie, set by the server itself (an ASGI middleware).

Streamlit's page scripts cannot set a response header; ``st.App`` (Streamlit >= 1.53, run with
``streamlit run serve.py``) accepts middleware, and this one gives every browser that has no
valid key a fresh one with the first page it loads (and renews the one it has with every page): ``HttpOnly`` (no script on the page can
read it), ``SameSite=Strict``, ``Secure`` behind https, ``Path=/``. The browser sends it back
with the page's WebSocket connection, where the app reads it (``st.context.cookies``).
"""
from __future__ import annotations

from http.cookies import SimpleCookie
from typing import Optional

from phpn.app.serving.settings import load_settings
from phpn.app.serving.workspace import new_browser_key, workspace_id

COOKIE = "phpn_key"


def cookie_header(key: str, secure: bool, max_age: int) -> bytes:
    """The Set-Cookie value for ``key``."""
    parts = [f"{COOKIE}={key}", "Path=/", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts).encode("latin-1")


def _cookie_of(headers) -> Optional[str]:
    for name, value in headers:
        if name.lower() == b"cookie":
            jar = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except Exception:  # noqa: BLE001 - a malformed Cookie header is no key
                return None
            if COOKIE in jar:
                return jar[COOKIE].value
    return None


def _is_page(message, path: str) -> bool:
    """A page of the app (its HTML, or the browser's cached copy of it confirmed with a 304),
    not a script, style, image or one of Streamlit's own endpoints."""
    headers = message.get("headers") or []
    if any(n.lower() == b"content-type" and v.lower().startswith(b"text/html") for n, v in headers):
        return True
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return message.get("status") == 304 and "/_stcore/" not in path and "/static/" not in path and "." not in last


class BrowserKeyMiddleware:
    """Pure ASGI: every page response carries the browser's key as an HttpOnly cookie, the one
    it sent when this server signed it (so the cookie lasts as long as the visitor is active),
    else a fresh one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        headers_in = scope.get("headers") or []
        sent_key = _cookie_of(headers_in)
        secure = scope.get("scheme") == "https" or any(
            n.lower() == b"x-forwarded-proto" and v.lower() == b"https" for n, v in headers_in)
        path = str(scope.get("path") or "/")

        async def send_with_cookie(message):
            if message.get("type") == "http.response.start" and _is_page(message, path):
                key = sent_key if workspace_id(sent_key) is not None else new_browser_key()
                age = int(max(1.0, load_settings().idle_hours) * 3600)
                message = {**message, "headers": [*(message.get("headers") or []),
                                                  (b"set-cookie", cookie_header(key, secure, age))]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)
