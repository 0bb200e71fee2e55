"""The in-memory broker (``EVENT_BROKER=memory``, the default): one process, no storage."""

from __future__ import annotations

import itertools
import secrets
import time
from typing import Any

from ghar_core.broker.base import TOPICS, Record, Sink, check_event

__all__ = ["MemoryBroker"]


class MemoryBroker:
    """Publishing hands the record to this process's sinks at once, in the caller's task.

    Nothing crosses processes and nothing is stored: the SSE bus keeps its
    own in-process history (``MemoryEventLog``) and does not route its emits
    through here; the WebSocket manager does, so that switching to the
    Postgres broker changes no caller. Positions are one per-process counter
    under one per-process epoch, so they only grow.
    """

    name = "broker"
    remote = False

    def __init__(self, *, max_payload: int = 65_536) -> None:
        self.max_payload = max_payload
        self.epoch = secrets.token_hex(8)
        self._positions = itertools.count(1)
        self._position = 0
        self._sinks: dict[str, list[Sink]] = {topic: [] for topic in TOPICS}
        self.published = 0
        self.delivered = 0

    def attach(self, topic: str, sink: Sink) -> None:
        """Hand the records of ``topic`` to ``sink`` (idempotent)."""
        sinks = self._sinks[topic]
        if sink not in sinks:
            sinks.append(sink)

    def detach(self, topic: str, sink: Sink) -> None:
        if sink in self._sinks[topic]:
            self._sinks[topic].remove(sink)

    def publish_nowait(self, topic: str, key: str, type: str, payload: bytes) -> None:
        """Deliver to the local sinks that want ``key`` now."""
        self._publish(topic, key, type, payload)

    def _publish(self, topic: str, key: str, type: str, payload: bytes) -> Record:
        check_event(topic, key, type, payload, self.max_payload)
        self._position = position = next(self._positions)
        record = Record(topic, key, self.epoch, position, type, payload, time.time())
        self.published += 1
        for sink in self._sinks[topic]:
            if sink.wants(key):
                sink.receive(record)
                self.delivered += 1
        return record

    async def publish(self, topic: str, key: str, type: str, payload: bytes) -> Record:
        return self._publish(topic, key, type, payload)

    def known_head(self, topic: str, key: str) -> tuple[str, int] | None:
        return self.epoch, self._position

    async def head(self, topic: str, key: str) -> tuple[str, int]:
        return self.epoch, self._position

    async def read_since(
        self, topic: str, key: str, epoch: str, position: int
    ) -> list[Record] | str:
        # No history here: only "nothing missed" can be answered.
        if epoch != self.epoch:
            return "epoch_changed"
        return [] if position == self._position else "history_expired"

    async def register_job(self, job: str, owner: str, ttl: float) -> None:
        return None  # one process: the manager's registry is enough

    async def release_job(self, job: str) -> None:
        return None

    async def job_owner(self, job: str) -> tuple[str, float] | None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def check(self) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"kind": "memory", "published": self.published, "delivered": self.delivered}

    def __repr__(self) -> str:
        return f"<MemoryBroker {self.published} published>"
