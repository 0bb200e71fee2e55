"""The env-file dialect our settings read: a small, strict dotenv subset.

``KEY=value`` lines, an optional ``export``, ``#`` comments (whole-line, or
after whitespace in an unquoted value), single quotes (literal) and double
quotes (with ``\\n \\r \\t \\" \\\\ \\$`` escapes). No variable interpolation:
a value means what it says, which keeps secrets containing ``$`` intact.
:func:`quote_env_text` writes any text so that :func:`parse_env_text` reads it
back unchanged (the settings round-trip tests rely on it).
"""

from __future__ import annotations

import re

__all__ = ["EnvSyntaxError", "parse_env_text", "quote_env_text"]


class EnvSyntaxError(ValueError):
    """Lines that are not ``KEY=value``; ``problems`` lists (file:line, reason)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {where}: {reason}" for where, reason in problems)
        super().__init__(f"invalid env file ({len(problems)} problem(s)):\n{lines}")


_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "$": "$"}


def _unquote_double(body: str) -> str:
    out: list[str] = []
    chars = iter(body)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
        else:
            out.append(ch)
    return "".join(out)


def quote_env_text(text: str) -> str:
    """Quote ``text`` for an env file when it would not survive unquoted."""
    if text and text == text.strip() and not re.search(r"[\s#\"'\\]", text):
        return text
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def _parse_line_value(raw: str) -> str:
    raw = raw.strip()
    if raw.startswith('"'):
        match = re.fullmatch(r'"((?:[^"\\]|\\.)*)"\s*(#.*)?', raw, re.DOTALL)
        if not match:
            raise ValueError("unterminated double-quoted value")
        return _unquote_double(match.group(1))
    if raw.startswith("'"):
        match = re.fullmatch(r"'([^']*)'\s*(#.*)?", raw)
        if not match:
            raise ValueError("unterminated single-quoted value")
        return match.group(1)
    # Unquoted: a " #" starts a comment.
    return re.split(r"\s+#", raw, maxsplit=1)[0].strip()


def parse_env_text(text: str, source: str = "<env>") -> dict[str, str]:
    """Parse dotenv-style text: ``KEY=value`` lines, ``export``, quotes, comments.

    Raises :class:`EnvSyntaxError` naming each bad line (file and line number).
    """
    values: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    # Split on "\n" only: str.splitlines() would also break on \x0b, \x1c,
    # \u2028 and friends, which may legitimately sit inside a quoted value.
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.removesuffix("\r").strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export ") :].lstrip()
        key, sep, raw = stripped.partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.fullmatch(key):
            problems.append((f"{source}:{number}", "expected KEY=value"))
            continue
        try:
            values[key] = _parse_line_value(raw)
        except ValueError as exc:
            problems.append((f"{source}:{number} ({key})", str(exc)))
    if problems:
        raise EnvSyntaxError(problems)
    return values
