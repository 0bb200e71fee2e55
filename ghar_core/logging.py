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
import sys
import time
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, TextIO

import orjson

if TYPE_CHECKING:
    from ghar_core.config import Settings

__all__ = [
    "ColourFormatter",
    "JSONFormatter",
    "RequestIDFilter",
    "configure_logging",
    "get_request_id",
    "request_id_var",
    "reset_logging",
    "reset_request_id",
    "set_request_id",
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


# Attributes every LogRecord has; anything else was passed with ``extra=``.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__
) | {"message", "asctime", "request_id", "taskName"}


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


class ColourFormatter(logging.Formatter):
    """Human-readable lines for a developer's terminal; colour only on a tty."""

    def __init__(self, *, colour: bool = True) -> None:
        super().__init__("%(asctime)s %(levelname)-8s %(name)s [%(request_id)s] %(message)s")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):
            record.request_id = get_request_id() or "-"
        text = super().format(record)
        if not self.colour:
            return text
        return f"{_COLOURS.get(record.levelno, '')}{text}{_RESET}"


_handler: logging.Handler | None = None


def _wants_colour(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def configure_logging(settings: Settings, *, stream: TextIO | None = None) -> logging.Handler:
    """Install our handler on the root logger, replacing one we installed before.

    ``LOG_FORMAT``: ``json`` (production shippers), ``colour`` or ``plain``;
    ``auto`` means json in prod, colour on a terminal otherwise.
    """
    global _handler
    out = stream if stream is not None else sys.stderr
    fmt = settings.LOG_FORMAT
    if fmt == "auto":
        fmt = "json" if settings.APP_ENV == "prod" else "colour" if _wants_colour(out) else "plain"
    handler = logging.StreamHandler(out)
    formatter: logging.Formatter
    formatter = JSONFormatter() if fmt == "json" else ColourFormatter(colour=fmt == "colour")
    handler.setFormatter(formatter)
    handler.addFilter(RequestIDFilter())
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(settings.LOG_LEVEL)
    _handler = handler
    return handler


def reset_logging() -> None:
    """Remove the handler :func:`configure_logging` installed (for tests)."""
    global _handler
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler = None
