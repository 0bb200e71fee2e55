"""Settings: env-file text round-trips, garbage is reported per variable, secrets stay masked."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ghar_core import config
from ghar_core.config import (
    ConfigError,
    Secret,
    Settings,
    config_table_markdown,
    format_env_value,
    load_settings,
    settings_fields,
)
from ghar_core.envfile import parse_env_text, quote_env_text
from tests.strategies import setting_value

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {name: (spec, default) for name, spec, default in settings_fields()}
# Fields whose bounds depend on a partner field: give the partner room.
PARTNERS = {"DB_POOL_MIN_SIZE": "DB_POOL_MAX_SIZE", "DB_BG_POOL_MIN_SIZE": "DB_BG_POOL_MAX_SIZE"}


def _load(tmp_path: Path, lines: dict[str, str], app_env: str = "dev") -> Settings:
    text = "".join(f"{k}={quote_env_text(v)}\n" for k, v in lines.items())
    (tmp_path / f".env.{app_env}").write_text(text, encoding="utf-8")
    return load_settings(app_env=app_env, env_dir=tmp_path, environ={})


@pytest.mark.parametrize("name", [n for n in FIELDS if n != "APP_ENV"])
@given(data=st.data())
def test_every_setting_round_trips_through_env_file_text(
    name: str, data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    spec, _ = FIELDS[name]
    value = data.draw(setting_value(name, spec), label=name)
    lines = {name: format_env_value(name, value)}
    if name in PARTNERS:
        lines[PARTNERS[name]] = "1000"
    if name == "CORS_ORIGINS_STR" and value is not None:
        lines["CORS_ORIGINS"] = ""
    loaded = _load(tmp_path_factory.mktemp("env"), lines)
    assert getattr(loaded, name) == value
    if name == "CORS_ORIGINS_STR" and value:
        assert loaded.CORS_ORIGINS == tuple(i.strip() for i in value.split(",") if i.strip())


TYPED = [n for n, (spec, _) in FIELDS.items() if spec.kind not in ("str", "secret", "list")]


@pytest.mark.parametrize("name", TYPED)
@given(garbage=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")))
def test_garbage_is_a_config_error_naming_the_variable(name: str, garbage: str) -> None:
    environ = {name: garbage}
    if name in PARTNERS:
        environ[PARTNERS[name]] = "1000"
    try:
        loaded = load_settings(app_env="dev", env_dir="/nonexistent", environ=environ)
    except ConfigError as exc:
        assert [n for n, _ in exc.problems] == [name]
        assert name in str(exc)
    else:
        # Accepted: then it parsed to the declared type, not to junk.
        spec, default = FIELDS[name]
        value = getattr(loaded, name)
        assert value is None or type(value) is type(default) or spec.optional


def test_all_problems_are_reported_at_once() -> None:
    environ = {
        "DB_POOL_MAX_SIZE": "ten",
        "DEBUG": "maybe",
        "JWKS_CACHE_TTL": "nan",
        "PUBLIC_API_URL": "ftp://x",
        "API_V1_STR": "api/v1/",
        "LOG_LEVEL": "LOUD",
    }
    with pytest.raises(ConfigError) as info:
        load_settings(app_env="dev", env_dir="/nonexistent", environ=environ)
    assert sorted(n for n, _ in info.value.problems) == sorted(environ)
    text = str(info.value)
    assert "expected an integer" in text
    assert "expected true/false" in text
    assert "6 problem(s)" in text


@pytest.mark.parametrize(
    ("value", "why"),
    [("0", "must be at least 1, got 0"), ("65", "must be at most 64, got 65"), ("two", "integer")],
)
def test_the_outbox_writer_count_is_validated_naming_the_setting(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(
            app_env="dev", env_dir="/nonexistent", environ={"EVENT_OUTBOX_WRITERS": value}
        )
    assert [n for n, _ in info.value.problems] == ["EVENT_OUTBOX_WRITERS"]
    assert "EVENT_OUTBOX_WRITERS" in str(info.value)
    assert why in str(info.value)
    loaded = load_settings(
        app_env="dev", env_dir="/nonexistent", environ={"EVENT_OUTBOX_WRITERS": "5"}
    )
    assert loaded.EVENT_OUTBOX_WRITERS == 5


def test_bad_app_env_is_named() -> None:
    with pytest.raises(ConfigError, match="APP_ENV"):
        load_settings(environ={"APP_ENV": "staging"})


def test_prod_refuses_default_secret_and_missing_provider(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(app_env="prod", env_dir=tmp_path, environ={})
    names = {n for n, _ in info.value.problems}
    assert names == {"SECRET_KEY", "SUPABASE_URL"}
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        load_settings(
            app_env="prod",
            env_dir=tmp_path,
            environ={"SECRET_KEY": "   ", "SUPABASE_URL": "https://x.supabase.co"},
        )
    ok = load_settings(
        app_env="prod",
        env_dir=tmp_path,
        environ={"SECRET_KEY": "s" * 40, "SUPABASE_URL": "https://x.supabase.co/"},
    )
    assert ok.is_prod
    assert ok.SUPABASE_URL == "https://x.supabase.co"


@pytest.mark.parametrize("origins", ["*", "https://app.example.com,*"])
def test_prod_refuses_star_origins_with_credentials(tmp_path: Path, origins: str) -> None:
    base = {"SECRET_KEY": "s" * 40, "SUPABASE_URL": "https://x.supabase.co"}
    with pytest.raises(ConfigError) as info:
        load_settings(app_env="prod", env_dir=tmp_path, environ={**base, "CORS_ORIGINS": origins})
    assert [n for n, _ in info.value.problems] == ["CORS_ORIGINS"]
    ok = load_settings(
        app_env="prod",
        env_dir=tmp_path,
        environ={**base, "CORS_ORIGINS": origins, "CORS_ALLOW_CREDENTIALS": "false"},
    )
    assert "*" in ok.CORS_ORIGINS


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    (tmp_path / ".env.test").write_text("DB_POOL_MAX_SIZE=7\nDEBUG=true\n")
    loaded = load_settings(app_env="test", env_dir=tmp_path, environ={"DB_POOL_MAX_SIZE": "9"})
    assert loaded.DB_POOL_MAX_SIZE == 9
    assert loaded.DEBUG is True


def test_app_env_and_env_dir_come_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / ".env.test").write_text("VERSION=9.9.9\n")
    loaded = load_settings(environ={"APP_ENV": "test", "GHAR_ENV_DIR": str(tmp_path)})
    assert loaded.APP_ENV == "test"
    assert loaded.VERSION == "9.9.9"


def test_cors_origins_str_overrides_the_list() -> None:
    loaded = load_settings(
        app_env="dev",
        env_dir="/nonexistent",
        environ={
            "CORS_ORIGINS": '["https://a.example"]',
            "CORS_ORIGINS_STR": "https://b, https://c",
        },
    )
    assert loaded.CORS_ORIGINS == ("https://b", "https://c")


def test_env_file_syntax_errors_name_file_and_line(tmp_path: Path) -> None:
    (tmp_path / ".env.dev").write_text('# ok\nGOOD=1\nthis is not a pair\nQ="open\n')
    with pytest.raises(ConfigError) as info:
        load_settings(app_env="dev", env_dir=tmp_path, environ={})
    wheres = [w for w, _ in info.value.problems]
    assert wheres[0].endswith(".env.dev:3")
    assert wheres[1].endswith(".env.dev:4 (Q)")


SECRET_VALUES = {
    "SECRET_KEY": "k" * 40,
    "SUPABASE_ANON_KEY": "anon-secret-value",
    "SUPABASE_SERVICE_ROLE_KEY": "service-secret-value",
    "SUPABASE_JWT_SECRET": "jwt-secret-value",
    "OPENAI_API_KEY": "sk-openai-secret",
    "SMTP_PASSWORD": "smtp-secret-value",
    "SENTRY_DSN": "https://sentrykey@o1.ingest.sentry.io/2",
    "DATABASE_URL": "postgresql://app:db-password-value@db.example:5432/app",
}


def test_secrets_are_masked_in_repr_str_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    loaded = load_settings(app_env="dev", env_dir="/nonexistent", environ=SECRET_VALUES)
    shown = repr(loaded) + str(loaded) + repr(loaded.masked_items())
    import logging

    logging.getLogger("t").warning("settings: %s", loaded)
    shown += caplog.text
    for name, secret in SECRET_VALUES.items():
        hidden = "db-password-value" if name == "DATABASE_URL" else secret
        assert hidden not in shown, name
    assert loaded.SUPABASE_ANON_KEY is not None
    assert loaded.SUPABASE_ANON_KEY.get_secret_value() == "anon-secret-value"
    assert "postgresql://app:**********@db.example:5432/app" in shown


def test_settings_are_immutable_and_replace_revalidates() -> None:
    loaded = load_settings(app_env="dev", env_dir="/nonexistent", environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.DEBUG = True  # type: ignore[misc]
    with pytest.raises(ConfigError, match="DB_POOL_MIN_SIZE"):
        dataclasses.replace(loaded, DB_POOL_MIN_SIZE=50)


def test_secret_type_behaves() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert not Secret("")
    assert str(Secret("abc")) == "**********"
    assert len({Secret("a"), Secret("a")}) == 1


def test_lazy_module_settings_and_reset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env.test").write_text("VERSION=1.2.3\n")
    monkeypatch.setenv("GHAR_ENV_DIR", str(tmp_path))
    monkeypatch.setenv("APP_ENV", "test")
    config.reset_settings()
    try:
        from ghar_core.config import settings

        assert settings.VERSION == "1.2.3"
        assert config.get_settings() is settings
    finally:
        config.reset_settings()
    with pytest.raises(AttributeError):
        config.no_such_thing  # noqa: B018


def test_committed_env_files_load() -> None:
    for app_env in ("dev", "test"):
        loaded = load_settings(app_env=app_env, env_dir=ROOT / "env", environ={})
        assert loaded.APP_ENV == app_env
    example = parse_env_text((ROOT / "env" / ".env.prod.example").read_text())
    assert set(example) == set(FIELDS) - {"APP_ENV"}


def test_readme_configuration_table_matches_settings() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("<!-- config-table:start -->\n") + len("<!-- config-table:start -->\n")
    end = readme.index("<!-- config-table:end -->")
    assert readme[start:end] == config_table_markdown(), (
        "README configuration table drifted: regenerate with `ghar-core config --table`"
    )


def test_print_settings_from_the_command_line_masks_secrets() -> None:
    env = {"APP_ENV": "test", "SUPABASE_ANON_KEY": "visible-if-broken", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", "from ghar_core.config import settings; print(settings)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    ).stdout
    assert "APP_ENV='test'" in out
    assert "visible-if-broken" not in out
    assert "SUPABASE_ANON_KEY='**********'" in out
