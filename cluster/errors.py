"""HTTP errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``.

Statuses: 400 bad request (malformed JSON, invalid UTF-8, prompt + max_tokens over
max_model_len), 404 unknown model or route, 413 body too large, 422 a field fails validation,
429 overloaded (with ``Retry-After``), 503 no capacity / no instance after retries, 500 a bug.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    500: "internal_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An HTTP error answer; raised anywhere in the ingress, rendered by ``to_response``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


class StreamError(Exception):
    """A request failed after its response started (no HTTP status left to change)."""
