"""The built-in endpoints: liveness (``/health``) and readiness (``/ready``).

``/health`` does no I/O and does not trigger a lazy start: it says the
process serves HTTP. ``/ready`` runs ``check()`` of every started resource
concurrently (each bounded) and answers 503 ``NOT_READY`` with
``Retry-After`` naming the failing checks; the reasons go to the log, not
to the client. A ready answer also carries the counters of every started
resource that has a ``stats()`` (the event bus: subscribers, drops, reaps).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ghar_core.exceptions import ServiceUnavailableException

if TYPE_CHECKING:
    from ghar_core.asgi.requests import Request

__all__ = ["READY_CHECK_TIMEOUT", "health", "ready"]

logger = logging.getLogger("ghar_core.ready")

READY_CHECK_TIMEOUT = 5.0


async def health(request: Request) -> dict[str, Any]:
    """Liveness: the process is up; name, version and environment."""
    settings = request.settings
    return {
        "status": "ok",
        "name": settings.PROJECT_NAME,
        "version": settings.VERSION,
        "environment": settings.ENVIRONMENT or settings.APP_ENV,
    }


async def ready(request: Request) -> dict[str, Any]:
    """Readiness: every started resource's check passes, else 503 naming the failures."""
    resources = request.resources
    limit = min(READY_CHECK_TIMEOUT, resources.step_timeout)
    results = await resources.check(limit=limit)
    checks = {name: "ok" if exc is None else "failed" for name, exc in results.items()}
    failing = [name for name, exc in results.items() if exc is not None]
    if failing:
        for name in failing:
            logger.warning("readiness check %r failed: %r", name, results[name])
        raise ServiceUnavailableException(
            f"Not ready: {', '.join(failing)} failed its check.",
            error_code="NOT_READY",
            details={"failing": failing, "checks": checks},
        )
    body: dict[str, Any] = {"status": "ready", "checks": checks}
    stats: dict[str, Any] = {}
    for resource in resources.started:
        stats_of = getattr(resource, "stats", None)
        if callable(stats_of):
            stats[resource.name] = stats_of()
    if stats:
        body["stats"] = stats
    return body
