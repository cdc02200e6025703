"""The error every endpoint raises; each API renders it in its own shape (OpenAI's
{"error": {...}}, Anthropic's {"type": "error", "error": {...}})."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error returned to the client with this HTTP status, in the shape of the API it came
    through (body() for OpenAI routes, anthropic_body() for /v1/messages)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        """Anthropic's error shape; its type follows the status as the Messages API's does."""
        return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(self.status, "api_error"),
                                           "message": self.message}}


ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}
