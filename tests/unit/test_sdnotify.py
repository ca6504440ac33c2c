"""sd_notify contract against a real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.system import sdnotify
from appliance.system.sdnotify import Notifier, listen_fds


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """What systemd listens on: a bound datagram socket and the NOTIFY_SOCKET value naming it."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield str(path), sock


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_no_notify_socket_is_a_silent_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.is_enabled
    assert notifier.ready("warm") is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval_s() is None


def test_ready_carries_status(manager: tuple[str, socket.socket]) -> None:
    address, sock = manager
    with Notifier.from_env({"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.ready("3 models warm") is True
    assert received(sock) == ["READY=1", "STATUS=3 models warm"]


def test_each_message_is_one_datagram(manager: tuple[str, socket.socket]) -> None:
    address, sock = manager
    with Notifier.from_env({"NOTIFY_SOCKET": address}) as notifier:
        notifier.status("loading\nresnet50")
        notifier.watchdog()
        notifier.stopping("draining")
        notifier.extend_timeout(2.5)
        notifier.reloading()
    assert received(sock) == ["STATUS=loading resnet50"]
    assert received(sock) == ["WATCHDOG=1"]
    assert received(sock) == ["STOPPING=1", "STATUS=draining"]
    assert received(sock) == ["EXTEND_TIMEOUT_USEC=2500000"]
    reload_fields = received(sock)
    assert reload_fields[0] == "RELOADING=1"
    assert reload_fields[1].startswith("MONOTONIC_USEC=") and reload_fields[1][15:].isdigit()


def test_abstract_namespace_address() -> None:
    name = f"appliance-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        with Notifier.from_env({"NOTIFY_SOCKET": "@" + name}) as notifier:
            assert notifier.ready() is True
        assert received(sock) == ["READY=1"]


def test_extend_timeout_refuses_non_positive(manager: tuple[str, socket.socket]) -> None:
    with (
        Notifier.from_env({"NOTIFY_SOCKET": manager[0]}) as notifier,
        pytest.raises(ValueError, match="positive number of seconds, got 0"),
    ):
        notifier.extend_timeout(0)


def test_vanished_socket_never_raises_and_logs_once(
    manager: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    address, sock = manager
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    sock.close()
    os.unlink(address)
    with caplog.at_level(logging.WARNING, logger=sdnotify.__name__):
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
    notifier.close()
    assert len(caplog.records) == 1
    assert address in caplog.records[0].getMessage()


def test_unusable_notify_socket_disables_notification(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=sdnotify.__name__):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.is_enabled
    assert "expected an absolute path or an @abstract name" in caplog.text


@pytest.mark.parametrize(
    ("environ", "expected_s"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_this_process(
    environ: dict[str, str], expected_s: float | None
) -> None:
    assert Notifier.from_env(environ, pid=4242).watchdog_interval_s() == expected_s


def test_listen_fds_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = socket.socket(), socket.socket()
    base = 200  # well above what the test process has open; stands in for fd 3
    try:
        os.dup2(first.fileno(), base)
        os.dup2(second.fileno(), base + 1)
        monkeypatch.setattr(sdnotify, "SD_LISTEN_FDS_START", base)
        environ = {"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "http:"}
        assert listen_fds(environ, pid=4242) == {"http": [base], "unknown": [base + 1]}
        assert not os.get_inheritable(base)
        assert listen_fds({**environ, "LISTEN_PID": "1"}, pid=4242) == {}
    finally:
        for fd in (base, base + 1):
            os.close(fd)
        first.close()
        second.close()
