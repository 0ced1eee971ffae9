"""`diffmem serve`: one FastAPI app with the JSON API under /api and the Gradio page at /, served by uvicorn.

Bound to 127.0.0.1 unless `--host` says otherwise; no share link, no analytics, no interactive docs page
(FastAPI's /docs loads its script from a CDN): the schema is at /openapi.json.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from diffmem.app.gate import DEFAULT_MAX_UPLOAD  # noqa: E402
from diffmem.app.service import (  # noqa: E402
    Limits,
    Service,
    Settings,
    calibrate_testbed,
    threshold_from_options,
)
from diffmem.errors import InputError  # noqa: E402

DESCRIPTION = """Screen prompts for training-data memorization before generating (Wen et al., ICLR 2024).

Errors are JSON `{"error": "<one line>"}`: 400 bad input or a Host name this server does not answer to, 401 no or
a wrong access token (a server started with one), 403 a request from another origin that would change state, 413
over a limit (prompt length, batch size, body size), 422 malformed request, 500 an internal error (a bug; the
server log has the details), 503 queue full (retry after the `Retry-After` seconds)."""


def create_api_app(service: Service) -> Any:
    """The FastAPI app with the /api routes over `service` (its model queue at `app.state.model_queue`)."""
    from fastapi import FastAPI

    from diffmem import __version__
    from diffmem.app.api import ModelQueue, add_body_limit, add_error_handlers, api_router, body_limit

    app = FastAPI(title="diffmem", version=__version__, description=DESCRIPTION, docs_url=None, redoc_url=None)
    add_error_handlers(app)
    add_body_limit(app, body_limit(service))
    app.state.model_queue = ModelQueue(service.limits.concurrency, service.limits.max_queue)
    app.include_router(api_router(service, app.state.model_queue))
    return app


def create_app(service: Service, token: str | None = None, hosts: Iterable[str] | None = None,
               max_upload: int = DEFAULT_MAX_UPLOAD) -> Any:
    """The API app with the Gradio page mounted at / (no share link, no analytics, no server-side rendering),
    behind `diffmem.app.gate`: Host names in `hosts` only (default: loopback names), same-origin state changes,
    request bodies outside /api of at most `max_upload` bytes and, with `token`, the token on every request."""
    import gradio as gr

    from diffmem.app.gate import allowed_hosts, guard
    from diffmem.app.ui import CSS, build_ui, theme

    app = gr.mount_gradio_app(create_api_app(service), build_ui(service), path="/", footer_links=[],
                              ssr_mode=False, pwa=False, mcp_server=False, theme=theme(), css=CSS, show_error=True)
    guard(app, allowed_hosts() if hosts is None else hosts, token, max_upload,
          applies=lambda path: not path.startswith("/api/"))  # /api has its own limit (create_api_app)
    return app


def build_service(model: str, device: Any = None, threshold: float | None = None, calibration: Path | None = None,
                  settings: Settings | None = None, limits: Limits | None = None,
                  allow_pickle: bool = False) -> Service:
    """Load the model once and fix its threshold (flag, calibration file, the model's own, or the testbed's own
    calibration)."""
    from diffmem.models.defaults import ModelDefaults
    from diffmem.models.loading import load_pipeline, quiet_diffusers

    quiet_diffusers()
    settings = settings or Settings()
    # before loading: fail fast on bad options
    fixed = threshold_from_options(model, threshold, calibration, ModelDefaults.for_model(model))
    pipe = load_pipeline(model, device=device, allow_pickle=allow_pickle)
    service = Service(pipe, model, fixed or calibrate_testbed(pipe, settings), settings, limits)
    service.analyse("warm up")  # the first request of a user should not pay for one-time set-up
    return service


def check_port(host: str, port: int) -> None:
    """Fail with one line when `host:port` cannot be bound (in use, or not an address of this machine)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, port))
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (choose another --port)") from None


class BackgroundServer:
    """Run the app with uvicorn in a daemon thread (for tests and screenshots); `url` once started."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        if port == 0:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(model: str, host: str = "127.0.0.1", port: int = 7860, device: Any = None, threshold: float | None = None,
          calibration: Path | None = None, settings: Settings | None = None, limits: Limits | None = None,
          echo: Any = print, token: str | None = None, allow_pickle: bool = False,
          allowed_host: Sequence[str] = (), max_upload: int = DEFAULT_MAX_UPLOAD) -> None:
    """Load the model, fix the threshold, and serve the page and the API until interrupted. A host other than
    loopback needs `token` (`diffmem.app.auth`); the token is never printed or logged. Requests must name the
    server as a loopback name, `host` or one of `allowed_host`; bodies outside /api are at most `max_upload`
    bytes (`diffmem.app.gate`)."""
    import uvicorn

    from diffmem.app.auth import check_access
    from diffmem.app.gate import WILDCARDS, allowed_hosts

    check_access(host, token)
    hosts = allowed_hosts(host, allowed_host)
    check_port(host, port)
    echo(f"loading {model} ...")
    service = build_service(model, device, threshold, calibration, settings, limits, allow_pickle)
    app = create_app(service, token, hosts, max_upload)
    shown = f"[{host}]" if ":" in host else host
    echo(f"threshold {service.threshold.value:.6g} from: {service.threshold.source}")
    echo(f"serving http://{shown}:{port}  (page at /, JSON API at /api/detect and /api/explain, schema at "
         "/openapi.json; Ctrl-C stops)")
    if token is not None:
        echo("every request needs the access token: open the page once as /?token=<token>, or send the header "
             "'Authorization: Bearer <token>'")
    if host.strip("[]") in WILDCARDS and not allowed_host:
        echo("only loopback names reach it: add --allowed-host NAME for each name or address clients use for "
             "this machine (requests naming any other host get 400)")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
