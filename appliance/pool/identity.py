"""The node's Ed25519 device key: from systemd credentials, else made once in the state directory (0600)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.errors import ConfigError

log = logging.getLogger(__name__)

CREDENTIAL = "pool.device_key"  # LoadCredential=pool.device_key:/etc/credstore/appliance.pool.device_key
STATE_FILE = "device-key.pem"


def credentials_directory() -> Path | None:
    """systemd's $CREDENTIALS_DIRECTORY (LoadCredential=), if the service was given one."""
    found = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(found) if found else None


def device_key(
    state_dir: Path,
    credentials_dir: Path | None = None,
    *,
    credential: str = CREDENTIAL,
    state_file: str = STATE_FILE,
) -> Ed25519PrivateKey:
    """The credential `pool.device_key` if systemd passed one, else <state_dir>/device-key.pem, created
    with mode 0600 on first start. A key file others may read, or one that is not an Ed25519 PEM key,
    is a ConfigError naming the file. The gateway keeps its own key the same way, under other names."""
    if credentials_dir is not None and (credentials_dir / credential).is_file():
        return read_key(credentials_dir / credential)
    path = state_dir / state_file
    if path.exists():
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"device key {path} may be read by others "
                f"(mode {path.stat().st_mode & 0o777:o}); chmod 600 it"
            )
        return read_key(path)
    key = generate()
    write_key(path, key)
    log.info("Ed25519 key created in %s", path)
    return key


def read_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"device key {path}: not a readable PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"device key {path}: an Ed25519 key is needed, this is {type(key).__name__}")
    return key


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def pem(key: Ed25519PrivateKey) -> bytes:
    """The key as an unencrypted PKCS#8 PEM file holds it."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write a new key file, mode 0600 from its creation (never readable by others, even briefly);
    refuses to overwrite (FileExistsError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(pem(key))
        stream.flush()
        os.fsync(stream.fileno())
