"""Parley's error tree. HTTP status codes are chosen only in ``relay/api``.

::

    RelayError                      code: a stable machine-readable string (API.md)
    ├── BadRequest                  the caller sent something malformed          (400/413/422 at the edge)
    ├── NotFound                    missing, or someone else's (never an oracle)  (404)
    ├── Conflict                    the resource is in the wrong state           (409)
    ├── Unauthorized                missing or bad credentials                   (401)
    ├── Forbidden                   authenticated, but not allowed (admin only)   (403)
    ├── RateLimited                 too many attempts; ``retry_after_s``          (429 + Retry-After)
    ├── CapacityError               this node cannot take more work now          (503 + Retry-After)
    ├── DependencyError             a dependency failed; ``retryable`` says if trying again may help
    │   ├── StorageError            database or object store
    │   └── UpstreamError           the Realtime upstream (OpenAI or the simulator)
    ├── JobError                    a post-processing job failed; ``retryable`` says if a later try may help
    └── ... later issues add their own leaves here

Whether to retry is decided by the pure function :func:`is_retryable`, never ad hoc.
"""

from __future__ import annotations

import asyncio

__all__ = [
    "BadRequest",
    "CapacityError",
    "Conflict",
    "DependencyError",
    "Forbidden",
    "JobError",
    "NotFound",
    "RateLimited",
    "RelayError",
    "StorageError",
    "Unauthorized",
    "UpstreamError",
    "is_retryable",
]


class RelayError(Exception):
    """Base of every error Parley raises on purpose. ``code`` is part of the API contract."""

    code: str = "internal_error"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class BadRequest(RelayError):
    code = "bad_request"

    def __init__(self, detail: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(detail, code=code)
        self.field = field


class NotFound(RelayError):
    code = "not_found"


class Conflict(RelayError):
    code = "conflict"


class Unauthorized(RelayError):
    code = "unauthorized"


class Forbidden(RelayError):
    code = "forbidden"


class RateLimited(RelayError):
    code = "rate_limited"

    def __init__(self, detail: str, *, retry_after_s: int, code: str | None = None) -> None:
        super().__init__(detail, code=code)
        self.retry_after_s = max(1, retry_after_s)


class CapacityError(RelayError):
    code = "capacity"

    def __init__(self, detail: str, *, retry_after_s: int = 5, code: str | None = None) -> None:
        super().__init__(detail, code=code)
        self.retry_after_s = retry_after_s


class DependencyError(RelayError):
    code = "dependency_unavailable"

    def __init__(self, detail: str, *, retryable: bool = True, code: str | None = None) -> None:
        super().__init__(detail, code=code)
        self.retryable = retryable


class StorageError(DependencyError):
    code = "storage_unavailable"


class UpstreamError(DependencyError):
    code = "upstream_unavailable"


class JobError(RelayError):
    """A job handler's failure (``relay.worker.jobs``): retried with backoff, or dead at once.

    ``code`` is what ``parley jobs list`` shows and metrics count: a short fixed string, never content.
    """

    code = "job_failed"

    def __init__(self, detail: str, *, retryable: bool, code: str | None = None) -> None:
        super().__init__(detail, code=code)
        self.retryable = retryable


def is_retryable(exc: BaseException) -> bool:
    """True when the same operation may succeed if tried again later."""
    if isinstance(exc, (DependencyError, JobError)):
        return exc.retryable
    if isinstance(exc, RelayError):
        return False
    return isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError))
