"""The reliability suite's stack (one per session) and its report.

Every test under ``tests/reliability/`` is marked ``reliability`` (``-m "not
reliability"`` leaves them out; ``./scripts/test`` runs them). Tests marked
``last`` run after all others: the secrets case reads the logs of the whole
suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from ghar_core.devtools.pg_binaries import find_binaries
from tests.pg import pgbouncer_binary
from tests.reliability.report import write_report
from tests.reliability.stack import Stack

_HERE = Path(__file__).parent
_stacks: list[Stack] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if _HERE in Path(str(item.fspath)).parents]
    for item in ours:
        item.add_marker(pytest.mark.reliability)
    last = [item for item in ours if item.get_closest_marker("last") is not None]
    for item in last:
        items.remove(item)
        items.append(item)


def pytest_sessionfinish(session: pytest.Session) -> None:
    write_report()
    while _stacks:
        _stacks.pop().cleanup()


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """Postgres, PgBouncer, the identity provider and ``ghar-core serve``, for the session."""
    require(find_binaries() is not None, "PostgreSQL binaries (scripts/bootstrap.sh)")
    require(pgbouncer_binary() is not None, "the pgbouncer binary (scripts/ensure-pgbouncer.sh)")
    built = Stack()
    _stacks.append(built)  # its folder (server logs) stays until the secrets case has read it
    try:
        built.start()
        yield built
    finally:
        built.close()
