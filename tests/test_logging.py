"""Request ids are isolated per task and reset; formatters never raise."""

from __future__ import annotations

import asyncio
import io
import logging
import re

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ghar_core.config import load_settings
from ghar_core.logging import (
    ColourFormatter,
    JSONFormatter,
    RequestIDFilter,
    configure_logging,
    get_request_id,
    redact_text,
    reset_logging,
    reset_request_id,
    set_request_id,
)

ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=16)


@given(request_ids=st.lists(ids, min_size=1, max_size=20))
def test_request_ids_are_isolated_between_concurrent_tasks(request_ids: list[str]) -> None:
    async def handle(rid: str, seen: list[tuple[str, str | None, str | None]]) -> None:
        token = set_request_id(rid)
        try:
            for _ in range(3):
                await asyncio.sleep(0)
                seen.append((rid, get_request_id(), None))
        finally:
            reset_request_id(token)
        seen.append((rid, None, get_request_id()))

    async def main() -> list[tuple[str, str | None, str | None]]:
        seen: list[tuple[str, str | None, str | None]] = []
        await asyncio.gather(*(handle(r, seen) for r in request_ids))
        return seen

    assert get_request_id() is None
    seen = asyncio.run(main())
    for rid, during, after in seen:
        if during is not None:
            assert during == rid
        assert after is None
    assert get_request_id() is None


def test_reset_restores_outer_value() -> None:
    outer = set_request_id("outer")
    inner = set_request_id("inner")
    assert get_request_id() == "inner"
    reset_request_id(inner)
    assert get_request_id() == "outer"
    reset_request_id(outer)
    assert get_request_id() is None


def _record(msg: str = "hello %s", args: tuple[object, ...] = ("world",)) -> logging.LogRecord:
    return logging.LogRecord("ghar.test", logging.WARNING, __file__, 1, msg, args, None)


def test_filter_stamps_request_id() -> None:
    record = _record()
    token = set_request_id("abc")
    try:
        RequestIDFilter().filter(record)
    finally:
        reset_request_id(token)
    assert record.request_id == "abc"
    plain = _record()
    RequestIDFilter().filter(plain)
    assert plain.request_id == "-"


@given(message=st.text(), extra=st.dictionaries(st.sampled_from(["user", "n", "obj"]), st.text()))
def test_json_formatter_writes_one_parseable_line(message: str, extra: dict[str, str]) -> None:
    record = _record("%s", (message,))
    record.__dict__.update(extra)
    record.request_id = "rid-1"
    line = JSONFormatter().format(record)
    assert "\n" not in line
    doc = orjson.loads(line)
    assert doc["message"] == message
    assert doc["level"] == "WARNING"
    assert doc["logger"] == "ghar.test"
    assert doc["request_id"] == "rid-1"
    assert doc["ts"].endswith("Z")
    for key, value in extra.items():
        assert doc[key] == value


def test_json_formatter_includes_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), None)
        import sys

        record.exc_info = sys.exc_info()
    doc = orjson.loads(JSONFormatter().format(record))
    assert "ValueError: boom" in doc["exc"]
    assert doc["request_id"] is None


def test_colour_formatter_colours_only_when_asked() -> None:
    record = _record()
    assert "\x1b[" in ColourFormatter(colour=True).format(record)
    plain = ColourFormatter(colour=False).format(_record())
    assert "\x1b[" not in plain
    assert "[-] hello world" in plain
    # The same UTC ISO stamp as the JSON lines and the access log.
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", plain)


@pytest.mark.parametrize(
    ("app_env", "fmt", "expect_json"),
    [
        ("prod", "auto", True),
        ("dev", "auto", False),
        ("dev", "json", True),
        ("test", "plain", False),
    ],
)
def test_configure_logging_picks_the_format(app_env: str, fmt: str, expect_json: bool) -> None:
    environ = {"LOG_FORMAT": fmt, "LOG_LEVEL": "INFO"}
    if app_env == "prod":
        environ |= {"SECRET_KEY": "x" * 40, "SUPABASE_URL": "https://p.example"}
    settings = load_settings(app_env=app_env, env_dir="/nonexistent", environ=environ)
    stream = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        configure_logging(settings, stream=stream)
        configure_logging(settings, stream=stream)  # idempotent: replaces its own handler
        assert len(root.handlers) == len(before) + 1
        token = set_request_id("req-9")
        try:
            logging.getLogger("ghar.t").info("ping")
        finally:
            reset_request_id(token)
    finally:
        reset_logging()
        root.setLevel(level)
    assert root.handlers == before
    out = stream.getvalue().strip()
    if expect_json:
        assert orjson.loads(out)["request_id"] == "req-9"
    else:
        assert "[req-9] ping" in out


# A marker no other part of the log line contains, so "not in the output" means redacted.
secret_values = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.", min_size=4
).map(lambda v: "zq9" + v)


@given(
    value=secret_values,
    key=st.sampled_from(["access_token", "Access_Token", "token", "apikey", "password", "jwt"]),
    prefix=st.sampled_from(["", "page=2&", "q=x;"]),
)
def test_server_request_lines_never_carry_secret_query_values(
    value: str, key: str, prefix: str
) -> None:
    # What uvicorn logs on `uvicorn.error` for a WebSocket: we never format it,
    # so the handler's filter must redact it.
    settings = load_settings(app_env="test", environ={"LOG_FORMAT": "plain"})
    stream = io.StringIO()
    server = logging.getLogger("uvicorn.error")
    # Under uvicorn's own logging config the records stop at its handler; the
    # filter sits on the logger itself, so a handler of uvicorn's sees them too.
    theirs = io.StringIO()
    their_handler = logging.StreamHandler(theirs)
    level = server.level
    server.setLevel(logging.INFO)
    server.addHandler(their_handler)
    try:
        configure_logging(settings, stream=stream)
        path = f"/ws/events?{prefix}{key}={value}&after=1"
        server.info('%s - "WebSocket %s" %d', "127.0.0.1:5000", path, 403)
        server.info(f"GET {path} HTTP/1.1")  # already formatted text, no args
    finally:
        reset_logging()
        server.removeHandler(their_handler)
        server.setLevel(level)
    assert value not in theirs.getvalue()
    assert theirs.getvalue().count(f"{key}=[REDACTED]") == 2
    out = stream.getvalue() if logging.getLogger("uvicorn").propagate else theirs.getvalue()
    assert value not in out
    assert out.count(f"{key}=[REDACTED]") == 2
    assert "after=1" in out


def test_redact_text_leaves_text_without_queries_alone() -> None:
    assert redact_text("no query here = fine") == "no query here = fine"
    line = '"GET /a?token=s3cret HTTP/1.1" 200'
    assert redact_text(line) == '"GET /a?token=[REDACTED] HTTP/1.1" 200'


# --- issue 11: plain and colour lines cannot be forged --------------------------------

_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _forged_record(
    message: str, args: tuple[object, ...], exc_text: str | None
) -> logging.LogRecord:
    exc_info = None
    if exc_text is not None:
        try:
            raise ValueError(exc_text)
        except ValueError as exc:
            exc_info = (type(exc), exc, exc.__traceback__)
    return logging.LogRecord("app", logging.ERROR, __file__, 1, message, args, exc_info)


def _assert_one_forged_record(out: str) -> None:
    assert "\r" not in out
    lines = out.split("\n")
    # No other separator a viewer or log shipper might split on (\v, \f, \x1c-\x1e,
    # \x85, \u2028, \u2029): the lines are exactly the "\n"-separated ones.
    assert out.splitlines() == lines
    assert _RECORD_START.match(lines[0]), lines[0]
    for line in lines[1:]:
        # A continuation line (the traceback) is indented: it cannot start a record.
        assert line.startswith("  "), line
    assert all(ch.isprintable() for line in lines for ch in line), out


@given(
    message=st.text(),
    arg=st.text(),
    exc_text=st.none() | st.text(),
    colour=st.booleans(),
)
def test_plain_and_colour_lines_cannot_be_forged(
    message: str, arg: str, exc_text: str | None, colour: bool
) -> None:
    record = _forged_record(message.replace("%", "%%") + " %s", (arg,), exc_text)
    out = ColourFormatter(colour=colour).format(record)
    if colour:
        out = _ANSI.sub("", out)
    _assert_one_forged_record(out)


def test_a_forged_access_line_stays_inside_its_forged_record() -> None:
    forged = "x\r\n2099-01-01T00:00:00.000Z INFO     ghar_core.access [-] GET /admin 200 1.00ms"
    record = _forged_record("boom: %s", (forged,), forged)
    out = ColourFormatter(colour=False).format(record)
    _assert_one_forged_record(out)
    assert out.count("\n2099-") == 0
    assert "x\\r\\n2099-01-01" in out.split("\n")[0]  # escaped, still readable
    assert "Traceback (most recent call last):" in out  # the traceback stays readable
