"""Shared test plumbing: hypothesis profiles and the CI rule on missing services.

With ``CI=true`` a test that needs a service must not skip: :func:`require`
fails it instead, so CI can never go green by skipping the real thing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# Postgres / PgBouncer fixtures (pg_admin_dsn, pg_database, fresh_database, db, pgbouncer).
pytest_plugins = ["tests.pg"]

IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}

settings.register_profile(
    "default", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("quick", max_examples=20, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if IN_CI else "default"))


def require(available: bool, what: str) -> None:
    """Skip when ``what`` is missing locally; fail in CI, where it must exist."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI but is not available", pytrace=False)
    pytest.skip(f"{what} is not available")


@pytest.fixture
def ghar_admin_dsn(pg_admin_dsn: str) -> str:
    """The package plugin's databases live on the server tests/pg.py decided on."""
    return pg_admin_dsn


# --- shared TLS fixture (added with tests/tls.py for the HTTP clients; reuse it) ---
@pytest.fixture(scope="session")
def tls():  # -> tests.tls.TLS
    """A trustme CA with a loopback server cert and a client context trusting it."""
    from tests.tls import make_tls

    return make_tls()


# --- end shared TLS fixture ---


@pytest.fixture(autouse=True)
def _no_leaked_log_handler() -> Iterator[None]:
    """A test that configures logging (the CLI does) must not leave our handler behind."""
    yield
    from ghar_core.logging import reset_logging

    reset_logging()
