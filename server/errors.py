"""Errors the API reports as JSON: `{"error": {"code", "message"}}` with a 4xx/5xx status."""

from __future__ import annotations


class ApiError(Exception):
    """An error with an HTTP status and a stable machine-readable code."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidInputError(ApiError):
    """The request's content is unusable (bad image, wrong shape, over a limit)."""

    def __init__(self, code: str, message: str, status: int = 422) -> None:
        super().__init__(code, message, status)


class OverloadedError(ApiError):
    """The queue is full; the client should retry later."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("overloaded", "the server is at capacity; retry later", status=503)
        self.retry_after_s = retry_after_s
