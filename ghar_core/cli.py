"""The ``ghar-core`` command line (also ``python -m ghar_core``).

Each subcommand is one ``_cmd_<name>(args) -> int`` function plus one
``_add_<name>(subparsers)`` registration in :func:`build_parser`. The CLI sits
on top of every layer and may import any of them, lazily, so ``--help``
stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ghar_core import __version__

if TYPE_CHECKING:
    from ghar_core.config import Settings

__all__ = ["build_parser", "main"]


def _cmd_config(args: argparse.Namespace) -> int:
    from ghar_core.config import chosen_schema, config_table_markdown, env_file_path, load_settings

    if args.table:
        # The table needs the schema only, not valid values.
        sys.stdout.write(config_table_markdown(chosen_schema()))
        return 0
    source = env_file_path()
    loaded = load_settings()  # GHAR_SETTINGS (or --settings) names the app's schema
    state = "read" if source.is_file() else "not found: defaults and the environment only"
    print(f"# env file: {source} ({state})")
    for name, value in loaded.masked_items():
        print(f"{name}={value!r}")
    return 0


def _add_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="print the effective settings (secrets masked)")
    p.add_argument(
        "--table",
        action="store_true",
        help="print the configuration table (with --settings: your app's rows too)",
    )
    p.set_defaults(func=_cmd_config)


def _cmd_emit(args: argparse.Namespace) -> int:
    import asyncio

    import asyncpg
    import orjson

    from ghar_core.broker import EventTooLargeError, emit
    from ghar_core.config import load_settings

    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        print(f"--data is not JSON: {exc}", file=sys.stderr)
        return 2
    settings = load_settings()
    try:
        record = asyncio.run(
            emit(
                user=args.user,
                job=args.job,
                type=args.type,
                data=data,
                dsn=args.dsn,
                settings=settings,
            )
        )
    except (EventTooLargeError, ValueError) as exc:
        print(f"not emitted: {exc}", file=sys.stderr)
        return 2
    except asyncpg.UndefinedFunctionError:
        print(
            "not emitted: the database has no event outbox; run `ghar-core migrate` first",
            file=sys.stderr,
        )
        return 1
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        print(
            f"not emitted: cannot write to Postgres: {type(exc).__name__}: {exc}", file=sys.stderr
        )
        return 1
    target = f"user {args.user}" if args.user is not None else f"job {args.job}"
    print(f"emitted {args.type} to {target} as {record.epoch}:{record.position}")
    return 0


def _add_emit(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "emit",
        help="publish an event to the running servers (EVENT_BROKER=postgres) from a shell",
        description=(
            "Write one event to the Postgres outbox: every server with EVENT_BROKER=postgres "
            "on the same database delivers it to the user's event streams and sockets (or the "
            'job\'s sockets). The event is {"type": TYPE, "data": DATA}.'
        ),
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--user", help="the user id whose streams get the event")
    target.add_argument("--job", help="the job id whose subscribers get the event")
    p.add_argument("--type", required=True, help="the event type (1-64 of [A-Za-z0-9_.-])")
    p.add_argument("--data", default="null", help="the event data, as JSON (default: null)")
    p.add_argument("--dsn", help="Postgres DSN (default: DATABASE_URL)")
    p.set_defaults(func=_cmd_emit)


def _cmd_migrate(args: argparse.Namespace) -> int:
    import asyncio

    import asyncpg

    from ghar_core.config import load_settings
    from ghar_core.migrate import MigrationError, MigrationSet, migrate_dsn, migration_status

    dirs, namespaces = args.dir or [], args.namespace or []
    if len(dirs) != len(namespaces):
        print("give --dir and --namespace in pairs, one --namespace per --dir", file=sys.stderr)
        return 2
    try:
        sets = [MigrationSet(ns, d) for d, ns in zip(dirs, namespaces, strict=True)]
        dsn = args.dsn or load_settings().DATABASE_URL
    except MigrationError as exc:
        print(exc, file=sys.stderr)
        return 2

    async def run() -> int:
        if args.status:
            conn = await asyncpg.connect(dsn, statement_cache_size=0, timeout=10)
            try:
                print("namespace\tversion\tname\tapplied")
                for s in await migration_status(conn, sets):
                    state = s.applied_at.isoformat() if s.applied_at else "pending"
                    note = "" if s.has_file else " (recorded, no file)"
                    print(f"{s.namespace}\t{s.version}\t{s.name}\t{state}{note}")
            finally:
                await conn.close()
            return 0
        applied = await migrate_dsn(dsn, sets)
        labels = ", ".join(m.label for m in applied)
        print("applied: " + labels if applied else "database is up to date")
        return 0

    try:
        return asyncio.run(run())
    except MigrationError as exc:
        print(f"migration failed: {exc}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"cannot reach the database: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _add_migrate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "migrate",
        help="apply pending database migrations (advisory-locked): the core's, then the app's",
    )
    p.add_argument("--dsn", help="Postgres DSN (default: DATABASE_URL from the settings)")
    p.add_argument(
        "--dir",
        action="append",
        metavar="PATH",
        help="an app's migration directory (repeatable; pair each with --namespace)",
    )
    p.add_argument(
        "--namespace",
        action="append",
        metavar="NAME",
        help="the namespace of the --dir at the same position (e.g. marketplace)",
    )
    p.add_argument(
        "--status",
        action="store_true",
        help="list namespace, version, name and when applied (or pending)",
    )
    p.set_defaults(func=_cmd_migrate)


#: The settings ``ghar-core serve`` also takes as flags (``--head-timeout 5``).
SERVE_LIMITS = (
    "MAX_HEADER_BYTES",
    "MAX_HEADERS",
    "MAX_URL_BYTES",
    "HEAD_TIMEOUT",
    "BODY_TIMEOUT",
    "KEEP_ALIVE_TIMEOUT",
    "MAX_CONCURRENCY",
    "MAX_CONNECTIONS",
)


def _uvicorn_options(args: argparse.Namespace, loaded: Settings) -> dict[str, Any]:
    """Every option ``serve`` gives uvicorn, in one place (the flags and the settings)."""
    from ghar_core.asgi.limits import uvicorn_options

    options: dict[str, Any] = {
        "factory": True,
        "host": args.host or loaded.HOST,
        "port": loaded.PORT if args.port is None else args.port,
        "workers": args.workers,
        # lifespan "on": a failed start is fatal instead of a server that answers 503s.
        "lifespan": "on",
        "access_log": False,  # ours is the app's own (buffered) access log
        "log_config": None,  # our handler, from configure_logging
        "log_level": loaded.LOG_LEVEL.lower(),
        "server_header": False,
        "timeout_graceful_shutdown": int(loaded.SHUTDOWN_STEP_TIMEOUT) or 1,
        "root_path": args.root_path,
        "proxy_headers": args.proxy_headers,
    }
    if args.forwarded_allow_ips is not None:
        options["forwarded_allow_ips"] = args.forwarded_allow_ips
    if args.reload:
        options["reload"] = True
        options["reload_dirs"] = [os.getcwd()]
    # Header, head/body, keep-alive and concurrency limits (ghar_core/asgi/limits.py).
    options.update(uvicorn_options(loaded))
    return options


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ghar_core.config import load_settings
    from ghar_core.logging import configure_logging
    from ghar_core.server import SERVE_APP_ENV, SERVE_FACTORY_ENV, AppLoadError, load_app_target

    for setting in SERVE_LIMITS:  # into the environment: read here and by every worker
        value = getattr(args, setting.lower())
        if value is not None:
            os.environ[setting] = value
    if args.log_level:
        os.environ["LOG_LEVEL"] = args.log_level.upper()  # the workers read it too
    if args.reload and args.workers != 1:
        print("ghar-core serve: --reload runs one worker; drop --workers", file=sys.stderr)
        return 2
    if args.factory and not args.app:
        print("ghar-core serve: --factory needs --app MODULE:ATTR", file=sys.stderr)
        return 2
    loaded: Settings | None = None
    if args.app:
        from ghar_core.asgi.app import App

        # Check here, where the error can be shown plainly; each worker process
        # loads it again (a single worker reuses this import).
        try:
            target = load_app_target(args.app, factory=args.factory)
        except AppLoadError as exc:
            print(f"ghar-core serve: cannot load --app {args.app}: {exc}", file=sys.stderr)
            return 2
        os.environ[SERVE_APP_ENV] = args.app
        os.environ[SERVE_FACTORY_ENV] = "1" if args.factory else "0"
        if isinstance(target, App):
            loaded = target.settings  # the app's own settings (its schema) rule
    if loaded is None:
        loaded = load_settings()
    configure_logging(loaded)
    # The factory runs in every worker: each builds its own app and resources.
    uvicorn.run("ghar_core.server:create_app_for_server", **_uvicorn_options(args, loaded))
    return 0


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="serve the ASGI app with uvicorn (HOST/PORT from settings)")
    p.add_argument("--host", default=None, help="address to bind (default: HOST)")
    p.add_argument("--port", type=int, default=None, help="port to bind (default: PORT)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help="your ASGI app (e.g. myservice.main:app) instead of the bare core app; "
        "the current directory is on the import path",
    )
    p.add_argument(
        "--factory", action="store_true", help="call --app with no arguments to build the app"
    )
    p.add_argument(
        "--reload",
        action="store_true",
        help="restart when a file under the current directory changes (development)",
    )
    p.add_argument(
        "--root-path",
        default="",
        metavar="PREFIX",
        help="the prefix a proxy mounts the app under (e.g. /api), as ASGI root_path",
    )
    p.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default=None,
        help="the log level of the app and the server (default: LOG_LEVEL)",
    )
    p.add_argument(
        "--proxy-headers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="take the client address and scheme from X-Forwarded-For/-Proto sent by "
        "--forwarded-allow-ips (default: on, as uvicorn)",
    )
    p.add_argument(
        "--forwarded-allow-ips",
        default=None,
        metavar="IPS",
        help="comma-separated proxy addresses (or *) whose X-Forwarded-* are trusted "
        "(default: uvicorn's, 127.0.0.1)",
    )
    limits = p.add_argument_group("limits per worker (ghar_core/asgi/limits.py)")
    for setting in SERVE_LIMITS:
        flag = "--" + setting.lower().replace("_", "-")
        limits.add_argument(flag, metavar="VALUE", help=f"sets {setting}")
    p.set_defaults(func=_cmd_serve)


def _cmd_token(args: argparse.Namespace) -> int:
    import asyncio

    from ghar_core.config import load_settings
    from ghar_core.devtools.identity_provider import (
        DEV_PROVIDER_URL,
        DEV_SERVICE_ROLE_KEY,
        TokenRequestError,
        request_token,
    )

    loaded = load_settings()
    url = args.provider_url or loaded.SUPABASE_URL or DEV_PROVIDER_URL
    key = loaded.SUPABASE_SERVICE_ROLE_KEY
    service_key = args.service_role_key or (key.get_secret_value() if key else DEV_SERVICE_ROLE_KEY)
    try:
        token = asyncio.run(
            request_token(url, service_key, sub=args.sub, email=args.email, expires_in=args.ttl)
        )
    except TokenRequestError as exc:
        print(f"ghar-core token: {exc}", file=sys.stderr)
        return 1
    print(token)
    return 0


def _seconds(text: str) -> int:
    """argparse type for a token lifetime: the provider accepts 1 s to 30 days."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole seconds, got {text!r}") from None
    if not 1 <= value <= 2_592_000:
        raise argparse.ArgumentTypeError(f"must be 1 to 2592000 seconds, got {value}")
    return value


def _add_token(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "token", help="print an access token minted by the local identity provider (dev only)"
    )
    p.add_argument("--sub", help="user id (UUID); default: the user with --email, else a new one")
    p.add_argument("--email", help="the user's email (the user is created when new)")
    p.add_argument(
        "--ttl",
        type=_seconds,
        default=3600,
        help="lifetime in seconds, 1 to 2592000 (default: 3600)",
    )
    p.add_argument(
        "--provider-url",
        help="the local provider's base URL (default: SUPABASE_URL, else http://127.0.0.1:54321)",
    )
    p.add_argument(
        "--service-role-key",
        help="service-role key (default: SUPABASE_SERVICE_ROLE_KEY, else the dev key)",
    )
    p.set_defaults(func=_cmd_token)


def _cmd_dev(args: argparse.Namespace) -> int:
    import asyncio

    from ghar_core.devtools.dev import DevOptions, run_dev

    options = DevOptions(
        host=args.host,
        port=args.port,
        app=args.app,
        factory=args.factory,
        data_dir=args.data_dir,
        email=args.email,
    )
    return asyncio.run(run_dev(options))


def _add_dev(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "dev",
        help="serve the app for development, starting a database and identity provider if unset",
    )
    p.add_argument("--host", default=None, help="address to bind (default: HOST)")
    p.add_argument("--port", type=int, default=None, help="port to bind (default: PORT)")
    p.add_argument("--app", metavar="MODULE:ATTR", help="your ASGI app, as for serve")
    p.add_argument("--factory", action="store_true", help="call --app to build the app")
    p.add_argument(
        "--data-dir",
        type=Path,
        metavar="PATH",
        help="where the embedded PostgreSQL keeps its data (default: GHAR_DEV_DIR or .ghar/dev)",
    )
    p.add_argument("--email", default="dev@example.com", help="the dev user's email")
    p.set_defaults(func=_cmd_dev)


def _cmd_identity_provider(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from ghar_core.devtools.identity_provider import IdentityProviderServer

    async def run() -> None:
        server = IdentityProviderServer(host=args.host, port=args.port)
        await server.start()
        provider = server.provider
        print(f"local identity provider on {server.url} (Ctrl-C stops it); for your env file:")
        print(f"SUPABASE_URL={server.url}")
        print(f"SUPABASE_ANON_KEY={provider.anon_key}")
        print(f"SUPABASE_SERVICE_ROLE_KEY={provider.service_role_key}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await server.stop()

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"ghar-core identity-provider: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


def _add_identity_provider(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "identity-provider",
        help="run the local identity provider (dev/test only; keys and users in memory)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=54321, help="port to bind (default: 54321)")
    p.set_defaults(func=_cmd_identity_provider)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ghar-core",
        description="The 360Ghar core: serve the app, migrate, inspect settings, dev tools.",
    )
    parser.add_argument("--version", action="version", version=f"ghar-core {__version__}")
    parser.add_argument(
        "--settings",
        metavar="MODULE:CLASS",
        help="your Settings subclass (sets GHAR_SETTINGS for this command and its workers)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_config(sub)
    _add_dev(sub)
    _add_emit(sub)
    _add_identity_provider(sub)
    _add_migrate(sub)
    _add_serve(sub)
    _add_token(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    from ghar_core.config import ConfigError

    # As uvicorn's CLI does: run from the project folder, its modules import
    # without PYTHONPATH=. (--settings, --app, GHAR_SETTINGS).
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    if args.settings:
        os.environ["GHAR_SETTINGS"] = args.settings

    try:
        result: int = func(args)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
    except ConfigError as exc:
        # Every command reads the settings: one place reports every bad variable.
        print(exc, file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`ghar-core config | head`): not our error, and
        # Python must not complain again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return result
