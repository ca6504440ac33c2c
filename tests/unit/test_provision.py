"""`appliance provision` into a temporary root: what it writes, idempotence, refusals, secrets, CLI."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ConfigError
from appliance.pool import identity, signing
from appliance.settings import INSTALLED_MODELS, Settings
from appliance.system import provision as prov
from appliance.system.provision import accelerators, provision

EXE = Path("/opt/appliance/bin/appliance")
CONFIG = "/etc/appliance/appliance.toml"
SHIPPED = {
    "/usr/lib/systemd/system/appliance.service",
    "/usr/lib/systemd/system/appliance.socket",
    "/usr/lib/systemd/system/appliance-healthcheck.service",
    "/usr/lib/sysusers.d/appliance.conf",
    "/usr/lib/tmpfiles.d/appliance.conf",
    "/usr/lib/systemd/system-preset/90-appliance.preset",
    "/etc/credstore/appliance.pool.device_key",
    CONFIG,
}
IDENTITY: dict[str, Any] = {"node_id": "box-17", "site": "line-3", "broker": "mqtts://pool.example:8883"}


def run_provision(root: Path, **options: Any) -> prov.ProvisionReport:
    return provision(root, executable=EXE, **{**IDENTITY, **options})


def test_fresh_root_gets_everything_and_a_loadable_config(tmp_path: Path) -> None:
    report = run_provision(tmp_path, port=8080, mqtt_username="box")
    assert set(report.written) == SHIPPED
    assert report.created == report.written
    assert report.is_complete
    settings = Settings.load(tmp_path / CONFIG.lstrip("/"), environ={})
    assert (settings.pool.node_id, settings.pool.site) == ("box-17", "line-3")
    assert settings.pool.broker == "mqtts://pool.example:8883"
    assert (settings.pool.username, settings.server.port) == ("box", 8080)
    assert settings.server.host == "127.0.0.1"  # unset options keep their defaults
    assert settings.models.repository == INSTALLED_MODELS  # never the bundled reference models


def test_the_model_repository_option_is_written(tmp_path: Path) -> None:
    run_provision(tmp_path, model_repository=Path("/srv/models"))
    config = tmp_path / CONFIG.lstrip("/")
    assert '[models]\nrepository = "/srv/models"\n' in config.read_text()
    assert Settings.load(config, environ={}).models.repository == Path("/srv/models")


def test_tmpfiles_creates_the_default_repository_for_the_service_user(tmp_path: Path) -> None:
    run_provision(tmp_path)
    lines = (tmp_path / "usr/lib/tmpfiles.d/appliance.conf").read_text().splitlines()
    entries = {line.split()[1]: line.split() for line in lines if line and not line.startswith("#")}
    assert entries[str(INSTALLED_MODELS)] == [
        "d",
        str(INSTALLED_MODELS),
        "0750",
        "appliance",
        "appliance",
        "-",
    ]
    assert list(entries).index(str(INSTALLED_MODELS.parent)) < list(entries).index(str(INSTALLED_MODELS))


def test_units_run_the_installed_executable(tmp_path: Path) -> None:
    run_provision(tmp_path)
    units = tmp_path / "usr/lib/systemd/system"
    assert f"ExecStart={EXE} serve\n" in (units / "appliance.service").read_text()
    assert f"ExecStart={EXE} ota verify\n" in (units / "appliance-healthcheck.service").read_text()
    assert "/usr/bin/appliance" not in (units / "appliance.service").read_text()


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    run_provision(tmp_path, accelerator=["nvidia"])
    stamp = tmp_path / "etc/appliance/provisioned.json"
    recorded = stamp.read_text()
    again = run_provision(tmp_path, accelerator=["nvidia"])
    assert again.written == [] and again.removed == [] and again.refused == []
    assert set(again.unchanged) == SHIPPED | {"/etc/systemd/system/appliance.service.d/nvidia.conf"}
    assert stamp.read_text() == recorded


def test_new_options_rewrite_an_unedited_config(tmp_path: Path) -> None:
    run_provision(tmp_path)
    report = run_provision(tmp_path, site="line-4")
    assert report.written == [CONFIG]
    assert Settings.load(tmp_path / CONFIG.lstrip("/"), environ={}).pool.site == "line-4"


def test_edited_config_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    run_provision(tmp_path)
    config = tmp_path / CONFIG.lstrip("/")
    config.write_text(config.read_text() + "\n[scheduler]\ninstances = 2\n")
    report = run_provision(tmp_path, site="line-4", accelerator=["nvidia"])
    assert report.refused == [
        (CONFIG, "edited since appliance provision wrote it; keep the edit or pass --force to replace it")
    ]
    assert report.written == []
    assert "instances = 2" in config.read_text()
    assert not (tmp_path / "etc/systemd/system/appliance.service.d/nvidia.conf").exists()

    forced = run_provision(tmp_path, site="line-4", force=True)
    assert CONFIG in forced.written
    assert "instances" not in config.read_text()


def test_files_it_did_not_write_are_refused_unless_identical(tmp_path: Path) -> None:
    preset = tmp_path / "usr/lib/systemd/system-preset/90-appliance.preset"
    preset.parent.mkdir(parents=True)
    preset.write_text("disable appliance.service\n")
    report = run_provision(tmp_path)
    assert report.refused == [
        (
            "/" + str(preset.relative_to(tmp_path)),
            "exists and was not written by appliance provision; pass --force to replace it",
        )
    ]
    preset.write_bytes((prov.units_source() / "90-appliance.preset").read_bytes())
    preset.chmod(0o644)
    report = run_provision(tmp_path)
    assert report.is_complete
    assert "/usr/lib/systemd/system-preset/90-appliance.preset" in report.unchanged


def test_accelerator_drop_ins_come_and_go(tmp_path: Path) -> None:
    dropins = tmp_path / "etc/systemd/system/appliance.service.d"
    run_provision(tmp_path, accelerator=["nvidia", "dri-render"])
    assert sorted(p.name for p in dropins.iterdir()) == ["dri-render.conf", "nvidia.conf"]

    (dropins / "local.conf").write_text("[Service]\nNice=5\n")  # the admin's own: never touched
    report = run_provision(tmp_path, accelerator=["nvidia"])
    assert report.removed == ["/etc/systemd/system/appliance.service.d/dri-render.conf"]
    assert sorted(p.name for p in dropins.iterdir()) == ["local.conf", "nvidia.conf"]

    (dropins / "nvidia.conf").write_text("[Service]\nDeviceAllow=char-nvidia-frontend rw\n")
    report = run_provision(tmp_path)
    assert report.refused == [
        (
            "/etc/systemd/system/appliance.service.d/nvidia.conf",
            "no longer wanted, but edited since appliance provision wrote it; "
            "keep the edit or pass --force to replace it",
        )
    ]


def test_secrets_go_to_the_credstore_readable_by_root_only(tmp_path: Path) -> None:
    secret = tmp_path / "password.txt"
    secret.write_text("s3cret\n")
    root = tmp_path / "root"
    run_provision(root, mqtt_password_file=secret)
    stored = root / "etc/credstore/appliance.pool.password"
    assert stored.read_bytes() == b"s3cret"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE(stored.parent.stat().st_mode) == 0o700
    assert "etc/credstore/appliance.pool.password" not in json.loads(
        (root / "etc/appliance/provisioned.json").read_text()
    )
    secret.write_text("rotated")
    assert run_provision(root, mqtt_password_file=secret).written == [
        "/etc/credstore/appliance.pool.password"
    ]
    assert stored.read_bytes() == b"rotated"


def test_the_service_reads_the_credential_under_the_name_settings_expects(tmp_path: Path) -> None:
    unit = (prov.units_source() / "appliance.service").read_text()
    assert "LoadCredential=pool.password:appliance.pool.password\n" in unit
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "pool.password").write_text("s3cret")
    empty = tmp_path / "appliance.toml"
    empty.write_text("")
    settings = Settings.load(empty, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert settings.pool.password is not None
    assert settings.pool.password.get_secret_value() == "s3cret"


def test_the_device_key_is_made_once_kept_and_rotated_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_provision(tmp_path)
    stored = tmp_path / "etc/credstore/appliance.pool.device_key"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert "etc/credstore/appliance.pool.device_key" not in json.loads(
        (tmp_path / "etc/appliance/provisioned.json").read_text()
    )
    first = stored.read_bytes()
    assert "/etc/credstore/appliance.pool.device_key" in run_provision(tmp_path).unchanged
    assert stored.read_bytes() == first
    # The service gets it from systemd under the name the node looks for.
    unit = (prov.units_source() / "appliance.service").read_text()
    assert f"LoadCredential={identity.CREDENTIAL}:appliance.{identity.CREDENTIAL}\n" in unit
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    shutil.copy(stored, credentials / identity.CREDENTIAL)
    key = identity.device_key(tmp_path / "state", credentials)
    assert identity.pem(key) == first
    assert not (tmp_path / "state").exists()  # nothing made in the state directory
    report = run_provision(tmp_path, rotate_key=True)
    assert "/etc/credstore/appliance.pool.device_key" in report.written
    assert stored.read_bytes() != first
    # The CLI prints the public key, the text a platform pins.
    parser = argparse.ArgumentParser(prog="appliance provision")
    prov.add_arguments(parser)
    argv = ["--root", str(tmp_path), "--node-id", "box-17", "--executable", str(EXE), "--no-apply"]
    capsys.readouterr()
    assert prov.run(parser.parse_args(argv)) == 0
    shown = signing.public_key_text(identity.read_key(stored))
    assert f"key       {shown} (/etc/credstore/appliance.pool.device_key)\n" in capsys.readouterr().out
    stored.write_text("damaged")
    with pytest.raises(ConfigError, match="not a readable PEM private key"):
        run_provision(tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"node_id": "box/17"}, "node id 'box/17': use 1-64 letters"),
        ({"site": "#"}, "site '#': use 1-64 letters"),
        ({"broker": "http://pool"}, "expected mqtt://host:port or mqtts://host:port"),
        ({"model_repository": Path("models")}, "model repository models: expected an absolute path"),
        ({"port": 70000}, "setting 'server.port' (from the options given)"),
        ({"accelerator": ["tpu"]}, "unknown accelerator tpu; known: accel-npu, amd-kfd"),
        ({"executable": Path("/root/venv/bin/appliance")}, "which ProtectHome=yes hides from the service"),
        ({"executable": Path("/tmp/venv/bin/appliance")}, "is under /tmp/, which PrivateTmp=yes hides"),
        ({"executable": Path("/var/tmp/x/appliance")}, "is under /var/tmp/, which PrivateTmp=yes hides"),
        ({"executable": Path("/opt/../tmp/appliance")}, "which PrivateTmp=yes hides from the service"),
        ({"executable": Path("bin/appliance")}, "expected an absolute path"),
        ({"mqtt_password_file": Path("/nonexistent/pw")}, "secret file /nonexistent/pw: cannot be read"),
    ],
)
def test_bad_options_are_named_and_nothing_is_written(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        provision(tmp_path, **{**IDENTITY, "executable": EXE, **options})
    assert message in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_apply_runs_system_tools_and_presets_only_new_units(tmp_path: Path) -> None:
    ran: list[list[str]] = []

    def fake_run(command: list[str]) -> subprocess.CompletedProcess[str]:
        ran.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    run_provision(tmp_path, apply=True, run=fake_run)
    assert [c[0] for c in ran] == ["systemd-sysusers", "systemd-tmpfiles", "systemctl"]
    assert ran[2][-3:] == ["appliance.service", "appliance.socket", "appliance-healthcheck.service"]
    ran.clear()
    run_provision(tmp_path, apply=True, run=fake_run)
    assert [c[0] for c in ran] == ["systemd-sysusers", "systemd-tmpfiles"]  # the admin's choices stay


def test_cli_reports_and_exits_nonzero_on_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="appliance provision")
    prov.add_arguments(parser)
    argv = ["--root", str(tmp_path), "--node-id", "box-17", "--executable", str(EXE), "--no-apply"]
    assert prov.run(parser.parse_args([*argv, "--accelerator", "nvidia"])) == 0
    out = capsys.readouterr().out
    assert f"wrote     {CONFIG}\n" in out
    assert "wrote     /etc/systemd/system/appliance.service.d/nvidia.conf\n" in out

    (tmp_path / CONFIG.lstrip("/")).write_text("# mine\n")
    assert prov.run(parser.parse_args([*argv, "--accelerator", "nvidia"])) == 1
    err = capsys.readouterr().err
    assert f"refused   {CONFIG}: edited since appliance provision wrote it" in err
    assert "nothing written" in err

    args = parser.parse_args([*argv, "--accelerator", "tpu"])
    assert args.func is prov.run
    with pytest.raises(ConfigError, match="unknown accelerator tpu"):
        args.func(args)


def test_accelerators_are_the_shipped_drop_ins() -> None:
    assert accelerators() == ["accel-npu", "amd-kfd", "cpu-jit", "dri-render", "nvidia"]


def test_units_are_found_where_a_wheel_installs_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site_packages = tmp_path / "venv/lib/python3.11/site-packages"
    monkeypatch.setattr(prov, "__file__", str(site_packages / "appliance/system/provision.py"))
    monkeypatch.setattr(prov.sysconfig, "get_path", lambda name: str(tmp_path / "venv"))
    monkeypatch.setattr(prov.sys, "prefix", str(tmp_path / "venv"))
    with pytest.raises(ConfigError, match="shipped unit files not found; looked in"):
        prov.units_source()
    shared = tmp_path / "venv/share/appliance/systemd"
    shutil.copytree(Path(__file__).resolve().parents[2] / "systemd", shared)
    assert prov.units_source() == shared


class Systemd:
    """A stand-in for systemd's tools: records each command, fails the ones named in `failing`, and
    keeps enablement the way `systemctl preset`, `disable` and `is-enabled` would."""

    def __init__(self) -> None:
        self.ran: list[list[str]] = []
        self.failing: set[str] = set()
        self.enabled = {unit: False for unit in prov.UNITS}

    def __call__(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        self.ran.append(command)
        verb = command[0] if command[0] != "systemctl" else command[2]
        if verb in self.failing:
            return subprocess.CompletedProcess(command, 1, "", f"{verb}: simulated failure")
        if verb == "preset":
            self.enabled.update({unit: unit != "appliance.socket" for unit in command[3:]})
        if verb == "is-enabled":
            states = ["enabled" if self.enabled[unit] else "disabled" for unit in command[3:]]
            return subprocess.CompletedProcess(
                command, 0 if "enabled" in states else 1, "\n".join(states), ""
            )
        return subprocess.CompletedProcess(command, 0, "", "")

    def verbs(self) -> list[str]:
        return [c[0] if c[0] != "systemctl" else c[2] for c in self.ran]


def test_a_provision_that_failed_before_the_preset_presets_on_the_next_run(tmp_path: Path) -> None:
    systemd = Systemd()
    systemd.failing.add("systemd-tmpfiles")
    with pytest.raises(prov.ApplianceError, match="systemd-tmpfiles: simulated failure"):
        run_provision(tmp_path, apply=True, run=systemd)
    assert "preset" not in systemd.verbs()
    systemd.failing.clear()
    report = run_provision(tmp_path, apply=True, run=systemd)
    assert report.created == []  # every file is there from the failed run
    assert systemd.verbs()[-1] == "preset"
    assert systemd.ran[-1][3:] == list(prov.UNITS)
    assert systemd.enabled["appliance.service"] and systemd.enabled["appliance-healthcheck.service"]
    systemd.ran.clear()
    run_provision(tmp_path, apply=True, run=systemd)
    assert systemd.verbs() == ["systemd-sysusers", "systemd-tmpfiles"]  # once applied, never again


def test_a_failed_preset_is_tried_again(tmp_path: Path) -> None:
    systemd = Systemd()
    systemd.failing.add("preset")
    with pytest.raises(prov.ApplianceError, match="preset: simulated failure"):
        run_provision(tmp_path, apply=True, run=systemd)
    systemd.failing.clear()
    run_provision(tmp_path, apply=True, run=systemd)
    assert systemd.verbs()[-1] == "preset" and systemd.enabled["appliance.service"]


def test_a_no_apply_run_leaves_the_preset_to_the_first_run_that_applies(tmp_path: Path) -> None:
    run_provision(tmp_path)  # apply=False: files only
    systemd = Systemd()
    run_provision(tmp_path, apply=True, run=systemd)
    assert systemd.verbs() == ["systemd-sysusers", "systemd-tmpfiles", "preset"]


def test_a_unit_the_admin_disabled_stays_disabled(tmp_path: Path) -> None:
    systemd = Systemd()
    run_provision(tmp_path, apply=True, run=systemd)
    systemd.enabled["appliance.service"] = False  # systemctl disable appliance.service
    systemd.ran.clear()
    run_provision(tmp_path, apply=True, run=systemd, site="line-4")
    assert "preset" not in systemd.verbs()
    assert not systemd.enabled["appliance.service"]


@pytest.mark.parametrize("was_preset", [True, False], ids=["preset before", "never preset"])
def test_a_root_provisioned_before_the_preset_record_keeps_its_enablement(
    tmp_path: Path, was_preset: bool
) -> None:
    systemd = Systemd()
    run_provision(tmp_path, apply=was_preset, run=systemd)
    stamp = tmp_path / "etc/appliance/provisioned.json"
    digests = json.loads(stamp.read_text())
    del digests[prov.PRESET_RECORD]  # a provisioned.json as earlier versions wrote it
    stamp.write_text(json.dumps(digests))
    systemd.enabled["appliance.service"] = False  # the admin's choice, if it was ever preset
    systemd.ran.clear()
    run_provision(tmp_path, apply=True, run=systemd)
    assert "is-enabled" in systemd.verbs()
    assert ("preset" in systemd.verbs()) is not was_preset
    assert systemd.enabled["appliance.service"] is not was_preset
    assert systemd.enabled["appliance-healthcheck.service"]
    assert sorted(json.loads(stamp.read_text())[prov.PRESET_RECORD]) == sorted(prov.UNITS)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"p\xe4ss\n", "not UTF-8 text"),
        (b"  pass word\n", "starts or ends with whitespace"),
        (b"pass word \n", "starts or ends with whitespace"),
        (b"pass\n\n", "starts or ends with whitespace"),
        (b"\tpass", "starts or ends with whitespace"),
        (b"\n", "empty"),
        (b"", "empty"),
    ],
)
def test_a_secret_the_service_would_read_differently_is_refused(
    tmp_path: Path, content: bytes, message: str
) -> None:
    secret = tmp_path / "pw"
    secret.write_bytes(content)
    root = tmp_path / "root"
    with pytest.raises(ConfigError) as raised:
        run_provision(root, mqtt_password_file=secret)
    assert str(raised.value).startswith(f"secret file {secret}: {message}")
    assert "p\\xe4ss" not in str(raised.value) and "pass" not in str(raised.value)
    chained = raised.value.__cause__ or (
        None if raised.value.__suppress_context__ else raised.value.__context__
    )
    assert chained is None  # a traceback shows no UnicodeDecodeError holding the secret's bytes
    assert not root.exists()


@pytest.mark.parametrize("content", [b"s3cret", b"s3cret\n", b"s3cret\r\n", "pässwörd\n".encode(), b"a b"])
def test_an_installed_secret_reads_back_as_it_was_given(tmp_path: Path, content: bytes) -> None:
    secret = tmp_path / "pw"
    secret.write_bytes(content)
    root = tmp_path / "root"
    run_provision(root, mqtt_password_file=secret)
    credentials = tmp_path / "credentials"  # what LoadCredential= hands the service
    credentials.mkdir()
    shutil.copy(root / "etc/credstore/appliance.pool.password", credentials / "pool.password")
    empty = tmp_path / "appliance.toml"
    empty.write_text("")
    settings = Settings.load(empty, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert settings.pool.password is not None
    expected = content.decode().removesuffix("\n").removesuffix("\r")
    assert settings.pool.password.get_secret_value() == expected


@pytest.mark.parametrize(
    ("repository", "hidden"),
    [
        ("/home/me/models", "/home/, which ProtectHome=yes"),
        ("/root/models", "/root/, which ProtectHome=yes"),
        ("/run/user/0/models", "/run/user/, which ProtectHome=yes"),
        ("/tmp/models", "/tmp/, which PrivateTmp=yes"),
        ("/var/tmp/models", "/var/tmp/, which PrivateTmp=yes"),
        ("/srv/../tmp/models", "/tmp/, which PrivateTmp=yes"),
        ("/tmp", "/tmp/, which PrivateTmp=yes"),
    ],
)
def test_a_model_repository_the_unit_cannot_see_is_refused(
    tmp_path: Path, repository: str, hidden: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        run_provision(tmp_path, model_repository=Path(repository))
    assert str(raised.value) == (
        f"model repository {repository} is under {hidden} hides from the service; "
        f"put the models under {INSTALLED_MODELS}"
    )
    assert list(tmp_path.iterdir()) == []


def assert_durable(events: list[tuple[str, ...]], root: Path, paths: set[str]) -> None:
    """Each file was fsynced under its temporary name, renamed over its path, and its folder fsynced."""
    for path in paths:
        target = str(root) + path
        renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == target]
        assert renames, f"{path} was not renamed into place: {events}"
        at = renames[-1]
        scratch = events[at][1]
        assert Path(scratch).parent == Path(target).parent and Path(scratch).name.startswith(".")
        assert ("fsync", scratch) in events[:at], f"{path}: no fsync of {scratch} before the rename"
        assert ("fsync", str(Path(target).parent)) in events[at:], f"{path}: folder not fsynced after"
    for folder in {str(Path(str(root) + path).parent) for path in paths}:  # folders it made, too
        made = Path(folder)
        while made != root:
            assert ("fsync", str(made.parent)) in events, f"{made.parent} not fsynced after making {made}"
            made = made.parent


STAMPED = SHIPPED | {"/etc/appliance/provisioned.json"}


def test_every_file_is_fsynced_before_and_its_folder_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.fsync and os.replace watched in-process (the strace test below sees the system calls)."""
    events: list[tuple[str, ...]] = []
    fsync, replace = os.fsync, os.replace

    def watched_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def watched_replace(source: Any, target: Any) -> None:
        replace(source, target)
        events.append(("rename", str(source), str(target)))

    monkeypatch.setattr(os, "fsync", watched_fsync)
    monkeypatch.setattr(os, "replace", watched_replace)
    root = tmp_path / "root"
    root.mkdir()
    run_provision(root)
    assert_durable(events, root, STAMPED)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_the_system_calls_make_every_file_durable(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    trace = tmp_path / "trace"
    argv = ["provision", "--root", str(root), "--executable", str(EXE), "--node-id", "box-17", "--no-apply"]
    syscalls = "trace=fsync,fdatasync,rename,renameat,renameat2"
    result = subprocess.run(
        [
            "strace",
            "-f",
            "-y",
            "-qq",
            "-e",
            syscalls,
            "-o",
            str(trace),
            sys.executable,
            "-m",
            "appliance",
            *argv,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 and "ptrace" in result.stderr:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    events: list[tuple[str, ...]] = []
    for line in trace.read_text().splitlines():
        if synced := re.search(r"\b(?:fsync|fdatasync)\(\d+<(.+)>\)\s+= 0$", line):
            events.append(("fsync", synced.group(1)))
        elif renamed := re.search(r"\brename\w*\((.*)\)\s+= 0$", line):
            source, target = re.findall(r'"([^"]*)"', renamed.group(1))[-2:]
            events.append(("rename", source, target))
    assert_durable(events, root, STAMPED)
