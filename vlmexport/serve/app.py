"""The FastAPI app: OpenAI chat completions (plain and SSE), /v1/models, /health, /metrics.

``create_app(config)`` loads the bundle (``max_concurrency`` copies) and returns the app;
``serve(config)`` runs it under uvicorn. Every client mistake is answered in OpenAI's
error JSON with its status (400, 404, 413, 422, 429, 504); a failure of the server
itself is a 500 with a one-line message, the traceback going to the server log only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import VlmexportError
from ..runtimes.pipeline import Pipeline
from .config import ServeConfig, ServeConfigError
from .engine import Delta, Done, Engine, Failed, Prepared
from .errors import APIError, BadRequest, ModelNotFound, PayloadTooLarge, Unprocessable, error_body
from .messages import to_conversation
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .schema import ChatCompletionRequest, chunk, completion, completion_id, model_card, usage

log = logging.getLogger(__name__)


def load_pipelines(cfg: ServeConfig) -> list[Pipeline]:
    """``max_concurrency`` independent copies of the model (each its own sessions and KV cache)."""
    from ..runtimes.loader import load
    from ..runtimes.environment import physical_cores

    copies = 1 if cfg.batch else cfg.max_concurrency
    threads = cfg.threads or max(1, physical_cores() // copies)
    # one copy spins inside its decoder runs (the default); several copies share the cores, and a thread
    # spinning for one would take the core another copy's step is waiting for
    spin = "decode" if copies == 1 else "off"
    first = load(cfg.bundle, backend=cfg.backend, precision=cfg.precision, device=cfg.device, threads=threads,
                 spin=spin)
    # the bundle's hashes were checked once; the other copies open the same files
    rest = [load(cfg.bundle, backend=cfg.backend, precision=cfg.precision, device=cfg.device, threads=threads,
                 verify="none", spin=spin) for _ in range(copies - 1)]
    return [first, *rest]


def create_app(cfg: ServeConfig, pipelines: Sequence[Pipeline] | None = None) -> FastAPI:
    metrics = Metrics()
    pipes = pipelines or load_pipelines(cfg)
    if cfg.batch:
        from .batching import BatchEngine

        if not pipes[0].backend.startswith("onnxruntime"):
            raise ServeConfigError(f"--batch needs the onnxruntime backend (this bundle runs on {pipes[0].backend}); "
                                   "pass --backend onnxruntime or leave --batch out")
        engine: Engine = BatchEngine(pipes[0], cfg.batch, metrics, cfg.max_queue)
    else:
        engine = Engine(pipes, metrics, cfg.max_queue)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="vlmexport", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.config = engine, cfg
    _error_handlers(app, metrics)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": cfg.served_model, "backend": engine.pipeline.backend,
                "slots": getattr(engine, "slots", len(engine.pipelines)), "inflight": engine.inflight}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(cfg.served_model, created, engine.pipeline.backend)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != cfg.served_model:
            raise ModelNotFound(f"the model {model_id!r} does not exist here; this server serves "
                                f"{cfg.served_model!r}", param="model", code="model_not_found")
        return model_card(cfg.served_model, created, engine.pipeline.backend)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        deadline = time.monotonic() + cfg.request_timeout_s
        req, job = await _parse_and_prepare(request, cfg, engine, metrics)
        cancel = threading.Event()
        if req.stream:
            return await _stream(req, job, engine, cfg, deadline, cancel, request)
        return await _complete(job, engine, cfg, deadline, cancel, request)

    return app


# ------------------------------------------------------------------- request
async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {int(declared):,} bytes, over this server's {limit:,}; send "
                              "smaller images", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body is over this server's {limit:,} bytes; send smaller images",
                                  code="request_too_large")
    return bytes(body)


def _parse(body: bytes) -> ChatCompletionRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON ({exc.__class__.__name__}); send a JSON object") \
            from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "body"
        raise Unprocessable(f"{where}: {first.get('msg', 'invalid value')} ({exc.error_count()} problem(s) in "
                            "the request body)", param=where) from None


async def _parse_and_prepare(request: Request, cfg: ServeConfig, engine: Engine,
                             metrics: Metrics) -> tuple[ChatCompletionRequest, Prepared]:
    try:
        req = _parse(await _read_body(request, cfg.max_body_bytes))
        req.check_supported()
        if req.model != cfg.served_model:
            raise ModelNotFound(f"the model {req.model!r} does not exist here; this server serves "
                                f"{cfg.served_model!r}", param="model", code="model_not_found")
        pipe = engine.pipeline
        conv = await asyncio.to_thread(to_conversation, req.messages, cfg, pipe.template.image_token,
                                       engine.max_images)
        gen = dict(max_new_tokens=req.token_limit() or cfg.default_max_tokens,
                   temperature=req.temperature or 0.0, top_p=req.top_p, seed=req.seed,
                   stop_strings=tuple(req.stop_list()))
        try:
            job = await asyncio.to_thread(engine.prepare, conv, **gen)
        except VlmexportError as exc:  # the prompt does not fit, an image does not decode...
            raise BadRequest(str(exc), param="messages") from None
    except APIError:
        metrics.requests.labels("client_error").inc()
        raise
    return req, job


# ------------------------------------------------------------------ response
async def _watch_disconnect(request: Request, gone: asyncio.Event, cancel: threading.Event) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone.set()
            cancel.set()
            return


async def _complete(job: Prepared, engine: Engine, cfg: ServeConfig, deadline: float, cancel: threading.Event,
                    request: Request) -> Response:
    gone = asyncio.Event()
    watcher = asyncio.ensure_future(_watch_disconnect(request, gone, cancel))
    try:
        text: list[str] = []
        async for ev in engine.generate(job, deadline, cancel, gone):
            if isinstance(ev, Delta):
                text.append(ev.text)
            elif isinstance(ev, Failed):
                raise ev.error
            elif isinstance(ev, Done):
                body = completion(completion_id(), cfg.served_model, "".join(text), ev.finish_reason,
                                  ev.prompt_tokens, ev.completion_tokens)
                return JSONResponse(body)
        # the client went away while queued: nobody reads this answer
        return Response(status_code=499)
    finally:
        watcher.cancel()


async def _stream(req: ChatCompletionRequest, job: Prepared, engine: Engine, cfg: ServeConfig, deadline: float,
                  cancel: threading.Event, request: Request) -> Response:
    gone = asyncio.Event()
    watcher = asyncio.ensure_future(_watch_disconnect(request, gone, cancel))
    events = engine.generate(job, deadline, cancel, gone)
    try:
        first = await anext(events)  # admission, queueing and errors before any token are HTTP errors
    except StopAsyncIteration:
        return Response(status_code=499)
    finally:
        watcher.cancel()
    if isinstance(first, Failed):
        await events.aclose()
        raise first.error
    cid, created = completion_id(), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def body() -> AsyncIterator[str]:
        try:
            yield sse(chunk(cid, cfg.served_model, created, {"role": "assistant", "content": ""}))
            ev = first
            while True:
                if isinstance(ev, Delta):
                    yield sse(chunk(cid, cfg.served_model, created, {"content": ev.text}))
                elif isinstance(ev, Failed):
                    err = ev.error if isinstance(ev.error, APIError) else None
                    yield sse(err.body() if err else error_body("the server failed while generating; see its log",
                                                                "server_error"))
                    break
                elif isinstance(ev, Done):
                    yield sse(chunk(cid, cfg.served_model, created, {}, ev.finish_reason))
                    if include_usage:
                        yield sse(chunk(cid, cfg.served_model, created, {}, None,
                                        usage(ev.prompt_tokens, ev.completion_tokens), with_choice=False))
                    break
                ev = await anext(events)
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()  # sets the cancel flag: the worker stops at its next token

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -------------------------------------------------------------------- errors
def _error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(f"invalid request: {exc.errors()[0].get('msg', '')}"), status_code=422)

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s", exc, exc_info=exc)
        return JSONResponse(error_body("internal server error; see the server log", "server_error"),
                            status_code=500)


def serve(cfg: ServeConfig, log_level: str = "info") -> None:
    """Load the bundle, then listen (the port is open only once the model is ready)."""
    import uvicorn

    app = create_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=log_level, timeout_graceful_shutdown=5)
