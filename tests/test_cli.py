"""The CLI: `ghar-core` and `python -m ghar_core` are the same program."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ghar_core import __version__
from ghar_core.cli import main
from ghar_core.config import config_table_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_module_entry_point_is_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ghar_core", "--version"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert out.stdout.strip() == f"ghar-core {__version__}"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "ghar-core"
    assert script.exists(), "pip install -e . should have created the ghar-core script"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert "config" in out.stdout


def test_config_table_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--table"]) == 0
    assert capsys.readouterr().out == config_table_markdown()


def test_config_command_masks_and_reports_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APP_ENV", "test")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "never-print-me")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# env file: ")
    assert out.splitlines()[0].endswith(".env.test (read)")
    assert "never-print-me" not in out
    assert "SUPABASE_SERVICE_ROLE_KEY='**********'" in out
    monkeypatch.setenv("DB_POOL_MAX_SIZE", "lots")
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert "DB_POOL_MAX_SIZE: expected an integer" in err
    assert "Traceback" not in err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: ghar-core" in capsys.readouterr().out


def test_environment_is_not_leaked_between_tests() -> None:
    assert os.environ.get("DB_POOL_MAX_SIZE") != "lots"


def test_a_closed_pipe_is_not_a_traceback() -> None:
    import fcntl

    read_fd, write_fd = os.pipe()
    # The smallest pipe (one page), so the output cannot all fit before we close.
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ghar_core", "config", "--table"],
        stdout=write_fd,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        # Block-buffered stdout, as in production: the write fails at the final flush.
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "APP_ENV": "test"},
    )
    os.close(write_fd)
    assert os.read(read_fd, 10) == b"| Variable"  # like `| head -c 10`
    os.close(read_fd)
    _, err = proc.communicate(timeout=30)
    assert len(config_table_markdown()) > 4096  # more than the pipe holds: the write failed
    assert b"Traceback" not in err, err.decode()
    assert proc.returncode == 0


@pytest.mark.parametrize("ttl", ["-60", "0", "2592001", "soon"])
def test_token_lifetime_is_checked_before_any_request(
    ttl: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["token", "--email", "a@b.co", "--ttl", ttl])
    assert info.value.code == 2
    assert "--ttl" in capsys.readouterr().err


def test_serve_limit_flags_are_settings_named_in_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--head-timeout`` is HEAD_TIMEOUT: a bad value is refused naming the variable."""
    import dataclasses

    from ghar_core.asgi.limits import ServerLimits
    from ghar_core.cli import SERVE_LIMITS, main

    names = {f.name.upper() for f in dataclasses.fields(ServerLimits)} | {"KEEP_ALIVE_TIMEOUT"}
    assert set(SERVE_LIMITS) == names
    monkeypatch.setenv("HEAD_TIMEOUT", "10")  # restored after the test
    assert main(["serve", "--head-timeout", "soon"]) == 2
    assert "HEAD_TIMEOUT" in capsys.readouterr().err
