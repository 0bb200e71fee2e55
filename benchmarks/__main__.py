"""Run the benchmark suites and write one report: ``python -m benchmarks [--quick] [SUITE ...]``.

Why one runner: each suite measures ours, its baseline and its peers side by
side, but a reader wants one place with every figure and a picture of the
ratios. So this runs every suite (or the ones named) one after another, each
in its own interpreter, streaming its progress, then writes to the results
folder ``latest.md`` (headline ratios and charts), ``latest.json`` (every
figure of every suite) and ``<suite>.png`` charts. Suites are found, not
listed: see ``benchmarks/__init__.py`` for the contract a suite keeps.

``--quick`` runs each suite briefly to prove it works and writes into
``benchmarks/results/quick/`` (git-ignored), never over the real results.
Suites not named this time keep their earlier figures in the report.
Suites that need Postgres get ``GHAR_BENCH_DATABASE_URL``: as given, else
the machine's server on 127.0.0.1:5432 when it answers, else an embedded one
for the length of the run.

    .venv/bin/python -m benchmarks                  # everything (tens of minutes)
    .venv/bin/python -m benchmarks auth database    # two suites
    .venv/bin/python -m benchmarks --quick          # a smoke run (about two minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks._report import SuiteResult, check_summary, draw_chart, render_markdown

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DATABASE_ENV = "GHAR_BENCH_DATABASE_URL"
MACHINE_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def discover() -> dict[str, Path]:
    """Every suite: ``benchmarks/<name>.py`` not starting with ``_``, by name."""
    return {p.stem: p for p in sorted(HERE.glob("*.py")) if not p.name.startswith("_")}


def title_of(path: Path) -> str:
    """The first line of the suite's docstring (without running it)."""
    import ast

    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or path.stem
    return doc.strip().splitlines()[0].rstrip(".")


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"


def _commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


async def _answers(dsn: str) -> bool:
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    await conn.close()
    return True


@contextlib.contextmanager
def database_for_suites() -> Iterator[tuple[str, str]]:
    """The DSN the suites get and where it comes from: as given, the machine's, or embedded."""
    given = os.environ.get(DATABASE_ENV)
    if given:
        yield given, DATABASE_ENV
        return
    if asyncio.run(_answers(MACHINE_DSN)):
        yield MACHINE_DSN, "the machine's PostgreSQL on 127.0.0.1:5432"
        return
    from ghar_core.devtools.postgres import EmbeddedPostgres

    folder = tempfile.mkdtemp(prefix="ghar-bench-pg-")
    os.chmod(folder, 0o755)  # as root the server runs as postgres, who must enter it
    server = EmbeddedPostgres(os.path.join(folder, "pg"))
    try:
        print(f"benchmarks: nothing answers at {MACHINE_DSN}; starting an embedded PostgreSQL")
        yield server.start(), "an embedded PostgreSQL started for the run"
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def run_suite(
    name: str, path: Path, out: Path, *, quick: bool, timeout: float, env: dict[str, str]
) -> SuiteResult:
    """Run one suite in its own interpreter, its output streamed with a prefix."""
    command = [sys.executable, str(path.relative_to(ROOT)), "--results-dir", str(out)]
    if quick:
        command.insert(2, "--quick")
    result = SuiteResult(name, title_of(path), "ok", command=" ".join(command[1:]))
    (out / f"{name}.json").unlink(missing_ok=True)  # a stale file must not pass for new
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            print(f"  {name} | {line.rstrip()}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
        result.status = f"timed out after {timeout:g} s"
    reader.join(10)
    if process.stdout is not None:
        process.stdout.close()
    result.seconds = time.monotonic() - started
    if code != 0 and result.status == "ok":
        result.status = f"failed (exit {code})"
    json_path = out / f"{name}.json"
    if json_path.is_file():
        result.results = json.loads(json_path.read_text(encoding="utf-8"))
        result.problems = check_summary(result.results.get("summary"))
    elif result.status == "ok":
        result.status = f"failed (wrote no {name}.json)"
    return result


def earlier(name: str, path: Path, out: Path) -> SuiteResult:
    """A suite not run this time, as its last results left it."""
    result = SuiteResult(name, title_of(path), "not run")
    json_path = out / f"{name}.json"
    if json_path.is_file():
        stamp = datetime.datetime.fromtimestamp(json_path.stat().st_mtime, datetime.UTC)
        result.status = f"earlier run ({stamp:%Y-%m-%d})"
        result.results = json.loads(json_path.read_text(encoding="utf-8"))
        result.problems = check_summary(result.results.get("summary"))
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    suites = discover()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=f"of: {', '.join(suites)}")
    parser.add_argument("--quick", action="store_true", help="a brief run of each suite")
    parser.add_argument(
        "--results-dir",
        type=Path,
        help="where the report goes (default benchmarks/results, --quick: .../results/quick)",
    )
    parser.add_argument("--timeout", type=float, help="seconds per suite (default 3600, quick 600)")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in suites]
    if unknown:
        parser.error(f"no suite {', '.join(unknown)}; the suites are {', '.join(suites)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suites = discover()
    if args.list:
        for name, path in suites.items():
            print(f"{name}\t{title_of(path)}")
        return 0
    chosen = args.suites or list(suites)
    out = (args.results_dir or (RESULTS / "quick" if args.quick else RESULTS)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timeout = args.timeout or (600.0 if args.quick else 3600.0)
    load_before = _load()
    command = "python -m benchmarks" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    print(f"benchmarks: {len(chosen)} suite(s): {', '.join(chosen)} -> {out}", flush=True)
    results: dict[str, SuiteResult] = {}
    with database_for_suites() as (dsn, database):
        env = {**os.environ, DATABASE_ENV: dsn, "PYTHONUNBUFFERED": "1", "APP_ENV": "test"}
        for i, name in enumerate(chosen, 1):
            print(f"[{i}/{len(chosen)}] {name}: {title_of(suites[name])}", flush=True)
            result = run_suite(name, suites[name], out, quick=args.quick, timeout=timeout, env=env)
            results[name] = result
            print(f"[{i}/{len(chosen)}] {name}: {result.status} in {result.seconds:.1f} s")
            for problem in result.problems:
                print(f"[{i}/{len(chosen)}] {name}: {problem}")
    ordered = [results.get(n) or earlier(n, p, out) for n, p in suites.items()]
    meta = {
        "command": command,
        "quick": args.quick,
        "generated_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": _load(),
        "database": database,
    }
    charts = write_charts(ordered, out, meta)
    (out / "latest.md").write_text(render_markdown(ordered, meta, charts), encoding="utf-8")
    every = {
        "meta": meta,
        "suites": {
            s.name: {
                "title": s.title,
                "status": s.status,
                "seconds": s.seconds,
                "command": s.command,
                "results": s.results,
            }
            for s in ordered
        },
    }
    (out / "latest.json").write_text(json.dumps(every, indent=2) + "\n", encoding="utf-8")
    print(f"benchmarks: wrote {out / 'latest.md'}, latest.json and {len(charts)} chart(s)")
    failed = [r.name for r in results.values() if r.status != "ok" or r.problems]
    if failed:
        print(f"benchmarks: {', '.join(failed)} did not finish cleanly", file=sys.stderr)
    return 1 if failed else 0


def write_charts(suites: list[SuiteResult], out: Path, meta: dict[str, object]) -> set[str]:
    """``<suite>.png`` for every suite whose summary keeps the contract."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("benchmarks: no charts: matplotlib is missing (pip install -e '.[bench]')")
        return set()
    note = (
        f"{'quick run, not for reading performance; ' if meta['quick'] else ''}"
        f"{meta['generated_at']}, commit {meta['commit']}, Python {meta['python']}, "
        f"{meta['cpus']} CPUs (shared, noisy: read the ratios). Dashed line: the baseline."
    )
    drawn = set()
    for suite in suites:
        if suite.summary and not check_summary(suite.summary):
            earlier = f"figures of an {suite.status}, not this one; " * (
                suite.status.startswith("earlier run")
            )
            draw_chart(suite, out / f"{suite.name}.png", note=earlier + note)
            drawn.add(suite.name)
    return drawn


if __name__ == "__main__":
    sys.exit(main())
