"""Every exception, expected or not, renders to a valid envelope without internals."""

from __future__ import annotations

import inspect
import re

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ghar_core import exceptions
from ghar_core.exceptions import (
    BaseAPIException,
    NotFoundException,
    ServiceUnavailableException,
    UnauthorizedException,
    error_envelope,
    render_error,
)

API_CLASSES = sorted(
    (
        cls
        for _, cls in inspect.getmembers(exceptions, inspect.isclass)
        if issubclass(cls, BaseAPIException)
    ),
    key=lambda c: c.__name__,
)
CODE_RE = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
odd_values = st.one_of(
    json_values,
    st.builds(object),
    st.integers(min_value=2**64, max_value=2**80),
    st.sets(st.integers(), max_size=3),
    st.binary(max_size=10),
)
header_text = st.text(max_size=30)


def _check_envelope(status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> dict:
    assert 400 <= status <= 599
    doc = orjson.loads(body)
    assert set(doc) == {"error"}
    err = doc["error"]
    assert set(err) <= {"code", "message", "details"}
    assert CODE_RE.fullmatch(err["code"])
    assert isinstance(err["message"], str)
    for name, value in headers:
        assert re.fullmatch(rb"[!#$%&'*+.^_`|~0-9a-z-]+", name)
        assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", value)
    assert dict(headers)[b"content-length"] == str(len(body)).encode()
    return err


@pytest.mark.parametrize("cls", API_CLASSES, ids=lambda c: c.__name__)
def test_every_class_has_a_stable_code_and_status(cls: type[BaseAPIException]) -> None:
    assert CODE_RE.fullmatch(cls.error_code)
    assert 400 <= cls.status_code <= 599
    rendered = render_error(cls())
    err = _check_envelope(rendered.status_code, rendered.body, rendered.headers)
    assert err == {"code": cls.error_code, "message": cls.message}


@given(
    cls=st.sampled_from(API_CLASSES),
    message=st.none() | st.text(),
    details=st.none() | odd_values,
    headers=st.none() | st.dictionaries(header_text, header_text, max_size=3),
    status=st.none() | st.integers(-1000, 1000),
)
def test_any_api_exception_renders_a_valid_envelope(
    cls: type[BaseAPIException],
    message: str | None,
    details: object,
    headers: dict[str, str] | None,
    status: int | None,
) -> None:
    exc = cls(message, details=details, headers=headers, status_code=status)
    rendered = render_error(exc)
    err = _check_envelope(rendered.status_code, rendered.body, rendered.headers)
    assert err["code"] == cls.error_code
    assert err["message"] == (message if message is not None else cls.message)
    assert ("details" in err) == (details is not None)


@given(message=st.text(), kind=st.sampled_from([ValueError, KeyError, RuntimeError, OSError]))
def test_unexpected_exceptions_reveal_nothing(message: str, kind: type[Exception]) -> None:
    rendered = render_error(kind(message + "secret internals"))
    err = _check_envelope(rendered.status_code, rendered.body, rendered.headers)
    assert rendered.status_code == 500
    assert err["code"] == "INTERNAL_ERROR"
    assert "secret internals" not in rendered.body.decode()
    assert "details" not in err


def test_default_headers_and_overrides() -> None:
    assert render_error(ServiceUnavailableException()).headers[-1] == (b"retry-after", b"5")
    exc = ServiceUnavailableException(headers={"Retry-After": "30"})
    assert (b"retry-after", b"30") in render_error(exc).headers
    assert (b"www-authenticate", b"Bearer") in render_error(UnauthorizedException()).headers
    # Instances never share the class's default header dict.
    exc.headers["X"] = "1"
    assert "X" not in ServiceUnavailableException().headers


def test_hostile_headers_are_dropped_not_sent() -> None:
    exc = NotFoundException(headers={"X-Evil": "a\r\nSet-Cookie: x=1", "X-Ok": "fine"})
    headers = dict(render_error(exc).headers)
    assert b"x-evil" not in headers
    assert headers[b"x-ok"] == b"fine"


def test_envelope_shape_and_repr() -> None:
    exc = NotFoundException("No such listing", details={"id": 7})
    assert error_envelope(exc) == {
        "error": {"code": "NOT_FOUND", "message": "No such listing", "details": {"id": 7}}
    }
    assert "NOT_FOUND" in repr(exc)
    assert str(exc) == "No such listing"


def test_cyclic_details_do_not_break_rendering() -> None:
    cyclic: list[object] = []
    cyclic.append(cyclic)
    rendered = render_error(NotFoundException(details=cyclic))
    err = _check_envelope(rendered.status_code, rendered.body, rendered.headers)
    assert err["details"] == {"note": "details could not be serialised"}


def test_the_seeds_names_are_importable() -> None:
    """The rest of the backend imports these names from the seed; DESIGN.md lists them."""
    from ghar_core.exceptions import (
        BookingConflictError,
        BookingConflictException,
        PropertyNotFoundException,
        UserNotFoundException,
    )

    assert BookingConflictException is BookingConflictError
    assert render_error(BookingConflictError()).status_code == 409
    assert BookingConflictError.error_code == "BOOKING_CONFLICT"
    assert PropertyNotFoundException.error_code == "PROPERTY_NOT_FOUND"
    assert UserNotFoundException.error_code == "USER_NOT_FOUND"
