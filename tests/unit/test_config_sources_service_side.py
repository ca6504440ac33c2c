"""What only the service takes from its environment: its credentials, read back exactly as provision
installed them, and the folders systemd names for its unit (never for a hook's unit)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config_sources import ignoring_unit_directories
from appliance.errors import ConfigError
from appliance.settings import Settings


def test_a_credential_that_is_not_utf8_is_a_config_error_naming_it_not_its_value(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "pool.password").write_bytes(b"p\xe4ss")
    with pytest.raises(ConfigError) as raised:
        Settings.load(None, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert str(raised.value) == (
        f"credential pool.password in $CREDENTIALS_DIRECTORY ({credentials}): not UTF-8 text; "
        "write it again as UTF-8"
    )
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_the_service_stops_with_one_line_on_such_a_credential(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "server.api_token").write_bytes(b"t\xffken\n")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_") and k != "CREDENTIALS_DIRECTORY"
    }
    env.update(CREDENTIALS_DIRECTORY=str(credentials), RUNTIME_DIRECTORY=str(tmp_path / "run"))
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "status"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"appliance: credential server.api_token in $CREDENTIALS_DIRECTORY ({credentials}): not UTF-8 text; "
        "write it again as UTF-8\n"
    )


def test_an_unreadable_credential_is_a_config_error(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "pool.password").mkdir()  # a folder where the file should be
    with pytest.raises(
        ConfigError, match=r"credential pool.password in \$CREDENTIALS_DIRECTORY .*: cannot be read"
    ):
        Settings.load(None, environ={"CREDENTIALS_DIRECTORY": str(credentials)})


UNIT_DIRECTORIES = ("RUNTIME_DIRECTORY", "STATE_DIRECTORY", "CACHE_DIRECTORY")


def test_only_the_service_takes_its_folders_from_systemds_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = tmp_path / "agent"
    for variable in UNIT_DIRECTORIES:
        monkeypatch.setenv(variable, f"{agent / variable.lower()}:{tmp_path / 'second'}")
    service = Settings.load(None, environ={}).system
    assert (service.runtime_dir, service.state_dir, service.cache_dir) == (
        agent / "runtime_directory",
        agent / "state_directory",
        agent / "cache_directory",
    )
    with ignoring_unit_directories():
        client = Settings.load(None, environ={}).system
    for folder in (client.runtime_dir, client.state_dir, client.cache_dir):
        assert not folder.is_relative_to(tmp_path)
    configured = tmp_path / "appliance.toml"
    configured.write_text(
        f'[system]\nruntime_dir = "{tmp_path / "run"}"\nstate_dir = "{tmp_path / "state"}"\n'
    )
    with ignoring_unit_directories():
        client = Settings.load(configured, environ={}).system
    assert (client.runtime_dir, client.state_dir) == (tmp_path / "run", tmp_path / "state")
    assert Settings.load(None, environ={}).system.runtime_dir == agent / "runtime_directory"  # restored
