"""`diffmem serve` before routing (diffmem.app.gate): a Host allow-list against DNS rebinding, same-origin state
changes against CSRF (Gradio's upload and queue routes included), a request body limit, and a generic 500 for a bug.
A real server on 127.0.0.1, bounded request loops only."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from diffmem.app.gate import BodyLimit, HostCheck, OriginCheck, allowed_hosts, host_name
from diffmem.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

LIMIT = 4096
EVIL = "evil.example"
TOKEN = "t0k3n-For-The-Tests_0123456789"


class Boom(Exception):
    """A bug in the service."""


@pytest.fixture(scope="module")
def service(sd1_pipe, sd1_dir: Path):
    from diffmem.app.service import Service, Settings, Threshold

    class Buggy(Service):
        """Explaining "boom" hits a bug holding a path that must not reach the client."""

        def explain_prompt(self, prompt: str, suggest: bool = True) -> dict:
            if prompt == "boom":
                raise Boom("/secret/path/weights.safetensors is corrupt")
            return super().explain_prompt(prompt, suggest)

    return Buggy(sd1_pipe, str(sd1_dir), Threshold(1.0, "a test"), Settings(generate_steps=2, mitigate_iters=1))


@pytest.fixture(scope="module")
def server(service) -> Iterator[str]:
    """The whole app (page, Gradio routes, API) with a small upload limit and one extra allowed name."""
    from diffmem.app.server import BackgroundServer, create_app

    app = create_app(service, hosts=allowed_hosts("127.0.0.1", ["myserver.lan"]), max_upload=LIMIT)
    with BackgroundServer(app) as running:
        yield running.url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def json_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error, str) and error and "\n" not in error
    return error


ROUTES = [("GET", "/"), ("GET", "/config"), ("GET", "/gradio_api/info"), ("GET", "/openapi.json"),
          ("GET", "/api/info"), ("POST", "/api/detect"), ("POST", "/gradio_api/upload"),
          ("POST", "/gradio_api/queue/join"), ("GET", "/api/nope")]


# ------------------------------------------------------------------------------------------------------ Host

def test_host_names_parse_and_the_allow_list() -> None:
    assert [host_name(h) for h in ("LocalHost:7860", "[::1]:80", "::1", "127.0.0.1", "name.lan.", "a b",
                                   "evil.com@127.0.0.1", "x:y:z", "[::1]junk", "h:port")] == \
        ["localhost", "::1", "::1", "127.0.0.1", "name.lan", "", "", "", "", ""]
    assert allowed_hosts() == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts("0.0.0.0") == allowed_hosts("::") == allowed_hosts()  # a wildcard is no client's name
    assert allowed_hosts("192.168.1.5", ["Box.LAN", "[fe80::1]:8080"]) == {*allowed_hosts(), "192.168.1.5",
                                                                           "box.lan", "fe80::1"}
    for bad in ("http://box.lan", "box.lan/path", "", "a b"):
        with pytest.raises(InputError, match="--allowed-host .* is not a host name"):
            allowed_hosts("127.0.0.1", [bad])


def test_serve_options_are_checked_before_loading(cli) -> None:
    refused = cli("serve", "--threshold", "1", "--allowed-host", "http://box.lan/")
    assert refused.exit_code == 2 and "--allowed-host 'http://box.lan/' is not a host name" in refused.stderr
    assert cli("serve", "--threshold", "1", "--max-upload-mb", "0").exit_code == 2


def test_any_other_host_is_refused_on_every_route(client: httpx.Client, server: str) -> None:
    port = _port(server)
    for host in (EVIL, f"{EVIL}:{port}", "127.0.0.1.evil.example", "localhost.evil.example", "0.0.0.0"):
        for method, path in ROUTES:
            response = client.request(method, path, headers={"host": host}, json={"prompts": ["a cat"]})
            assert "does not answer to the host name" in json_error(response, 400), (host, method, path)
    for host in ("127.0.0.1", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST.", "myserver.lan:8080"):
        assert client.get("/api/info", headers={"host": host}).status_code == 200, host
        assert client.get("/", headers={"host": host}).status_code == 200, host


def test_a_request_without_a_host_header_is_refused(server: str) -> None:
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=30) as sock:
        sock.sendall(b"GET /api/info HTTP/1.0\r\n\r\n")  # HTTP/1.0 may leave Host out
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"no Host header" in answer


# ---------------------------------------------------------------------------------------------------- Origin

def test_state_changes_from_another_origin_are_refused(client: httpx.Client, server: str) -> None:
    own = server  # http://127.0.0.1:PORT
    refused = [{"origin": f"http://{EVIL}"}, {"origin": "null"}, {"origin": f"{own}.evil.example"},
               {"origin": f"http://localhost:{_port(server) + 1}"}, {"origin": own.replace("http:", "https:")},
               {"referer": f"http://{EVIL}/page"}, {"origin": own, "sec-fetch-site": "cross-site"},
               {"sec-fetch-site": "same-site"}, {"origin": "garbage"}]
    for headers in refused:
        for method, path in [("POST", "/api/detect"), ("POST", "/gradio_api/upload"),
                             ("POST", "/gradio_api/queue/join"), ("DELETE", "/api/detect"), ("PUT", "/api/x")]:
            response = client.request(method, path, headers=headers, json={"prompts": ["a cat"]})
            assert json_error(response, 403), (headers, method, path)
    # reads are not refused (a cross-origin page cannot read the answer without CORS), and the same origin works
    assert client.get("/api/info", headers={"origin": f"http://{EVIL}"}).status_code == 200
    for headers in [{"origin": own}, {"referer": f"{own}/?lang=en"}, {"origin": own, "sec-fetch-site": "same-origin"},
                    {"origin": f"http://localhost:{_port(server)}", "host": f"localhost:{_port(server)}"}, {}]:
        response = client.post("/api/detect", headers=headers, json={"prompts": ["a cat"]})
        assert response.status_code == 200, (headers, response.text[:200])
    joined = client.post("/gradio_api/queue/join", headers={"origin": own}, json={})
    assert joined.status_code != 403  # reaches Gradio, which judges the body itself


def test_the_page_works_from_its_own_origin_only(server: str) -> None:
    """Gradio's own client flow (queue/join, then the event stream), as the page's script sends it."""
    from gradio_client import Client

    verdict = Client(server, headers={"Origin": server}, verbose=False).predict("a red cube", fn_index=0)
    assert 'data-verdict="clear"' in str(verdict) and 'data-prompt="a red cube"' in str(verdict)
    with pytest.raises(httpx.HTTPStatusError, match="403"):
        Client(server, headers={"Origin": f"http://{EVIL}"}, verbose=False).predict("a red cube", fn_index=0)


def _scope(kind: str = "http", method: str = "POST", client: str = "127.0.0.1", **headers: str) -> dict[str, Any]:
    return {"type": kind, "method": method, "path": "/gradio_api/queue/join", "scheme": "http",
            "client": (client, 5000), "headers": [(k.replace("_", "-").encode(), v.encode())
                                                  for k, v in {"host": "box.lan:7860", **headers}.items()]}


def test_no_origin_needs_the_token_or_loopback() -> None:
    """A request with neither Origin nor Referer is no browser's cross-site request: curl and scripts."""
    check = OriginCheck(app=None)
    assert check.problem(_scope()) is None  # loopback client
    assert "needs an Origin" in str(check.problem(_scope(client="192.168.1.9")))
    assert OriginCheck(app=None, token_checked=True).problem(_scope(client="192.168.1.9")) is None
    assert check.problem(_scope(client="192.168.1.9", origin="http://box.lan:7860")) is None


class Recorder:
    """An ASGI app that records what reached it; and the `send` that collects a middleware's answer."""

    def __init__(self) -> None:
        self.called = False
        self.sent: list[dict[str, Any]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.called = True

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


@pytest.mark.parametrize("extension", [True, False], ids=["http answer", "close"])
def test_websockets_are_checked_too(extension: bool) -> None:
    def run(middleware: Any, scope: dict[str, Any]) -> Recorder:
        inner = Recorder()
        if extension:
            scope["extensions"] = {"websocket.http.response": {}}
        asyncio.run(middleware(inner)(scope, None, inner.send))
        return inner

    for middleware, scope, status in [
        (lambda app: HostCheck(app, allowed_hosts()), _scope("websocket", host=EVIL), 400),
        (lambda app: OriginCheck(app), _scope("websocket", origin=f"http://{EVIL}"), 403),
    ]:
        got = run(middleware, scope)
        assert not got.called
        if extension:
            assert got.sent[0] == {"type": "websocket.http.response.start", "status": status,
                                   "headers": got.sent[0]["headers"]}
        else:
            assert got.sent == [{"type": "websocket.close", "code": 1008}]
    assert run(lambda app: OriginCheck(app), _scope("websocket", origin="http://box.lan:7860")).called


# ------------------------------------------------------------------------------------------------- body size

def test_upload_size_limit(client: httpx.Client, server: str) -> None:
    own = {"origin": server}
    small = client.post("/gradio_api/upload", headers=own, files={"files": ("a.txt", b"x" * 100)})
    assert small.status_code == 200, small.text  # the page's own uploads still work
    declared = client.post("/gradio_api/upload", headers=own, files={"files": ("big.bin", b"x" * (LIMIT + 1))})
    assert f"the limit is {LIMIT}" in json_error(declared, 413)

    def chunks(n: int) -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding chunked; a file that never ends
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.bin"\r\n\r\n'
        for _ in range(n):
            yield b"y" * 1024

    streamed = client.post("/gradio_api/upload", headers={**own, "content-type": "multipart/form-data; boundary=b"},
                           content=chunks(64))
    assert f"more than {LIMIT} bytes" in json_error(streamed, 413)
    for path in ("/gradio_api/queue/join", "/"):
        assert json_error(client.post(path, headers=own, content=b"z" * (LIMIT + 1)), 413)
    assert client.get("/api/info").status_code == 200  # the server is fine afterwards


def test_a_streamed_body_is_cut_off_at_the_limit() -> None:
    """The app never reads past the limit: it is told the client left, and its answer is replaced by 413."""
    read: list[int] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        while (message := await receive())["type"] == "http.request":
            read.append(len(message["body"]))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"client gone"})

    chunks = iter([{"type": "http.request", "body": b"x" * 60, "more_body": True}] * 10)

    async def receive() -> dict[str, Any]:
        return next(chunks)

    out = Recorder()
    asyncio.run(BodyLimit(app, limit=100)({"type": "http", "path": "/x", "headers": []}, receive, out.send))
    assert sum(read) <= 100 and read == [60]
    assert out.sent[0]["status"] == 413 and b"the limit is 100" in out.sent[1]["body"]


# ---------------------------------------------------------------------------------------------------- a bug

def test_a_bug_is_a_generic_500_and_is_logged(client: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="diffmem.app")
    response = client.post("/api/explain", json={"prompt": "boom"})
    error = json_error(response, 500)
    assert "internal error" in error and "secret" not in response.text and "Boom" not in response.text
    logged = [r for r in caplog.records if r.name == "diffmem.app"]
    assert logged and logged[0].exc_info is not None and "secret/path" in str(logged[0].exc_info[1])
    assert client.get("/api/info").status_code == 200


# ----------------------------------------------------------------------------------------------- with a token

def test_the_gate_and_the_token_together(service, monkeypatch: pytest.MonkeyPatch) -> None:
    """Host first (400 before 401), then the token, compared in constant time whatever is presented, then Origin."""
    import hmac

    from diffmem.app.server import BackgroundServer, create_app

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr("diffmem.app.auth.hmac.compare_digest", spy)
    bearer = {"authorization": f"Bearer {TOKEN}"}
    with BackgroundServer(create_app(service, token=TOKEN)) as running, \
            httpx.Client(base_url=running.url, timeout=60) as c:
        assert json_error(c.get("/api/info", headers={"host": EVIL}), 400)
        assert not compared  # refused before the token was looked at
        for wrong in ("x", "y" * 200, TOKEN[:-1] + "!", "-"):
            assert json_error(c.get("/api/info", headers={"authorization": f"Bearer {wrong}"}), 401)
        assert {b for _, b in compared} == {TOKEN.encode()} and len(compared) >= 4  # every one via compare_digest
        assert json_error(c.post("/api/detect", headers={**bearer, "origin": f"http://{EVIL}"},
                                 json={"prompts": ["a cat"]}), 403)
        assert c.post("/api/detect", headers=bearer, json={"prompts": ["a cat"]}).status_code == 200
