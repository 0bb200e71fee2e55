"""ghar_core: the cross-cutting async core of the 360Ghar backend.

Import what you need from its modules (``ghar_core.config``,
``ghar_core.exceptions``, ...); this package root stays cheap to import.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
