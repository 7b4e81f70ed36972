"""The browser key as an HttpOnly cookie, set by the server itself (an ASGI middleware).

Streamlit's page scripts cannot set a response header; ``st.App`` (Streamlit >= 1.53, run with
``streamlit run serve.py``) accepts middleware, and this one gives every browser that has no
valid key a fresh one with the first page it loads: ``HttpOnly`` (no script on the page can
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


class BrowserKeyMiddleware:
    """Pure ASGI: on an HTML page response to a browser without a valid key, add Set-Cookie."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        if workspace_id(_cookie_of(scope.get("headers") or [])) is not None:
            return await self.app(scope, receive, send)
        secure = scope.get("scheme") == "https" or any(
            n.lower() == b"x-forwarded-proto" and v.lower() == b"https" for n, v in scope.get("headers") or [])

        async def send_with_cookie(message):
            if message.get("type") == "http.response.start":
                headers = list(message.get("headers") or [])
                html = any(n.lower() == b"content-type" and v.lower().startswith(b"text/html") for n, v in headers)
                if html:
                    age = int(max(1.0, load_settings().idle_hours) * 3600)
                    headers.append((b"set-cookie", cookie_header(new_browser_key(), secure, age)))
                    message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)
