"""An app's own settings beside the core's, unknown keys, and who reads each setting.

The app schema in these tests is what a service writes in its own package:
a ``Settings`` subclass with ``setting()`` fields, read from the same env file
and environment as the core's, with the same checks and masking.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ghar_core.config import (
    APP_READER,
    ConfigError,
    Secret,
    Settings,
    config_table_markdown,
    load_settings,
    setting,
    settings_fields,
)
from ghar_core.envfile import quote_env_text

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ghar_core"


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class ListingsSettings(Settings):
    GEOCODER_URL: str = setting(
        "http://127.0.0.1:8081", "url", "The geocoder's base URL.", schemes=("http", "https")
    )
    GEOCODER_TIMEOUT: float = setting(
        2.0, "float", "Seconds a geocoder call may take.", minimum=0.1, maximum=30
    )
    GEOCODER_KEY: Secret | None = setting(None, "secret", "The geocoder's API key.", optional=True)
    LISTINGS_PAGE_SIZE: int = setting(20, "int", "Listings per page.", minimum=1, maximum=200)

    def extra_problems(self) -> list[tuple[str, str]]:
        if self.is_prod and not self.GEOCODER_KEY:
            return [("GEOCODER_KEY", "prod needs the geocoder's key")]
        return []


def _write_env(folder: Path, lines: dict[str, str], app_env: str = "dev") -> None:
    text = "".join(f"{k}={quote_env_text(v)}\n" for k, v in lines.items())
    (folder / f".env.{app_env}").write_text(text, encoding="utf-8")


def test_app_settings_come_from_the_same_file_and_environment(tmp_path: Path) -> None:
    _write_env(
        tmp_path,
        {"GEOCODER_URL": "https://geo.test/", "GEOCODER_KEY": "k-123", "DB_POOL_MAX_SIZE": "7"},
    )
    loaded = load_settings(
        env_dir=tmp_path, environ={"LISTINGS_PAGE_SIZE": "50"}, schema=ListingsSettings
    )
    assert isinstance(loaded, ListingsSettings)
    assert loaded.GEOCODER_URL == "https://geo.test"  # the same URL rules as the core's
    assert loaded.GEOCODER_KEY == Secret("k-123")
    assert loaded.LISTINGS_PAGE_SIZE == 50  # the environment overrides the file
    assert loaded.DB_POOL_MAX_SIZE == 7  # and the core's settings are all there
    text = repr(loaded) + str(dict(loaded.masked_items()))
    assert "k-123" not in text
    assert repr(loaded).startswith("ListingsSettings(")
    assert "GEOCODER_KEY='**********'" in repr(loaded)


def test_app_and_core_problems_are_reported_together(tmp_path: Path) -> None:
    _write_env(
        tmp_path,
        {"GEOCODER_URL": "ftp://geo", "GEOCODER_TIMEOUT": "99", "DB_POOL_MAX_SIZE": "lots"},
    )
    with pytest.raises(ConfigError) as info:
        load_settings(env_dir=tmp_path, environ={}, schema=ListingsSettings)
    names = [name for name, _ in info.value.problems]
    assert names == ["DB_POOL_MAX_SIZE", "GEOCODER_URL", "GEOCODER_TIMEOUT"]
    assert "expected a http/https URL" in str(info.value)
    assert "must be at most 30" in str(info.value)


def test_app_cross_field_rules_run_with_the_cores() -> None:
    env = {"SECRET_KEY": "x" * 40, "SUPABASE_URL": "https://id.test"}
    with pytest.raises(ConfigError, match="GEOCODER_KEY: prod needs the geocoder's key"):
        load_settings(app_env="prod", env_dir="/nonexistent", environ=env, schema=ListingsSettings)
    env["GEOCODER_KEY"] = "k"
    assert load_settings(
        app_env="prod", env_dir="/nonexistent", environ=env, schema=ListingsSettings
    ).GEOCODER_KEY


def test_the_table_has_the_apps_rows_read_by_its_services() -> None:
    table = config_table_markdown(ListingsSettings)
    core = config_table_markdown()
    assert table.startswith(core.rstrip("\n"))
    row = next(line for line in table.splitlines() if line.startswith("| `GEOCODER_URL`"))
    assert row == (
        "| `GEOCODER_URL` | App | url (http/https) | `http://127.0.0.1:8081` | "
        f"{APP_READER} | The geocoder's base URL. |"
    )


def test_a_field_not_declared_with_setting_is_refused() -> None:
    @dataclasses.dataclass(frozen=True, slots=True, repr=False)
    class Broken(Settings):
        PLAIN: int = 3

    with pytest.raises(TypeError, match=r"Broken.PLAIN is not declared with .*setting\(\)"):
        load_settings(environ={}, schema=Broken)


def test_unknown_env_file_keys_are_one_warning_with_the_closest_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_env(
        tmp_path, {"DATABSE_URL": "postgresql://x/y", "GEOCODER_URL": "http://g", "ZZZ": "1"}
    )
    with caplog.at_level(logging.WARNING, logger="ghar_core.config"):
        loaded = load_settings(
            env_dir=tmp_path, environ={"DB_POOL_MAX_SIZ": "3", "HOME": "/", "GHAR_DEV_DIR": "/x"}
        )
    default = load_settings(env_dir="/nonexistent", environ={})
    assert loaded.DATABASE_URL == default.DATABASE_URL  # the typo did not set it
    records = [r for r in caplog.records if r.name == "ghar_core.config"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "4 unknown setting(s)" in message
    assert "DATABSE_URL (did you mean DATABASE_URL?)" in message
    assert "GEOCODER_URL" in message  # the core schema does not know the app's key
    assert "ZZZ" in message
    assert "DB_POOL_MAX_SIZ (did you mean DB_POOL_MAX_SIZE?)" in message  # a near miss in env
    assert "HOME" not in message  # the rest of the environment is not ours to judge
    assert "GHAR_DEV_DIR" not in message  # the tools' own variables (close to GHAR_ENV_DIR)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ghar_core.config"):
        load_settings(env_dir=tmp_path, environ={}, schema=ListingsSettings)
    assert "GEOCODER_URL" not in caplog.text  # declared by the app's schema


def test_strict_mode_refuses_unknown_keys_with_the_other_problems(tmp_path: Path) -> None:
    _write_env(tmp_path, {"DATABSE_URL": "postgresql://x/y", "PORT": "http"})
    with pytest.raises(ConfigError) as info:
        load_settings(env_dir=tmp_path, environ={}, strict=True)
    problems = dict(info.value.problems)
    assert "PORT" in problems
    assert problems["DATABSE_URL"] == (
        "not a setting of Settings (env file); did you mean DATABASE_URL?"
    )
    # The setting turns it on too, from the file itself.
    _write_env(tmp_path, {"STRICT_SETTINGS": "true", "GEOCODR_URL": "http://g"})
    with pytest.raises(ConfigError, match="GEOCODR_URL: not a setting of ListingsSettings"):
        load_settings(env_dir=tmp_path, environ={}, schema=ListingsSettings)
    _write_env(tmp_path, {"STRICT_SETTINGS": "true", "GEOCODER_URL": "http://g"})
    assert load_settings(env_dir=tmp_path, environ={}, schema=ListingsSettings).GEOCODER_URL


@given(st.from_regex(r"[A-Z][A-Z0-9_]{0,30}", fullmatch=True))
def test_a_file_key_is_either_a_setting_or_refused_in_strict_mode(key: str) -> None:
    """Property: strict loading refuses a file key exactly when the schema does not declare it."""
    known = {name for name, _, _ in settings_fields(ListingsSettings)}
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, ".env.dev").write_text(f"{key}=1\n", encoding="utf-8")
        try:
            load_settings(env_dir=folder, environ={}, schema=ListingsSettings, strict=True)
            refused = False
        except ConfigError as exc:
            refused = any(name == key and "not a setting" in why for name, why in exc.problems)
        except TypeError:  # GHAR_SETTINGS=1 names no schema
            assert key == "GHAR_SETTINGS"
            return
    assert refused == (key not in known and key not in {"APP_ENV", "GHAR_ENV_DIR"})


def test_ghar_settings_names_the_schema_for_every_command(tmp_path: Path) -> None:
    (tmp_path / "listings_settings.py").write_text(
        "import dataclasses\n"
        "from ghar_core.config import Settings, setting\n"
        "@dataclasses.dataclass(frozen=True, slots=True, repr=False)\n"
        "class AppSettings(Settings):\n"
        "    GEOCODER_KEY: object = setting(None, 'secret', 'The key.', optional=True)\n"
    )
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    _write_env(
        env_dir, {"GEOCODER_KEY": "never-printed", "GHAR_SETTINGS": "listings_settings:AppSettings"}
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("GHAR_", "APP_ENV"))}
    environ.pop("PYTHONPATH", None)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ghar_core", *argv],
            cwd=tmp_path,
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    shown = run("config")
    assert shown.returncode == 0, shown.stderr
    assert "GEOCODER_KEY='**********'" in shown.stdout
    assert "never-printed" not in shown.stdout + shown.stderr
    assert "unknown" not in shown.stderr
    table = run("config", "--table")  # GHAR_SETTINGS from the env file
    assert "| `GEOCODER_KEY` | App | secret |" in table.stdout, table.stderr
    _write_env(env_dir, {"GEOCODER_KEY": "never-printed"})
    table = run("--settings", "listings_settings:AppSettings", "config", "--table")
    assert "| `GEOCODER_KEY` | App | secret |" in table.stdout, table.stderr
    assert "GEOCODER_KEY" not in run("config", "--table").stdout  # the core's alone
    wrong = run("--settings", "listings_settings:Nope", "config")
    assert wrong.returncode == 2
    assert "GHAR_SETTINGS: 'listings_settings' has no 'Nope'" in wrong.stderr
    assert "Traceback" not in wrong.stderr


# --- every setting real ----------------------------------------------------------------


def _module_text(module: str) -> str:
    path = PACKAGE.joinpath(*module.split("."))
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


@pytest.mark.parametrize(
    ("name", "reader"),
    [(name, spec.reader) for name, spec, _ in settings_fields() if spec.reader],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_each_module_the_table_names_reads_the_setting(name: str, reader: tuple[str, ...]) -> None:
    """A row that says a core module reads a setting is true: that module uses the name."""
    word = re.compile(rf"\b{name}\b")
    for module in reader:
        if module == "config":
            # Read by the loader itself: used beyond its own declaration.
            text = (PACKAGE / "config.py").read_text(encoding="utf-8")
            assert len(word.findall(text)) >= 2, f"{name}: config.py only declares it"
            continue
        assert word.search(_module_text(module)), f"{name}: ghar_core.{module} never reads it"


def test_the_apps_settings_are_read_nowhere_in_the_core() -> None:
    """The other half: a row given to "your services" is not secretly used by the core."""
    texts = {
        path: path.read_text(encoding="utf-8")
        for path in PACKAGE.rglob("*.py")
        # constants.py defines the seed's DEFAULT_VISION_PROVIDER constant, not a read.
        if path.name not in ("config.py", "constants.py")
    }
    for name, spec, _ in settings_fields():
        if spec.reader:
            continue
        users = [
            str(p.relative_to(PACKAGE)) for p, t in texts.items() if re.search(rf"\b{name}\b", t)
        ]
        assert not users, f"{name} is documented as the app's but {users} read it"
