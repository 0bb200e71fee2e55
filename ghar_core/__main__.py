"""``python -m ghar_core`` is the same CLI as ``ghar-core``."""

from __future__ import annotations

from ghar_core.cli import main

raise SystemExit(main())
