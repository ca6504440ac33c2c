"""Settings layering (defaults < TOML < credentials < env < CLI) and precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.settings import Settings


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_layers_in_order(tmp_path: Path) -> None:
    config = write(tmp_path / "a.toml", "[server]\nport = 9000\nhost = '0.0.0.0'\n[pool]\nsite = 'plant-7'\n")
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "pool.password").write_text("s3cret\n")
    settings = Settings.load(
        config,
        environ={"APPLIANCE_SERVER__PORT": "9100", "CREDENTIALS_DIRECTORY": str(credentials)},
        overrides={"server": {"host": "127.0.0.2"}},
    )
    assert settings.server.port == 9100  # env beats TOML
    assert settings.server.host == "127.0.0.2"  # CLI beats everything
    assert settings.pool.site == "plant-7"  # TOML beats defaults
    assert settings.pool.password is not None and settings.pool.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_env_lists_and_nesting(tmp_path: Path) -> None:
    settings = Settings.load(None, environ={"APPLIANCE_MODELS__PROVIDERS": '["cuda", "cpu"]'})
    assert settings.models.providers == ["cuda", "cpu"]
    settings = Settings.load(None, environ={"APPLIANCE_PROVIDERS__CPU__ARENA": "x"})
    assert settings.providers == {"cpu": {"arena": "x"}}


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"APPLIANCE_SERVR__PORT": "1"}, "unknown setting 'servr' (from APPLIANCE_SERVR__PORT)"),
        ({"APPLIANCE_SERVER__PORT": "http"}, "setting 'server.port' (from APPLIANCE_SERVER__PORT)"),
        ({"APPLIANCE_POOL__RESERVED_PCT": "150"}, "less than or equal to 100"),
        ({"APPLIANCE_SERVER____PORT": "1"}, "empty section name"),
        ({"APPLIANCE_MODELS__DEFAULT_MAX_BATCH_SIZE": "100000"}, "less than or equal to 4096"),
    ],
)
def test_env_errors_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.load(None, environ=environ)
    assert message in str(caught.value)


def test_toml_errors_name_the_file_and_key(tmp_path: Path) -> None:
    bad_key = write(tmp_path / "k.toml", "[scheduler]\ninstancez = 2\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'scheduler.instancez' \(from .*k.toml\)"):
        Settings.load(bad_key, environ={})
    broken = write(tmp_path / "b.toml", "[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.load(broken, environ={})
    with pytest.raises(ConfigError, match="cannot be read"):
        Settings.load(tmp_path / "missing.toml", environ={})


def test_blank_broker_means_no_pool_link() -> None:
    assert Settings.load(None, environ={"APPLIANCE_POOL__BROKER": ""}).pool.broker is None


def test_every_field_is_described_and_units_are_named() -> None:
    schema = Settings.model_json_schema()
    for definition in schema["$defs"].values():
        for name, field in definition["properties"].items():
            assert field.get("description"), name
    unitless = {
        "host",
        "port",
        "grpc_port",
        "site",
        "node_id",
        "topic_root",
        "username",
        "password",
        "broker",
        "api_token",
        "repository",
        "providers",
        "instances",
        "ca_file",
        "cert_file",
        "key_file",
        "accept_jobs",
        "pool_process",
        "pool_cpu_priority",
        "log_level",
        "state_dir",
        "cache_dir",
        "runtime_dir",
        "warmup_runs",
        "cpu_threads",
        "mqtt_version",
        "remote_control",
        "reply_topic_prefix",
        "strict_readiness",
        "access_log",
        "admin_socket",
        "records_dir",
        "log_format",
        "max_tensor_rank",
        "solo_session",
    }
    units = (
        "_s", "_ms", "_bytes", "_pct", "_requests", "_batches", "_size", "_responses", "_ips",
        "_connections", "_per_peer", "_elements", "_per_s", "_regions",
    )  # fmt: skip
    for definition in schema["$defs"].values():
        for name in definition["properties"]:
            assert name in unitless or name.endswith(units), f"{name} has no unit in its name"
