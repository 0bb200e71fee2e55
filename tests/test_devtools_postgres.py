"""The embedded PostgreSQL: real initdb and postgres from the machine's binaries.

Each test makes its own data folder in a temporary folder the ``postgres``
user can enter (as root the server runs as that user) and checks, besides
what it is about, that nothing is left running and no lock file stays behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from ghar_core.devtools.postgres import (
    PG_BIN_ENV,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    find_binaries,
    not_found_message,
)
from tests.conftest import require
from tests.pg import run_sync

BINARIES = find_binaries()


@pytest.fixture
def folder() -> Iterator[Path]:
    require(BINARIES is not None, "PostgreSQL server binaries")
    parent = Path(tempfile.mkdtemp(prefix="ghar-test-embedded-"))
    parent.chmod(0o755)
    try:
        yield parent / "pg"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _server_processes(folder: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(folder).encode() in command and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


async def _fetch(dsn: str, query: str) -> object:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


def _assert_nothing_left(folder: Path) -> None:
    assert not (folder / "postmaster.pid").exists()
    assert not folder.with_name(folder.name + ".owner").exists()
    assert _server_processes(folder) == []


def test_a_folder_is_initialised_once_and_reused_with_its_data(folder: Path) -> None:
    first = EmbeddedPostgres(folder, database="ghar_try", migrate=True)
    with first:
        assert first.initialised
        assert first.dsn.startswith("postgresql://postgres@127.0.0.1:")
        run_sync(_fetch(first.dsn, "CREATE TABLE kept AS SELECT 41 + 1 AS answer"))
        # The core migrations ran on the database it created.
        assert run_sync(_fetch(first.dsn, "SELECT count(*) FROM schema_migrations")) >= 1
        assert run_sync(_fetch(first.dsn, "SHOW listen_addresses")) == "127.0.0.1"
        if os.geteuid() == 0:
            assert folder.stat().st_uid != 0  # PostgreSQL refuses root: it runs as postgres
    _assert_nothing_left(folder)
    second = EmbeddedPostgres(folder, database="ghar_try")
    with second:
        assert not second.initialised
        assert run_sync(_fetch(second.dsn, "SELECT answer FROM kept")) == 42
    _assert_nothing_left(folder)
    second.stop()  # idempotent


def test_a_folder_in_use_is_refused_and_an_orphan_is_stopped(folder: Path) -> None:
    owner = EmbeddedPostgres(folder, durable=False)
    owner.start()
    try:
        with pytest.raises(EmbeddedPostgresError, match="in use by PostgreSQL"):
            EmbeddedPostgres(folder, durable=False).start()
        # Its owner dies without stopping it (the file names a pid that is gone).
        dead = subprocess.Popen(["true"])
        dead.wait()
        folder.with_name("pg.owner").write_text(f"{dead.pid}\n")
        orphan, owner._process = owner._process, None  # forgotten, as by a dead owner
        assert orphan is not None
        successor = EmbeddedPostgres(folder, durable=False)
        with successor:
            assert not _alive(orphan.pid)
            assert run_sync(_fetch(successor.dsn, "SELECT 1")) == 1
        assert orphan.wait(10) == 0  # it was shut down cleanly, not killed
    finally:
        owner.stop()
    _assert_nothing_left(folder)


def test_the_server_stops_when_its_owner_is_killed(folder: Path) -> None:
    script = textwrap.dedent(
        f"""
        import time
        from ghar_core.devtools.postgres import EmbeddedPostgres
        pg = EmbeddedPostgres({str(folder)!r}, durable=False)
        pg.start()
        print(pg.pid, flush=True)
        time.sleep(120)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        server = int(owner.stdout.readline())
        assert _alive(server)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        if owner.stdout is not None:
            owner.stdout.close()
    deadline = time.monotonic() + 30
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server)
    assert not (folder / "postmaster.pid").exists()


def test_a_server_started_from_a_short_lived_thread_outlives_that_thread(folder: Path) -> None:
    # The kernel's parent-death signal follows the thread that forked, not the
    # process: a start from asyncio.to_thread or a worker that then exits must
    # not take the server down with it.
    pg = EmbeddedPostgres(folder, durable=False)
    worker = threading.Thread(target=pg.start)
    worker.start()
    worker.join(60)
    try:
        assert pg.pid is not None
        time.sleep(1.0)  # a SIGINT from the exited thread would have stopped it by now
        assert _alive(pg.pid)
        assert run_sync(_fetch(pg.dsn, "SELECT 1")) == 1
    finally:
        pg.stop()
    _assert_nothing_left(folder)


def test_a_cluster_of_another_major_version_is_refused_with_the_fix(folder: Path) -> None:
    with EmbeddedPostgres(folder, durable=False):
        pass
    major = (folder / "PG_VERSION").read_text().strip()
    (folder / "PG_VERSION").write_text("9\n")
    try:
        with pytest.raises(EmbeddedPostgresError, match=r"PostgreSQL 9 cluster.*GHAR_PG_BIN"):
            EmbeddedPostgres(folder, binaries=BINARIES).start()
    finally:
        (folder / "PG_VERSION").write_text(major + "\n")
    _assert_nothing_left(folder)


def test_binaries_are_found_where_packages_put_them() -> None:
    require(BINARIES is not None, "PostgreSQL server binaries")
    assert BINARIES is not None
    assert BINARIES.initdb.is_file()
    assert BINARIES.postgres.is_file()
    explicit = find_binaries(environ={PG_BIN_ENV: str(BINARIES.bin_dir)})
    assert explicit == BINARIES
    # Not on PATH: the package location still finds it (Debian's layout here).
    assert find_binaries(path="", environ={}) is not None or not BINARIES.bin_dir.match(
        "/usr/lib/postgresql/*/bin"
    )


def test_no_binaries_anywhere_is_none_and_the_message_says_how_to_fix_it() -> None:
    assert find_binaries(path="", search_globs=(), environ={}) is None
    assert find_binaries(environ={PG_BIN_ENV: "/nonexistent/bin"}) is None
    message = not_found_message(environ={})
    assert "initdb and postgres" in message
    assert "apt-get install postgresql" in message
    assert PG_BIN_ENV in message
    assert "/nonexistent/bin" in not_found_message(environ={PG_BIN_ENV: "/nonexistent/bin"})


def test_a_database_name_must_be_an_identifier(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plain identifier"):
        EmbeddedPostgres(tmp_path, database='x"; DROP')


def test_a_preferred_port_taken_meanwhile_falls_back_to_a_free_one(folder: Path) -> None:
    """``ghar-core dev`` asks for 54322 when it looked free; a race must not fail the run."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        strict = EmbeddedPostgres(folder, port=taken)
        with pytest.raises(EmbeddedPostgresError, match=f"port {taken} on 127.0.0.1 is taken"):
            strict.start()
        _assert_nothing_left(folder)
        relaxed = EmbeddedPostgres(folder, port=taken, port_fallback=True)
        with relaxed:
            assert relaxed.port != taken
            assert run_sync(_fetch(relaxed.dsn, "SELECT 1")) == 1
        _assert_nothing_left(folder)
    finally:
        holder.close()
