"""The FastAPI app: routes, authentication, body limits, OpenAI-shaped errors, metrics.

    loaded = inference.load.load(PATH)
    app = create_app(loaded, num_slots=8, api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)      # or inference.serve.testing.running_server

Every error is `{"error": {"message", "type", "param", "code"}}` with its status: 400 bad
request, 401 missing or wrong bearer token (every /v1 route, compared in constant time),
404 unknown route or model, 408 past the per-request timeout, 413 body over the limit, 429
queue full (with Retry-After), 500 a server fault (logged here, never sent).
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import logging
import os
import time

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from inference.engine import Engine
from inference.serve.handlers import Handlers
from inference.serve.hooks import Hooks
from inference.serve.metrics import Metrics
from inference.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModerationRequest,
    error_body,
)
from inference.serve.worker import EngineLoop

log = logging.getLogger(__name__)
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_BODY_BYTES = 1 << 20


class _Guard:
    """ASGI middleware: body size limit (413), bearer token on /v1 (401), status counts."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

    async def _reply(self, send, status: int, body: dict, headers=()) -> None:
        payload = JSONResponse(body, status_code=status, headers=dict(headers))
        await send({"type": "http.response.start", "status": status, "headers": payload.raw_headers})
        await send({"type": "http.response.body", "body": payload.body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path.startswith(("/v1/", "/health", "/metrics")) else "other"
        status = [500]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            if self.api_key is not None and path.startswith("/v1"):
                given = headers.get(b"authorization", b"").decode("latin-1")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                    return await self._reply(counted, 401, error_body(
                        "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                        "invalid_request_error", code="invalid_api_key"), [("WWW-Authenticate", "Bearer")])
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                return await self._reply(counted, 413, self._too_large())
            seen = [0]

            async def limited():
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > self.max_body_bytes:
                        raise _TooLarge
                return message

            try:
                return await self.app(scope, limited, counted)
            except _TooLarge:
                return await self._reply(counted, 413, self._too_large())
        finally:
            self.metrics.requests.inc(route=route, status=str(status[0]))

    def _too_large(self) -> dict:
        return error_body(f"the request body is larger than the server's limit of {self.max_body_bytes} bytes",
                          "invalid_request_error", code="request_too_large")


class _TooLarge(Exception):
    pass


def _errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        message = first.get("msg", "invalid request")
        message = f"{param}: {message}" if param else message
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        else:
            message = str(e.detail)
        return JSONResponse(error_body(message, "invalid_request_error", code=str(e.status_code)),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request, e: Exception):
        log.exception("error while serving %s %s", request.method, request.url.path)
        return JSONResponse(error_body("the server failed on this request; its log has the details", "server_error"),
                            status_code=500)


def create_app(loaded, *, model_name: str | None = None, num_slots: int = 8, max_queue: int = 64,
               timeout_s: float = 600.0, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               chat_template: str | None = None, max_len: int | None = None, block_size: int | None = None,
               hooks: Hooks | None = None, kv_cache: str | None = None) -> FastAPI:
    """The server's app over `loaded` (`inference.load.Loaded`); the engine thread starts now.

    Args:
      loaded: model, params and tokenizer.
      model_name: the id clients pass as `model` (default: the checkpoint's directory name).
      num_slots: requests decoded together (continuous batching).
      max_queue: requests that may wait for a slot; past it, 429.
      timeout_s: the most seconds one request may take; past it 408 and its slots are freed.
      api_key: if set, /v1 requests need `Authorization: Bearer api_key`.
      max_body_bytes: the largest request body (413 above).
      chat_template: None: the tokenizer's; "chatml", "llama3" or a Jinja string.
      max_len, block_size: the engine's positions per slot and paged-cache block size.
      hooks: embeddings, retrieval, moderation (`Hooks.load`).
      kv_cache: the engine's KV-cache storage, "float" | "int8" | "fp8" (None: the model's own).
    """
    if max_queue < 0 or timeout_s <= 0 or max_body_bytes < 1:
        raise ValueError(f"max_queue={max_queue} must be >= 0, timeout_s={timeout_s} and "
                         f"max_body_bytes={max_body_bytes} > 0")
    if chat_template:
        from data.chat import check_template_key
        check_template_key(chat_template)
    hooks = hooks or Hooks()
    model_name = model_name or os.path.basename(os.path.normpath(loaded.source.split(",")[0].split()[-1]))
    metrics = Metrics()
    engine = Engine(loaded.model, loaded.params, num_slots=num_slots, max_len=max_len, block_size=block_size,
                    kv_cache=kv_cache)
    loop = EngineLoop(engine, max_queue=max_queue, metrics=metrics)
    handlers = Handlers(loaded, loop, model_name=model_name, timeout_s=timeout_s, chat_template=chat_template,
                        hooks=hooks)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        loop.close()

    app = FastAPI(title="lmlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.loop, app.state.handlers, app.state.metrics = loop, handlers, metrics
    _errors(app)
    _routes(app, handlers, loop, metrics, hooks, model_name)
    if os.path.isdir(STATIC_DIR):
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    return app


def _routes(app: FastAPI, handlers: Handlers, loop: EngineLoop, metrics: Metrics, hooks: Hooks,
            model_name: str) -> None:
    created = int(time.time())

    @app.get("/health")
    async def health():
        if loop.failure:
            return JSONResponse(error_body(f"the engine failed: {loop.failure}", "server_error"), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(queue=loop.waiting, running=loop.running,
                                                slots=loop.engine.num_slots),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        page = os.path.join(STATIC_DIR, "index.html")
        if not os.path.isfile(page):
            raise APIError(404, "this server has no chat page (inference/serve/static/index.html is missing)")
        return FileResponse(page)

    @app.get("/v1/models")
    async def models():
        data = [{"id": model_name, "object": "model", "created": created, "owned_by": "lmlab",
                 "max_model_len": loop.engine.max_len}]
        if hooks.embedder is not None:
            data.append({"id": hooks.embedding_name, "object": "model", "created": created, "owned_by": "lmlab"})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        return await handlers.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: HTTPRequest):
        return await handlers.chat(body, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        if hooks.embedder is None:
            raise APIError(404, "this server has no embedding model; start it with --embedding_model=DIR",
                           param="model", code="model_not_found")
        if body.model != hooks.embedding_name:
            raise APIError(404, f"the embedding model {body.model!r} does not exist; this server has "
                           f"{hooks.embedding_name!r}", param="model", code="model_not_found")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if body.dimensions is not None and body.dimensions != hooks.embedder.dim:
            raise APIError(400, f"dimensions={body.dimensions}: this model's embeddings have {hooks.embedder.dim}",
                           param="dimensions")
        vectors = np.asarray(await hooks.embed(texts), np.float32)
        tokens = sum(len(hooks.embedder.tokenizer.encode(t)) for t in texts)
        def encoded(v):  # the openai client asks for base64 (little-endian float32) and decodes it
            return base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" \
                else v.tolist()

        return {"object": "list", "model": hooks.embedding_name, "usage": {"prompt_tokens": tokens,
                                                                            "total_tokens": tokens},
                "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)]}

    @app.post("/v1/moderations")
    async def moderations(body: ModerationRequest):
        if hooks.moderator is None:
            raise APIError(404, "this server has no moderator; start it with --moderation=SPEC")
        texts = [body.input] if isinstance(body.input, str) else body.input
        results = await hooks.moderate(texts)
        return {"id": f"modr-{time.time_ns()}", "model": body.model or "lmlab-moderation", "results": [
            {"flagged": r.flagged, "categories": r.categories, "category_scores": r.scores} for r in results]}
