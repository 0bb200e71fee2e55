"""The README's code examples run as written (a newcomer copies them first)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import require
from tests.pg import postgres_available

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.DOTALL)


def test_the_readme_has_its_examples() -> None:
    assert len(BLOCKS) >= 3


async def test_use_it_example_serves_and_refuses_a_missing_token() -> None:
    require(postgres_available(), "PostgreSQL on 127.0.0.1:5432")
    namespace: dict[str, object] = {}
    exec(compile(BLOCKS[0], "README.md[use-it]", "exec"), namespace)
    exec(compile(BLOCKS[1], "README.md[testing]", "exec"), namespace)
    await namespace["test_property_needs_a_token"]()  # type: ignore[operator]
