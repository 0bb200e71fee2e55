"""A small router: exact paths in a dict, templated paths as compiled regexes.

Templates use ``{name}`` (one segment, ``str``), ``{name:int}`` (digits,
``int``), ``{name:uuid}`` (``uuid.UUID``) and ``{name:path}`` (the rest,
slashes included). Static paths are found with one dict lookup; templated
ones are tried in registration order, so register the more specific first.

Trailing slashes are strict: ``/items`` and ``/items/`` are different paths
and nothing redirects (a redirect would drop a POST body and hide client
bugs). A miss whose other spelling exists is a 404 whose ``details`` name
the path that does exist.
"""

from __future__ import annotations

import inspect
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["HTTP_METHODS", "Route", "Router", "compile_path"]

H = TypeVar("H")

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z]+))?\}")
_UUID = "[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
_CONVERTERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "str": ("[^/]+", str),
    "int": ("[0-9]{1,18}", int),
    "uuid": (_UUID, uuid.UUID),
    "path": (".*", str),
}


def compile_path(
    path: str,
) -> tuple[re.Pattern[str] | None, dict[str, Callable[[str], Any]]]:
    """Compile a template; ``(None, {})`` for a static path.

    Raises ``ValueError`` naming the problem (no leading slash, unknown
    converter, repeated parameter).
    """
    if not path.startswith("/"):
        raise ValueError(f"route path {path!r} must start with '/'")
    converters: dict[str, Callable[[str], Any]] = {}
    pattern = "^"
    last = 0
    for match in _PARAM.finditer(path):
        name, kind = match.group(1), match.group(2) or "str"
        if kind not in _CONVERTERS:
            raise ValueError(
                f"route path {path!r}: unknown converter {kind!r} "
                f"(known: {', '.join(sorted(_CONVERTERS))})"
            )
        if name in converters:
            raise ValueError(f"route path {path!r} repeats the parameter {name!r}")
        regex, convert = _CONVERTERS[kind]
        pattern += re.escape(path[last : match.start()]) + f"(?P<{name}>{regex})"
        converters[name] = convert
        last = match.end()
    if not converters:
        if "{" in path or "}" in path:
            raise ValueError(f"route path {path!r} has a malformed '{{name}}' parameter")
        return None, {}
    rest = path[last:]
    if "{" in rest or "}" in rest:
        raise ValueError(f"route path {path!r} has a malformed '{{name}}' parameter")
    # \Z, not $: a path may end in a decoded newline, which $ would let through.
    pattern += re.escape(rest) + r"\Z"
    return re.compile(pattern, re.DOTALL), converters


def is_async_callable(obj: object) -> bool:
    """True for ``async def`` functions and objects with an ``async def __call__``."""
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 - we need the bound method itself
    )


@dataclass(slots=True)
class Route(Generic[H]):
    """One path with its handler per method (WebSocket routes use the key ``"WS"``)."""

    path: str
    regex: re.Pattern[str] | None
    converters: dict[str, Callable[[str], Any]]
    handlers: dict[str, H] = field(default_factory=dict)
    allow: str = ""

    def match(self, path: str) -> dict[str, Any] | None:
        """Converted parameters when ``path`` matches this template, else ``None``."""
        assert self.regex is not None
        m = self.regex.match(path)
        if m is None:
            return None
        params: dict[str, Any] = {}
        try:
            for name, raw in m.groupdict().items():
                params[name] = self.converters[name](raw)
        except ValueError:
            return None
        return params


class Router(Generic[H]):
    """Maps paths to :class:`Route` objects; owned by the app, built at import time."""

    def __init__(self) -> None:
        self.static: dict[str, Route[H]] = {}
        self.dynamic: list[Route[H]] = []
        self._by_path: dict[str, Route[H]] = {}

    @property
    def routes(self) -> list[Route[H]]:
        """Every route, in registration order."""
        return list(self._by_path.values())

    def add(self, path: str, handler: H, methods: Iterable[str]) -> Route[H]:
        """Register ``handler`` for ``methods`` on ``path``; a duplicate is a ``ValueError``."""
        wanted = [m.upper() for m in methods]
        if not wanted:
            raise ValueError(f"route {path!r}: give at least one method")
        route = self._by_path.get(path)
        if route is None:
            regex, converters = compile_path(path)
            route = Route(path, regex, converters)
            self._by_path[path] = route
            if regex is None:
                self.static[path] = route
            else:
                self.dynamic.append(route)
        for method in wanted:
            if method in route.handlers:
                raise ValueError(f"route {method} {path!r} is registered twice")
            route.handlers[method] = handler
        allowed = set(route.handlers)
        if "GET" in allowed:
            allowed.add("HEAD")
        route.allow = ", ".join(sorted(allowed))
        return route

    def match(self, path: str) -> tuple[Route[H], dict[str, Any]] | None:
        """The route for ``path`` and its converted parameters, or ``None``."""
        route = self.static.get(path)
        if route is not None:
            return route, {}
        for route in self.dynamic:
            params = route.match(path)
            if params is not None:
                return route, params
        return None

    def suggest(self, path: str) -> str | None:
        """The other trailing-slash spelling of ``path`` when that one exists."""
        other = path[:-1] if path.endswith("/") and len(path) > 1 else path + "/"
        return other if self.match(other) is not None else None
