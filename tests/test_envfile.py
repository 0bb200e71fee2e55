"""The env-file dialect: any text either parses or names its bad lines; quoting round-trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ghar_core.envfile import EnvSyntaxError, parse_env_text, quote_env_text
from tests.strategies import env_text, safe_text


@given(text=env_text())
def test_any_text_parses_or_names_its_bad_lines(text: str) -> None:
    try:
        values = parse_env_text(text, "f")
    except EnvSyntaxError as exc:
        assert exc.problems
        assert all(where.startswith("f:") for where, _ in exc.problems)
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())


@given(value=st.text(st.characters(blacklist_categories=("Cs",))))
def test_quoting_preserves_any_text(value: str) -> None:
    assert parse_env_text(f"K={quote_env_text(value)}\n") == {"K": value}


@given(values=st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True), safe_text))
def test_a_whole_file_round_trips(values: dict[str, str]) -> None:
    text = "".join(f"{k}={quote_env_text(v)}\r\n" for k, v in values.items())
    assert parse_env_text("# header\n\n" + text) == values


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("A=1", "1"),
        ("export A=1", "1"),
        ("A = spaced  # comment", "spaced"),
        ("A=x#not-a-comment", "x#not-a-comment"),
        ("A='literal $HOME \\n'", "literal $HOME \\n"),
        ('A="tab\\there" # c', "tab\there"),
        ("A=", ""),
    ],
)
def test_dialect(line: str, expected: str) -> None:
    assert parse_env_text(line) == {"A": expected}


def test_bad_lines_are_all_reported() -> None:
    with pytest.raises(EnvSyntaxError) as info:
        parse_env_text("OK=1\nnot a pair\n1BAD=2\nQ='open\n", "env/.env.dev")
    assert [w for w, _ in info.value.problems] == [
        "env/.env.dev:2",
        "env/.env.dev:3",
        "env/.env.dev:4 (Q)",
    ]
