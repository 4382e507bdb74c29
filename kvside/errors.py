"""Typed errors. Each carries an HTTP status and an OpenAI error type so every interface maps them
by type, never by message text. Messages are one line, written for the user."""

from __future__ import annotations


class KvsideError(Exception):
    status = 500
    kind = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class InvalidRequest(KvsideError):
    status = 400
    kind = "invalid_request_error"


class ModelNotFound(KvsideError):
    status = 404
    kind = "invalid_request_error"
    code = "model_not_found"


class ModelLoadError(KvsideError):
    status = 500
    kind = "server_error"
    code = "model_load_failed"


class SessionNotFound(KvsideError):
    status = 404
    kind = "invalid_request_error"
    code = "session_not_found"


class SessionBusy(KvsideError):
    status = 409
    kind = "invalid_request_error"
    code = "session_busy"


class ContextFull(KvsideError):
    status = 400
    kind = "invalid_request_error"
    code = "context_length_exceeded"


class CacheFull(KvsideError):
    """No free cells or sequences in the shared KV cache."""

    status = 503
    kind = "server_error"
    code = "cache_full"


class NoIdleSession(CacheFull):
    """Every resident session is busy, so none can go to disk to make room. The engine holds a
    task that raises it until a session is free again (when one is busy, it will be)."""


class EditError(KvsideError):
    status = 400
    kind = "invalid_request_error"
    code = "edit_failed"


class DecodeError(KvsideError):
    status = 500
    kind = "server_error"
    code = "decode_failed"


class EngineClosed(KvsideError):
    status = 503
    kind = "server_error"
    code = "engine_closed"
