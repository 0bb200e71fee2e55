"""A TCP relay between the app and PgBouncer that loses COMMIT answers on demand.

Case 1 serves its load through it. Transparent by default (bytes are copied
both ways, a PgBouncer that is gone is a connection the relay closes too);
two faults, switched on for a window of the load:

- :meth:`CommitRelay.lose_commits`: of the transactions that claim an
  idempotency key (the write route's ``INSERT INTO reliability_keys``),
  every ``every``-th COMMIT is forwarded and its answer swallowed; 0.2 s
  later (the COMMIT has reached Postgres) the connection is cut both ways.
  The app sees its connection drop while COMMIT is in flight: the one case
  where the outcome is unknown until it asks Postgres again.
- :meth:`CommitRelay.partition_after_next_commit`: the next such COMMIT is
  forwarded and its answer swallowed, then every connection is cut and new
  ones are closed as soon as accepted for ``seconds``: asking Postgres about
  the COMMIT fails too, so the app can only answer
  ``DB_COMMIT_OUTCOME_UNKNOWN``.

The write id of each swallowed COMMIT is read from the write's payload
(``payload-<id>``, a text parameter), so the case can check each against the
table. The relay is a process of its own (``python -m
tests.reliability.relay TARGET_PORT``, driven by :class:`CommitRelay` over
its stdin and stdout), as a network hop would be: it shares no interpreter
lock with the test's load clients.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")

_WRITE_ID = re.compile(rb"payload-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
_LET_COMMIT_LAND = 0.2


class _Link:
    """One app connection and its PgBouncer connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.claimed = False  # the open transaction claimed an idempotency key
        self.write_id: str | None = None
        self.swallowing = False

    def cut(self) -> None:
        for writer in (self.client, self.upstream):
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()


class _Relay:
    """The relay itself (in the child process): loopback to ``target_port`` from ``port``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        #: Write ids whose COMMIT answer was swallowed (in the lost-COMMIT window).
        self.lost: list[str] = []
        #: Write ids whose COMMIT answer was swallowed just before a partition.
        self.partitioned: list[str] = []
        #: Connections cut by the partition (besides the swallowed one).
        self.cut_by_partition = 0
        #: Connections closed as soon as accepted while partitioned.
        self.refused = 0
        #: Set when the partition begins (a thread-safe event: wait on it from any thread).
        self.partition_began = threading.Event()
        self._every = 0
        self._limit = 0
        self._claimed_commits = 0
        self._partition_for = 0.0
        self._partitioned_until = 0.0
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(15)

    def start(self) -> None:
        self._thread.start()
        self._call(self._start())

    def close(self) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def lose_commits(self, every: int, limit: int) -> None:
        """Swallow the answer of every ``every``-th claimed COMMIT, ``limit`` at most (0: off)."""
        self._loop.call_soon_threadsafe(self._set_losing, every, limit)

    def partition_after_next_commit(self, seconds: float) -> None:
        """Swallow the next claimed COMMIT's answer, then cut everything for ``seconds``."""
        self._loop.call_soon_threadsafe(setattr, self, "_partition_for", seconds)

    def _set_losing(self, every: int, limit: int) -> None:
        self._every, self._limit, self._claimed_commits = every, limit, 0

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._loop.time() < self._partitioned_until:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:  # PgBouncer is down: so is the relay, for this connection
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        pumps = [
            asyncio.ensure_future(self._upstream(link, reader)),
            asyncio.ensure_future(self._downstream(link, up_reader)),
        ]
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if link.swallowing:
                await asyncio.sleep(_LET_COMMIT_LAND)
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            self._links.discard(link)
            link.cut()
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _upstream(self, link: _Link, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(65536):
            if b"reliability_keys" in data:
                link.claimed = True
            if link.claimed and link.write_id is None and (found := _WRITE_ID.search(data)):
                link.write_id = found.group(1).decode()
            ends = b"COMMIT" in data or b"ROLLBACK" in data
            if ends and link.claimed and b"COMMIT" in data and self._swallow():
                link.swallowing = True  # before forwarding: its answer must never pass
                link.upstream.write(data)
                self._swallowed(link)
                return  # the handler lets the COMMIT land, then cuts the link
            link.upstream.write(data)
            await link.upstream.drain()
            if ends:
                link.claimed, link.write_id = False, None

    async def _downstream(self, link: _Link, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(65536):
            if link.swallowing:
                return
            link.client.write(data)
            await link.client.drain()

    def _swallow(self) -> bool:
        if self._partition_for:
            return True
        if self._every <= 0 or len(self.lost) >= self._limit:
            return False
        self._claimed_commits += 1
        return self._claimed_commits % self._every == 0

    def _swallowed(self, link: _Link) -> None:
        write_id = link.write_id or "?"
        if not self._partition_for:
            self.lost.append(write_id)
            return
        # A partition: the COMMIT is on its way, then nothing gets through.
        self.partitioned.append(write_id)
        self._partitioned_until = self._loop.time() + self._partition_for
        self._partition_for = 0.0
        self.partition_began.set()
        for other in list(self._links):
            if other is not link:
                self.cut_by_partition += 1
                other.cut()


class CommitRelay:
    """The relay process, seen from the test: start, switch its faults, read its counts."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.lost: list[str] = []
        self.partitioned: list[str] = []
        self.cut_by_partition = 0
        self.refused = 0
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        root = Path(__file__).resolve().parents[2]
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.relay", str(self.target_port)],
            cwd=root,
            env=os.environ | {"PYTHONPATH": str(root)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(self._ask("port"))

    def _ask(self, command: str) -> str:
        process = self._process
        assert process is not None
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(command + "\n")
        process.stdin.flush()
        answer = process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the relay process exited (code {process.poll()})")
        return answer.strip()

    def lose_commits(self, every: int, limit: int) -> None:
        """Swallow the answer of every ``every``-th claimed COMMIT, ``limit`` at most (0: off)."""
        self._ask(f"lose {every} {limit}")

    def partition_after_next_commit(self, seconds: float) -> None:
        """Swallow the next claimed COMMIT's answer, then cut everything for ``seconds``."""
        self._ask(f"partition {seconds}")

    def wait_partition(self, timeout: float) -> bool:
        """Block until the partition began (True) or ``timeout`` passed (False)."""
        return self._ask(f"wait {timeout}") == "began"

    def refresh(self) -> None:
        """Read the relay's counts into this object's attributes."""
        counts = json.loads(self._ask("counts"))
        self.lost = counts["lost"]
        self.partitioned = counts["partitioned"]
        self.cut_by_partition = counts["cut_by_partition"]
        self.refused = counts["refused"]

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        process.stdin.close()  # end of commands: the relay closes and exits
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if process.stdout is not None:
            process.stdout.close()


def _serve(target_port: int, commands: IO[str], out: IO[str]) -> None:
    """The child process: one command a line on ``commands``, one answer a line on ``out``."""
    relay = _Relay(target_port)
    relay.start()
    try:
        for line in commands:
            name, *args = line.split()
            if name == "port":
                answer = str(relay.port)
            elif name == "lose":
                relay.lose_commits(int(args[0]), int(args[1]))
                answer = "ok"
            elif name == "partition":
                relay.partition_after_next_commit(float(args[0]))
                answer = "ok"
            elif name == "wait":
                answer = "began" if relay.partition_began.wait(float(args[0])) else "not yet"
            elif name == "counts":
                answer = json.dumps(
                    {
                        "lost": list(relay.lost),
                        "partitioned": list(relay.partitioned),
                        "cut_by_partition": relay.cut_by_partition,
                        "refused": relay.refused,
                    }
                )
            else:
                answer = f"unknown command {name!r}"
            out.write(answer + "\n")
            out.flush()
    finally:
        relay.close()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.stdin, sys.stdout)
