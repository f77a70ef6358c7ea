"""What keeps the dashboard safe to leave open in a browser: CSRF tokens, and headers on every answer.

CSRF: each browser gets a random session cookie (HttpOnly, SameSite=Strict); its token is an
HMAC of that session under a secret drawn when the process starts, written into every page, and
every POST must send it back in the X-CSRF-Token header. Another site can make a browser post
to the dashboard but cannot read a page of it to learn the token, and SameSite keeps the cookie
off its requests in the first place. A restart draws a new secret, so old pages must be reloaded.

Headers: a Content-Security-Policy allowing only the dashboard's own scripts and styles (no
inline script, so markup that slipped into a page could not run), no framing, no sniffing, no
referrer; API answers are never cached.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from http.cookies import SimpleCookie

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SESSION_COOKIE = "chainrule_dashboard_session"
CSRF_HEADER = "x-csrf-token"
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Protection:
    """ASGI middleware: sessions and CSRF checks, and the security headers on every response.

    Pages read the session's token as `request.state.csrf_token`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._secret = secrets.token_bytes(32)

    def token(self, session: str) -> str:
        return hmac.new(self._secret, session.encode(), hashlib.sha256).hexdigest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        session = _session(headers.get("cookie", ""))
        new_session = session is None
        if session is None:
            session = secrets.token_urlsafe(32)
        token = self.token(session)
        scope.setdefault("state", {})["csrf_token"] = token
        if scope["method"] not in SAFE_METHODS:
            refusal = _refusal(headers, token, new_session)
            if refusal is not None:
                await _forbidden(send, refusal)
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if new_session:
                    cookie = f"{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict"
                    extra.append((b"set-cookie", cookie.encode()))
                if scope["path"].startswith("/api/"):
                    extra.append((b"cache-control", b"no-store"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _session(cookie_header: str) -> str | None:
    cookies: SimpleCookie = SimpleCookie()
    try:
        cookies.load(cookie_header)
    except Exception:  # a malformed Cookie header from another site's cookies: as if there were none
        return None
    morsel = cookies.get(SESSION_COOKIE)
    return morsel.value if morsel is not None and morsel.value else None


def _refusal(headers: dict[str, str], token: str, new_session: bool) -> str | None:
    """Why a state-changing request is refused, or None to let it through."""
    origin = headers.get("origin")
    if origin is not None and origin.split("://", 1)[-1] != headers.get("host", ""):
        return f"cross-origin request from {origin} refused"
    sent = headers.get(CSRF_HEADER, "")
    if new_session or not sent:
        return "missing CSRF token: reload the page and try again"
    if not hmac.compare_digest(sent, token):
        return "invalid CSRF token (the dashboard restarted, or the page is from another session): reload the page"
    return None


async def _forbidden(send: Send, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 403, "headers": [*headers, *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})
