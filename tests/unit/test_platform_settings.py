"""Platform settings, buyers and catalogue files: layered sources, precise errors; the CLI verbs."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.cli import build_parser
from appliance.errors import ConfigError
from appliance.platform.buyers import Buyers, token_digest
from appliance.platform.catalogue import Catalogue
from appliance.platform.settings import PlatformSettings


def test_sources_layer_toml_credentials_environment_flags(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nbroker = "mqtt://a:1883"\nport = 9000\njob_timeout_s = 5\n')
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "gateway.password").write_text("s3cret\n")
    environ = {
        "APPLIANCE_GATEWAY__PORT": "9100",
        "APPLIANCE_SERVER__PORT": "1",  # the box's settings are not the gateway's business
        "CREDENTIALS_DIRECTORY": str(credentials),
    }
    settings = PlatformSettings.load(config, environ=environ, overrides={"gateway": {"broker": "mqtt://b:1"}})
    gateway = settings.gateway
    assert (gateway.broker, gateway.port, gateway.job_timeout_s) == ("mqtt://b:1", 9100, 5.0)
    assert gateway.password is not None and gateway.password.get_secret_value() == "s3cret"
    with pytest.raises(ConfigError, match=r"unknown setting 'gateway.prot' \(from APPLIANCE_GATEWAY__PROT\)"):
        PlatformSettings.load(None, environ={"APPLIANCE_GATEWAY__PROT": "1"})
    with pytest.raises(ConfigError, match=r"gateway\.gateway_id"):
        PlatformSettings.load(None, environ={}, overrides={"gateway": {"gateway_id": "a/b"}})


def test_buyers_are_known_by_token_digest_with_their_quota(tmp_path: Path) -> None:
    path = tmp_path / "buyers.toml"
    path.write_text(f'[buyers.acme]\ntoken_sha256 = "{token_digest("t0k")}"\nrate_per_s = 2\n')
    buyers = Buyers.load(path, rate_per_s=50, max_body_bytes=1000)
    buyer = buyers.identify(b"Bearer t0k")
    assert buyer is not None and (buyer.name, buyer.rate_per_s, buyer.max_body_bytes) == ("acme", 2.0, 1000)
    assert buyers.identify(b"Bearer nope") is None and buyers.identify(None) is None
    assert [buyers.admit(buyer) is None for _ in range(3)] == [True, True, False]
    open_door = Buyers.load(None, rate_per_s=50, max_body_bytes=1000)
    assert open_door.is_open and open_door.identify(None) is not None
    path.write_text('[buyers."a/b"]\ntoken_sha256 = "' + "0" * 64 + '"\n')
    with pytest.raises(ConfigError, match="one MQTT topic level"):
        Buyers.load(path, rate_per_s=50, max_body_bytes=1000)
    path.write_text('[buyers.x]\ntoken_sha256 = "short"\n')
    with pytest.raises(ConfigError, match="64 lowercase hex"):
        Buyers.load(path, rate_per_s=50, max_body_bytes=1000)


def test_catalogue_pins_names_to_files_and_tolerances(tmp_path: Path) -> None:
    path = tmp_path / "catalogue.toml"
    path.write_text(
        '[models.detector]\nsha256 = "' + "a" * 64 + '"\nsamples = "golden/samples.npz"\n'
        '[models.detector.tolerances]\n"fp32/cpu~int8/cpu" = [0.1, 0.05]\n'
    )
    entry = Catalogue.load(path).entries["detector"]  # type: ignore[index]
    assert entry.files == frozenset({"a" * 64})
    assert entry.samples == tmp_path / "golden" / "samples.npz"
    assert entry.tolerance("int8/cpu", "fp32/cpu") == (0.1, 0.05)
    path.write_text('[models.detector]\nsha256 = "' + "a" * 64 + '"\nsha = 1\n')
    with pytest.raises(ConfigError, match="unknown key 'sha'"):
        Catalogue.load(path)


def test_cli_verbs() -> None:
    parser = build_parser()
    for argv in (
        ["platform", "gateway", "--broker", "mqtt://h:1"],
        ["platform", "watch", "--gateway", "http://h:8100", "--once"],
        ["platform", "submit", "--broker", "mqtt://h", "--model", "m", "--input", "x.npy"],
        ["pool", "watch", "--broker", "mqtt://h"],
        ["pool", "submit", "--broker", "mqtt://h", "--model", "m", "--input", "x.npy"],
    ):
        assert callable(parser.parse_args(argv).func)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"APPLIANCE_GATWAY__PORT": "9"}, "APPLIANCE_GATWAY__PORT: not a setting"),
        ({"APPLIANCE_GATEWAY_PORT": "9"}, "APPLIANCE_GATEWAY_PORT: not a setting"),
        ({"APPLIANCE_GATEWAY__SITE": "#"}, "one non-empty MQTT topic level"),
        ({"APPLIANCE_GATEWAY__SITE": "a/b"}, "one non-empty MQTT topic level"),
        ({"APPLIANCE_GATEWAY__BROKER": "not a url"}, "expected mqtt://host"),
        ({"APPLIANCE_GATEWAY__BROKER": "mqtts://gw:pw-secret@pool:8883"}, "credentials in the broker URL"),
    ],
)
def test_what_the_gateway_would_have_ignored_or_choked_on_is_refused(environ: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        PlatformSettings.load(None, environ=environ)
    assert "pw-secret" not in str(caught.value)


def test_the_box_s_variables_and_every_site_stay_accepted() -> None:
    environ = {"APPLIANCE_POOL__BROKER": "mqtt://b:1883", "APPLIANCE_BIN": "/usr/bin/appliance"}
    assert PlatformSettings.load(None, environ=environ).gateway.site == "+"
    one_site = PlatformSettings.load(None, environ={"APPLIANCE_GATEWAY__SITE": "plant-7"})
    assert one_site.gateway.site == "plant-7"


def test_a_gateway_credential_that_is_not_text_is_one_error_without_its_bytes(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "gateway.password").write_bytes(b"p\xe4ss")
    with pytest.raises(ConfigError, match=r"gateway\.password.*not UTF-8 text") as caught:
        PlatformSettings.load(None, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert "\\xe4" not in str(caught.value)
