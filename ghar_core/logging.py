"""Request-scoped logging: the request id rides a ContextVar into every record.

The ASGI middleware binds the id with :func:`set_request_id` and resets it with
the returned token in ``finally``; asyncio copies the context into each task it
spawns, so concurrent requests never see each other's ids and a background
task started inside a request keeps the id of the request that started it.

:func:`configure_logging` is the one global configuration: a colour formatter
for a developer's terminal, JSON lines (orjson) for production log shippers.
It replaces only the handler it installed itself, so calling it twice (or
from tests) is safe, and :func:`reset_logging` removes it again.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import unquote_plus

import orjson

if TYPE_CHECKING:
    from ghar_core.config import Settings

__all__ = [
    "REDACTED",
    "ColourFormatter",
    "JSONFormatter",
    "RedactingFilter",
    "RequestIDFilter",
    "configure_logging",
    "escape_control",
    "get_request_id",
    "redact_query",
    "redact_text",
    "request_id_var",
    "reset_logging",
    "reset_request_id",
    "set_request_id",
    "uses_json_logs",
]

request_id_var: ContextVar[str | None] = ContextVar("ghar_request_id", default=None)


def set_request_id(request_id: str | None) -> Token[str | None]:
    """Bind ``request_id`` to the current context; keep the token to reset it."""
    return request_id_var.set(request_id)


def reset_request_id(token: Token[str | None]) -> None:
    """Restore the id that was bound before the matching :func:`set_request_id`."""
    request_id_var.reset(token)


def get_request_id() -> str | None:
    """The id of the request this code runs for, or ``None`` outside one."""
    return request_id_var.get()


class RequestIDFilter(logging.Filter):
    """Stamp ``record.request_id`` ("-" outside a request) on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get() or "-"
        return True


# Query keys whose values never reach a log: exact names, then substrings.
_SECRET_KEYS = frozenset(
    {
        "access_token",
        "api-key",
        "api_key",
        "apikey",
        "auth",
        "authorization",
        "client_secret",
        "code",
        "id_token",
        "jwt",
        "key",
        "passwd",
        "password",
        "pwd",
        "refresh_token",
        "secret",
        "session",
        "sig",
        "signature",
        "token",
    }
)
_SECRET_PARTS = (
    "token",
    "secret",
    "password",
    "passwd",
    "apikey",
    "api_key",
    "signature",
    "session",
    "credential",
)
#: What a redacted value reads as, in the access log and every other log line.
REDACTED = "[REDACTED]"
# Both separators: some parsers (proxies, older frameworks) split on ";" too, and a
# value we would log whole could be a secret to them.
_QUERY_SEPARATORS = re.compile(r"([&;])")


def _is_secret_key(key: str) -> bool:
    k = key
    # Decode until stable (bounded): a double-encoded key (%2561ccess_token) is
    # still the secret's name to a layer that decodes twice.
    for _ in range(3):
        decoded = unquote_plus(k)
        if decoded == k:
            break
        k = decoded
    k = k.strip().lower()
    return k in _SECRET_KEYS or any(part in k for part in _SECRET_PARTS)


def redact_query(query: str) -> str:
    """The query string with the values of secret-looking keys replaced by ``[REDACTED]``."""
    if not query:
        return query
    parts = _QUERY_SEPARATORS.split(query)  # separators kept at the odd indexes
    for i in range(0, len(parts), 2):
        key, sep, _value = parts[i].partition("=")
        if _is_secret_key(key):
            parts[i] = f"{key}={REDACTED}" if sep else key
    return "".join(parts)


# A query string inside free text (a URL, a request line): from "?" to the end
# of the URL (whitespace, a quote or a fragment ends it).
_QUERY_IN_TEXT = re.compile(r"\?([^\s\"'#]*)")


def redact_text(text: str) -> str:
    """``text`` with every query string in it passed through :func:`redact_query`."""
    if "?" not in text:
        return text
    return _QUERY_IN_TEXT.sub(lambda m: "?" + redact_query(m.group(1)), text)


class RedactingFilter(logging.Filter):
    """Redact secret query values (``?access_token=...``) in any record's text.

    Servers log request lines we do not format ourselves -- uvicorn writes
    ``"WebSocket /ws?access_token=..."`` on ``uvicorn.error`` -- so
    :func:`configure_logging` puts this filter on its handler, where it sees
    every record from every logger. Only strings containing ``?`` are touched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "?" in record.msg:
            record.msg = redact_text(record.msg)
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, str) and "?" in a for a in args):
            record.args = tuple(redact_text(a) if isinstance(a, str) else a for a in args)
        return True


# Attributes every LogRecord has; anything else was passed with ``extra=``.
# uvicorn passes ``color_message`` (the message with ANSI escapes) that way:
# a duplicate of "message" with escapes, never wanted in a JSON line.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__
) | {"message", "asctime", "request_id", "taskName", "color_message"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, exc.

    Values passed with ``extra=`` are included; anything orjson cannot encode
    is written with ``str()`` so a log call never raises.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or get_request_id(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def _iso_utc(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


_COLOURS = {
    logging.DEBUG: "\x1b[2m",
    logging.INFO: "\x1b[32m",
    logging.WARNING: "\x1b[33m",
    logging.ERROR: "\x1b[31m",
    logging.CRITICAL: "\x1b[1;31m",
}
_RESET = "\x1b[0m"


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    named = _NAMED_ESCAPES.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


def escape_control(text: str) -> str:
    """``text`` on one line: CR, LF and every other non-printable character escaped.

    Printable text (the common case) is returned as is after one C-speed check;
    non-ASCII letters stay readable, only what a terminal or a log reader could
    act on (line breaks, ANSI escapes, bidi overrides) becomes ``\\xNN``/``\\uNNNN``.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def _continued(block: str) -> str:
    """A multi-line block (a traceback) as indented lines, each escaped.

    Split on LF only: every piece is escaped, so a CR or an LF inside an
    exception's text cannot end the indentation and start what looks like
    a record of its own.
    """
    return "\n".join("  " + escape_control(line) for line in block.split("\n"))


class ColourFormatter(logging.Formatter):
    """Human-readable lines for a developer's terminal; colour only on a tty.

    One record is one line, plus indented continuation lines for a traceback
    or stack: the message (with its arguments), the logger name and the request
    id are escaped (:func:`escape_control`), so text an app logs -- a query
    parameter, an exception message -- cannot forge a record. JSON lines need
    none of this: a string inside JSON cannot break the line.
    """

    def __init__(self, *, colour: bool = True) -> None:
        super().__init__("%(asctime)s %(levelname)-8s %(name)s [%(request_id)s] %(message)s")
        self.colour = colour

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # UTC ISO 8601, the same stamp as the JSON lines and the buffered access log.
        return _iso_utc(record.created)

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        if request_id is None:
            request_id = record.request_id = get_request_id() or "-"
        # Escaped copies for this line only: the record itself is shared with
        # other handlers (a JSON one wants the raw text).
        fields = dict(record.__dict__)
        fields["message"] = escape_control(record.getMessage())
        fields["asctime"] = _iso_utc(record.created)
        fields["name"] = escape_control(record.name)
        fields["request_id"] = escape_control(str(request_id))
        text = self._style._fmt % fields
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + _continued(record.exc_text)
        if record.stack_info:
            text += "\n" + _continued(self.formatStack(record.stack_info))
        if not self.colour:
            return text
        return f"{_COLOURS.get(record.levelno, '')}{text}{_RESET}"


_handler: logging.Handler | None = None
_SERVER_LOGGERS = ("uvicorn.error", "uvicorn.access")
_server_filter = RedactingFilter()


def _wants_colour(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def uses_json_logs(settings: Settings) -> bool:
    """Whether logs are JSON lines: ``LOG_FORMAT=json``, or ``auto`` in prod.

    The one rule both our handler and the buffered access log follow, so the
    two never write different formats into one stream.
    """
    fmt = settings.LOG_FORMAT
    return fmt == "json" or (fmt == "auto" and settings.APP_ENV == "prod")


def configure_logging(settings: Settings, *, stream: TextIO | None = None) -> logging.Handler:
    """Install our handler on the root logger, replacing one we installed before.

    ``LOG_FORMAT``: ``json`` (production shippers), ``colour`` or ``plain``;
    ``auto`` means json in prod, colour on a terminal otherwise.
    """
    global _handler
    out = stream if stream is not None else sys.stderr
    fmt = settings.LOG_FORMAT
    if uses_json_logs(settings):
        fmt = "json"
    elif fmt == "auto":
        fmt = "colour" if _wants_colour(out) else "plain"
    handler = logging.StreamHandler(out)
    formatter: logging.Formatter
    formatter = JSONFormatter() if fmt == "json" else ColourFormatter(colour=fmt == "colour")
    handler.setFormatter(formatter)
    handler.addFilter(RequestIDFilter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(settings.LOG_LEVEL)
    _handler = handler
    # uvicorn writes request lines (with query strings) on these loggers, and
    # under its own logging config they never reach our handler: filter them
    # where they are made.
    for name in _SERVER_LOGGERS:
        server = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in server.filters):
            server.addFilter(_server_filter)
    return handler


def reset_logging() -> None:
    """Remove the handler :func:`configure_logging` installed (for tests)."""
    global _handler
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler = None
    for name in _SERVER_LOGGERS:
        logging.getLogger(name).removeFilter(_server_filter)
