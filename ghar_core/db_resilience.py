"""Retry once on transient database errors; fail fast on everything else.

A *transient* error is one where the same statement on a fresh connection a
moment later would probably succeed: the connection was lost or closed
(SQLSTATE class 08, ``ConnectionDoesNotExistError``, socket errors), the
server was shut down or restarted under us (57P01 admin shutdown, 57P02 crash
shutdown, 57P03 cannot connect now, 53300 too many connections), or a
timeout fired (client-side ``TimeoutError``, 57014 query canceled by
``statement_timeout``), plus the driver's messages that say the same in
words. An error the server reports carries a SQLSTATE, and that code alone
decides: an app's own ``RAISE EXCEPTION 'the provider timed out'`` (P0001) is
an answer, not an outage. Serialization failures and deadlocks (class 40) are *not* here:
they are retryable, but by the caller who owns the transaction's logic, and
they do not call for a new connection.

:func:`execute_with_transient_retry` runs an operation inside a transaction
of the main pool. On a transient error *before COMMIT was sent* the
transaction is rolled back and the connection discarded (``Database.transaction``
terminates a connection that failed transiently, so it never returns to the
pool), then it sleeps a jittered 50-200 ms and runs the operation exactly once
more. A second failure becomes :class:`DatabaseUnavailableException` (503 +
Retry-After). Pool exhaustion is never retried: it already waited the acquire
timeout, and retrying would only double the queue it is complaining about.

A failure *while COMMIT is in flight* (connection lost, PgBouncer killed,
COMMIT past the command timeout) is different: the server may have committed.
``Database.transaction`` resolves it before anything is retried (see
:mod:`ghar_core.database`): committed -> the operation's result is returned;
aborted, or nothing was written -> the ordinary transient path above;
unknown -> :class:`CommitOutcomeUnknownException` (503,
``DB_COMMIT_OUTCOME_UNKNOWN``), which is never retried. So no write is
applied twice by this helper, whatever the operation.

Why only once: a lost connection is usually one bad socket (failover,
PgBouncer restart, idle kill); a second failure means an outage, and the
client's own retry after ``Retry-After`` is the better place to wait.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Protocol, TypeVar

import asyncpg

from ghar_core.exceptions import (
    BaseAPIException,
    DatabaseUnavailableException,
    PoolExhaustedException,
    ServiceUnavailableException,
)
from ghar_core.logging import get_request_id

__all__ = [
    "RETRY_DELAY_RANGE",
    "TRANSIENT_MESSAGE_MARKERS",
    "TRANSIENT_SQLSTATES",
    "TRANSIENT_SQLSTATE_CLASSES",
    "CommitOutcomeUnknownException",
    "TransactionSource",
    "execute_with_transient_retry",
    "is_transient_error",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: SQLSTATE classes whose every code is transient (08: connection exception).
TRANSIENT_SQLSTATE_CLASSES: Final = frozenset({"08"})
#: Individual transient SQLSTATEs outside those classes.
TRANSIENT_SQLSTATES: Final = frozenset(
    {
        "57P01",  # admin_shutdown (also pg_terminate_backend)
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, recovery)
        "57014",  # query_canceled (statement_timeout)
        "53300",  # too_many_connections
    }
)
#: Lower-case fragments of driver messages (errors without a SQLSTATE) that mean "connection lost".
TRANSIENT_MESSAGE_MARKERS: Final = (
    "connection to database closed",
    "connection was closed",
    "connection is closed",
    "connection has been closed",
    "server closed the connection",
    "terminating connection",
    "connection reset by peer",
    "connection refused",
    "broken pipe",
    "could not connect to server",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "ssl connection has been closed unexpectedly",
    "timed out",
    "timeout expired",
)
#: Seconds slept before the single retry (uniformly jittered).
RETRY_DELAY_RANGE: Final = (0.05, 0.2)


class CommitOutcomeUnknownException(ServiceUnavailableException):
    """The connection failed while COMMIT was in flight and nobody could tell its fate.

    The write may or may not be applied: it is never retried (that could apply
    it twice). A client seeing ``DB_COMMIT_OUTCOME_UNKNOWN`` should read the
    state back, or resend with the same idempotency key, after ``Retry-After``.
    """

    error_code = "DB_COMMIT_OUTCOME_UNKNOWN"
    message = (
        "The database connection failed while the change was being committed; it may or may "
        "not have been applied. Check before retrying, or retry with the same idempotency key."
    )
    default_headers = {"Retry-After": "5"}


def is_transient_error(exc: BaseException) -> bool:
    """True when retrying ``exc`` once on a fresh connection is likely to succeed.

    Pool exhaustion is never transient here (see the module doc). Our own
    :class:`DatabaseUnavailableException` is transient (a connect failure or
    a lost connection the database layer already translated). Other API
    exceptions are never transient: they are answers, not outages.
    """
    if isinstance(exc, PoolExhaustedException):
        return False
    if isinstance(exc, DatabaseUnavailableException):
        return True
    if isinstance(exc, BaseAPIException):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        # The server's own verdict; its text may be the app's (RAISE EXCEPTION).
        return sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES or sqlstate in TRANSIENT_SQLSTATES
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError | PermissionError):
        # Socket-level failures (EHOSTUNREACH, ENETDOWN ...) without a nicer subclass.
        return True
    text = str(exc).lower()
    return any(marker in text for marker in TRANSIENT_MESSAGE_MARKERS)


class TransactionSource(Protocol):
    """What the retry needs from a database: a transaction that yields a connection.

    :class:`ghar_core.database.Database` is one; the protocol keeps this module
    free of an import of the pool implementation.
    """

    def transaction(self) -> AbstractAsyncContextManager[Any]: ...


async def execute_with_transient_retry(
    db: TransactionSource,
    operation: Callable[[Any], Awaitable[T]],
    *,
    operation_name: str,
) -> T:
    """Run ``operation(conn)`` in a transaction; retry exactly once on a transient error.

    ``operation`` receives an asyncpg connection inside a transaction. It may
    run twice, but only when its first attempt is known not to have
    committed: the failure came before COMMIT was sent (the first attempt
    was rolled back), or COMMIT's answer was lost and the server says the
    transaction aborted or wrote nothing. Its side effects *outside* the
    database (an email, an HTTP call) are not rolled back: keep them after
    the helper returns. When COMMIT's answer is lost and the server says it
    committed, the result of the first attempt is returned; when nobody can
    tell, :class:`CommitOutcomeUnknownException` (503
    ``DB_COMMIT_OUTCOME_UNKNOWN``) is raised and nothing is re-run.

    Give every write an idempotency key anyway (a unique key with
    ``INSERT ... ON CONFLICT DO NOTHING``, or an update keyed on the
    client's request id): a client that got ``DB_COMMIT_OUTCOME_UNKNOWN``,
    or whose own connection dropped, will resend, and only the key makes
    that resend harmless.

    Errors that are not transient pass through unchanged; pool exhaustion
    passes through without a retry; a second transient failure raises
    :class:`DatabaseUnavailableException` (503) chained to the driver error.
    Each retry is logged at WARNING with the operation name and request id.
    """
    try:
        return await _attempt(db, operation)
    except BaseException as first:
        if not is_transient_error(first):
            raise
        delay = random.uniform(*RETRY_DELAY_RANGE)
        logger.warning(
            "transient database error in %s (%s: %s); retrying once in %.0f ms",
            operation_name,
            type(first).__name__,
            first,
            delay * 1000,
            extra={
                "operation": operation_name,
                "request_id": get_request_id() or "-",
                "error_type": type(first).__name__,
            },
        )
    await asyncio.sleep(delay)
    try:
        return await _attempt(db, operation)
    except BaseException as second:
        if isinstance(second, PoolExhaustedException) or not is_transient_error(second):
            raise
        if isinstance(second, DatabaseUnavailableException):
            raise  # already our 503, with the more exact message (e.g. never reached)
        raise DatabaseUnavailableException(
            f"The database is temporarily unavailable ({operation_name} failed twice)."
            " Please retry."
        ) from second


async def _attempt(db: TransactionSource, operation: Callable[[Any], Awaitable[T]]) -> T:
    async with db.transaction() as conn:
        return await operation(conn)
