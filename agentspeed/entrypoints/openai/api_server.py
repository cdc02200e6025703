"""The HTTP server (FastAPI + uvicorn) in front of AsyncLLM.

Routes: OpenAI's /v1/chat/completions, /v1/completions, /v1/responses (+ GET by id),
Anthropic's /v1/messages and /v1/messages/count_tokens, and /v1/models, /health, /metrics,
/tokenize, /detokenize, /version, and for a gateway /v1/loads, /server_info, /model_info. Errors are the route's API's error JSON (Anthropic's
shape under /v1/messages, OpenAI's elsewhere): 400 invalid request (validation errors
included, FastAPI's 422 is not used), 401 bad API key, 404 unknown model or route, 503
engine not ready, dead or overloaded, 500 for anything unexpected.
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
from agentspeed.entrypoints import loads
from agentspeed.entrypoints.anthropic.protocol import (
    AnthropicError,
    CountTokensRequest,
    MessagesRequest,
)
from agentspeed.entrypoints.anthropic.serving_messages import count_tokens, create_message
from agentspeed.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
)
from agentspeed.entrypoints.openai.protocol_responses import ResponsesRequest
from agentspeed.entrypoints.openai.serving import ServerState
from agentspeed.entrypoints.openai.serving_chat import create_chat_completion
from agentspeed.entrypoints.openai.serving_completion import create_completion
from agentspeed.entrypoints.openai.serving_responses import create_response, get_response
from agentspeed.errors import ConfigError

log = logging.getLogger("agentspeed.server")

_OPEN_PATHS = {"/health", "/metrics", "/version", "/ping"}


def _error(request: Request, status: int, message: str, type_: str = "invalid_request_error",
           param: str | None = None, code: str | None = None) -> JSONResponse:
    return _render(request, APIError(status, message, type_, param, code))


def _render(request: Request, exc: APIError) -> JSONResponse:
    anthropic = request.url.path.startswith("/v1/messages")
    return JSONResponse(exc.anthropic_body() if anthropic else exc.body(), status_code=exc.status)


def _documented(*statuses: int, anthropic: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route really returns."""
    model = AnthropicError if anthropic else ErrorResponse
    why = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or id",
           500: "unexpected server error", 503: "engine not ready, dead or overloaded"}
    return {s: {"model": model, "description": why[s]} for s in statuses}


_V1_ERRORS = (400, 401, 404, 500, 503)
_SSE = {"text/event-stream": {"schema": {"type": "string"}}}


def _public_openapi(app: FastAPI, show_test_fields: bool) -> Callable[[], dict[str, Any]]:
    """The schema without the test-only request field unless test hooks are on."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            if not show_test_fields:
                for comp in schema.get("components", {}).get("schemas", {}).values():
                    comp.get("properties", {}).pop("agentspeed_test_output", None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


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

    app.openapi = _public_openapi(app, state.enable_test_hooks)  # type: ignore[method-assign]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        return _error(request, 400, msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(request, exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                      "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(request, 500, f"internal error: {type(exc).__name__}: {exc}", "internal_server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        key = state.api_key
        if key and request.url.path not in _OPEN_PATHS:
            # OpenAI clients send a bearer token, Anthropic clients x-api-key; either works.
            bearer = request.headers.get("authorization", "")
            x_key = request.headers.get("x-api-key", "")
            if not (hmac.compare_digest(bearer.encode(), f"Bearer {key}".encode())
                    or hmac.compare_digest(x_key.encode(), key.encode())):
                return _error(request, 401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' "
                              "or 'x-api-key: <key>'", "invalid_request_error", code="invalid_api_key")
        if request.url.path.startswith("/v1/") and not state.engine.healthy:
            return _error(request, 503, f"the engine is not available ({state.engine.dead or 'not ready'})",
                          "service_unavailable")
        return await call_next(request)

    @app.get("/health", responses={200: {"description": "the engine is serving",
                                         "content": {"application/json": {"example": {"status": "ok"}}}},
                                   **_documented(503)})
    async def health(request: Request) -> Response:
        if state.engine.healthy:
            return JSONResponse({"status": "ok"})
        return _error(request, 503, f"engine unavailable: {state.engine.dead or 'not ready'}", "service_unavailable")

    @app.get("/ping", responses={200: {"description": "the engine is serving"}, **_documented(503)})
    async def ping(request: Request) -> Response:
        return await health(request)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # What SMG reads from an HTTP worker (SGLang's routes): loads for least_load,
    # power_of_two and overload protection; server and model facts at registration.
    @app.get("/v1/loads", responses=_documented(401, 503))
    @app.get("/loads", responses=_documented(401, 503))
    @app.get("/get_loads", include_in_schema=False)
    async def get_loads() -> dict[str, Any]:
        return loads.as_json(loads.get_loads(state))

    @app.get("/server_info", responses=_documented(401))
    @app.get("/get_server_info", include_in_schema=False)
    async def server_info() -> dict[str, Any]:
        return loads.as_json(loads.server_info(state))

    @app.get("/model_info", responses=_documented(401))
    @app.get("/get_model_info", include_in_schema=False)
    async def model_info() -> dict[str, Any]:
        return loads.as_json(loads.model_info(state))

    @app.get("/v1/models", responses=_documented(401, 503))
    async def models() -> dict[str, Any]:
        info = state.engine.info
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": 0, "owned_by": "agentspeed",
            "root": state.model_name, "max_model_len": info.max_model_len if info else None,
        }]}

    streaming: dict[int | str, dict[str, Any]] = {200: {"description": "the result; with stream=true, server-sent events", "content": _SSE}}

    @app.post("/v1/chat/completions", responses={**streaming, **_documented(*_V1_ERRORS)})
    async def chat(req: ChatCompletionRequest, raw: Request) -> Any:
        return await create_chat_completion(state, req, raw)

    @app.post("/v1/completions", responses={**streaming, **_documented(*_V1_ERRORS)})
    async def completions(req: CompletionRequest, raw: Request) -> Any:
        return await create_completion(state, req, raw)

    @app.post("/v1/responses", responses={**streaming, **_documented(*_V1_ERRORS)})
    async def responses(req: ResponsesRequest, raw: Request) -> Any:
        return await create_response(state, req, raw)

    @app.get("/v1/responses/{response_id}", responses=_documented(401, 404))
    async def responses_get(response_id: str) -> Any:
        return get_response(state, response_id)

    @app.post("/v1/messages", responses={**streaming, **_documented(*_V1_ERRORS, anthropic=True)})
    async def messages(req: MessagesRequest, raw: Request) -> Any:
        return await create_message(state, req, raw)

    @app.post("/v1/messages/count_tokens", responses=_documented(400, 401, 404, 503, anthropic=True))
    async def messages_count_tokens(req: CountTokensRequest) -> Any:
        return await count_tokens(state, req)

    @app.post("/tokenize", responses=_documented(400, 401, 404))
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

    @app.post("/detokenize", responses=_documented(400, 401, 404))
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
