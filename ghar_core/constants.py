"""Constants shared by the services: the vision providers the AI layer may use."""

from __future__ import annotations

__all__ = [
    "DEFAULT_VISION_MODELS",
    "DEFAULT_VISION_PROVIDER",
    "VALID_VISION_PROVIDERS",
]

#: Providers the image-understanding features can call; the config validates
#: ``DEFAULT_VISION_PROVIDER`` against this set.
VALID_VISION_PROVIDERS: frozenset[str] = frozenset({"openai", "gemini", "anthropic"})

DEFAULT_VISION_PROVIDER = "gemini"

#: The model each provider uses unless a caller asks for another.
DEFAULT_VISION_MODELS: dict[str, str] = {
    "openai": "gpt-4o-mini",
    "gemini": "gemini-2.0-flash",
    "anthropic": "claude-3-5-haiku-latest",
}
