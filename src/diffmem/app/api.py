"""The JSON HTTP API of `diffmem serve`: POST /api/detect, /api/explain, /api/generate and GET /api/info.

Requests and responses are pydantic models, so /openapi.json (and /docs) document the schema. Every error is
JSON `{"error": "<one line>"}` with a 4xx status (400 bad input, 413 over a limit, 422 malformed request) or
503 when the model's queue is full; never a traceback. A bug is a 500 with a generic line, its traceback logged.
Model calls run in worker threads behind a bounded queue, so a slow request does not block the server's event
loop (the page and other requests keep working).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffmem.app.gate import BodyLimit
from diffmem.app.service import LimitError, Service, png_base64
from diffmem.errors import DiffmemError

log = logging.getLogger("diffmem.app")
T = TypeVar("T")


class QueueFull(Exception):
    """More requests wait for the model than the queue holds: HTTP 503, try again later."""


class ModelQueue:
    """At most `concurrency` model calls at once and at most `max_waiting` more waiting; beyond that, QueueFull.

    Calls run in the thread pool (`run_in_threadpool`), so the event loop stays free while the model works.
    """

    def __init__(self, concurrency: int, max_waiting: int) -> None:
        self.concurrency = concurrency
        self.max_waiting = max_waiting
        self.pending = 0
        self._sem: asyncio.Semaphore | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in a worker thread once a slot is free, or raise QueueFull right away."""
        if self.pending >= self.concurrency + self.max_waiting:
            raise QueueFull(f"the model's queue is full ({self.pending} requests in it); try again shortly")
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        self.pending += 1
        try:
            async with self._sem:
                return await run_in_threadpool(fn, *args)
        finally:
            self.pending -= 1


# ------------------------------------------------------------------------------------------------- schema

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DetectRequest(_Strict):
    """Prompts to screen."""

    prompts: list[str] = Field(description="Prompts to score (1 to the server's max_batch, each non-blank and "
                                           "at most max_prompt_chars characters).")
    curve: bool = Field(False, description="Return the magnitude at every sampling step, not only the scored ones.")


class DetectResult(BaseModel):
    """One prompt's score and verdict."""

    prompt: str
    score: float | None = Field(description="Mean text-conditional noise magnitude over the scored steps and "
                                            "generations; null when the denoiser gave NaN/inf.")
    flagged: bool | None = Field(description="score >= threshold: the prompt is likely memorized.")
    threshold: float
    scored_steps: int = Field(description="How many leading sampling steps the score averages.")
    magnitudes: list[list[float | None]] = Field(description="d_t per generation per step (all steps with curve).")
    timesteps: list[float]
    n_tokens: int
    truncated: bool = Field(description="The prompt is longer than the text encoder takes; the rest is ignored.")
    truncated_text: str
    error: str | None


class DetectResponse(BaseModel):
    """Scores and verdicts, in request order, with the threshold and where it came from."""

    model: str
    threshold: float
    threshold_source: str
    results: list[DetectResult]


class ExplainRequest(_Strict):
    """A prompt to explain."""

    prompt: str = Field(description="The prompt (non-blank, at most max_prompt_chars characters).")
    suggest: bool = Field(True, description="Propose edits scoring below the threshold when the prompt is flagged.")


class WordOut(BaseModel):
    """A whitespace-separated word and its significance for the score (leave-one-out: the score's drop without it)."""

    text: str
    significance: float
    truncated: bool = Field(description="Cut off by the text encoder (significance 0).")


class SuggestionOut(BaseModel):
    """An edited prompt whose score is below the threshold."""

    prompt: str
    change: str
    n_changed: int
    score: float


class ExplainResponse(BaseModel):
    """Word significance, verdict and suggested edits of one prompt."""

    prompt: str
    score: float
    flagged: bool
    threshold: float
    method: str
    words: list[WordOut]
    cut_off: str
    suggestions: list[SuggestionOut]


class GenerateRequest(_Strict):
    """A prompt to generate from, plainly and with mitigation."""

    prompt: str = Field(description="The prompt (non-blank, at most max_prompt_chars characters).")


class MitigationOut(BaseModel):
    """How the mitigated image was made: the conditioning embedding found, and the guidance schedule."""

    score: float = Field(description="Detection score of the mitigated embedding.")
    initial_loss: float = Field(description="First-step loss of the prompt's own embedding.")
    final_loss: float
    iters: int
    reached: bool
    target_loss: float = Field(description="The first-step loss at which the optimisation stops.")
    method: str = Field(description="The mitigation (the model's default: embedding-delayed; on Flux, embedding).")
    guidance_from_step: int | None = Field(
        description="embedding-delayed: the sampling step from which guidance was on (None: never, or embedding).")


class CopyOut(BaseModel):
    """Testbed only: copy similarity of each image to the planted caption's training image."""

    plain: float
    mitigated: float
    copy_threshold: float


class GenerateResponse(BaseModel):
    """Plain and mitigated images (base64 PNG) from the same initial noise."""

    prompt: str
    seed: int
    num_inference_steps: int
    plain_png: str
    mitigated_png: str
    training_png: str | None = Field(description="Testbed only: the training image of a planted caption.")
    mitigation: MitigationOut
    copy_similarity: CopyOut | None
    seconds: float
    error: str | None = Field(None, description="Set when an image held NaN or inf (shown black), as the rows of "
                              "`diffmem generate` say it.")


class ErrorResponse(BaseModel):
    """Every error: one line saying what is wrong."""

    error: str
    detail: Any = None


# ------------------------------------------------------------------------------------------------- routes

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in ((400, "Bad input"), (413, "Over a limit"), (422, "Malformed request"),
                       (503, "Queue full"))
}


def _error(status: int, message: str, detail: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": " ".join(message.split())}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    """The first validation problem as one line, e.g. `body.prompts.0: Input should be a valid string`."""
    errors = exc.errors()
    if not errors:
        return "malformed request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


def add_error_handlers(app: FastAPI) -> None:
    """JSON errors for the API routes: one `error` line, 4xx/503 status, no traceback."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{k: e.get(k) for k in ("loc", "msg", "type")} for e in exc.errors()]
        return _error(422, _validation_message(exc), detail)

    @app.exception_handler(LimitError)
    async def _limit(request: Request, exc: LimitError) -> JSONResponse:
        return _error(413, str(exc))

    @app.exception_handler(DiffmemError)
    async def _bad(request: Request, exc: DiffmemError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull) -> JSONResponse:
        return _error(503, str(exc), headers={"Retry-After": "2"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's 400 for a body it cannot decode: malformed
            return _error(422, f"the request body is not UTF-8 JSON ({exc.__cause__.reason} at byte "
                               f"{exc.__cause__.start})")
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(request, exc)  # outside a route (a middleware); in one, ContainedRoute answers


def internal_error(request: Request, exc: BaseException) -> JSONResponse:
    """A bug, never the client's input: logged with its traceback, answered 500 with a generic line (nothing of
    the exception, which may hold paths or data, reaches the client)."""
    log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal error (a bug in the server, not your request); the server log has the details")


_EXPECTED = (StarletteHTTPException, RequestValidationError, DiffmemError, QueueFull)
"""Exceptions the app's handlers turn into 4xx/503 answers."""


class ContainedRoute(APIRoute):
    """An API route whose unexpected exceptions become `internal_error` right there, instead of reaching the
    server, which would log them again and close the client's keep-alive connection after the 500."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def contained(request: Request) -> Response:
            try:
                return await handler(request)
            except _EXPECTED:
                raise
            except Exception as exc:
                return internal_error(request, exc)

        return contained


def body_limit(service: Service) -> int:
    """Largest request body the API reads: a full batch of prompts at the length limit, JSON-escaped."""
    return 6 * service.limits.max_prompt_chars * service.limits.max_batch + 65536


def api_router(service: Service, queue: ModelQueue) -> APIRouter:
    """The /api routes over `service`, each model call through `queue`."""
    router = APIRouter(prefix="/api", tags=["api"], responses=_ERRORS, route_class=ContainedRoute)

    @router.get("/info", summary="Model, threshold and its source, settings and limits")
    async def info() -> dict[str, Any]:
        return service.info()

    @router.post("/detect", response_model=DetectResponse, summary="Score prompts and flag likely memorized ones")
    async def detect(req: DetectRequest) -> dict[str, Any]:
        service.check_prompts(req.prompts)  # fail fast, before waiting in the queue
        rows = await queue.run(service.screen, req.prompts, req.curve)
        return {"model": service.model, "threshold": service.threshold.value,
                "threshold_source": service.threshold.source, "results": rows}

    @router.post("/explain", response_model=ExplainResponse, summary="Which words drive a prompt's score, and fixes")
    async def explain(req: ExplainRequest) -> dict[str, Any]:
        service.check_prompt(req.prompt)
        return await queue.run(service.explain_prompt, req.prompt, req.suggest)

    @router.post("/generate", response_model=GenerateResponse, summary="Plain and mitigated images of a prompt")
    async def generate(req: GenerateRequest) -> dict[str, Any]:
        service.check_prompt(req.prompt)
        out = await queue.run(service.generate_pair, req.prompt)
        training = out.pop("training")
        return {**out, "plain_png": png_base64(out.pop("plain")), "mitigated_png": png_base64(out.pop("mitigated")),
                "training_png": None if training is None else png_base64(training)}

    allowed = {r.path: sorted(r.methods or ()) for r in router.routes if isinstance(r, APIRoute)}

    every = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]  # whatever else a client sends is JSON too

    @router.api_route("/{rest:path}", methods=every, include_in_schema=False)
    async def unknown(rest: str, request: Request) -> JSONResponse:
        """JSON 405/404 for every other /api request (the page mounted at / would answer with its own)."""
        path = f"/api/{rest}"
        if path in allowed:
            methods = ", ".join(allowed[path])
            return _error(405, f"{request.method} {path} is not allowed; use {methods}", headers={"Allow": methods})
        return _error(404, f"no API route {path}; the routes are in /openapi.json")

    return router


def add_body_limit(app: FastAPI, limit: int) -> None:
    """Refuse /api request bodies larger than `limit` bytes with 413: before reading them when their size is
    declared, as soon as the limit is passed when they are streamed (chunked) without one."""
    app.add_middleware(BodyLimit, limit=limit, applies=lambda path: path.startswith("/api/"))
