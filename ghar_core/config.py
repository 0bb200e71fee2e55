"""Typed, immutable settings read from ``env/.env.<APP_ENV>`` and the process.

Why by hand and not pydantic: the core keeps its runtime dependencies to the
six it needs, and settings are simple enough to describe as data. Every
variable is one field below, with its group, type, default and a sentence of
documentation; the README's configuration table is generated from the same
fields (``ghar-core config --table``), so the two cannot drift.

Precedence, highest first: real environment variables, the env file picked by
``APP_ENV`` (dev | test | prod, default dev) from ``GHAR_ENV_DIR`` (default:
``./env``, else the ``env/`` folder next to the package), then the defaults
here. Loading checks every variable and raises one :class:`ConfigError`
listing all problems, each naming the variable and the reason.

Secrets are :class:`Secret` values: their ``str`` and ``repr`` are masked, so
printing or logging the settings never leaks them; call
``get_secret_value()`` at the single place that needs the real value.

An app declares its own settings in a :class:`Settings` subclass with
:func:`setting` fields and loads it with ``load_settings(schema=...)`` (or
names it in ``GHAR_SETTINGS``): one object, one file, one set of checks. A
key nobody declares is reported (one warning, with the closest known name),
or refused with ``STRICT_SETTINGS``. Each field records which core module
reads it (the table's "Read by"); a test checks that each such module does.

``from ghar_core.config import settings`` loads on first use and caches;
:func:`reset_settings` drops the cache (tests).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar, overload
from urllib.parse import urlsplit

import orjson

from ghar_core.constants import VALID_VISION_PROVIDERS
from ghar_core.envfile import EnvSyntaxError, parse_env_text

__all__ = [
    "APP",
    "APP_ENVS",
    "APP_READER",
    "ConfigError",
    "Secret",
    "Settings",
    "chosen_schema",
    "config_table_markdown",
    "env_file_path",
    "format_env_value",
    "get_settings",
    "load_settings",
    "reset_settings",
    "setting",
    "settings_fields",
    "settings_schema",
]

APP_ENVS: Final = ("dev", "test", "prod")
_DEFAULT_SECRET_KEY: Final = "change-me"
_MASK: Final = "**********"
S = TypeVar("S", bound="Settings")


class ConfigError(ValueError):
    """The configuration is invalid; ``problems`` lists (variable, reason)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {name}: {reason}" for name, reason in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem(s)):\n{lines}")


class Secret:
    """A string that masks itself in ``str``/``repr`` so it never reaches a log."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{_MASK}')" if self._value else "Secret('')"

    def __str__(self) -> str:
        return _MASK if self._value else ""

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


# --- field descriptions -------------------------------------------------------

_KINDS = ("str", "int", "float", "bool", "list", "url", "secret", "choice", "prefix")


#: The "Read by" of a setting no core module reads: the app's services do.
APP: Final[tuple[str, ...]] = ()
APP_READER: Final = "your services (validated and masked by the core)"


@dataclass(frozen=True, slots=True)
class _Spec:
    group: str
    kind: str
    doc: str
    optional: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()
    # Modules under ghar_core that read it (a test checks each does); () = the app's.
    reader: tuple[str, ...] = APP


def _var(
    default: Any,
    kind: str,
    group: str,
    doc: str,
    *,
    optional: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] = (),
    schemes: tuple[str, ...] = (),
    reader: tuple[str, ...],
) -> Any:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    spec = _Spec(group, kind, doc, optional, minimum, maximum, choices, schemes, reader)
    return field(default=default, metadata={"spec": spec})


def setting(
    default: Any,
    kind: str,
    doc: str,
    *,
    group: str = "App",
    optional: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] = (),
    schemes: tuple[str, ...] = (),
) -> Any:
    """Declare one of your app's settings on a :class:`Settings` subclass.

    ``kind`` is one of ``str int float bool list url secret choice prefix``
    (parsed and checked exactly as the core's own: ranges with
    ``minimum``/``maximum``, ``choices``, URL ``schemes``; ``optional`` lets
    it be empty). A ``secret`` is a :class:`Secret`, masked everywhere; the
    field appears in ``ghar-core config`` and its table under ``group``::

        @dataclass(frozen=True, slots=True, repr=False)
        class ListingsSettings(Settings):
            GEOCODER_URL: str = setting(
                "http://127.0.0.1:8081", "url", "The geocoder.", schemes=("http", "https")
            )

        settings = load_settings(schema=ListingsSettings)
    """
    return _var(
        default,
        kind,
        group,
        doc,
        optional=optional,
        minimum=minimum,
        maximum=maximum,
        choices=choices,
        schemes=schemes,
        reader=APP,
    )


_HTTP = ("http", "https")
_PG = ("postgres", "postgresql")


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    """Every setting of the core, typed and immutable.

    Build it with :func:`load_settings`; in tests ``dataclasses.replace``
    gives a modified copy (cross-field rules are checked again). An app adds
    its own settings in a subclass (fields declared with :func:`setting`,
    decorated ``@dataclass(frozen=True, slots=True, repr=False)``) and may
    override :meth:`extra_problems` for its cross-field rules.
    """

    # Core
    APP_ENV: str = _var(
        "dev",
        "choice",
        "Core",
        "Which env file is read: dev, test or prod.",
        choices=APP_ENVS,
        reader=("logging", "asgi.endpoints"),
    )
    ENVIRONMENT: str = _var(
        "",
        "str",
        "Core",
        "Deployment label for logs and error reports; empty means APP_ENV.",
        optional=True,
        reader=("asgi.endpoints", "error_reporting"),
    )
    PROJECT_NAME: str = _var(
        "360Ghar", "str", "Core", "Name shown in logs and responses.", reader=("asgi.endpoints",)
    )
    VERSION: str = _var(
        "0.1.0",
        "str",
        "Core",
        "Version reported by /health.",
        reader=("asgi.endpoints", "error_reporting"),
    )
    API_V1_STR: str = _var(
        "/api/v1",
        "prefix",
        "Core",
        "Prefix of the versioned API routes.",
        reader=("asgi.auth", "asgi.sse"),
    )
    SECRET_KEY: Secret = _var(
        Secret(_DEFAULT_SECRET_KEY),
        "secret",
        "Core",
        "Signing secret for your services' own values (the core signs nothing); prod refuses "
        "the default.",
        reader=APP,
    )
    DEBUG: bool = _var(
        False, "bool", "Core", "Verbose errors in logs (never in responses).", reader=("logging",)
    )
    LOG_LEVEL: str = _var(
        "INFO",
        "choice",
        "Core",
        "Root log level.",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        reader=("logging", "cli"),
    )
    LOG_FORMAT: str = _var(
        "auto",
        "choice",
        "Core",
        "auto (json in prod, colour on a terminal), json, colour or plain.",
        choices=("auto", "json", "colour", "plain"),
        reader=("logging",),
    )
    ACCESS_LOG: bool = _var(
        True, "bool", "Core", "One access-log line per request.", reader=("asgi.app",)
    )
    SENTRY_DSN: Secret | None = _var(
        None,
        "secret",
        "Core",
        "Sentry DSN: unhandled errors (the 500s) are reported, tagged with the request id "
        "(the `sentry` extra); empty disables.",
        optional=True,
        reader=("error_reporting",),
    )
    SERVERLESS_ENABLED: bool = _var(
        False,
        "bool",
        "Core",
        "Open a database connection per use instead of pools.",
        reader=("database",),
    )
    SHUTDOWN_STEP_TIMEOUT: float = _var(
        10.0,
        "float",
        "Core",
        "Seconds each resource gets to start or stop.",
        minimum=0.1,
        maximum=600,
        reader=("asgi.app", "database", "broker", "cli"),
    )
    STRICT_SETTINGS: bool = _var(
        False,
        "bool",
        "Core",
        "Refuse keys no setting declares (a typo, another app's key) instead of warning.",
        reader=("config",),
    )
    # HTTP server
    HOST: str = _var(
        "127.0.0.1", "str", "HTTP", "Address `ghar-core serve` binds.", reader=("cli",)
    )
    PORT: int = _var(
        8000,
        "int",
        "HTTP",
        "Port `ghar-core serve` binds.",
        minimum=0,
        maximum=65535,
        reader=("cli",),
    )
    MAX_BODY_SIZE: int = _var(
        1_048_576,
        "int",
        "HTTP",
        "Largest request body read, in bytes; larger gets 413.",
        minimum=0,
        maximum=1 << 31,
        reader=("asgi.requests",),
    )
    # Limits `ghar-core serve` enforces per worker (ghar_core/asgi/limits.py)
    MAX_HEADER_BYTES: int = _var(
        16_384,
        "int",
        "HTTP",
        "Largest request head (request line and headers) in bytes; larger gets 431.",
        minimum=1024,
        maximum=1 << 20,
        reader=("asgi.limits",),
    )
    MAX_HEADERS: int = _var(
        100,
        "int",
        "HTTP",
        "Most header fields in one request; more gets 431.",
        minimum=8,
        reader=("asgi.limits",),
    )
    MAX_URL_BYTES: int = _var(
        8_192,
        "int",
        "HTTP",
        "Longest request target (path and query) in bytes; longer gets 414.",
        minimum=256,
        maximum=1 << 20,
        reader=("asgi.limits",),
    )
    HEAD_TIMEOUT: float = _var(
        10.0,
        "float",
        "HTTP",
        "Seconds to send the request head after connecting (or its first byte); then 408.",
        minimum=0.1,
        maximum=3600,
        reader=("asgi.limits",),
    )
    BODY_TIMEOUT: float = _var(
        30.0,
        "float",
        "HTTP",
        "Seconds to send the whole body after the head; then 408. Answers are not limited.",
        minimum=0.1,
        maximum=3600,
        reader=("asgi.limits",),
    )
    KEEP_ALIVE_TIMEOUT: float = _var(
        5.0,
        "float",
        "HTTP",
        "Seconds an idle keep-alive connection stays open.",
        minimum=0.1,
        maximum=3600,
        reader=("asgi.limits",),
    )
    MAX_CONCURRENCY: int = _var(
        1000,
        "int",
        "HTTP",
        "Requests in flight per worker (streams included); past it 503. 0: no limit.",
        minimum=0,
        reader=("asgi.limits",),
    )
    MAX_CONNECTIONS: int = _var(
        2000,
        "int",
        "HTTP",
        "Open connections per worker; a new one past it gets 503. 0: no limit.",
        minimum=0,
        reader=("asgi.limits",),
    )
    # Public URLs
    PUBLIC_API_URL: str = _var(
        "http://127.0.0.1:8000",
        "url",
        "Public URLs",
        "Where clients reach this API.",
        schemes=_HTTP,
        reader=APP,
    )
    FRONTEND_URL: str = _var(
        "http://localhost:3000",
        "url",
        "Public URLs",
        "The web app, for links in emails and redirects.",
        schemes=_HTTP,
        reader=APP,
    )
    # CORS
    CORS_ORIGINS: tuple[str, ...] = _var(
        ("http://localhost:3000",),
        "list",
        "CORS",
        "Allowed browser origins (comma-separated or JSON list); `*` allows any, never with"
        " credentials (answered `*`, no Allow-Credentials; prod refuses it with"
        " CORS_ALLOW_CREDENTIALS).",
        reader=("asgi.app",),
    )
    CORS_ORIGINS_STR: str | None = _var(
        None,
        "str",
        "CORS",
        "Comma-separated override of CORS_ORIGINS.",
        optional=True,
        reader=("config",),
    )
    CORS_ALLOW_CREDENTIALS: bool = _var(
        True,
        "bool",
        "CORS",
        "Allow cookies and Authorization on CORS requests from the listed origins (not with `*`).",
        reader=("asgi.app",),
    )
    CORS_MAX_AGE: int = _var(
        600,
        "int",
        "CORS",
        "Seconds browsers may cache a preflight.",
        minimum=0,
        maximum=86400,
        reader=("asgi.app",),
    )
    # Database
    DATABASE_URL: str = _var(
        "postgresql://postgres@127.0.0.1:5432/ghar_dev",
        "url",
        "Database",
        "Postgres DSN (direct or PgBouncer); its password is masked.",
        schemes=_PG,
        reader=("database", "broker", "cli"),
    )
    DATABASE_DIRECT_URL: str | None = _var(
        None,
        "url",
        "Database",
        "Direct Postgres DSN (never PgBouncer) for the event broker's LISTEN and outbox "
        "writers; default DATABASE_URL.",
        optional=True,
        schemes=_PG,
        reader=("broker",),
    )
    DB_POOL_MIN_SIZE: int = _var(
        1,
        "int",
        "Database",
        "Main pool: connections kept open.",
        minimum=0,
        maximum=1000,
        reader=("database",),
    )
    DB_POOL_MAX_SIZE: int = _var(
        10,
        "int",
        "Database",
        "Main pool: most connections.",
        minimum=1,
        maximum=1000,
        reader=("database",),
    )
    DB_POOL_ACQUIRE_TIMEOUT: float = _var(
        5.0,
        "float",
        "Database",
        "Main pool: seconds to wait for a free connection before 503.",
        minimum=0.001,
        maximum=600,
        reader=("database",),
    )
    DB_BG_POOL_MIN_SIZE: int = _var(
        0,
        "int",
        "Database",
        "Background pool: connections kept open.",
        minimum=0,
        maximum=1000,
        reader=("database",),
    )
    DB_BG_POOL_MAX_SIZE: int = _var(
        4,
        "int",
        "Database",
        "Background pool: most connections.",
        minimum=1,
        maximum=1000,
        reader=("database",),
    )
    DB_BG_POOL_ACQUIRE_TIMEOUT: float = _var(
        30.0,
        "float",
        "Database",
        "Background pool: seconds to wait for a connection.",
        minimum=0.001,
        maximum=3600,
        reader=("database",),
    )
    DB_COMMAND_TIMEOUT: float = _var(
        30.0,
        "float",
        "Database",
        "Seconds a single statement may run.",
        minimum=0.001,
        maximum=3600,
        reader=("database",),
    )
    DB_CONNECT_TIMEOUT: float = _var(
        5.0,
        "float",
        "Database",
        "Seconds to open a connection.",
        minimum=0.001,
        maximum=600,
        reader=("database", "broker"),
    )
    DB_MAX_INACTIVE_LIFETIME: float = _var(
        300.0,
        "float",
        "Database",
        "Seconds an idle pooled connection lives.",
        minimum=0,
        maximum=86400,
        reader=("database",),
    )
    DB_MIGRATE_ON_STARTUP: bool = _var(
        False,
        "bool",
        "Database",
        "Apply pending migrations when the app starts.",
        reader=("database",),
    )
    # Redis
    REDIS_URL: str | None = _var(
        None,
        "url",
        "Redis",
        "Redis DSN for your services (the core uses no Redis).",
        optional=True,
        schemes=("redis", "rediss", "unix"),
        reader=APP,
    )
    # Identity provider
    SUPABASE_URL: str | None = _var(
        None,
        "url",
        "Identity provider",
        "Identity provider base URL; required in prod.",
        optional=True,
        schemes=_HTTP,
        reader=("auth", "jwt_verification"),
    )
    SUPABASE_ANON_KEY: Secret | None = _var(
        None,
        "secret",
        "Identity provider",
        "Public API key sent as `apikey`.",
        optional=True,
        reader=("auth",),
    )
    SUPABASE_SERVICE_ROLE_KEY: Secret | None = _var(
        None,
        "secret",
        "Identity provider",
        "Admin key for the user admin API.",
        optional=True,
        reader=("auth",),
    )
    SUPABASE_JWT_SECRET: Secret | None = _var(
        None,
        "secret",
        "Identity provider",
        "Legacy HS256 secret; empty means HS256 tokens go to the provider.",
        optional=True,
        reader=("jwt_verification",),
    )
    JWT_AUDIENCE: str = _var(
        "authenticated",
        "str",
        "Identity provider",
        "Required `aud` claim.",
        reader=("jwt_verification",),
    )
    JWT_LEEWAY: float = _var(
        10.0,
        "float",
        "Identity provider",
        "Clock skew allowed on exp, nbf and iat, in seconds.",
        minimum=0,
        maximum=300,
        reader=("jwt_verification",),
    )
    JWKS_CACHE_TTL: float = _var(
        3600.0,
        "float",
        "Identity provider",
        "Seconds a fetched key set is trusted.",
        minimum=1,
        maximum=86400,
        reader=("jwt_verification",),
    )
    JWKS_MIN_REFRESH_INTERVAL: float = _var(
        30.0,
        "float",
        "Identity provider",
        "Fewest seconds between two key-set refreshes.",
        minimum=0,
        maximum=3600,
        reader=("jwt_verification",),
    )
    TOKEN_CACHE_TTL: float = _var(
        60.0,
        "float",
        "Identity provider",
        "Seconds a verified token stays cached.",
        minimum=0,
        maximum=3600,
        reader=("jwt_verification",),
    )
    TOKEN_CACHE_MAX_SIZE: int = _var(
        5000,
        "int",
        "Identity provider",
        "Most tokens kept in the verified-token cache.",
        minimum=0,
        maximum=1_000_000,
        reader=("jwt_verification",),
    )
    TOKEN_NEGATIVE_CACHE_TTL: float = _var(
        300.0,
        "float",
        "Identity provider",
        "Seconds a token the provider refused is refused again without asking it; 0 disables.",
        minimum=0,
        maximum=86400,
        reader=("auth",),
    )
    AUTH_PROVIDER_MAX_IN_FLIGHT: int = _var(
        10,
        "int",
        "Identity provider",
        "Most token introspections in flight per process; past it, 503 with `Retry-After: 1`.",
        minimum=1,
        maximum=10_000,
        reader=("auth",),
    )
    # AI providers
    OPENAI_API_KEY: Secret | None = _var(
        None, "secret", "AI providers", "OpenAI API key.", optional=True, reader=APP
    )
    GEMINI_API_KEY: Secret | None = _var(
        None, "secret", "AI providers", "Gemini API key.", optional=True, reader=APP
    )
    ANTHROPIC_API_KEY: Secret | None = _var(
        None, "secret", "AI providers", "Anthropic API key.", optional=True, reader=APP
    )
    DEFAULT_VISION_PROVIDER: str = _var(
        "gemini",
        "choice",
        "AI providers",
        "Vision provider used unless a caller picks one.",
        choices=tuple(sorted(VALID_VISION_PROVIDERS)),
        reader=APP,
    )
    # Notifications
    NOTIFICATIONS_ENABLED: bool = _var(
        False, "bool", "Notifications", "Send push and email notifications.", reader=APP
    )
    FCM_SERVER_KEY: Secret | None = _var(
        None, "secret", "Notifications", "Firebase Cloud Messaging key.", optional=True, reader=APP
    )
    SMTP_HOST: str | None = _var(
        None, "str", "Notifications", "SMTP server for email.", optional=True, reader=APP
    )
    SMTP_PORT: int = _var(
        587, "int", "Notifications", "SMTP port.", minimum=1, maximum=65535, reader=APP
    )
    SMTP_USER: str | None = _var(
        None, "str", "Notifications", "SMTP user.", optional=True, reader=APP
    )
    SMTP_PASSWORD: Secret | None = _var(
        None, "secret", "Notifications", "SMTP password.", optional=True, reader=APP
    )
    EMAIL_FROM: str = _var(
        "no-reply@360ghar.com",
        "str",
        "Notifications",
        "Sender address of outgoing email.",
        reader=APP,
    )
    # Feature flags
    ENABLE_SSE: bool = _var(
        True, "bool", "Feature flags", "Serve the per-user event stream.", reader=("asgi.sse",)
    )
    ENABLE_WEBSOCKETS: bool = _var(
        True,
        "bool",
        "Feature flags",
        "Serve the WebSocket routes; false leaves them out (a handshake gets 404).",
        reader=("asgi.app",),
    )
    ENABLE_SCHEDULERS: bool = _var(
        False,
        "bool",
        "Feature flags",
        "Run your background schedulers in this process (the core runs none).",
        reader=APP,
    )
    EVENT_BROKER: str = _var(
        "memory",
        "choice",
        "Feature flags",
        "How events cross processes: memory (one process) or postgres (outbox + LISTEN/NOTIFY).",
        choices=("memory", "postgres"),
        reader=("broker",),
    )
    EVENT_MAX_PAYLOAD_BYTES: int = _var(
        65_536,
        "int",
        "Feature flags",
        "Largest encoded event the postgres broker accepts; larger is an error.",
        minimum=64,
        maximum=50_000_000,
        reader=("broker", "sse"),
    )
    EVENT_OUTBOX_RETENTION_AGE: float = _var(
        3600.0,
        "float",
        "Feature flags",
        "Seconds an outbox row is kept (the resume window of EVENT_BROKER=postgres).",
        minimum=1,
        maximum=86400 * 30,
        reader=("broker",),
    )
    EVENT_OUTBOX_RETENTION_COUNT: int = _var(
        1_000_000,
        "int",
        "Feature flags",
        "Most outbox rows kept; the oldest beyond are pruned.",
        minimum=1,
        maximum=1_000_000_000,
        reader=("broker",),
    )
    EVENT_OUTBOX_SYNCHRONOUS_COMMIT: bool = _var(
        True,
        "bool",
        "Feature flags",
        "Wait for the WAL flush of each outbox batch; off cuts the emit-to-delivery latency "
        "by the disk's fsync, and a Postgres crash (not a restart) can lose the last "
        "fraction of a second of events.",
        reader=("broker",),
    )
    EVENT_OUTBOX_NOTIFY_ROWS: bool = _var(
        False,
        "bool",
        "Feature flags",
        "A small outbox batch's NOTIFY carries a copy of its committed rows, so other "
        "instances deliver them without reading them back (one round trip less); off: it "
        "carries their id range, the smallest load on Postgres's shared notification queue.",
        reader=("broker",),
    )
    EVENT_OUTBOX_WRITERS: int = _var(
        2,
        "int",
        "Feature flags",
        "Outbox writers per process, committing in parallel, each on a direct connection of "
        "its own (DATABASE_DIRECT_URL: this many plus the LISTEN one).",
        minimum=1,
        maximum=64,
        reader=("broker",),
    )
    EVENT_OUTBOX_PRUNE_INTERVAL: float = _var(
        30.0,
        "float",
        "Feature flags",
        "Seconds between two outbox prunes (one instance at a time).",
        minimum=0.1,
        maximum=86400,
        reader=("broker",),
    )
    # SSE
    SSE_QUEUE_MAX_SIZE: int = _var(
        100,
        "int",
        "SSE",
        "Events buffered per subscriber; full drops the oldest.",
        minimum=1,
        maximum=100_000,
        reader=("sse.bus",),
    )
    SSE_MAX_SUBSCRIBERS: int = _var(
        500,
        "int",
        "SSE",
        "Most live subscribers per process.",
        minimum=1,
        maximum=1_000_000,
        reader=("sse.bus",),
    )
    SSE_HEARTBEAT_INTERVAL: float = _var(
        15.0,
        "float",
        "SSE",
        "Seconds between keep-alive comments.",
        minimum=0.1,
        maximum=3600,
        reader=("asgi.sse",),
    )
    SSE_REAPER_INTERVAL: float = _var(
        60.0,
        "float",
        "SSE",
        "Seconds between reaper cycles.",
        minimum=0.1,
        maximum=3600,
        reader=("sse.bus",),
    )
    SSE_IDLE_TIMEOUT: float = _var(
        1800.0,
        "float",
        "SSE",
        "Seconds without a read before a queue is reaped.",
        minimum=1,
        maximum=86400,
        reader=("sse.bus",),
    )
    SSE_FULL_CYCLES_LIMIT: int = _var(
        3,
        "int",
        "SSE",
        "Reaper cycles a queue may stay full before removal.",
        minimum=1,
        maximum=1000,
        reader=("sse.bus",),
    )
    SSE_HISTORY_SIZE: int = _var(
        100,
        "int",
        "SSE",
        "Events kept per user for resume by Last-Event-ID; 0 makes every gap a reset.",
        minimum=0,
        maximum=100_000,
        reader=("sse.bus",),
    )
    SSE_HISTORY_MAX_AGE: float = _var(
        300.0,
        "float",
        "SSE",
        "Seconds an event stays resumable.",
        minimum=0,
        maximum=86400,
        reader=("sse.bus",),
    )
    SSE_SEND_TIMEOUT: float = _var(
        5.0,
        "float",
        "SSE",
        "Seconds one write to a stream may take before the client is dropped.",
        minimum=0.05,
        maximum=600,
        reader=("asgi.sse",),
    )
    SSE_RETRY_INTERVAL: float = _var(
        3.0,
        "float",
        "SSE",
        "Reconnect delay sent as `retry:`; at shutdown each stream gets 1-4 times it.",
        minimum=0.05,
        maximum=3600,
        reader=("asgi.sse",),
    )
    # WebSocket
    WS_MAX_CONNECTIONS_PER_USER: int = _var(
        10,
        "int",
        "WebSocket",
        "Open WebSockets one user may hold in this process; the next is refused with 429.",
        minimum=1,
        maximum=10_000,
        reader=("websocket",),
    )
    WS_SEND_TIMEOUT: float = _var(
        5.0,
        "float",
        "WebSocket",
        "Seconds one send to a socket may take before it is closed (4001).",
        minimum=0.05,
        maximum=600,
        reader=("websocket",),
    )
    WS_QUEUE_MAX_SIZE: int = _var(
        100,
        "int",
        "WebSocket",
        "Messages waiting per socket; one more closes it (4002, the client reads too slowly).",
        minimum=1,
        maximum=100_000,
        reader=("websocket",),
    )
    WS_PING_INTERVAL: float = _var(
        20.0,
        "float",
        "WebSocket",
        "Seconds of silence from a client before the server sends it a `ping` message.",
        minimum=0.05,
        maximum=3600,
        reader=("websocket",),
    )
    WS_PONG_TIMEOUT: float = _var(
        20.0,
        "float",
        "WebSocket",
        "Seconds a client has to answer a `ping` (any message counts) before it is closed (4003).",
        minimum=0.05,
        maximum=3600,
        reader=("websocket",),
    )
    WS_JOB_TTL: float = _var(
        3600.0,
        "float",
        "WebSocket",
        "Seconds a job registration lives unless the job completes or fails first.",
        minimum=1,
        maximum=86400 * 7,
        reader=("websocket",),
    )
    # Cache
    CACHE_DEFAULT_TTL: float = _var(
        300.0,
        "float",
        "Cache",
        "Default entry lifetime for your in-process caches.",
        minimum=0,
        maximum=86400 * 30,
        reader=APP,
    )
    CACHE_MAX_SIZE: int = _var(
        10_000,
        "int",
        "Cache",
        "Most entries for your in-process caches.",
        minimum=0,
        maximum=10_000_000,
        reader=APP,
    )

    def __post_init__(self) -> None:
        problems = _cross_field_problems(self) + self.extra_problems()
        if problems:
            raise ConfigError(problems)

    def extra_problems(self) -> list[tuple[str, str]]:
        """An app's cross-field rules: (variable, reason) pairs, reported with the core's."""
        return []

    @property
    def is_prod(self) -> bool:
        return self.APP_ENV == "prod"

    @property
    def environment_label(self) -> str:
        return self.ENVIRONMENT or self.APP_ENV

    def masked_items(self) -> list[tuple[str, Any]]:
        """(name, value) pairs with secrets and URL passwords masked, for display."""
        return [
            (f.name, _masked_text(f.name, getattr(self, f.name))) for f in dataclasses.fields(self)
        ]

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}={value!r}" for name, value in self.masked_items())
        return f"{type(self).__name__}({parts})"

    __str__ = __repr__


def settings_fields(schema: type[Settings] | None = None) -> tuple[tuple[str, _Spec, Any], ...]:
    """(name, spec, default) of every setting of ``schema`` (the core's), in declaration order."""
    fields = dataclasses.fields(schema or Settings)
    return tuple((f.name, f.metadata["spec"], f.default) for f in fields)


def _mask_url_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return url.replace(parts.netloc, f"{user}:{_MASK}@{netloc[-1]}", 1)


def _masked_text(name: str, value: Any) -> Any:
    if isinstance(value, Secret):
        return str(value)
    if isinstance(value, str) and name.endswith("_URL") and "@" in value:
        try:
            return _mask_url_password(value)
        except ValueError:
            return _MASK
    return value


# --- cross-field rules --------------------------------------------------------


def _cross_field_problems(s: Settings) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if s.DB_POOL_MIN_SIZE > s.DB_POOL_MAX_SIZE:
        problems.append(("DB_POOL_MIN_SIZE", "must not exceed DB_POOL_MAX_SIZE"))
    if s.DB_BG_POOL_MIN_SIZE > s.DB_BG_POOL_MAX_SIZE:
        problems.append(("DB_BG_POOL_MIN_SIZE", "must not exceed DB_BG_POOL_MAX_SIZE"))
    if s.APP_ENV == "prod":
        key = s.SECRET_KEY.get_secret_value()
        if not key.strip() or key == _DEFAULT_SECRET_KEY:
            problems.append(("SECRET_KEY", "prod needs a real secret, not empty or the default"))
        elif len(key) < 32:
            problems.append(("SECRET_KEY", "prod needs at least 32 characters"))
        if not s.SUPABASE_URL:
            problems.append(("SUPABASE_URL", "prod needs the identity provider's URL"))
        if "*" in s.CORS_ORIGINS and s.CORS_ALLOW_CREDENTIALS:
            problems.append(
                ("CORS_ORIGINS", "prod refuses `*` together with CORS_ALLOW_CREDENTIALS")
            )
    return problems


# --- parsing values -------------------------------------------------------------

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_INT_RE = re.compile(r"[+-]?\d+")
_PREFIX_RE = re.compile(r"(/[A-Za-z0-9._~-]+)+")


def _check_range(value: float, spec: _Spec) -> None:
    if spec.minimum is not None and value < spec.minimum:
        raise ValueError(f"must be at least {_num(spec.minimum)}, got {_num(value)}")
    if spec.maximum is not None and value > spec.maximum:
        raise ValueError(f"must be at most {_num(spec.maximum)}, got {_num(value)}")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _shorten(text: str, limit: int = 40) -> str:
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr(shown)


def _split_commas(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _parse_list(text: str) -> tuple[str, ...]:
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            items = orjson.loads(stripped)
        except orjson.JSONDecodeError:
            raise ValueError("looks like a JSON list but is not valid JSON") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError("a JSON list must contain only strings")
        return tuple(items)
    return _split_commas(text)


def _parse_value(name: str, spec: _Spec, text: str) -> Any:
    """Turn the text form of one variable into its typed value (or raise ValueError)."""
    kind = spec.kind
    if spec.optional and text.strip() == "":
        return None
    if kind == "str":
        if text.strip() == "":
            raise ValueError("must not be empty")
        return text
    if kind == "secret":
        return Secret(text)
    if kind == "bool":
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"expected true/false (or 1/0, yes/no, on/off), got {_shorten(text)}")
    if kind == "int":
        stripped = text.strip()
        if not _INT_RE.fullmatch(stripped):
            raise ValueError(f"expected an integer, got {_shorten(text)}")
        number = int(stripped)
        _check_range(number, spec)
        return number
    if kind == "float":
        try:
            number_f = float(text.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {_shorten(text)}") from None
        if not math.isfinite(number_f):
            raise ValueError(f"expected a finite number, got {_shorten(text)}")
        _check_range(number_f, spec)
        return number_f
    if kind == "choice":
        value = text.strip()
        if spec.choices and spec.choices[0].isupper():
            value = value.upper()
        if value not in spec.choices:
            raise ValueError(f"expected one of {', '.join(spec.choices)}, got {_shorten(text)}")
        return value
    if kind == "list":
        return _parse_list(text)
    if kind == "url":
        return _parse_url(text, spec)
    if kind == "prefix":
        value = text.strip()
        if value == "" or value == "/":
            return ""
        if not _PREFIX_RE.fullmatch(value):
            raise ValueError(
                f"expected a path like /api/v1 (leading slash, no trailing slash), "
                f"got {_shorten(text)}"
            )
        return value
    raise AssertionError(f"unknown kind {kind} for {name}")  # pragma: no cover


def _parse_url(text: str, spec: _Spec) -> str:
    value = text.strip()
    if any(ch.isspace() for ch in value):
        raise ValueError("a URL must not contain whitespace")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    if spec.schemes and parts.scheme.lower() not in spec.schemes:
        raise ValueError(
            f"expected a {'/'.join(spec.schemes)} URL, got scheme {parts.scheme or '(none)'!r}"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"the URL has no host: {_shorten(_mask_url_password(value))}")
    return value.rstrip("/") if spec.schemes == _HTTP else value


def format_env_value(name: str, value: Any, schema: type[Settings] | None = None) -> str:
    """The env-file text form of a typed value (``parse`` gives ``value`` back)."""
    spec: _Spec = _specs_of(schema or Settings)[name]
    if value is None:
        return ""
    if isinstance(value, Secret):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if spec.kind == "list":
        items = list(value)
        plain = all(item == item.strip() and item and "," not in item for item in items) and not (
            items and items[0].startswith("[")
        )
        return ",".join(items) if plain else orjson.dumps(items).decode()
    return str(value)


# --- loading ------------------------------------------------------------------------


_schema_specs: dict[type[Settings], dict[str, _Spec]] = {}


def _specs_of(schema: type[Settings]) -> dict[str, _Spec]:
    """Name -> spec of every field of ``schema``; a field not made by ``setting()`` is refused."""
    cached = _schema_specs.get(schema)
    if cached is not None:
        return cached
    if not (isinstance(schema, type) and issubclass(schema, Settings)):
        raise TypeError(f"a settings schema must be a subclass of Settings, got {schema!r}")
    specs: dict[str, _Spec] = {}
    for f in dataclasses.fields(schema):
        spec = f.metadata.get("spec")
        if not isinstance(spec, _Spec):
            raise TypeError(
                f"{schema.__name__}.{f.name} is not declared with ghar_core.config.setting()"
            )
        specs[f.name] = spec
    _schema_specs[schema] = specs
    return specs


_SPECS: Final = _specs_of(Settings)
#: Variables the loader reads itself (not settings): never reported as unknown.
_CONTROL_VARS: Final = frozenset({"APP_ENV", "GHAR_ENV_DIR", "GHAR_SETTINGS"})
_log = logging.getLogger("ghar_core.config")


def _default_env_dir(environ: Mapping[str, str]) -> Path:
    configured = environ.get("GHAR_ENV_DIR")
    if configured:
        return Path(configured)
    cwd_env = Path.cwd() / "env"
    if cwd_env.is_dir():
        return cwd_env
    return Path(__file__).resolve().parent.parent / "env"


def env_file_path(
    app_env: str | None = None,
    env_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """The env file :func:`load_settings` reads (it may not exist): says where settings come from.

    The folder is ``env_dir``, else ``GHAR_ENV_DIR``, else ``./env``, else the
    ``env/`` folder next to the package; raises ConfigError on a bad ``APP_ENV``.
    """
    env = os.environ if environ is None else environ
    chosen = (app_env or env.get("APP_ENV") or "dev").strip()
    if chosen not in APP_ENVS:
        raise ConfigError([("APP_ENV", f"expected one of {', '.join(APP_ENVS)}, got {chosen!r}")])
    folder = Path(env_dir) if env_dir is not None else _default_env_dir(env)
    return folder / f".env.{chosen}"


def settings_schema(target: str) -> type[Settings]:
    """The :class:`Settings` subclass ``"package.module:Class"`` names (``GHAR_SETTINGS``).

    Raises ConfigError naming ``GHAR_SETTINGS`` and the cause.
    """
    module_name, sep, attr = target.strip().partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError([("GHAR_SETTINGS", f"expected 'package.module:Class', got {target!r}")])
    try:
        schema = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise ConfigError([("GHAR_SETTINGS", f"cannot import {module_name!r}: {exc}")]) from None
    except AttributeError:
        raise ConfigError([("GHAR_SETTINGS", f"{module_name!r} has no {attr!r}")]) from None
    if not (isinstance(schema, type) and issubclass(schema, Settings)):
        raise ConfigError([("GHAR_SETTINGS", f"{target!r} is not a subclass of Settings")])
    return schema


def _read_env_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([(str(path), f"cannot read the env file: {exc}")]) from None
    try:
        return parse_env_text(text, str(path))
    except EnvSyntaxError as exc:
        raise ConfigError(exc.problems) from None


def _schema_named(env: Mapping[str, str], from_file: Mapping[str, str]) -> type[Settings]:
    target = env.get("GHAR_SETTINGS") or from_file.get("GHAR_SETTINGS")
    return settings_schema(target) if target else Settings


def chosen_schema(
    app_env: str | None = None,
    env_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> type[Settings]:
    """The schema :func:`load_settings` would use: ``GHAR_SETTINGS`` (environment, then file)."""
    env = os.environ if environ is None else environ
    return _schema_named(env, _read_env_file(env_file_path(app_env, env_dir, env)))


def _closest(name: str, known: Iterable[str], cutoff: float) -> str | None:
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=cutoff)
    return match[0] if match else None


def _unknown_keys(
    file_keys: Iterable[str], env: Mapping[str, str], specs: Mapping[str, _Spec]
) -> list[tuple[str, str | None, str]]:
    """(name, closest known name, where) of every key no setting of the schema declares.

    Every unknown key of the env file counts; of the process environment
    (which holds PATH, HOME and the rest) only the near misses of a setting's
    name do -- a ``DATABSE_URL`` exported by hand is as wrong as one in a file.
    """
    known = [*specs, *_CONTROL_VARS]
    found: list[tuple[str, str | None, str]] = []
    seen: set[str] = set()
    for key in file_keys:
        if key not in specs and key not in _CONTROL_VARS:
            found.append((key, _closest(key, known, 0.6), "env file"))
            seen.add(key)
    for key in env:
        if key in specs or key in seen or key.startswith("GHAR_") or not key.isupper():
            continue  # GHAR_*: the tools' own variables (GHAR_DEV_DIR, GHAR_SERVE_APP, ...)
        near = _closest(key, known, 0.88)
        if near is not None:
            found.append((key, near, "environment"))
    return found


def _describe_unknown(name: str, near: str | None) -> str:
    return f"{name} (did you mean {near}?)" if near else name


@overload
def load_settings(
    app_env: str | None = ...,
    env_dir: str | os.PathLike[str] | None = ...,
    environ: Mapping[str, str] | None = ...,
    *,
    schema: None = ...,
    strict: bool | None = ...,
) -> Settings: ...
@overload
def load_settings(
    app_env: str | None = ...,
    env_dir: str | os.PathLike[str] | None = ...,
    environ: Mapping[str, str] | None = ...,
    *,
    schema: type[S],
    strict: bool | None = ...,
) -> S: ...
def load_settings(
    app_env: str | None = None,
    env_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    schema: type[Settings] | None = None,
    strict: bool | None = None,
) -> Settings:
    """Read, parse and validate the settings; raise one ConfigError listing every problem.

    ``environ`` defaults to ``os.environ`` (pass a dict in tests); ``app_env``
    and ``env_dir`` override ``APP_ENV`` and ``GHAR_ENV_DIR``. A missing env
    file is not an error: defaults and the environment still apply.

    ``schema``: your :class:`Settings` subclass (its fields are read from the
    same file and environment, checked and masked like the core's); without
    it, ``GHAR_SETTINGS`` (``package.module:Class``, in the environment or
    the env file) names it, else the core's own. A key of the env file that
    the schema does not declare -- or an environment variable one typo away
    from a setting -- is logged in one warning naming each with the closest
    known name; ``strict=True`` (default: ``STRICT_SETTINGS``) makes them
    problems of the ConfigError instead.
    """
    env = os.environ if environ is None else environ
    path = env_file_path(app_env, env_dir, env)
    chosen = path.name.removeprefix(".env.")
    from_file = _read_env_file(path)
    if schema is None:
        schema = _schema_named(env, from_file)
    specs = _specs_of(schema)
    raw = {k: v for k, v in from_file.items() if k in specs}
    raw.update({k: v for k, v in env.items() if k in specs})
    raw["APP_ENV"] = chosen

    values: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for name, spec in specs.items():
        if name not in raw:
            continue
        try:
            values[name] = _parse_value(name, spec, raw[name])
        except ValueError as exc:
            problems.append((name, str(exc)))
    override = values.get("CORS_ORIGINS_STR")
    if override:
        values["CORS_ORIGINS"] = _split_commas(override)
    unknown = _unknown_keys(from_file, env, specs)
    if strict is None:
        strict = bool(values.get("STRICT_SETTINGS", False))
    if unknown and strict:
        for name, near, where in unknown:
            hint = f"; did you mean {near}?" if near else ""
            problems.append((name, f"not a setting of {schema.__name__} ({where}){hint}"))
    elif unknown:
        _log.warning(
            "%s: %d unknown setting(s) ignored: %s. Declare your app's settings in a Settings "
            "subclass (load_settings(schema=...) or GHAR_SETTINGS); STRICT_SETTINGS=true "
            "refuses unknown keys.",
            path,
            len(unknown),
            ", ".join(_describe_unknown(name, near) for name, near, _ in unknown),
        )
    if problems:
        raise ConfigError(problems)
    return schema(**values)


_cached: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, loaded on first use."""
    global _cached
    if _cached is None:
        _cached = load_settings()
    return _cached


def reset_settings() -> None:
    """Forget the cached settings so the next use reloads them (tests)."""
    global _cached
    _cached = None


def __getattr__(name: str) -> Any:
    # PEP 562: ``from ghar_core.config import settings`` loads lazily.
    if name == "settings":
        return get_settings()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _default_text(name: str, spec: _Spec, default: Any, schema: type[Settings] | None) -> str:
    if spec.kind == "secret":
        return "(secret, empty)" if not default else "(secret, dev default)"
    text = format_env_value(name, default, schema)
    return f"`{text}`" if text else "(empty)"


def _reader_text(spec: _Spec) -> str:
    if not spec.reader:
        return APP_READER
    return ", ".join(f"`ghar_core.{module}`" for module in spec.reader)


def config_table_markdown(schema: type[Settings] | None = None) -> str:
    """The README's configuration table, generated from :class:`Settings` (or ``schema``)."""
    head = "| Variable | Group | Type | Default | Read by | Description |"
    lines = [head, "|---|---|---|---|---|---|"]
    for name, spec, default in settings_fields(schema):
        kind = spec.kind
        if kind == "choice":
            kind = " \\| ".join(spec.choices)
        elif kind == "url" and spec.schemes:
            kind = f"url ({'/'.join(spec.schemes)})"
        if spec.optional and spec.kind != "secret":
            kind += ", optional"
        doc = spec.doc.replace("|", "\\|")
        lines.append(
            f"| `{name}` | {spec.group} | {kind} | {_default_text(name, spec, default, schema)} "
            f"| {_reader_text(spec)} | {doc} |"
        )
    return "\n".join(lines) + "\n"
