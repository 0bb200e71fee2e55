"""The errors clients see, and the one place that renders them.

Every error that reaches a client is a :class:`BaseAPIException` (or is turned
into one) and leaves as the envelope ``{"error": {"code", "message",
"details"?}}``. The JSON shape lives only in :func:`error_envelope`, so the
middleware, the auth layer and the database layer cannot drift apart.

Anything that is not a ``BaseAPIException`` renders as a 500
``INTERNAL_ERROR`` whose message says nothing about internals: the traceback
belongs in the log (with the request id), never in the response.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

__all__ = [
    "BadRequestException",
    "BaseAPIException",
    "BookingConflictError",
    "BookingConflictException",
    "BookingNotFoundException",
    "ConflictException",
    "DatabaseUnavailableException",
    "ExternalServiceError",
    "ForbiddenException",
    "InternalServerError",
    "MethodNotAllowedException",
    "NotFoundException",
    "PayloadTooLargeException",
    "PoolExhaustedException",
    "PropertyNotFoundException",
    "PropertyUnavailableException",
    "RateLimitException",
    "RenderedError",
    "ServiceUnavailableException",
    "StorageException",
    "UnauthorizedException",
    "UnsupportedMediaTypeException",
    "UserNotFoundException",
    "ValidationException",
    "error_envelope",
    "render_error",
]

_INTERNAL_MESSAGE = "An unexpected error occurred. Quote the request id when reporting it."


class BaseAPIException(Exception):
    """Root of every error a client may see.

    Subclasses set ``status_code``, ``error_code`` (stable UPPER_SNAKE, part of
    the public contract: clients switch on it) and a default ``message``. An
    instance may override any of them, and carry ``details`` (JSON-able data
    that helps the client fix its request) and extra response ``headers``.
    """

    status_code: int = 500
    error_code: str = "INTERNAL_ERROR"
    message: str = "Internal server error."
    default_headers: Mapping[str, str] = {}

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Any = None,
        headers: Mapping[str, str] | None = None,
        error_code: str | None = None,
        status_code: int | None = None,
    ) -> None:
        if message is not None:
            self.message = message
        if error_code is not None:
            self.error_code = error_code
        if status_code is not None:
            self.status_code = status_code
        self.details = details
        merged = dict(self.default_headers)
        if headers:
            merged.update(headers)
        self.headers: dict[str, str] = merged
        super().__init__(self.message)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status_code={self.status_code}, "
            f"error_code={self.error_code!r}, message={self.message!r})"
        )


class BadRequestException(BaseAPIException):
    """The request is malformed (bad JSON, bad parameter)."""

    status_code = 400
    error_code = "BAD_REQUEST"
    message = "The request is malformed."


class UnauthorizedException(BaseAPIException):
    """No valid credentials; ``WWW-Authenticate`` tells the client what to send."""

    status_code = 401
    error_code = "UNAUTHORIZED"
    message = "Authentication is required."
    default_headers = {"WWW-Authenticate": "Bearer"}


class ForbiddenException(BaseAPIException):
    """Authenticated, but not allowed to do this."""

    status_code = 403
    error_code = "FORBIDDEN"
    message = "You do not have permission to do this."


class NotFoundException(BaseAPIException):
    """The resource (or route) does not exist."""

    status_code = 404
    error_code = "NOT_FOUND"
    message = "Not found."


class MethodNotAllowedException(BaseAPIException):
    """The route exists but not for this method; carries ``Allow``."""

    status_code = 405
    error_code = "METHOD_NOT_ALLOWED"
    message = "Method not allowed."


class ConflictException(BaseAPIException):
    """The request conflicts with the current state of the resource."""

    status_code = 409
    error_code = "CONFLICT"
    message = "The request conflicts with the current state."


class PayloadTooLargeException(BaseAPIException):
    """The body is larger than the configured limit."""

    status_code = 413
    error_code = "PAYLOAD_TOO_LARGE"
    message = "The request body is too large."


class UnsupportedMediaTypeException(BaseAPIException):
    """The body's content type is not one this endpoint reads."""

    status_code = 415
    error_code = "UNSUPPORTED_MEDIA_TYPE"
    message = "Unsupported media type."


class ValidationException(BaseAPIException):
    """Well-formed but invalid input; ``details`` lists the fields."""

    status_code = 422
    error_code = "VALIDATION_ERROR"
    message = "The request is invalid."


class RateLimitException(BaseAPIException):
    """Too many requests; ``Retry-After`` says when to try again."""

    status_code = 429
    error_code = "RATE_LIMITED"
    message = "Too many requests."
    default_headers = {"Retry-After": "60"}


class InternalServerError(BaseAPIException):
    """An explicit 500, for code that knows it failed and wants the envelope."""


class ExternalServiceError(BaseAPIException):
    """A service we depend on answered badly (not an outage: that is 503)."""

    status_code = 502
    error_code = "EXTERNAL_SERVICE_ERROR"
    message = "An upstream service failed."


class StorageException(ExternalServiceError):
    """Object storage failed to store or serve a file."""

    error_code = "STORAGE_ERROR"
    message = "The storage service failed."


class ServiceUnavailableException(BaseAPIException):
    """A dependency is down or saturated; the client should retry later."""

    status_code = 503
    error_code = "SERVICE_UNAVAILABLE"
    message = "The service is temporarily unavailable. Please retry."
    default_headers = {"Retry-After": "5"}


class DatabaseUnavailableException(ServiceUnavailableException):
    """Postgres cannot be reached or lost the connection; the app recovers by itself."""

    error_code = "SERVICE_UNAVAILABLE"
    message = "The database is temporarily unavailable. Please retry."
    default_headers = {"Retry-After": "5"}


class PoolExhaustedException(DatabaseUnavailableException):
    """Every pooled connection stayed busy past the acquire timeout (never retried)."""

    message = "The database is busy. Please retry shortly."
    default_headers = {"Retry-After": "1"}


# Domain errors: stable codes the apps switch on.


class PropertyNotFoundException(NotFoundException):
    error_code = "PROPERTY_NOT_FOUND"
    message = "Property not found."


class UserNotFoundException(NotFoundException):
    error_code = "USER_NOT_FOUND"
    message = "User not found."


class BookingNotFoundException(NotFoundException):
    error_code = "BOOKING_NOT_FOUND"
    message = "Booking not found."


class BookingConflictError(ConflictException):
    """The seed's name (an ``Error``, unlike its neighbours), kept for its callers."""

    error_code = "BOOKING_CONFLICT"
    message = "The dates overlap an existing booking."


#: The name this package used before it took the seed's spelling.
BookingConflictException = BookingConflictError


class PropertyUnavailableException(ConflictException):
    error_code = "PROPERTY_UNAVAILABLE"
    message = "The property is not available."


class RenderedError(NamedTuple):
    """What the ASGI layer needs to send an error: status, headers, body bytes."""

    status_code: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE_RE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def _clean_header(name: object, value: object) -> tuple[bytes, bytes] | None:
    """The header as bytes, or None when it could split or corrupt the response."""
    text_name, text_value = str(name), str(value)
    if not _TOKEN_RE.fullmatch(text_name) or not _VALUE_RE.fullmatch(text_value):
        return None
    return text_name.lower().encode("ascii"), text_value.encode("latin-1")


def error_envelope(exc: BaseException) -> dict[str, Any]:
    """The envelope dict for ``exc``; unexpected exceptions reveal nothing."""
    if isinstance(exc, BaseAPIException):
        error: dict[str, Any] = {"code": exc.error_code, "message": str(exc.message)}
        if exc.details is not None:
            error["details"] = exc.details
        return {"error": error}
    return {"error": {"code": "INTERNAL_ERROR", "message": _INTERNAL_MESSAGE}}


_DUMP_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _dump(envelope: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(envelope, default=str, option=_DUMP_OPTIONS)
    except (TypeError, ValueError):
        # Details that cannot be serialised even as strings (cycles, integers
        # beyond 64 bits): keep code and message, say what was dropped.
        error = dict(envelope["error"])
        error["details"] = {"note": "details could not be serialised"}
        return orjson.dumps({"error": error}, default=str, option=_DUMP_OPTIONS)


def render_error(exc: BaseException) -> RenderedError:
    """Render any exception as (status, headers, envelope bytes).

    Headers with an invalid name, CR/LF or other control characters are
    dropped rather than sent, so an exception built from user input cannot
    split the response.
    """
    if isinstance(exc, BaseAPIException):
        status = exc.status_code if 400 <= exc.status_code <= 599 else 500
        extra = exc.headers
    else:
        status, extra = 500, {}
    body = _dump(error_envelope(exc))
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
    ]
    for name, value in extra.items():
        cleaned = _clean_header(name, value)
        if cleaned is not None and cleaned[0] not in (b"content-type", b"content-length"):
            headers.append(cleaned)
    return RenderedError(status, headers, body)
