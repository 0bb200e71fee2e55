"""Shared by the event-stream tests: settings, real tokens, an SSE parser, the served app.

Tokens are HS256, signed with the test's ``SUPABASE_JWT_SECRET``, so auth
verifies them locally (the real verification path, no provider round trip).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from ghar_core.config import Secret, Settings, load_settings
from tests.idp import hs256

JWT_SECRET = "sse-tests-shared-secret"
PROVIDER_URL = "http://127.0.0.1:9"  # never called: HS256 with a secret is decided locally

#: The environment of a served test app (subprocess tests).
SERVED_ENV = {
    "APP_ENV": "test",
    "SUPABASE_URL": PROVIDER_URL,
    "SUPABASE_JWT_SECRET": JWT_SECRET,
}


ROOT = Path(__file__).resolve().parents[2]


async def start_served(
    args: list[str], port: int, env: dict[str, str]
) -> tuple[asyncio.subprocess.Process, asyncio.Future[bytes]]:
    """A server process (``python <args> --port <port>``) and the future of its whole log.

    Waits until ``/health`` answers, up to 20 s.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        "--port",
        str(port),
        cwd=ROOT,
        env={**os.environ, **SERVED_ENV, "PYTHONPATH": str(ROOT), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    log = asyncio.ensure_future(proc.stdout.read())  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(20):
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/health") as r:
                        if r.status == 200:
                            return proc, log
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise


def sse_settings(**changes: Any) -> Settings:
    base = load_settings(app_env="test", environ={})
    return dataclasses.replace(
        base,
        SUPABASE_URL=PROVIDER_URL,
        SUPABASE_JWT_SECRET=Secret(JWT_SECRET),
        **changes,
    )


def token_for(user_id: str | None = None, *, ttl: int = 600) -> tuple[str, str]:
    """``(user_id, token)`` for a provider user (a new one when omitted)."""
    user = user_id or str(uuid.uuid4())
    now = int(time.time())
    claims = {
        "sub": user,
        "aud": "authenticated",
        "role": "authenticated",
        "iss": f"{PROVIDER_URL}/auth/v1",
        "iat": now,
        "exp": now + ttl,
    }
    return user, hs256({"alg": "HS256", "typ": "JWT"}, claims, JWT_SECRET.encode())


def parse_blocks(text: str) -> list[dict[str, str]]:
    """SSE blocks as dicts of their fields (``":"`` holds a comment); the last may be partial."""
    blocks: list[dict[str, str]] = []
    for raw in text.split("\n\n"):
        if not raw:
            continue
        block: dict[str, str] = {}
        for line in raw.split("\n"):
            name, _, value = line.partition(":")
            block[name or ":"] = value.removeprefix(" ")
        blocks.append(block)
    return blocks
