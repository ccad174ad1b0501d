"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status.

The ``openai`` client turns each status into its exception (400 ``BadRequestError``, 401 ``AuthenticationError``,
404 ``NotFoundError``, 409 ``ConflictError``, 413 ``APIStatusError``, 429 ``RateLimitError``, 503
``InternalServerError``) and reads ``message`` from the body.
"""
from __future__ import annotations


class ApiError(Exception):
    """A request the API answers with an error; ``message`` is one line naming the problem."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def not_found(video_id: str) -> ApiError:
    return ApiError(404, f"no video with id {video_id!r}", code="not_found", param="video_id")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, type="authentication_error", code="invalid_api_key")


def too_large(size: int | None, limit: int) -> ApiError:
    what = f"{size} bytes" if size is not None else "more"
    return ApiError(413, f"the request body is {what}, more than the limit of {limit} bytes (--max-upload-mb)",
                    code="request_too_large")


def queue_full(limit: int) -> ApiError:
    return ApiError(429, f"{limit} jobs are already waiting, the most this server queues (--max-queue); retry later",
                    type="rate_limit_error", code="queue_full")


def unavailable(reason: str) -> ApiError:
    return ApiError(503, f"the Triton server is not ready: {reason}", type="server_error", code="server_not_ready")
