"""The reliability suite's stack (one per session) and its report.

Every test under ``tests/reliability/`` is marked ``reliability`` (``-m "not
reliability"`` leaves them out; ``./scripts/test`` runs them). Tests marked
``last`` run after the suite's others: the secrets case reads the logs of the
whole suite. The stack lives as long as the package's tests run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ghar_core.devtools.pg_binaries import find_binaries
from tests.conftest import require
from tests.pg import pgbouncer_binary
from tests.reliability.report import section, write_report
from tests.reliability.stack import Stack

_HERE = Path(__file__).parent
_stacks: list[Stack] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if _HERE in Path(str(item.fspath)).parents]
    for item in ours:
        item.add_marker(pytest.mark.reliability)
    last = [item for item in ours if item.get_closest_marker("last") is not None]
    if not last or len(last) == len(ours):
        return
    for item in last:
        items.remove(item)
    # After the last of the suite's other tests, so the stack can go with the package.
    mine = {id(item) for item in ours}
    end = max(i for i, item in enumerate(items) if id(item) in mine) + 1
    items[end:end] = last


def pytest_sessionfinish(session: pytest.Session) -> None:
    write_report()
    while _stacks:
        _stacks.pop().cleanup()


@pytest.fixture(scope="package")
def stack() -> Iterator[Stack]:
    """Postgres, PgBouncer, the identity provider and ``ghar-core serve``, for the package."""
    require(find_binaries() is not None, "PostgreSQL binaries (scripts/bootstrap.sh)")
    require(pgbouncer_binary() is not None, "the pgbouncer binary (scripts/ensure-pgbouncer.sh)")
    built = Stack()
    _stacks.append(built)  # its folder (server logs) stays until the secrets case has read it
    try:
        built.start()
        _describe(built)
        yield built
    finally:
        built.close()


def _describe(stack: Stack) -> None:
    env = stack.env()
    report = section(0, "The stack")
    assert stack.cluster.server.binaries is not None
    report.add("PostgreSQL", f"{stack.cluster.server.binaries.major}, own cluster, fsync off")
    report.add(
        "PgBouncer",
        "own, transaction mode, default_pool_size 20, server_login_retry 0.2 s, "
        "query_wait_timeout 10 s",
    )
    report.add(
        "identity provider", "ghar_core.devtools local provider, ES256, in a thread of its own"
    )
    report.add("app", "ghar-core serve --app tests.reliability.app:build --factory (one worker)")
    keys = (
        "DB_POOL_MIN_SIZE",
        "DB_POOL_MAX_SIZE",
        "DB_POOL_ACQUIRE_TIMEOUT",
        "DB_COMMAND_TIMEOUT",
        "DB_CONNECT_TIMEOUT",
        "SHUTDOWN_STEP_TIMEOUT",
        "HEAD_TIMEOUT",
        "SSE_MAX_SUBSCRIBERS",
        "SSE_SEND_TIMEOUT",
        "WS_SEND_TIMEOUT",
    )
    report.add("settings", ", ".join(f"{key}={env[key]}" for key in keys))
