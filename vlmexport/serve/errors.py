"""Errors the server answers with, in OpenAI's error JSON (``{"error": {message, type, param, code}}``).

Every client mistake is an :class:`APIError` with its HTTP status; the app turns it
into a JSON response. Nothing a client sends may produce a 500 or a traceback.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    status: int = 400
    type: str = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class BadRequest(APIError):
    status = 400


class PayloadTooLarge(APIError):
    status = 413


class Unprocessable(APIError):
    status = 422


class ModelNotFound(APIError):
    status = 404  # what OpenAI answers for an unknown model (code model_not_found)


class Overloaded(APIError):
    status = 429
    type = "rate_limit_error"


class Timeout(APIError):
    status = 504
    type = "timeout_error"


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
