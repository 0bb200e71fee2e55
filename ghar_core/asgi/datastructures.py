"""Case-insensitive headers, query parameters and per-request state.

All three are built lazily from the raw ASGI scope and keep only what they
were given: a handler that never looks at a header pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

__all__ = ["Headers", "QueryParams", "State"]


class Headers(Mapping[str, str]):
    """Read-only, case-insensitive view of ASGI ``(bytes, bytes)`` headers.

    ``headers["content-type"]`` gives the first value; :meth:`getlist` all
    of them (``Set-Cookie``, repeated ``Accept``). Values are decoded as
    latin-1, as HTTP/1.1 defines them, so no header can fail to decode.
    """

    __slots__ = ("_dict", "_raw")

    def __init__(self, raw: Sequence[tuple[bytes, bytes]] | None = None) -> None:
        self._raw: Sequence[tuple[bytes, bytes]] = raw if raw is not None else ()
        self._dict: dict[str, str] | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> Headers:
        """Headers from a plain mapping (tests, responses)."""
        return cls([(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in values.items()])

    @property
    def raw(self) -> Sequence[tuple[bytes, bytes]]:
        """The headers as the server sent them."""
        return self._raw

    def _lookup(self) -> dict[str, str]:
        d = self._dict
        if d is None:
            d = {}
            for key, value in self._raw:
                name = key.decode("latin-1").lower()
                if name not in d:
                    d[name] = value.decode("latin-1")
            self._dict = d
        return d

    def __getitem__(self, key: str) -> str:
        return self._lookup()[key.lower()]

    def get(self, key: str, default: Any = None) -> Any:
        return self._lookup().get(key.lower(), default)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._lookup()

    def __iter__(self) -> Iterator[str]:
        return iter(self._lookup())

    def __len__(self) -> int:
        return len(self._lookup())

    def getlist(self, key: str) -> list[str]:
        """Every value of ``key``, in order."""
        wanted = key.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self._raw if k.lower() == wanted]

    def __repr__(self) -> str:
        return f"Headers({[(k.decode('latin-1'), v.decode('latin-1')) for k, v in self._raw]!r})"


class QueryParams(Mapping[str, str]):
    """The query string, percent-decoded; the first value wins, :meth:`getlist` has all.

    Undecodable bytes become U+FFFD rather than an error: a malformed query
    never turns into a 500.
    """

    __slots__ = ("_dict", "_items")

    def __init__(self, query_string: bytes | str = b"") -> None:
        text = query_string.decode("latin-1") if isinstance(query_string, bytes) else query_string
        self._items: list[tuple[str, str]] = parse_qsl(
            text, keep_blank_values=True, encoding="utf-8", errors="replace"
        )
        d: dict[str, str] = {}
        for k, v in self._items:
            d.setdefault(k, v)
        self._dict = d

    def __getitem__(self, key: str) -> str:
        return self._dict[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._dict)

    def getlist(self, key: str) -> list[str]:
        """Every value given for ``key``, in order."""
        return [v for k, v in self._items if k == key]

    def multi_items(self) -> list[tuple[str, str]]:
        """All pairs in order, repeats included."""
        return list(self._items)

    def __repr__(self) -> str:
        return f"QueryParams({self._items!r})"


class State:
    """Free-form attributes (``request.state.user = ...``); a missing one says which."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"state has no attribute {name!r}; set it before reading it")

    def __repr__(self) -> str:
        return f"State({self.__dict__!r})"
