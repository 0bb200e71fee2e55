"""The ``ghar-core`` command line (also ``python -m ghar_core``).

Each subcommand is one ``_cmd_<name>(args) -> int`` function plus one
``_add_<name>(subparsers)`` registration in :func:`build_parser`. The CLI sits
on top of every layer and may import any of them, lazily, so ``--help``
stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ghar_core import __version__

__all__ = ["build_parser", "main"]


def _cmd_config(args: argparse.Namespace) -> int:
    from ghar_core.config import ConfigError, config_table_markdown, load_settings

    if args.table:
        sys.stdout.write(config_table_markdown())
        return 0
    try:
        loaded = load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    for name, value in loaded.masked_items():
        print(f"{name}={value!r}")
    return 0


def _add_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="print the effective settings (secrets masked)")
    p.add_argument("--table", action="store_true", help="print the README configuration table")
    p.set_defaults(func=_cmd_config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ghar-core",
        description="The 360Ghar core: serve the app, migrate, inspect settings, dev tools.",
    )
    parser.add_argument("--version", action="version", version=f"ghar-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_config(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    result: int = func(args)
    return result
