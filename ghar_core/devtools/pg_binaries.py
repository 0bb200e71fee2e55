"""Where the machine's PostgreSQL server binaries are, and which to use.

Why its own module: finding ``initdb`` and ``postgres`` is policy (an
explicit folder, the version an existing cluster needs, ``PATH``, the
packages' usual folders) that :mod:`ghar_core.devtools.postgres` and
``ghar-core dev``'s error message share, and it runs nothing but
``postgres --version``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["PG_BIN_ENV", "SEARCH_GLOBS", "PostgresBinaries", "find_binaries", "not_found_message"]

PG_BIN_ENV: Final = "GHAR_PG_BIN"
SEARCH_GLOBS: Final = (
    "/usr/lib/postgresql/*/bin",  # Debian and Ubuntu
    "/usr/pgsql-*/bin",  # the PGDG RPMs
    "/opt/homebrew/opt/postgresql@*/bin",  # Homebrew
    "/usr/local/opt/postgresql@*/bin",
)
_VERSION_RE: Final = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


@dataclass(frozen=True, slots=True)
class PostgresBinaries:
    """One installation's ``bin`` folder and the version its ``postgres`` reports."""

    bin_dir: Path
    version: tuple[int, int]

    @property
    def major(self) -> int:
        return self.version[0]

    @property
    def initdb(self) -> Path:
        return self.bin_dir / "initdb"

    @property
    def postgres(self) -> Path:
        return self.bin_dir / "postgres"


def _probe(bin_dir: Path) -> PostgresBinaries | None:
    """The binaries in ``bin_dir`` when both are there and ``postgres --version`` answers."""
    if not all(os.access(bin_dir / name, os.X_OK) for name in ("initdb", "postgres")):
        return None
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION_RE.search(out)
    if match is None:
        return None
    return PostgresBinaries(bin_dir, (int(match.group(1)), int(match.group(2) or 0)))


def find_binaries(
    *,
    prefer_major: int | None = None,
    path: str | None = None,
    search_globs: Sequence[str] = SEARCH_GLOBS,
    environ: dict[str, str] | None = None,
) -> PostgresBinaries | None:
    """The PostgreSQL server binaries to use, or None when there are none.

    ``GHAR_PG_BIN`` (in ``environ``, default ``os.environ``) is the only
    candidate when set. Otherwise: the installation whose major version is
    ``prefer_major`` (an existing data folder's), else the one on ``path``
    (default ``PATH``), else the newest under ``search_globs``.
    """
    env = os.environ if environ is None else environ
    explicit = env.get(PG_BIN_ENV)
    if explicit:
        return _probe(Path(explicit))
    found: list[PostgresBinaries] = []
    seen: set[Path] = set()

    def consider(bin_dir: Path) -> None:
        resolved = bin_dir.resolve()
        if resolved not in seen:
            seen.add(resolved)
            binaries = _probe(resolved)
            if binaries is not None:
                found.append(binaries)

    on_path = shutil.which("postgres", path=path)
    if on_path:
        consider(Path(on_path).resolve().parent)  # /usr/local/bin/postgres -> the real bin/
    for pattern in search_globs:
        for bin_dir in glob.glob(pattern):
            consider(Path(bin_dir))
    if not found:
        return None
    if prefer_major is not None:
        for binaries in found:
            if binaries.major == prefer_major:
                return binaries
    if on_path and found[0].bin_dir == Path(on_path).resolve().parent:
        return found[0]
    return max(found, key=lambda b: b.version)


def not_found_message(environ: dict[str, str] | None = None) -> str:
    """Where we looked for the binaries and how to get them (one sentence group)."""
    env = os.environ if environ is None else environ
    explicit = env.get(PG_BIN_ENV)
    if explicit:
        where = f"{PG_BIN_ENV}={explicit} has no working initdb and postgres"
    else:
        where = (
            "no PostgreSQL server binaries (initdb and postgres) were found on PATH or under "
            + ", ".join(SEARCH_GLOBS)
        )
    return (
        f"{where}. Install PostgreSQL's server package (Debian/Ubuntu: `apt-get install "
        "postgresql`; only its binaries are used, its own service may stay stopped), or set "
        f"{PG_BIN_ENV} to the bin folder of an installation"
    )
