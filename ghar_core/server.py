"""Serving with uvicorn: what ``ghar-core serve`` runs in the parent and in each worker.

The CLI checks the target once in the parent (where a one-line error can be
shown), passes it to the workers through two environment variables and hands
uvicorn :func:`create_app_for_server` as its factory. Each worker loads the
settings, configures logging, builds (or imports) the app and gives it the
buffered access log -- after the import, through :meth:`App.use_access_sink`,
so a module that builds its app at import time gets it too. The access lines
are flushed before any other log line is written, so the stream stays in
order (``"GET / 200"`` never appears after ``"Shutting down"``).
Once the app's lifespan has started, the worker moves its startup heap out of
the garbage collector's reach (:func:`freeze_startup_heap`).
"""

from __future__ import annotations

import gc
import importlib
import inspect
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ghar_core.asgi.accesslog import BufferedAccessLog
    from ghar_core.asgi.types import ASGIApp

__all__ = [
    "SERVE_APP_ENV",
    "SERVE_FACTORY_ENV",
    "AppLoadError",
    "create_app_for_server",
    "freeze_startup_heap",
    "load_app_target",
]

#: Environment variables through which ``ghar-core serve --app`` reaches its workers.
SERVE_APP_ENV = "GHAR_SERVE_APP"
SERVE_FACTORY_ENV = "GHAR_SERVE_FACTORY"


class AppLoadError(ValueError):
    """``--app``/``--factory`` name something that cannot be served; the message says why."""


def _cwd_on_path() -> None:
    # As uvicorn's own CLI does: `ghar-core serve --app myservice.main:app` from
    # the project folder finds `myservice` without PYTHONPATH=.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def load_app_target(target: str, *, factory: bool = False) -> Any:
    """The object ``"package.module:attr"`` names (called with no arguments when ``factory``).

    The current directory is put on ``sys.path`` first. Raises
    :class:`AppLoadError` (a ``ValueError``) with one line that names the
    target and the cause: a bad form, an import error, a missing attribute,
    a factory that is not callable or fails, or a result that is no ASGI app.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise AppLoadError(f"{target!r} is not of the form 'package.module:attribute'")
    _cwd_on_path()
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppLoadError(f"cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError(f"module {module_name!r} has no attribute {attr!r}") from None
    if factory:
        if not callable(obj) or _is_app(obj):
            what = "an ASGI app already (drop --factory)" if callable(obj) else "not callable"
            raise AppLoadError(f"--factory: {target!r} is {what}")
        try:
            obj = obj()
        except Exception as exc:
            raise AppLoadError(
                f"--factory: calling {target!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
    if not callable(obj):
        raise AppLoadError(f"{target!r} is not an ASGI application (got {type(obj).__name__})")
    if not factory and not _takes_three_arguments(obj):
        raise AppLoadError(
            f"{target!r} does not take (scope, receive, send); if it builds the app, add --factory"
        )
    return obj


def _is_app(obj: object) -> bool:
    from ghar_core.asgi.app import App

    return isinstance(obj, App)


def _takes_three_arguments(obj: Any) -> bool:
    """Whether ``obj(scope, receive, send)`` binds (unknown signatures get the benefit)."""
    try:
        inspect.signature(obj).bind(None, None, None)
    except TypeError:
        return False
    except ValueError:
        return True  # no signature to inspect (some builtins): let the server try
    return True


def _flush_before_other_lines(sink: BufferedAccessLog) -> None:
    """Write buffered access lines before any record our handler writes (keeps the order)."""

    class _FlushFirst(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            sink.flush()
            return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(_FlushFirst())


_frozen = False


def freeze_startup_heap() -> None:
    """Collect once, then ``gc.freeze()`` what startup left (once per process).

    Why: every full collection walks every tracked object, and pauses the
    whole worker -- every open stream -- while it does. The modules, classes
    and resources made at startup live as long as the process, so rescanning
    them finds nothing; frozen, they are skipped. Measured with 2 000 open SSE
    streams on one worker (the server of benchmarks/realtime.py, about 52 000
    objects frozen, on a noisy machine): a full collection during a broadcast
    went from 157-180 ms to 74-90 ms. The GC thresholds are not changed. The
    collection first keeps startup's cyclic garbage from being frozen for good.
    """
    global _frozen
    if _frozen:
        return
    _frozen = True
    gc.collect()
    gc.freeze()


def create_app_for_server() -> ASGIApp:
    """The uvicorn factory of ``ghar-core serve``: load settings, configure logging, build.

    Each worker process calls it, so every worker owns its own resources;
    logging is configured from the served app's settings.
    With ``--app`` (passed as ``GHAR_SERVE_APP``) it serves the named app or
    factory instead of the bare core app; an :class:`~ghar_core.asgi.App`
    whose access log goes through the logging module is switched to the
    buffered writer (same fields, same stream, under 1 us a line), and
    :func:`freeze_startup_heap` runs when its lifespan has started.
    """
    from ghar_core.asgi.accesslog import BufferedAccessLog
    from ghar_core.asgi.app import App, create_app
    from ghar_core.config import get_settings
    from ghar_core.logging import configure_logging, uses_json_logs

    target = os.environ.get(SERVE_APP_ENV)
    app: ASGIApp
    if target:
        app = load_app_target(target, factory=os.environ.get(SERVE_FACTORY_ENV) == "1")
    else:
        app = create_app(get_settings())
    # The app's own settings (its schema, its LOG_FORMAT) when it is ours.
    settings = app.settings if isinstance(app, App) else get_settings()
    configure_logging(settings)
    if isinstance(app, App) and app.access_log_enabled and app.access_log_sink is None:
        sink = BufferedAccessLog(json=uses_json_logs(settings))
        app.use_access_sink(sink)
        _flush_before_other_lines(sink)
    if isinstance(app, App):
        app.lifespan_manager.after_startup = freeze_startup_heap
    return app
