"""Error reporting to Sentry when ``SENTRY_DSN`` is set (the optional ``sentry`` extra).

Why explicit and not sentry-sdk's integrations: the core already knows the
one place an error becomes a 500 (the error-envelope middleware and the
WebSocket dispatch), and the integrations would also capture request
headers, cookies, bodies and frame locals -- where tokens and secrets live.
So the SDK is initialised with no default or auto-enabled integrations, no
PII, no local variables and no request bodies, and :class:`ErrorReporter`
captures exactly the unhandled exceptions, tagged with the request id.
Every event passes :func:`scrub_event` on its way out as a last guard.

The app owns its reporter: the SDK is initialised on the first report (not
at import, not on the hot path) and flushed and closed at the app's
shutdown; a later report initialises it again.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from ghar_core.logging import REDACTED, get_request_id, redact_query, redact_text

if TYPE_CHECKING:
    from ghar_core.config import Settings

__all__ = ["ErrorReporter", "scrub_event"]

logger = logging.getLogger("ghar_core.error_reporting")

# Header names whose values never leave the process (compared lowercased).
_SECRET_HEADERS = frozenset(
    {"authorization", "cookie", "set-cookie", "proxy-authorization", "apikey", "x-api-key"}
)


def _scrub_text(value: Any) -> Any:
    return redact_text(value) if isinstance(value, str) else value


def scrub_event(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Remove what could carry a secret from a Sentry event (its ``before_send``).

    Cookies, secret headers, request bodies, user data and breadcrumbs go;
    query strings in messages, exception values and URLs are redacted like
    the logs'; frame locals are dropped if any were collected.
    """
    request = event.get("request")
    if isinstance(request, dict):
        request.pop("cookies", None)
        request.pop("data", None)
        headers = request.get("headers")
        if isinstance(headers, dict):
            for name in list(headers):
                if name.lower() in _SECRET_HEADERS:
                    headers[name] = REDACTED
        if isinstance(request.get("url"), str):
            request["url"] = redact_text(request["url"])
        if isinstance(request.get("query_string"), str):
            request["query_string"] = redact_query(request["query_string"])
    event.pop("user", None)
    event.pop("breadcrumbs", None)
    if "message" in event:
        event["message"] = _scrub_text(event["message"])
    logentry = event.get("logentry")
    if isinstance(logentry, dict) and "message" in logentry:
        logentry["message"] = _scrub_text(logentry["message"])
    for exc in (event.get("exception") or {}).get("values") or ():
        if isinstance(exc, dict):
            exc["value"] = _scrub_text(exc.get("value"))
            for frame in (exc.get("stacktrace") or {}).get("frames") or ():
                if isinstance(frame, dict):
                    frame.pop("vars", None)
    return event


class ErrorReporter:
    """Send unhandled errors to Sentry when ``SENTRY_DSN`` is set; otherwise do nothing.

    ``report(exc)`` is called from the 500 path with the request id bound;
    ``close()`` flushes what is queued (bounded by ``timeout``) and closes
    the client. Without the ``sentry`` extra installed a set DSN is one
    warning at construction and nothing else.
    """

    def __init__(self, settings: Settings, *, timeout: float = 2.0) -> None:
        dsn = settings.SENTRY_DSN
        self.dsn = dsn.get_secret_value() if dsn else ""
        self.environment = settings.environment_label  # ENVIRONMENT, else APP_ENV
        self.release = f"{settings.PROJECT_NAME}@{settings.VERSION}"
        self.timeout = timeout
        self._client: Any = None
        if self.dsn and importlib.util.find_spec("sentry_sdk") is None:
            logger.warning(
                "SENTRY_DSN is set but sentry-sdk is not installed: errors are not reported "
                "(pip install 'ghar_core[sentry]')"
            )
            self.dsn = ""

    @property
    def enabled(self) -> bool:
        return bool(self.dsn)

    def _ensure_client(self) -> Any:
        import sentry_sdk

        client = sentry_sdk.get_client()
        if self._client is None or client is not self._client or not client.is_active():
            sentry_sdk.init(
                dsn=self.dsn,
                environment=self.environment,
                release=self.release,
                default_integrations=False,
                auto_enabling_integrations=False,
                integrations=[],
                include_local_variables=False,
                max_request_body_size="never",
                before_send=scrub_event,  # type: ignore[arg-type]
                before_breadcrumb=lambda crumb, hint: None,
                traces_sample_rate=None,
            )
            self._client = sentry_sdk.get_client()
        return sentry_sdk

    def report(self, exc: BaseException) -> None:
        """Capture ``exc`` with the current request id as the ``request_id`` tag; never raises."""
        if not self.dsn:
            return
        try:
            sdk = self._ensure_client()
            sdk.capture_exception(exc, tags={"request_id": get_request_id() or "-"})
        except Exception:
            logger.warning("error reporting failed", exc_info=True)

    def flush(self) -> None:
        """Send what is queued now (bounded by ``timeout``)."""
        if self._client is not None:
            self._client.flush(timeout=self.timeout)

    def close(self) -> None:
        """Flush and close the client this reporter started (idempotent)."""
        client, self._client = self._client, None
        if client is not None:
            client.close(timeout=self.timeout)
