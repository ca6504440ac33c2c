"""The gateway's connection bounds: the box's [server] names and defaults under [gateway], and the open
files they need."""

from __future__ import annotations

import resource
import subprocess
import sys
import typing

import pytest

from appliance.errors import ConfigError
from appliance.platform.service import OTHER_FILES
from appliance.platform.settings import GatewaySettings, PlatformSettings
from appliance.server.connections import ConnectionBounds
from appliance.settings import ServerSettings

SHARED = ("max_header_bytes", "header_timeout_s", "body_timeout_s", "idle_timeout_s")
LIMITS = ("max_connections", "max_connections_per_peer")


def test_the_gateway_has_every_bound_its_connections_read_under_the_boxs_names() -> None:
    bounds = typing.get_type_hints(ConnectionBounds)
    for name in (*bounds, *LIMITS):
        assert name in GatewaySettings.model_fields, name
    gateway, box = GatewaySettings(), ServerSettings()
    for name in (*SHARED, *LIMITS):
        assert getattr(gateway, name) == getattr(box, name), name


def test_the_bounds_come_from_the_environment_and_are_checked() -> None:
    environ = {"APPLIANCE_GATEWAY__MAX_CONNECTIONS": "64", "APPLIANCE_GATEWAY__HEADER_TIMEOUT_S": "2.5"}
    gateway = PlatformSettings.load(None, environ=environ).gateway
    assert (gateway.max_connections, gateway.header_timeout_s) == (64, 2.5)
    with pytest.raises(ConfigError, match="max_header_bytes"):
        PlatformSettings.load(None, environ={"APPLIANCE_GATEWAY__MAX_HEADER_BYTES": "100"})


def _open_files_for(max_connections: int, soft: int, hard: str) -> tuple[list[int], str]:
    """open_files_for in a process of its own, started with open files limited to (soft, hard)."""
    script = (
        "import logging, resource\n"
        "from appliance.platform.service import open_files_for\n"
        "logging.basicConfig()\n"
        f"hard = {hard}\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, hard))\n"
        f"now = open_files_for({max_connections})\n"
        "print(now, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return [int(word) for word in done.stdout.split()], done.stderr


def test_the_gateway_raises_its_open_files_limit_towards_what_its_connections_need() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2 * 256 + OTHER_FILES:
        pytest.skip(f"the hard open-files limit here ({hard}) is below what the test asks")
    (now, soft, _), warned = _open_files_for(256, 100, "resource.getrlimit(resource.RLIMIT_NOFILE)[1]")
    assert now == soft == 2 * 256 + OTHER_FILES and not warned
    (now, soft, _), warned = _open_files_for(1024, 100, "300")  # the hard limit is short: a warning
    assert now == soft == 300
    assert "below the 2112 that gateway.max_connections = 1024 needs" in warned and "LimitNOFILE=" in warned
