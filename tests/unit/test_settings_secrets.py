"""Secrets in settings: never repeated in an error, never mangled on the way in, never empty; a broker
URL carries no credentials; a config or credential file that is not text is one clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.pool.wire import Broker
from appliance.settings import Settings


def load(tmp_path: Path, toml: str = "", **environ: str) -> Settings:
    config = tmp_path / "appliance.toml"
    config.write_text(toml)
    return Settings.load(config, environ=environ)


@pytest.mark.parametrize(
    ("toml", "environ"),
    [
        ("[pool]\npassword = 12345\n", {}),
        ('[server]\napi_token = ["s3cr3t-12345"]\n', {}),
    ],
)
def test_a_secret_of_the_wrong_type_is_named_not_shown(tmp_path: Path, toml: str, environ: dict) -> None:
    with pytest.raises(ConfigError, match="its value is a secret: not shown") as caught:
        load(tmp_path, toml, **environ)
    assert "12345" not in str(caught.value)


def test_a_password_that_looks_like_json_is_taken_as_written(tmp_path: Path) -> None:
    settings = load(tmp_path, APPLIANCE_POOL__PASSWORD='["s3cr3t"]')
    assert settings.pool.password is not None
    assert settings.pool.password.get_secret_value() == '["s3cr3t"]'


@pytest.mark.parametrize("token", ["", "  "])
def test_an_empty_api_token_is_refused_at_start(tmp_path: Path, token: str) -> None:
    with pytest.raises(ConfigError, match=r"'server\.api_token'.*is empty: no client could send it"):
        load(tmp_path, f'[server]\napi_token = "{token}"\n')


def test_an_empty_api_token_credential_is_refused_at_start(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "server.api_token").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load(tmp_path, CREDENTIALS_DIRECTORY=str(credentials))


def test_a_broker_url_with_credentials_is_refused_without_repeating_them(tmp_path: Path) -> None:
    url = "mqtts://alice:s3cretPW@pool.example.com:8883"
    with pytest.raises(ConfigError, match=r"'pool\.broker'.*give them as username and password") as caught:
        load(tmp_path, APPLIANCE_POOL__BROKER=url)
    assert "s3cretPW" not in str(caught.value)
    with pytest.raises(ConfigError, match="credentials in it are not used") as parsed:
        Broker.parse(url)
    assert "s3cretPW" not in str(parsed.value)


def test_a_config_file_that_is_not_utf8_is_one_config_error(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_bytes(b'[server]\nhost = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        Settings.load(config, environ={})


def test_a_credential_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    os.mkfifo(credentials / "pool.password")
    with pytest.raises(ConfigError, match=r"pool\.password.*not a regular file"):
        load(tmp_path, CREDENTIALS_DIRECTORY=str(credentials))
