"""Development tools that sit on top of every layer: the local identity provider.

Nothing in the request path imports this package; ``ghar-core
identity-provider``, ``ghar-core token`` and the tests do.
"""

from __future__ import annotations

from ghar_core.devtools.identity_provider import (
    DEV_ANON_KEY,
    DEV_PROVIDER_URL,
    DEV_SERVICE_ROLE_KEY,
    IdentityProviderServer,
    LocalIdentityProvider,
    build_app,
)

__all__ = [
    "DEV_ANON_KEY",
    "DEV_PROVIDER_URL",
    "DEV_SERVICE_ROLE_KEY",
    "IdentityProviderServer",
    "LocalIdentityProvider",
    "build_app",
]
