"""Parley's object store: audio chunks, assembled recordings and exports.

One interface (:class:`ObjectStore`), two implementations chosen by URL:

* ``file:///ABSOLUTE/PATH`` - :class:`LocalObjectStore`, the default (see :mod:`storage.objects.local`);
* ``s3://ACCESS_KEY:SECRET_KEY@HOST[:PORT]/BUCKET[?secure=false&region=REGION]`` -
  :class:`S3ObjectStore` on MinIO/S3 (see :mod:`storage.objects.s3`).

Typical use::

    store = open_object_store(settings.objects_url)
    await ensure_ready(store)          # creates the directory / bucket if missing, then checks it
    await store.put("rec/42/chunk-0001.ogg", chunks(), content_type="audio/ogg")
    async for data in store.get("rec/42/chunk-0001.ogg", start=0, end=1023):
        ...
    await store.aclose()
"""

from __future__ import annotations

from .base import (
    CHUNK_SIZE,
    MAX_KEY_BYTES,
    InvalidRange,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailable,
    ensure_ready,
    validate_key,
)
from .local import LocalObjectStore, parse_file_url
from .s3 import PART_SIZE, S3Config, S3ObjectStore, parse_s3_url

__all__ = [
    "CHUNK_SIZE",
    "MAX_KEY_BYTES",
    "PART_SIZE",
    "InvalidRange",
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectStoreError",
    "ObjectStoreUnavailable",
    "S3Config",
    "S3ObjectStore",
    "ensure_ready",
    "open_object_store",
    "parse_file_url",
    "parse_s3_url",
    "validate_key",
]

_URL_HELP = "expected file:///ABSOLUTE/PATH or s3://ACCESS_KEY:SECRET_KEY@HOST[:PORT]/BUCKET"


def open_object_store(url: str) -> ObjectStore:
    """Build the store a URL names. ``ValueError`` says what is wrong and never echoes the secret."""
    if not isinstance(url, str):
        raise TypeError("the object store URL must be a str")
    scheme, colon, _ = url.partition(":")
    scheme = scheme.strip().lower()
    if not colon or not scheme:
        raise ValueError(f"the object store URL has no scheme; {_URL_HELP}")
    if scheme == "file":
        return LocalObjectStore(parse_file_url(url))
    if scheme == "s3":
        return S3ObjectStore(parse_s3_url(url))
    if len(scheme) > 20 or not scheme.isascii() or not scheme.replace("+", "").replace("-", "").isalnum():
        raise ValueError(f"the object store URL has an invalid scheme; {_URL_HELP}")
    raise ValueError(f"unsupported object store URL scheme {scheme!r}; {_URL_HELP}")
