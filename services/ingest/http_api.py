"""Ingest's HTTP plumbing, free of the service: error answers in the shape the SDKs read, the body read
(size-capped before and after gzip) and parsed with orjson, and the HTTP Basic user."""

from __future__ import annotations

import base64
import binascii
import zlib
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse


class Refused(Exception):
    """A request answered with an error status; `errors` lists per-event problems."""

    def __init__(self, status: int, message: str, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None, retry: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors
        self.headers = headers
        self.retry = retry

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.errors, self.headers, self.retry)


# The Segment and RudderStack SDKs read `code` and `message` from an error body; without them
# RudderStack's SDK retries even a 400 as if the network had failed.
ERROR_CODES = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "too_large", 429: "rate_limited", 503: "unavailable"}


def error_response(status: int, message: str, errors: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None, retry: bool = False) -> JSONResponse:
    body: dict[str, Any] = {"success": False, "code": ERROR_CODES.get(status, "error"), "message": message,
                            "error": message}
    if errors is not None:
        body["errors"] = errors
    if retry:
        body["retry"] = True
    return JSONResponse(body, status_code=status, headers=headers)


def bad_request(field: str, reason: str, index: int | None = None) -> Refused:
    return Refused(400, f"{field}: {reason}", errors=[{"index": index, "field": field, "reason": reason}])


def unauthorized() -> Refused:
    return Refused(401, "missing, unknown or revoked write key (HTTP Basic user, or writeKey in the body)",
                   headers={"WWW-Authenticate": 'Basic realm="touchstream"'})


def unavailable(what: str) -> Refused:
    return Refused(503, f"{what}; nothing in this request was accepted, retry it", headers={"Retry-After": "1"},
                   retry=True)


def parse_json(body: bytes) -> Any:
    """Parse a request body with orjson, which refuses NaN, Infinity, numbers that overflow a
    double, lone surrogates, invalid UTF-8 and nesting deeper than 1024.

    >>> parse_json(b'{"a": 1.5}')
    {'a': 1.5}
    >>> try:
    ...     parse_json(b'[1e999]')
    ... except ValueError as exc:
    ...     print(str(exc).split(":")[0])
    number is infinity when parsed as double
    """
    return orjson.loads(body)

def basic_user(header: str) -> str | None:
    """Return the user of an HTTP Basic `Authorization` header, or None.

    >>> basic_user("Basic " + base64.b64encode(b"key:").decode())
    'key'
    """
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        return base64.b64decode(encoded.strip(), validate=True).decode().split(":", 1)[0] or None
    except (binascii.Error, UnicodeDecodeError):
        return None


async def read_json(request: Request, limit: int, limit_name: str) -> Any:
    """Read the body (at most `limit` bytes, before and after gzip) and parse it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"body is {declared} bytes, the limit is {limit} bytes ({limit_name})")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"body is over {limit} bytes ({limit_name})")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding == "gzip":
        body = gunzip(body, limit, limit_name)
    elif encoding not in ("", "identity"):
        raise bad_request("Content-Encoding", f"{encoding[:40]!r} is not supported; use gzip or none")
    try:
        return parse_json(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad_request("(body)", f"not valid JSON: {str(exc)[:200]}") from None


def gunzip(body: bytes, limit: int, limit_name: str) -> bytes:
    # Decompress at most limit+1 bytes, so a small gzip bomb cannot take the worker's memory.
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise bad_request("Content-Encoding", f"gzip body could not be decompressed: {exc}") from None
    if len(out) > limit:
        raise Refused(413, f"decompressed body is over {limit} bytes ({limit_name})")
    if not inflater.eof:
        raise bad_request("Content-Encoding", "gzip body is truncated")
    return out
