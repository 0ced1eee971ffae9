"""What `diffmem serve` checks before routing any request: its Host, where a state-changing request comes from, and
the size of its body.

- **Host allow-list** (DNS rebinding): a page on `evil.example` whose name an attacker re-points at 127.0.0.1 makes
  the victim's browser talk to this server, but with `Host: evil.example`. Only loopback names (127.0.0.1,
  localhost, [::1]), the bound address and the names given with `--allowed-host` are served, with any port;
  anything else gets 400, on every route and websocket.
- **Same origin for changes** (CSRF): a browser sends `Origin` with every POST/PUT/PATCH/DELETE and websocket
  handshake, same-origin or not (the Fetch standard), and `Sec-Fetch-Site` with every request. Such a request is
  served only when its `Origin` (or, without one, its `Referer`) names this server as the request's own Host, and
  `Sec-Fetch-Site` (when sent) is not cross-site or same-site; otherwise 403. `Origin: null` (sandboxed frames,
  `data:` pages) is refused. A request with neither header is no browser's cross-site request (curl, scripts): it is
  served when it carries the access token (a server with one checks it first) or comes from a loopback address.
- **Body size**: a declared `Content-Length` over the limit is refused with 413 before anything is read; a body
  without one (chunked) is counted as it arrives, and the app sees the connection end once it passes the limit,
  answered with 413.

Every refusal is JSON `{"error": "<one line>"}`.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from diffmem.errors import InputError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
"""Host names served whatever the bound address: only a user on this machine can make a browser send them."""
WILDCARDS = ("0.0.0.0", "::", "")
"""Bind addresses that are no name a client uses: with one, name the server with `--allowed-host`."""
DEFAULT_MAX_UPLOAD = 1 << 20
"""Largest request body outside /api in bytes (the page uploads nothing large; /api has its own limit)."""
CHANGES_STATE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DEFAULT_PORT = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def host_name(value: str) -> str:
    """The host part of a Host header or a `--allowed-host` value (`name`, `name:port`, `[v6]:port`), lowercased,
    without brackets or a trailing dot; empty when it is not one."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = (value[1:end], value[end + 1 :]) if end > 0 else ("", "")
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return ""
    else:
        name, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
        if (port and not port.isdigit()) or (":" in name and not _is_ip(name)):
            return ""
    name = name.rstrip(".")
    return name if name and all(c.isalnum() or c in ".-_:" for c in name) else ""


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def allowed_hosts(bind: str = "127.0.0.1", names: Iterable[str] = ()) -> frozenset[str]:
    """The Host names a server bound to `bind` answers: loopback names, `bind` itself (unless a wildcard such as
    0.0.0.0) and `names` (`--allowed-host`); a value that is no host name is an InputError."""
    hosts = set(LOOPBACK_NAMES)
    if bind.strip("[]") not in WILDCARDS:
        hosts.add(host_name(bind) or bind.strip("[]").lower())
    for name in names:
        parsed = host_name(name)
        if not parsed or "/" in name:
            raise InputError(f"--allowed-host {name!r} is not a host name (e.g. myserver.lan, 192.168.1.5, "
                             "[fe80::1]; no scheme or path)")
        hosts.add(parsed)
    return frozenset(hosts)


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    """The request's headers by lowercase name (the first of repeated ones), decoded as latin-1 (never fails)."""
    out: dict[str, str] = {}
    for key, value in scope.get("headers", ()):
        out.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
    return out


async def refuse(scope: dict[str, Any], send: Any, status: int, message: str) -> None:
    """Answer `status` with a JSON `{"error": message}`; a websocket handshake too where the server can send an
    HTTP answer to one, else it is closed (code 1008; the client sees 403)."""
    body = json.dumps({"error": " ".join(message.split())}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


class HostCheck:
    """ASGI middleware: 400 for a request (or websocket) whose Host header is missing or not in `hosts`."""

    def __init__(self, app: Any, hosts: Iterable[str]) -> None:
        self.app = app
        self.hosts = frozenset(hosts)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = _headers(scope).get("host")
            if host is None:
                await refuse(scope, send, 400, "the request has no Host header")
                return
            name = host_name(host)
            if name not in self.hosts:
                shown = (name or host)[:100]
                await refuse(scope, send, 400, f"this server does not answer to the host name {shown!r} (add it "
                             "with --allowed-host if it is this server's)")
                return
        await self.app(scope, receive, send)


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin or Referer URL (None without an http(s) host: `null`, `file:`, junk)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.rstrip("."), port or _DEFAULT_PORT[parts.scheme]


def _own(scope: dict[str, Any], host: str) -> tuple[str, str, int] | None:
    """The origin the client used to reach this server: its scheme (uvicorn reads X-Forwarded-Proto from a proxy
    on this machine) and its Host header."""
    return _origin(f"{'https' if scope.get('scheme') in ('https', 'wss') else 'http'}://{host}")


class OriginCheck:
    """ASGI middleware: 403 for a state-changing request or websocket handshake that a browser sent from another
    origin (the rule is in this module's docstring). `token_checked`: a TokenAuth layer outside this one has
    already required the token of every request."""

    def __init__(self, app: Any, token_checked: bool = False) -> None:
        self.app = app
        self.token_checked = token_checked

    def problem(self, scope: dict[str, Any]) -> str | None:
        """Why the request must be refused, or None."""
        headers = _headers(scope)
        site = headers.get("sec-fetch-site", "").lower()
        if site in ("cross-site", "same-site"):
            return f"a {site} request may not change anything here (Sec-Fetch-Site: {site})"
        source = headers.get("origin") or headers.get("referer")
        if source is None:
            from diffmem.app.auth import is_loopback  # (auth loads starlette: only once a request is served)

            client = scope.get("client") or ("",)
            if self.token_checked or is_loopback(str(client[0])):
                return None
            return "a request that changes state needs an Origin header naming this server, or the access token"
        origin = _origin(source)
        own = _own(scope, headers.get("host", ""))
        if origin is None or own is None or origin != own:
            which = "Origin" if headers.get("origin") else "Referer"
            shown = source if len(source) <= 100 else source[:100] + "..."
            return f"cross-origin request refused: {which} {shown!r} is not this server"
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" or scope["type"] == "http" and scope["method"] in CHANGES_STATE:
            problem = self.problem(scope)
            if problem is not None:
                await refuse(scope, send, 403, problem)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: 413 for an HTTP request body over `limit` bytes on a path `applies(path)` accepts (all by
    default). A declared Content-Length is checked before reading; a streamed body is counted as it arrives, and
    once it passes the limit the app is told the client left (it reads no more), its answer is dropped and 413
    is sent instead."""

    def __init__(self, app: Any, limit: int, applies: Callable[[str], bool] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.applies = applies or (lambda path: True)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.applies(scope["path"]):
            await self.app(scope, receive, send)
            return
        size = _headers(scope).get("content-length", "").strip()
        if size.isdigit() and int(size) > self.limit:
            await refuse(scope, send, 413, f"request body of {size} bytes; the limit is {self.limit}")
            return
        seen, over, started = 0, False, False

        async def counted() -> dict[str, Any]:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                over = True
                return {"type": "http.disconnect"}
            return message

        async def answer(message: dict[str, Any]) -> None:
            nonlocal started
            if over and not started:  # the app's reaction to the cut body: replaced by the 413 below
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, answer)
        except Exception:
            if not over:
                raise
        if over and not started:
            await refuse(scope, send, 413, f"request body of more than {self.limit} bytes; the limit is {self.limit}")


def guard(app: Any, hosts: Iterable[str], token: str | None = None, max_upload: int = DEFAULT_MAX_UPLOAD,
          applies: Callable[[str], bool] | None = None) -> None:
    """Add the checks to a Starlette/FastAPI `app`, outermost first: Host, the token (when given), Origin, then
    the body limit on the paths `applies` accepts (all by default)."""
    from diffmem.app.auth import TokenAuth

    app.add_middleware(BodyLimit, limit=max_upload, applies=applies)
    app.add_middleware(OriginCheck, token_checked=token is not None)
    if token is not None:
        app.add_middleware(TokenAuth, token=token)
    app.add_middleware(HostCheck, hosts=hosts)  # added last: the outermost layer
