"""Test brokers: mosquitto on an ephemeral 127.0.0.1 port, or amqtt (MQTT 3.1.1) without mosquitto."""

from __future__ import annotations

import getpass
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

BROKER_ENV = "POOL_TEST_BROKER"
START_TIMEOUT_S = 20.0
_READY = {
    "mosquitto": re.compile(r"mosquitto version \S+ running"),
    "amqtt": re.compile(r"Listener 'default' bind to"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


@dataclass
class Broker:
    """One broker process; `stop()` and `start()` again keep the port (a broker restart mid-run)."""

    kind: str
    directory: Path
    port: int = field(default_factory=free_port)
    tls: TlsFiles | None = None
    password_file: Path | None = None
    acl_file: Path | None = None
    is_persistent: bool = False  # mosquitto keeps sessions and queued messages across a restart
    max_packet_bytes: int | None = None  # mosquitto's max_packet_size: what it takes, and tells clients
    process: subprocess.Popen[str] | None = None
    log: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def is_v5(self) -> bool:
        return self.kind == "mosquitto"

    def start(self) -> None:
        command = self._command()
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=_pump, args=(self.process, lines, self.log), daemon=True)
        self._reader.start()
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                pytest.fail(f"{self.kind} did not start in {START_TIMEOUT_S}s:\n" + "".join(self.log))
            if line is None:
                pytest.fail(f"{self.kind} exited at start:\n" + "".join(self.log))
            if _READY[self.kind].search(line):
                return

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        if self._reader is not None:
            self._reader.join(10)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = self._reader = None

    def _command(self) -> list[str]:
        if self.kind == "mosquitto":
            config = self.directory / "mosquitto.conf"
            config.write_text(self._mosquitto_config())
            return [_mosquitto(), "-c", str(config)]
        config = self.directory / "amqtt.yaml"
        config.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
        )
        return [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(config)]

    def _mosquitto_config(self) -> str:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence true" if self.is_persistent else "persistence false",
            f"persistence_location {self.directory}/",
            "log_dest stderr",
            f"user {getpass.getuser()}",  # as root, mosquitto would switch to a user who cannot read tmp_path
        ]
        if self.password_file is not None:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        else:
            lines.append("allow_anonymous true")
        if self.max_packet_bytes is not None:
            lines.append(f"max_packet_size {self.max_packet_bytes}")
        if self.tls is not None:
            lines += [f"cafile {self.tls.ca}", f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]
        return "\n".join(lines) + "\n"


def _mosquitto() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )
    assert found is not None
    return found


def default_kind() -> str:
    wanted = os.environ.get(BROKER_ENV)
    if wanted:
        return wanted
    has_mosquitto = shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto")
    return "mosquitto" if has_mosquitto else "amqtt"


def _pump(process: subprocess.Popen[str], lines: queue.Queue[str | None], log: list[str]) -> None:
    assert process.stderr is not None
    for line in process.stderr:
        log.append(line)
        lines.put(line)
    lines.put(None)


def tls_files(directory: Path) -> TlsFiles:
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    authority.cert_pem.write_to_path(str(files.ca))
    issued.cert_chain_pems[0].write_to_path(str(files.cert))
    issued.private_key_pem.write_to_path(str(files.key))
    return files
