"""The suite needs no running Postgres: with none in reach, the session starts its own.

A part of the suite (the users module, a PgBouncer test, the README's
database example) runs in a subprocess whose configured test address is a
closed port. As root with ``unshare`` it also runs in a network namespace of
its own, where the machine's Postgres on 127.0.0.1:5432 is out of reach too.
With ``CI=true`` nothing may skip, so it passes only on a cluster of its own,
which must be gone afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.pg import free_port

ROOT = Path(__file__).resolve().parent.parent
PART = [
    "tests/test_users.py",
    "tests/test_database.py::test_our_pools_work_through_pgbouncer",
    "tests/test_readme.py::test_real_token_example_with_the_plugins_fixtures",
]


def _isolated() -> list[str]:
    """A command prefix putting the run in its own network namespace, when we may."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if os.geteuid() != 0 or unshare is None or ip is None:
        return []
    probe = subprocess.run([unshare, "-n", ip, "link", "set", "lo", "up"], check=False)
    if probe.returncode != 0:
        return []
    return [unshare, "-n", "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh"]


def test_a_part_of_the_suite_passes_on_its_own_postgres() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GHAR_TEST_", "PYTEST_"))}
    env.update(
        APP_ENV="test",
        CI="true",
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
    )
    command = [
        *_isolated(),
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=-ra --strict-markers --strict-config",
        *PART,
    ]
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"\b\d+ passed\b", output), output
    assert "skipped" not in output, output
    found = re.search(r"the session ran its own PostgreSQL: (\S+) in (\S+)", output)
    assert found, output
    folder = Path(found.group(2))
    assert not folder.exists(), f"{folder} was left behind"
    running = [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit() and str(folder).encode() in _cmdline(pid)
    ]
    assert running == [], f"processes left on {folder}: {running}"


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
