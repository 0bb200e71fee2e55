"""Instructions per operation, counted by callgrind: the measure a shared machine cannot skew.

Wall clock and CPU time on a busy 2-core machine swing by more than the few
percent some targets are about; the number of instructions a piece of code
runs does not. A suite runs a driver script under callgrind that calls
:func:`mark` (``os.getppid()``, whose C function ``os_getppid`` callgrind is
told to dump before) around each measured segment; each dump is one part of
the run, counted on its own. Two segments of the same work at two sizes give
a slope, the cost of one more operation, which cancels what a segment costs
whatever its length (the marks, a loop's first turn).

Counts are repeatable when the interpreter's hashes are (``PYTHONHASHSEED=0``)
and addresses are (``setarch -R``, where the kernel lets us turn address
randomisation off).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MARK_FUNCTION", "Unavailable", "mark", "parse_part", "read_parts", "run", "slope"]

#: The C function behind :func:`mark`: callgrind dumps its counts before each call.
MARK_FUNCTION = "os_getppid"


class Unavailable(RuntimeError):
    """valgrind is not installed: nothing was counted (the message says what to install)."""


def mark() -> None:
    """End the part of the run so far: callgrind dumps its counts before this call."""
    os.getppid()


def _no_randomisation() -> list[str]:
    """``setarch -R`` when it works here (a container may refuse the personality)."""
    if shutil.which("setarch") is None:
        return []
    probe = subprocess.run(["setarch", "-R", "true"], capture_output=True, check=False)
    return ["setarch", "-R"] if probe.returncode == 0 else []


def run(
    argv: Sequence[str], *, env: dict[str, str], cwd: Path, timeout: float
) -> tuple[dict[int, int], bool]:
    """Run ``argv`` under callgrind; the instructions of each part, and whether ``setarch -R`` ran.

    ``PYTHONHASHSEED=0`` is set in ``env``. Raises :class:`Unavailable` when
    valgrind is missing and ``RuntimeError`` (with valgrind's last lines) when
    the run fails.
    """
    if shutil.which("valgrind") is None:
        raise Unavailable(
            "valgrind is not installed (every machine of this project has it; "
            "`apt-get install valgrind`)"
        )
    prefix = _no_randomisation()
    with tempfile.TemporaryDirectory(prefix="ghar-callgrind-") as folder:
        out = Path(folder) / "callgrind.out"
        command = [
            *prefix,
            "valgrind",
            "--tool=callgrind",
            f"--dump-before={MARK_FUNCTION}",
            f"--callgrind-out-file={out}",
            *argv,
        ]
        result = subprocess.run(
            command,
            cwd=cwd,
            env={**env, "PYTHONHASHSEED": "0"},
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"callgrind run failed (exit {result.returncode}):\n{tail}")
        return read_parts(out), bool(prefix)


def read_parts(out: Path) -> dict[int, int]:
    """Instructions of each part of one run: ``out`` and its dumps ``out.1``, ``out.2`` ..."""
    parts: dict[int, int] = {}
    for path in [out, *out.parent.glob(f"{out.name}.*")]:
        part, instructions = parse_part(path.read_text(encoding="utf-8", errors="replace"))
        if part in parts:
            raise ValueError(f"{path}: part {part} twice")
        parts[part] = instructions
    if sorted(parts) != list(range(1, len(parts) + 1)):
        raise ValueError(f"callgrind parts {sorted(parts)} are not 1..{len(parts)}")
    return parts


def parse_part(text: str) -> tuple[int, int]:
    """``(part number, instructions)`` of one callgrind output file (its header)."""
    events = re.search(r"^events:\s*(\S+)", text, re.MULTILINE)
    if events is None or events.group(1) != "Ir":
        raise ValueError("not a callgrind output whose first event is Ir (instructions)")
    part = re.search(r"^part:\s*(\d+)\s*$", text, re.MULTILINE)
    total = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.MULTILINE)
    if total is None:
        raise ValueError("a callgrind output without a summary or totals line")
    return (int(part.group(1)) if part else 1), int(total.group(1))


def slope(small: int, large: int, n_small: int, n_large: int) -> float:
    """Instructions of one more operation: two segments of ``n_small`` and ``n_large``."""
    if n_large <= n_small:
        raise ValueError("the large segment must hold more operations than the small one")
    return (large - small) / (n_large - n_small)
