"""An embedded PostgreSQL: the machine's own binaries serving a data folder of ours.

Why: ``ghar-core dev`` and the test suite need a real Postgres without anyone
installing a service, creating a role or editing ``pg_hba.conf``. Every
Postgres package ships ``initdb`` and ``postgres``; with them we make a
cluster in a folder we own, run it on a free loopback port (TCP only, no
Unix socket, trust auth for the ``postgres`` role) and stop it when done.

- **Binaries** (:mod:`ghar_core.devtools.pg_binaries`): ``GHAR_PG_BIN`` (a
  ``bin`` folder) when set; else the version that made an existing data
  folder; else the one on ``PATH``; else the newest under the usual package
  locations (Debian's ``/usr/lib/postgresql/*/bin``, the PGDG RPMs'
  ``/usr/pgsql-*/bin``, Homebrew's ``postgresql@*``).
- **Root**: PostgreSQL refuses to run as root, so as root the server (and
  ``initdb``) run as an unprivileged user, ``postgres`` by default, who owns
  the data folder. Every folder above it must be searchable by that user.
- **Reuse**: a folder that already holds a cluster is started as it is;
  only an empty or missing one is initialised.
- **Ownership**: :class:`EmbeddedPostgres` owns the server process; ``stop()``
  (or leaving ``with``) shuts it down fast and waits, so no process and no
  ``postmaster.pid`` is left behind. The server also gets SIGINT (a fast
  shutdown) if the process that started it dies without stopping it, from
  whichever thread ``start()`` was called, and a server orphaned that way
  anyway is stopped by the next ``start()``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import pwd
import queue
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Final

import asyncpg

from ghar_core.devtools.pg_binaries import (
    PG_BIN_ENV,
    PostgresBinaries,
    find_binaries,
    not_found_message,
)
from ghar_core.migrate import MigrationSet, migrate_dsn
from ghar_core.utils import run_on_private_loop

__all__ = [
    "PG_BIN_ENV",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "PostgresBinaries",
    "find_binaries",
    "free_port",
    "not_found_message",
]

SUPERUSER: Final = "postgres"
_PR_SET_PDEATHSIG: Final = 1


class EmbeddedPostgresError(RuntimeError):
    """The server could not be found, set up, started or stopped; the message says the fix."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """preexec_fn: a fast shutdown (SIGINT) when the forking thread dies (see :func:`_spawn`)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGINT)


_spawn_requests: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
    queue.SimpleQueue()
)
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()


def _serve_spawns() -> None:
    while True:
        call, result = _spawn_requests.get()
        try:
            result.set_result(call())
        except BaseException as exc:  # handed to the caller, which re-raises it
            result.set_exception(exc)


def _spawn(command: list[str], **options: Any) -> subprocess.Popen[bytes]:
    """``Popen`` from one daemon thread that lives as long as the process.

    Why: the kernel sends ``PR_SET_PDEATHSIG`` when the *thread* that forked
    exits, not the process. A start from ``asyncio.to_thread`` or any worker
    that later ends would shut the server down behind its owner's back; forking
    from a daemon thread, which only ends with the process, makes the signal
    mean "our process died", as intended.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = threading.Thread(target=_serve_spawns, name="pg-spawner", daemon=True)
            _spawner.start()
    result: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
    _spawn_requests.put((lambda: subprocess.Popen(command, **options), result))
    return result.result()


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _cmdline(pid: int) -> list[str] | None:
    """The arguments of ``pid`` (Linux /proc), None when unknown."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")


def _blocked_parent(folder: Path, user: pwd.struct_passwd) -> Path | None:
    """The first existing folder above ``folder`` that ``user`` may not enter."""
    for parent in reversed(folder.parents):
        try:
            mode = parent.stat()
        except FileNotFoundError:
            return None  # made by us from here on, with search rights for all
        if mode.st_uid == user.pw_uid:
            ok = bool(mode.st_mode & stat.S_IXUSR)
        elif mode.st_gid == user.pw_gid:
            ok = bool(mode.st_mode & stat.S_IXGRP)
        else:
            ok = bool(mode.st_mode & stat.S_IXOTH)
        if not ok:
            return parent
    return None


def _log_tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"


class EmbeddedPostgres:
    """A PostgreSQL server on ``data_dir``, started by :meth:`start`, stopped by :meth:`stop`.

    ``data_dir`` is initialised on first use (``initdb``: UTF-8, C locale,
    superuser ``postgres``, trust auth) and reused afterwards. The server
    listens on ``127.0.0.1:port`` (a free port when 0; a new one each start)
    and on no Unix socket. ``start()`` waits until it accepts connections,
    creates ``database`` when missing and, with ``migrate``, applies the core
    migrations and ``migration_sets``; it returns :attr:`dsn`.

    ``durable=False`` turns off fsync, synchronous commit and full page
    writes: right for a throwaway test cluster, wrong for data you keep.
    ``run_as`` names the OS user of the server; as root it defaults to
    ``postgres`` (PostgreSQL refuses root), otherwise the current user.
    The server's output goes to ``log_path`` (default: ``<data_dir>.log``).

    Use ``with EmbeddedPostgres(path) as pg: ...`` or pair ``start()`` with
    ``stop()``; both are idempotent, and ``stop()`` is bounded in time.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        database: str = "postgres",
        port: int = 0,
        binaries: PostgresBinaries | None = None,
        run_as: str | None = None,
        durable: bool = True,
        migrate: bool = False,
        migration_sets: Sequence[MigrationSet] = (),
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 60.0,
        port_fallback: bool = False,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", database):
            raise ValueError(f"database must be a plain identifier, got {database!r}")
        self.data_dir = Path(data_dir).absolute()
        self.database = database
        self.port = port
        self.binaries = binaries
        self.durable = durable
        self.migrate = migrate
        self.migration_sets = tuple(migration_sets)
        self.log_path = (
            Path(log_path) if log_path else self.data_dir.with_name(self.data_dir.name + ".log")
        )
        self.startup_timeout = startup_timeout
        self.initialised = False  # True when the last start() ran initdb
        self._requested_port = port
        # ``port`` is a preference: when another process takes it first, a free one.
        self._port_fallback = port_fallback
        self._run_as = run_as
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # --- public --------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """DSN of :attr:`database` on this server (valid once started)."""
        return self.dsn_for(self.database)

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> str:
        """Initialise when needed, run the server, wait for it, prepare the database; the DSN."""
        if self.running:
            return self.dsn
        existing = self._existing_major()
        binaries = self.binaries or find_binaries(prefer_major=existing)
        if binaries is None:
            raise EmbeddedPostgresError(not_found_message() + ".")
        self.binaries = binaries
        user = self._user()
        self._prepare_folder(user)
        if existing is None:
            self._initdb(binaries, user)
        elif existing != binaries.major:
            raise EmbeddedPostgresError(
                f"{self.data_dir} holds a PostgreSQL {existing} cluster but the binaries in "
                f"{binaries.bin_dir} are PostgreSQL {binaries.major}: point {PG_BIN_ENV} at a "
                f"PostgreSQL {existing} bin folder, or delete the folder (its data is lost) "
                "to start afresh"
            )
        self._clear_orphan()
        try:
            for attempt in range(3):
                fixed = self._requested_port and (attempt == 0 or not self._port_fallback)
                self.port = self._requested_port if fixed else free_port()
                self._spawn(binaries, user)
                if self._wait_ready():
                    break
                if (self._requested_port and not self._port_fallback) or attempt == 2:
                    raise EmbeddedPostgresError(
                        f"port {self.port} on 127.0.0.1 is taken; choose another (0: any free one)"
                    )
            self._owner_path.write_text(f"{os.getpid()}\n")
            run_on_private_loop(self._prepare_database())
        except BaseException:
            self.stop()
            raise
        return self.dsn

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown (SIGINT) and wait; escalate to SIGQUIT, then SIGKILL, past ``timeout``."""
        process, self._process = self._process, None
        try:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.send_signal(signal.SIGQUIT)
                    try:
                        process.wait(5)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait(5)
            lock = self.data_dir / "postmaster.pid"
            if process is not None and lock.exists() and not self._lock_holder_alive():
                lock.unlink(missing_ok=True)  # only left after SIGKILL
            if process is not None:
                self._owner_path.unlink(missing_ok=True)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __del__(self) -> None:
        process = getattr(self, "_process", None)  # absent when __init__ raised
        if process is not None and process.poll() is None:
            warnings.warn(
                f"EmbeddedPostgres({str(self.data_dir)!r}) was garbage-collected while running; "
                "call stop()",
                ResourceWarning,
                stacklevel=1,
            )

    # --- steps ---------------------------------------------------------------------------

    @property
    def _owner_path(self) -> Path:
        """Holds the pid of the process that started the server (removed by stop())."""
        return self.data_dir.with_name(self.data_dir.name + ".owner")

    def _existing_major(self) -> int | None:
        try:
            return int((self.data_dir / "PG_VERSION").read_text().strip().split(".")[0])
        except (OSError, ValueError):
            return None

    def _user(self) -> pwd.struct_passwd | None:
        """The OS user to switch to, or None to run as ourselves."""
        name = self._run_as or (SUPERUSER if os.geteuid() == 0 else None)
        if name is None:
            return None
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            raise EmbeddedPostgresError(
                f"PostgreSQL refuses to run as root and there is no {name!r} user to run it as: "
                f"create one (`useradd --system --no-create-home {name}`; Debian's postgresql "
                "package does) or run this as a normal user"
            ) from None
        if user.pw_uid == os.geteuid():
            return None
        if os.geteuid() != 0:
            raise EmbeddedPostgresError(
                f"cannot run PostgreSQL as {name!r} without being root; leave run_as unset"
            )
        return user

    def _prepare_folder(self, user: pwd.struct_passwd | None) -> None:
        folder = self.data_dir
        blocked = None if user is None else _blocked_parent(folder, user)
        if user is not None and blocked is not None:
            raise EmbeddedPostgresError(
                f"the server runs as {user.pw_name}, who cannot enter {blocked} (mode "
                f"{stat.filemode(blocked.stat().st_mode)}) on the way to {folder}: choose a "
                "data folder it can reach (e.g. under /var/tmp) or `chmod o+x` that folder"
            )
        if not folder.exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir(mode=0o700)
        if user is None:
            return
        info = folder.stat()
        if info.st_uid != user.pw_uid:
            if any(folder.iterdir()):
                raise EmbeddedPostgresError(
                    f"{folder} belongs to uid {info.st_uid}, but the server runs as "
                    f"{user.pw_name} (uid {user.pw_uid}): `chown -R {user.pw_name} {folder}`, "
                    "or delete the folder to start afresh"
                )
            os.chown(folder, user.pw_uid, user.pw_gid)
            folder.chmod(0o700)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    def unreachable_parent(self) -> Path | None:
        """The folder above :attr:`data_dir` the server's user cannot enter (None: all fine).

        Only as root, where the server runs as another user: a project under
        ``/root`` (mode 0700) is out of its reach.
        """
        user = self._user()
        return None if user is None else _blocked_parent(self.data_dir, user)

    def _popen_user(self, user: pwd.struct_passwd | None) -> dict[str, Any]:
        if user is None:
            return {}
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def _open_log(self) -> IO[bytes]:
        if self._log is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 -- closed by stop()
        return self._log

    def _initdb(self, binaries: PostgresBinaries, user: pwd.struct_passwd | None) -> None:
        command = [
            str(binaries.initdb),
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
        ]
        if not self.durable:
            command.append("--no-sync")
        was_empty = not any(self.data_dir.iterdir())
        log = self._open_log()
        log.write(f"--- initdb {self.data_dir} ({time.strftime('%F %T')})\n".encode())
        log.flush()
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=self._server_env(),
            cwd="/",
            timeout=max(self.startup_timeout, 60.0),
            check=False,
            **self._popen_user(user),
        )
        if result.returncode != 0:
            if was_empty:  # leave no half-made cluster: the next start initialises afresh
                for child in self.data_dir.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            raise EmbeddedPostgresError(
                f"initdb failed for {self.data_dir} (exit {result.returncode}); the end of "
                f"{self.log_path}:\n{_log_tail(self.log_path)}"
            )
        self.initialised = True

    def _server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _spawn(self, binaries: PostgresBinaries, user: pwd.struct_passwd | None) -> None:
        command = [
            str(binaries.postgres),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
        ]
        if not self.durable:
            for option in ("fsync=off", "synchronous_commit=off", "full_page_writes=off"):
                command += ["-c", option]
        log = self._open_log()
        log.write(f"--- postgres on 127.0.0.1:{self.port} ({time.strftime('%F %T')})\n".encode())
        log.flush()
        # Its own session: a Ctrl-C in the terminal reaches us, and we stop the
        # server after the app that uses it, not at the same moment.
        self._process = _spawn(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=self._server_env(),
            cwd="/",
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            **self._popen_user(user),
        )

    def _wait_ready(self) -> bool:
        """True once the server accepts connections; False when the port was taken."""
        process = self._process
        assert process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                tail = _log_tail(self.log_path)
                if "could not bind" in tail or "Address already in use" in tail:
                    return False
                raise EmbeddedPostgresError(
                    f"PostgreSQL exited with status {process.returncode} while starting on "
                    f"{self.data_dir}; the end of {self.log_path}:\n{tail}"
                )
            if run_on_private_loop(self._accepts()):
                return True
            time.sleep(0.05)
        raise EmbeddedPostgresError(
            f"PostgreSQL did not accept connections on 127.0.0.1:{self.port} within "
            f"{self.startup_timeout:g} s; the end of {self.log_path}:\n{_log_tail(self.log_path)}"
        )

    async def _accepts(self) -> bool:
        try:
            conn = await asyncpg.connect(self.dsn_for("postgres"), timeout=2)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        await conn.close()
        return True

    async def _prepare_database(self) -> None:
        if self.database != "postgres":
            conn = await asyncpg.connect(self.dsn_for("postgres"), timeout=10)
            try:
                exists = await conn.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", self.database
                )
                if not exists:
                    await conn.execute(f'CREATE DATABASE "{self.database}"')
            finally:
                await conn.close()
        if self.migrate:
            await migrate_dsn(self.dsn, self.migration_sets)

    def _lock_holder_alive(self) -> bool:
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return False
        return _pid_alive(pid)

    def _clear_orphan(self) -> None:
        """Stop a server left running on our folder by a dead owner; refuse one in use."""
        lock = self.data_dir / "postmaster.pid"
        try:
            pid = int(lock.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        if not _pid_alive(pid):
            return  # a stale lock file: PostgreSQL itself replaces it
        command = _cmdline(pid)
        if command is not None and str(self.data_dir) not in command:
            lock.unlink(missing_ok=True)  # stale, its pid reused by another program
            return
        try:
            owner: int | None = int(self._owner_path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            owner = None  # not started by us: never ours to stop
        if owner is None or _pid_alive(owner):
            by = f"started by pid {owner}: another `ghar-core dev`?" if owner else "not ours"
            raise EmbeddedPostgresError(
                f"{self.data_dir} is in use by PostgreSQL (pid {pid}, {by}). Stop that server "
                "first, or use another data folder"
            )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(pid):
            raise EmbeddedPostgresError(
                f"an orphaned PostgreSQL (pid {pid}) still runs on {self.data_dir}; stop it "
                f"(`kill {pid}`) and try again"
            )
