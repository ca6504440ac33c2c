"""`appliance provision`: install units, config, sysusers/tmpfiles, presets and secrets into a root."""

from __future__ import annotations

import argparse
import posixpath
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from appliance.errors import ApplianceError, ConfigError
from appliance.pool import identity, signing
from appliance.settings import INSTALLED_MODELS, SYSTEM_CONFIG_FILE, Settings
from appliance.system.installer import InstallReport, ManagedFile, install, read_record, write_record

SHIPPED_EXECUTABLE = "/usr/bin/appliance"
UNIT_DIR = PurePosixPath("usr/lib/systemd/system")  # vendor units; /etc stays the admin's to override
DROPIN_DIR = PurePosixPath("etc/systemd/system/appliance.service.d")  # per-box choices
CONFIG = PurePosixPath(str(SYSTEM_CONFIG_FILE).lstrip("/"))
STAMP = CONFIG.parent / "provisioned.json"
CREDSTORE = PurePosixPath("etc/credstore")  # LoadCredential= finds appliance.* there (systemd >= 251)
DEVICE_KEY = CREDSTORE / f"appliance.{identity.CREDENTIAL}"  # LoadCredential=pool.device_key:...
UNITS = ("appliance.service", "appliance.socket", "appliance-healthcheck.service")
PRESET_RECORD = "systemctl preset"  # in provisioned.json: the units whose preset has been applied
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # one MQTT topic level, no wildcards
_EXEC_PATH = re.compile(r"^/[A-Za-z0-9._/+-]+$")  # needs no quoting or %-escaping in a unit file
_HIDDEN = {  # where the hardened unit cannot see the host's files, and the setting that hides them
    "/home/": "ProtectHome=yes",
    "/root/": "ProtectHome=yes",
    "/run/user/": "ProtectHome=yes",
    "/tmp/": "PrivateTmp=yes",
    "/var/tmp/": "PrivateTmp=yes",
}

Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]
ProvisionReport = InstallReport


def units_source() -> Path:
    """The shipped systemd/ folder: a checkout's, else the one a wheel installs under share/."""
    candidates = [Path(__file__).resolve().parents[2] / "systemd"]
    for prefix in (sysconfig.get_path("data"), sys.prefix):  # pyproject's [tool.setuptools.data-files]
        candidate = Path(prefix) / "share" / "appliance" / "systemd"
        if candidate not in candidates:
            candidates.append(candidate)
    for candidate in candidates:
        if (candidate / "appliance.service").is_file():
            return candidate
    raise ConfigError(f"shipped unit files not found; looked in {', '.join(map(str, candidates))}")


def accelerators(source: Path | None = None) -> list[str]:
    """Names accepted by --accelerator: the drop-ins shipped in systemd/appliance.service.d/."""
    return sorted(p.stem for p in ((source or units_source()) / "appliance.service.d").glob("*.conf"))


def default_executable() -> Path:
    """The `appliance` script of this installation (a venv's bin/ first), else /usr/bin/appliance."""
    beside = Path(sys.executable).parent / "appliance"
    if beside.is_file():
        return beside
    found = shutil.which("appliance")
    return Path(found) if found else Path(SHIPPED_EXECUTABLE)


def provision(
    root: Path,
    *,
    node_id: str | None = None,
    site: str | None = None,
    broker: str | None = None,
    mqtt_username: str | None = None,
    mqtt_password_file: Path | None = None,
    api_token_file: Path | None = None,
    model_repository: Path | None = None,
    host: str | None = None,
    port: int | None = None,
    accelerator: Sequence[str] = (),
    executable: Path | None = None,
    force: bool = False,
    rotate_key: bool = False,
    apply: bool = False,
    run: Runner | None = None,
    source: Path | None = None,
) -> InstallReport:
    """Make `root` hold what appliance.service needs; idempotent. Raises ConfigError on bad input.

    Files this function wrote before (their sha256 is in /etc/appliance/provisioned.json) are
    updated; files edited since, or not written by it, are refused unless `force`, and then
    nothing at all is written. With `apply`, systemd-sysusers, systemd-tmpfiles and `systemctl
    preset` (once per unit, see `_units_to_preset`) run against `root`.
    """
    source = source or units_source()
    executable = executable or default_executable()
    _check_executable(executable)
    known = accelerators(source)
    unknown = sorted(set(accelerator) - set(known))
    if unknown:
        raise ConfigError(f"unknown accelerator {', '.join(unknown)}; known: {', '.join(known)}")
    config = _config(node_id, site, broker, mqtt_username, model_repository, host, port)
    files = [*_shipped(source, str(executable), accelerator), ManagedFile(CONFIG, config, 0o644)]
    for name, secret in (("pool.password", mqtt_password_file), ("server.api_token", api_token_file)):
        if secret is not None:
            path = CREDSTORE / f"appliance.{name}"
            files.append(ManagedFile(path, _read_secret(secret), 0o600, is_tracked=False))
    files.append(ManagedFile(DEVICE_KEY, _device_key(root, rotate_key), 0o600, is_tracked=False))

    removable = [DROPIN_DIR / f"{name}.conf" for name in known]
    report = install(root, files, stamp=STAMP, removable=removable, force=force)
    is_first_install = all("/" + str(UNIT_DIR / unit) in report.created for unit in UNITS)
    if report.is_complete and is_first_install and read_record(root, STAMP, PRESET_RECORD) is None:
        write_record(root, STAMP, PRESET_RECORD, [])  # no preset applied yet: `_apply` does it, now or later
    if apply and report.is_complete:
        _apply(root, run or _run, report)
    return report


def _device_key(root: Path, rotate: bool) -> bytes:
    """The key file as it is (kept across runs), or a new key on first run or with `rotate`."""
    existing = root / DEVICE_KEY
    if existing.is_file() and not rotate:
        identity.read_key(existing)  # a damaged key is a ConfigError naming the file, not a silent swap
        return existing.read_bytes()
    return identity.pem(identity.generate())


def _shipped(source: Path, executable: str, chosen: Sequence[str]) -> list[ManagedFile]:
    files = []
    for unit in UNITS:
        text = (source / unit).read_text()
        if executable != SHIPPED_EXECUTABLE:
            shipped = rf"^(Exec\w+=){re.escape(SHIPPED_EXECUTABLE)}(?=\s|$)"
            text = re.sub(shipped, rf"\g<1>{executable}", text, flags=re.MULTILINE)
        files.append(ManagedFile(UNIT_DIR / unit, text.encode(), 0o644))
    for name, target in (
        ("appliance.sysusers", "usr/lib/sysusers.d/appliance.conf"),
        ("appliance.tmpfiles", "usr/lib/tmpfiles.d/appliance.conf"),
        ("90-appliance.preset", "usr/lib/systemd/system-preset/90-appliance.preset"),
    ):
        files.append(ManagedFile(PurePosixPath(target), (source / name).read_bytes(), 0o644))
    for name in chosen:
        content = (source / "appliance.service.d" / f"{name}.conf").read_bytes()
        files.append(ManagedFile(DROPIN_DIR / f"{name}.conf", content, 0o644))
    return files


def _config(
    node_id: str | None,
    site: str | None,
    broker: str | None,
    mqtt_username: str | None,
    model_repository: Path | None,
    host: str | None,
    port: int | None,
) -> bytes:
    """appliance.toml for these options, checked by loading it the way the service will."""
    for name, value in (("node id", node_id), ("site", site)):
        if value is not None and not _NAME.match(value):
            raise ConfigError(
                f"{name} {value!r}: use 1-64 letters, digits, '.', '_' or '-' (it is an MQTT topic level)"
            )
    if broker is not None and not re.match(r"^mqtts?://[^/\s]+$", broker):
        raise ConfigError(f"broker {broker!r}: expected mqtt://host:port or mqtts://host:port")
    if model_repository is not None:
        if not model_repository.is_absolute():
            raise ConfigError(f"model repository {model_repository}: expected an absolute path on the box")
        _check_visible(
            f"model repository {model_repository}",
            model_repository,
            f"put the models under {INSTALLED_MODELS}",
        )
    sections: dict[str, dict[str, Any]] = {
        "server": {"host": host, "port": port},
        "models": {"repository": str(model_repository or INSTALLED_MODELS)},  # never the bundled demo
        "pool": {"broker": broker, "site": site, "node_id": node_id, "username": mqtt_username},
    }
    lines = [
        "# Written by `appliance provision`. Edits are kept: it refuses to overwrite them without --force.",
        "# Every setting and its default: `appliance config-schema`.",
    ]
    for section, values in sections.items():
        present = {k: v for k, v in values.items() if v is not None}
        if present:
            lines += ["", f"[{section}]", *(f"{k} = {_toml_value(v)}" for k, v in present.items())]
    text = "\n".join(lines) + "\n"
    with tempfile.TemporaryDirectory() as scratch:
        candidate = Path(scratch) / "appliance.toml"
        candidate.write_text(text)
        try:
            Settings.load(candidate, environ={})
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(str(candidate), "the options given")) from exc
    return text.encode()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"cannot write {value!r} to appliance.toml")
    if isinstance(value, int):
        return str(value)
    return '"' + "".join(_toml_char(ch) for ch in value) + '"'


def _toml_char(ch: str) -> str:
    if ch.isprintable() and ch not in '"\\':
        return ch
    return f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}"


def _check_executable(executable: Path) -> None:
    text = str(executable)
    if not _EXEC_PATH.match(text):
        raise ConfigError(f"executable {text!r}: expected an absolute path of letters, digits and ._/+-")
    _check_visible(
        f"executable {text}", executable, "install appliance under /opt or /usr and pass --executable"
    )


def _check_visible(what: str, path: Path, instead: str) -> None:
    """ConfigError unless the hardened unit can see `path` (ProtectHome=, PrivateTmp= hide some)."""
    normalized = posixpath.normpath(str(path)) + "/"
    for hidden, setting in _HIDDEN.items():
        if normalized.startswith(hidden):
            raise ConfigError(f"{what} is under {hidden}, which {setting} hides from the service; {instead}")


def _read_secret(path: Path) -> bytes:
    """The secret as the service will read it back: UTF-8, without surrounding whitespace (one final
    newline is dropped). Anything the reader would change or fail on is refused, never altered."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"secret file {path}: cannot be read ({exc.strerror})") from exc
    body = raw.removesuffix(b"\n").removesuffix(b"\r") if raw.endswith(b"\n") else raw
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        # `from None`: the decode error's repr holds the secret's bytes
        raise ConfigError(f"secret file {path}: not UTF-8 text; the service reads secrets as UTF-8") from None
    if not text.strip():
        raise ConfigError(f"secret file {path}: empty, or only whitespace")
    if text != text.strip():
        raise ConfigError(
            f"secret file {path}: starts or ends with whitespace (beyond one final newline), which the "
            "service strips when it reads the secret; remove it from the file"
        )
    return body


def _apply(root: Path, run: Runner, report: InstallReport) -> None:
    for command in (
        ["systemd-sysusers", f"--root={root}", "appliance.conf"],
        ["systemd-tmpfiles", "--create", f"--root={root}", "appliance.conf"],
    ):
        _checked(run, command, report)
    recorded = read_record(root, STAMP, PRESET_RECORD)
    if recorded is not None and not (
        isinstance(recorded, list) and all(isinstance(unit, str) for unit in recorded)
    ):
        raise ConfigError(f"/{STAMP}: {PRESET_RECORD!r} must be a list of unit names; delete the entry")
    pending = _units_to_preset(root, recorded, run, report)
    if pending:
        _checked(run, ["systemctl", f"--root={root}", "preset", *pending], report)
    # Only now, after the preset succeeded: a run that failed before it presets on the next run.
    write_record(root, STAMP, PRESET_RECORD, sorted({*(recorded or []), *UNITS}))


def _units_to_preset(root: Path, recorded: list[str] | None, run: Runner, report: InstallReport) -> list[str]:
    """Units whose preset was never applied. Presets are for first install: afterwards the units'
    enablement is the admin's (`systemctl disable appliance.service` stays disabled across runs).

    provisioned.json records the units once their preset succeeded ([] when provision installed
    them, so a --no-apply run or one that failed before the preset leaves them to the next run). A
    root without the record was provisioned before it existed: there the units tell. If every one
    is still "disabled", nothing ever enabled them and all get their preset; any other state
    (enabled, masked) is a choice to keep, and only units new in this run get theirs.
    """
    if recorded is not None:
        return [unit for unit in UNITS if unit not in recorded]
    present = [unit for unit in UNITS if "/" + str(UNIT_DIR / unit) not in report.created]
    command = ["systemctl", f"--root={root}", "is-enabled", *present]
    result = _checked(run, command, report, allowed_returncodes=(0, 1))  # 1: none is enabled
    states = result.stdout.split()
    if len(states) != len(present):
        raise ApplianceError(f"{' '.join(command)}: no state for every unit: {result.stderr.strip()}")
    if all(state == "disabled" for state in states):
        return list(UNITS)
    return [unit for unit in UNITS if unit not in present]  # keep the others as someone left them


def _checked(
    run: Runner, command: list[str], report: InstallReport, allowed_returncodes: Sequence[int] = (0,)
) -> subprocess.CompletedProcess[str]:
    result = run(command)
    report.commands.append(" ".join(command))
    if result.returncode not in allowed_returncodes:
        raise ApplianceError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ApplianceError(f"{command[0]} not found; install systemd or pass --no-apply") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `appliance provision`; sets `func` to `run` for the CLI's dispatch."""
    parser.set_defaults(func=run)
    parser.add_argument("--root", type=Path, default=Path("/"), help="Install into this root (default /).")
    parser.add_argument("--node-id", help="Node name in the MQTT topic root (default: hostname).")
    parser.add_argument("--site", help="Site name in the MQTT topic root.")
    parser.add_argument("--broker", help="mqtt://host:port or mqtts://host:port of the pool.")
    parser.add_argument("--mqtt-username", help="MQTT user name.")
    parser.add_argument("--mqtt-password-file", type=Path, help="File holding the MQTT password.")
    parser.add_argument("--api-token-file", type=Path, help="File holding the HTTP API bearer token.")
    parser.add_argument(
        "--model-repository", type=Path, help=f"Model repository on the box (default {INSTALLED_MODELS})."
    )
    parser.add_argument("--host", help="Address the HTTP API listens on.")
    parser.add_argument("--port", type=int, help="TCP port of the HTTP API.")
    parser.add_argument(
        "--accelerator",
        action="append",
        default=[],
        metavar="NAME",
        help="Install this accelerator drop-in (repeatable): " + ", ".join(_known_or_empty()) + ".",
    )
    parser.add_argument("--executable", type=Path, help="Path of `appliance` on the box (default: this one).")
    parser.add_argument("--force", action="store_true", help="Replace files edited since the last run.")
    parser.add_argument(
        "--rotate-key",
        action="store_true",
        help="Make a new device key (pool answers are signed with it); platforms refuse the node until "
        "an operator runs `appliance platform nodes trust NODE`.",
    )
    parser.add_argument(
        "--no-apply",
        dest="apply",
        action="store_false",
        help="Only write files; skip systemd-sysusers, systemd-tmpfiles and systemctl preset.",
    )


def run(args: argparse.Namespace) -> int:
    """`appliance provision`: 0 when everything is in place, 1 on refusals; bad options raise ConfigError."""
    report = provision(
        args.root,
        node_id=args.node_id,
        site=args.site,
        broker=args.broker,
        mqtt_username=args.mqtt_username,
        mqtt_password_file=args.mqtt_password_file,
        api_token_file=args.api_token_file,
        model_repository=args.model_repository,
        host=args.host,
        port=args.port,
        accelerator=args.accelerator,
        executable=args.executable,
        force=args.force,
        rotate_key=args.rotate_key,
        apply=args.apply,
    )
    done = (("wrote", report.written), ("removed", report.removed), ("unchanged", report.unchanged))
    for label, paths in done:
        for path in paths:
            print(f"{label:<10}{path}")
    for command in report.commands:
        print(f"{'ran':<10}{command}")
    key_file = args.root / DEVICE_KEY
    if report.is_complete and key_file.is_file():
        print(f"{'key':<10}{signing.public_key_text(identity.read_key(key_file))} (/{DEVICE_KEY})")
    for path, reason in report.refused:
        print(f"{'refused':<10}{path}: {reason}", file=sys.stderr)
    if report.refused:
        print("appliance provision: nothing written; see the refusals above", file=sys.stderr)
    elif report.written and args.root == Path("/"):
        print("next: systemctl daemon-reload && systemctl restart appliance.service")
    return 0 if report.is_complete else 1


def _known_or_empty() -> list[str]:
    try:
        return accelerators()
    except ConfigError:
        return []
