"""The server's one error type: what a client receives in OpenAI's error shape."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A refusal the client receives as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param, self.status, self.kind = message, code, param, status, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
