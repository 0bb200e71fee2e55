"""``python -m benchmarks --quick`` runs every suite and writes the whole report.

No timing assertions: this proves the runner and every suite work (the
contract in ``benchmarks/__init__.py``), not how fast anything is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import discover
from benchmarks._report import check_summary

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def test_quick_run_writes_the_report_every_figure_and_a_chart_per_suite(
    pg_admin_dsn: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["GHAR_BENCH_DATABASE_URL"] = pg_admin_dsn
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    suites = discover()
    assert {"asgi_stack", "auth", "database", "http_clients"} <= suites.keys()
    for i, name in enumerate(suites, 1):
        assert f"[{i}/{len(suites)}] {name}: ok in " in output  # progress, per suite
    every = json.loads((tmp_path / "latest.json").read_text())
    assert every["meta"]["quick"] is True
    assert set(every["suites"]) == set(suites)
    for name, suite in every["suites"].items():
        assert suite["status"] == "ok", name
        assert check_summary(suite["results"]["summary"]) == [], name
        assert (tmp_path / f"{name}.md").is_file()
        assert (tmp_path / f"{name}.png").read_bytes().startswith(PNG)
    report = (tmp_path / "latest.md").read_text()
    assert "A `--quick` run" in report
    for name in suites:
        assert f"]({name}.png)" in report
        assert f"[{name}.md]({name}.md)" in report


def test_an_unknown_suite_is_refused_with_the_list() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "nosuch"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "no suite nosuch; the suites are" in result.stderr
    assert "database" in result.stderr


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ([], "no 'summary' rows"),
        ([{"group": "g", "label": "x"}], "lacks one of"),
        (
            [
                {
                    "group": "g",
                    "label": "x",
                    "role": "ours",
                    "value": 1.0,
                    "unit": "µs",
                    "ratio": 1.0,
                    "better": "lower",
                }
            ],
            "has 0 baselines",
        ),
        (
            [
                {
                    "group": "g",
                    "label": "x",
                    "role": "boss",
                    "value": -1,
                    "unit": "µs",
                    "ratio": 1.0,
                    "better": "faster",
                }
            ],
            "role 'boss'",
        ),
    ],
)
def test_a_summary_that_breaks_the_contract_is_named(rows: object, problem: str) -> None:
    assert any(problem in p for p in check_summary(rows))
