"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of AsyncLLM.

Routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, /tokenize,
/detokenize, /version. Every error is OpenAI's error JSON: 400 invalid request (validation
errors included, FastAPI's 422 is not used), 401 bad API key, 404 unknown model, 503 engine
not ready, dead or overloaded, 500 for anything unexpected.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentspeed import __version__
from agentspeed.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from agentspeed.entrypoints.openai.serving import ServerState
from agentspeed.entrypoints.openai.serving_chat import create_chat_completion
from agentspeed.entrypoints.openai.serving_completion import create_completion
from agentspeed.errors import ConfigError

log = logging.getLogger("agentspeed.server")

_OPEN_PATHS = {"/health", "/metrics", "/version", "/ping"}


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type_, param, code).body(), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {e.get('msg', '')}", None
    param = ".".join(loc) or None
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="agentspeed", version=__version__, docs_url=None, redoc_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        return _error(400, msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                      "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "internal_server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        key = state.api_key
        if key and request.url.path not in _OPEN_PATHS:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
                return _error(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                              "invalid_request_error", code="invalid_api_key")
        if request.url.path.startswith("/v1/") and not state.engine.healthy:
            return _error(503, f"the engine is not available ({state.engine.dead or 'not ready'})",
                          "service_unavailable")
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        if state.engine.healthy:
            return Response(status_code=200)
        return _error(503, f"engine unavailable: {state.engine.dead or 'not ready'}", "service_unavailable")

    @app.get("/ping")
    async def ping() -> Response:
        return await health()

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        info = state.engine.info
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": 0, "owned_by": "agentspeed",
            "root": state.model_name, "max_model_len": info.max_model_len if info else None,
        }]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request) -> Any:
        return await create_chat_completion(state, req, raw)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Any:
        return await create_completion(state, req, raw)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        state.check_model(req.model)
        tok = state.tokenizer()
        if req.messages is not None:
            try:
                ids = tok.apply_chat_template([m.to_template() for m in req.messages], req.add_generation_prompt)
            except (ConfigError, ValueError) as e:  # no chat template, or the template refused
                raise APIError(400, str(e), param="messages") from None
        elif req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "send `prompt` or `messages`")
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        state.check_model(req.model)
        tok = state.tokenizer()
        if any(t < 0 or t >= tok.vocab_size for t in req.tokens):
            raise APIError(400, "token id out of the vocabulary", param="tokens")
        return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}

    return app


async def serve_forever(app: FastAPI, host: str, port: int, drain_timeout: float, log_level: str) -> None:
    """Serve until SIGINT/SIGTERM, then stop accepting and let open requests finish (up to
    drain_timeout). Returns normally after a signal, so the caller can stop the engine."""
    import signal

    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after its graceful shutdown, which would kill the
            # process before the engine is stopped; we only flag the exit.
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, h in old.items():
                    signal.signal(sig, h)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=max(1, int(drain_timeout)), lifespan="off")
    await _Server(config).serve()
