"""Request bodies: size-capped reads and schema validation with the failing field named.

Malformed JSON is 400 ``invalid_json``; a body over its limit is 413 ``request_too_large``; a body
that parses but breaks the schema is 422 ``invalid_request`` with ``field`` set.
"""

from __future__ import annotations

import json
from typing import Final, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from relay.errors import BadRequest

__all__ = ["JSON_LIMIT", "Schema", "read_body", "read_json"]

JSON_LIMIT: Final = 16 * 1024

T = TypeVar("T", bound="Schema")


class Schema(BaseModel):
    """Base of request schemas: unknown fields are refused, strings are stripped of nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)


async def read_body(request: web.Request, limit: int) -> bytes:
    """Read at most ``limit`` bytes; a larger body (declared or actual) is refused with 413."""
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(f"The request body is over {limit} bytes.", code="request_too_large")
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise BadRequest(f"The request body is over {limit} bytes.", code="request_too_large")
    return body


async def read_json(request: web.Request, schema: type[T], *, limit: int = JSON_LIMIT) -> T:
    """Parse and validate a JSON object body against ``schema``. An empty body counts as ``{}``."""
    raw = await read_body(request, limit)
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_request", field="$")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "$"
        # pydantic's message describes the rule, never echoes the submitted value.
        raise BadRequest(f"{field}: {first['msg']}", code="invalid_request", field=field) from None
