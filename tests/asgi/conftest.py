"""Fixtures for the ASGI tests: test settings and a small app with typical routes."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ghar_core.config import Settings, load_settings


@pytest.fixture
def settings() -> Settings:
    return dataclasses.replace(load_settings(app_env="test", environ={}), ACCESS_LOG=True)


def make_settings(**changes: Any) -> Settings:
    return dataclasses.replace(load_settings(app_env="test", environ={}), **changes)
