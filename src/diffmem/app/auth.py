"""Access control of `diffmem serve`: loopback by default, an access token for anything else.

Binding an address other than loopback needs a token (`--token` or the `DIFFMEM_TOKEN` environment variable).
With a token, every request (the page, its assets, the API, the schema, websockets) must present it as
`Authorization: Bearer <token>`, as the `diffmem_token` cookie, or once as `?token=<token>` (a browser opening the
page: it is answered with a redirect that sets the cookie and drops the token from the address bar). Tokens are
compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from typing import Any
from urllib.parse import urlencode

from starlette.requests import HTTPConnection

from diffmem.errors import InputError

TOKEN_ENV = "DIFFMEM_TOKEN"
MIN_TOKEN_CHARS = 16
COOKIE = "diffmem_token"
QUERY = "token"
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")
UNAUTHORIZED = (f"this server needs its access token: send 'Authorization: Bearer <token>', or open the page once "
                f"as /?{QUERY}=<token>")


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or the name localhost."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_access(host: str, token: str | None) -> None:
    """Fail with one line when `host` is not loopback and no token is given, or the token is too short to guess."""
    if token is not None and not _TOKEN_CHARS.fullmatch(token):
        raise InputError("the access token may hold only letters, digits and . _ ~ + / = - (it travels in a cookie)")
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise InputError(f"the access token must have at least {MIN_TOKEN_CHARS} characters; make one with "
                         "python -c 'import secrets; print(secrets.token_urlsafe())'")
    if token is None and not is_loopback(host):
        raise InputError(f"--host {host} lets other machines in: it needs an access token (--token, or the "
                         f"{TOKEN_ENV} environment variable); without one, serve on 127.0.0.1")


class TokenAuth:
    """ASGI middleware: answer 401 (websockets: close 1008) unless the request presents the token."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._token = token.encode("utf-8")

    def _matches(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode("utf-8"), self._token)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        scheme, _, bearer = conn.headers.get("authorization", "").partition(" ")
        if self._matches(bearer if scheme.lower() == "bearer" else None) or self._matches(conn.cookies.get(COOKIE)):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if self._matches(conn.query_params.get(QUERY)):
            rest = urlencode([(k, v) for k, v in conn.query_params.multi_items() if k != QUERY])
            await _respond(send, 303, b"", [(b"location", (scope["path"] + (f"?{rest}" if rest else "")).encode()),
                                            (b"set-cookie", f"{COOKIE}={conn.query_params[QUERY]}; HttpOnly; "
                                                            "SameSite=Strict; Path=/".encode())])
            return
        body = json.dumps({"error": UNAUTHORIZED}).encode()
        await _respond(send, 401, body, [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")])


async def _respond(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """Send a whole HTTP response from an ASGI middleware."""
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
