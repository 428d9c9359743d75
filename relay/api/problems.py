"""Every 4xx/5xx answer as ``application/problem+json`` (RFC 9457), with a stable ``code``.

The middleware here is the one place where Parley's error tree meets HTTP status codes.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from relay import errors

__all__ = ["abort_started_response", "problem", "problem_middleware"]

log = logging.getLogger("relay.api")

PROBLEM_TYPE: Final = "application/problem+json"
# BadRequest codes that mean "well-formed but fails the schema" (422) rather than malformed (400).
UNPROCESSABLE_CODES: Final = frozenset({"invalid_request", "confirmation_invalid"})

# aiohttp's own HTTP exceptions (routing, body size) mapped to our stable codes.
_HTTP_CODES: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}

_ERROR_STATUS: Final[tuple[tuple[type[errors.RelayError], int], ...]] = (
    (errors.BadRequest, 400),
    (errors.Unauthorized, 401),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.Forbidden, 403),
    (errors.RateLimited, 429),
    (errors.CapacityError, 503),
    (errors.DependencyError, 503),
)


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """Build a problem+json response; ``detail`` must never hold secrets, payloads or stack traces."""
    body = {
        "type": f"https://parley.dev/problems/{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    return web.Response(status=status, text=json.dumps(body), content_type=PROBLEM_TYPE, headers=headers)


def abort_started_response(request: web.Request) -> None:
    """Cut the connection of a response whose headers (and maybe part of its body) were sent.

    From then on an error cannot become a problem+json answer: one returned now would be written
    into the middle of the body. Aborting makes the client see an incomplete body (a transfer error),
    never a corrupt or a silently shortened one.
    """
    transport = request.transport
    if transport is not None:
        transport.abort()


def _status_for(exc: errors.RelayError) -> int:
    if isinstance(exc, errors.BadRequest) and exc.code in UNPROCESSABLE_CODES:
        return 422
    if isinstance(exc, errors.BadRequest) and exc.code == "request_too_large":
        return 413
    for kind, status in _ERROR_STATUS:
        if isinstance(exc, kind):
            return status
    return 500


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except errors.RelayError as exc:
        status = _status_for(exc)
        headers = {}
        if isinstance(exc, (errors.CapacityError, errors.RateLimited)):
            headers["Retry-After"] = str(exc.retry_after_s)
        if isinstance(exc, errors.Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        extra: dict[str, Any] = {}
        if isinstance(exc, errors.BadRequest) and exc.field is not None:
            extra["field"] = exc.field
        return problem(status, exc.code, exc.detail, headers=headers, **extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.content_type == PROBLEM_TYPE:
            raise
        code = _HTTP_CODES.get(exc.status, "error")
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        return problem(exc.status, code, exc.reason, headers=headers)
    except Exception as exc:
        log.error("http.unhandled", exc_info=exc, extra={"route": _route(request)})
        return problem(500, "internal_error", "The server hit an unexpected error.")
    return response


def _route(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource
    return resource.canonical if resource is not None else "unmatched"
