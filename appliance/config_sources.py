"""Where settings come from: TOML file, APPLIANCE_ variables, systemd credentials; errors naming it."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import stat
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ConfigDict, ValidationError

from appliance.errors import ConfigError

ENV_PREFIX = "APPLIANCE_"
ENV_NESTING = "__"
NOT_SETTINGS = frozenset({"APPLIANCE_BIN"})  # the firmware hooks' override of the command to run
SECRETS = {("pool", "password"), ("pool", "username"), ("server", "api_token")}
# Settings whose values are never repeated in an error message, on the box or the gateway.
SECRET_NAMES = frozenset({"password", "username", "api_token", "token", "tokens", "key", "secret"})
MAX_CREDENTIAL_BYTES = 64 * 1024


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start})") from None


def read_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split(ENV_NESTING)]
        if not all(path):
            raise ConfigError(f"environment variable {name}: empty section name")
        _assign(data, path, raw if _is_secret(path) else _env_value(raw))  # a password may look like JSON
    return data


def _is_secret(path: Sequence[Any]) -> bool:
    return bool(path) and str(path[-1]) in SECRET_NAMES


def _env_value(raw: str) -> Any:
    if raw[:1] in "[{":
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def read_credentials(directory: Path) -> dict[str, Any]:
    """Secrets from systemd LoadCredential=: a file named `pool.password` sets pool.password.

    Surrounding whitespace is stripped (`appliance provision` refuses secrets that have any, so what
    it installs reads back unchanged). A credential that cannot be read, or is not UTF-8 text, is a
    ConfigError naming the credential, never showing its content.
    """
    data: dict[str, Any] = {}
    if not directory.is_dir():
        return data
    for entry in sorted(directory.iterdir()):
        path = tuple(entry.name.split("."))
        if path in SECRETS:
            _assign(data, list(path), credential_text(directory, entry))
    return data


def credential_text(directory: Path, entry: Path) -> str:
    where = f"credential {entry.name} in $CREDENTIALS_DIRECTORY ({directory})"
    try:  # never blocks on a FIFO, never reads without end
        fd = os.open(entry, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                raise ConfigError(f"{where}: not a regular file")
            raw = stream.read(MAX_CREDENTIAL_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_CREDENTIAL_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CREDENTIAL_BYTES} bytes; expected a secret")
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        # `from None`: the decode error's repr would carry the secret's bytes into a traceback
        raise ConfigError(f"{where}: not UTF-8 text; write it again as UTF-8") from None


# systemd sets RUNTIME_DIRECTORY, STATE_DIRECTORY and CACHE_DIRECTORY for the unit that runs a
# process: they name the service's folders only in the service itself. A client of the service (the
# `appliance ota` verbs, run by update hooks from whatever unit the update agent runs in) ignores
# them and finds the service's folders from its settings or where provisioning puts them.
_honour_unit_directories: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "appliance_honour_unit_directories", default=True
)


def unit_directory(variable: str) -> str:
    """The first folder in $`variable` (a systemd *_DIRECTORY variable), or "" when it is unset or
    the caller is a client of the service (inside `ignoring_unit_directories()`)."""
    if not _honour_unit_directories.get():
        return ""
    return os.environ.get(variable, "").split(":")[0]


def runtime_dir() -> Path:
    """A runtime folder only this user can write: systemd's, the provisioned one, or one under the
    user's own runtime or home folder. /tmp is never used: anyone could create the folder first.
    $RUNTIME_DIRECTORY counts only in the service (see ignoring_unit_directories)."""
    value = unit_directory("RUNTIME_DIRECTORY")
    if value:
        return Path(value)
    installed = "/run/appliance"
    if os.path.isdir(installed) and os.access(installed, os.R_OK | os.W_OK | os.X_OK):
        return Path(installed)
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "appliance"
    return Path("~/.local/state/appliance/run").expanduser()


def systemd_dir(variable: str, installed: str, fallback: str) -> Path:
    """$VARIABLE (systemd sets it for the service), else the provisioned folder if this user may use it
    (so `appliance ota`, run by an update hook or the health check, finds the service's socket and
    state), else a per-user fallback. $VARIABLE counts only in the service, not in `appliance ota`
    (see ignoring_unit_directories)."""
    value = unit_directory(variable)
    if value:
        return Path(value)
    if os.path.isdir(installed) and os.access(installed, os.R_OK | os.X_OK):
        return Path(installed)
    return Path(fallback).expanduser()


@contextlib.contextmanager
def ignoring_unit_directories() -> Iterator[None]:
    """Settings loaded inside this block take no folder from $RUNTIME_DIRECTORY, $STATE_DIRECTORY or
    $CACHE_DIRECTORY: those belong to the unit running this process, not to appliance.service."""
    token = _honour_unit_directories.set(False)
    try:
        yield
    finally:
        _honour_unit_directories.reset(token)


def _assign(data: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise ConfigError(f"setting {'.'.join(path)}: {part} is a value, not a section")
    data[path[-1]] = value


def deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _origin(loc: tuple[Any, ...], layers: list[tuple[str, dict[str, Any]]]) -> str | None:
    for label, data in layers:
        node: Any = data
        for part in loc:
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            if label == "environment":
                return _env_name(loc, node)
            return label
    return None


def _env_name(loc: tuple[Any, ...], node: Any) -> str:
    """The variable that set `loc`, down to the first leaf when `loc` is a whole (unknown) section."""
    path = [str(p) for p in loc]
    while isinstance(node, Mapping) and node:
        key, node = next(iter(node.items()))
        path.append(str(key))
    return ENV_PREFIX + ENV_NESTING.join(p.upper() for p in path)


def describe(exc: ValidationError, layers: list[tuple[str, dict[str, Any]]]) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        key = ".".join(str(p) for p in loc)
        origin = _origin(loc, layers)
        where = f" (from {origin})" if origin else ""
        if error["type"] == "extra_forbidden":
            lines.append(f"unknown setting {key!r}{where}")
        elif _is_secret(loc):
            lines.append(f"setting {key!r}{where}: {error['msg']} (its value is a secret: not shown)")
        else:
            lines.append(f"setting {key!r}{where}: {error['msg']}, got {_shown(error.get('input'))!r}")
    return "; ".join(lines)


def _shown(value: Any) -> Any:
    """A value as an error may repeat it: a URL's user and password are left out."""
    if isinstance(value, str) and "://" in value and "@" in value:
        scheme, _, rest = value.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return value


def broker_url(value: str | None) -> str | None:
    """mqtt://host[:port] or mqtts://host[:port] (blank: None); ValueError otherwise, never repeating a
    URL that holds credentials."""
    if not value:
        return None
    parts = urlsplit(value)
    if "@" in parts.netloc:  # not repeated: the URL holds a password
        raise ValueError("credentials in the broker URL are not used; give them as username and password")
    try:
        has_port = parts.port is not None or not parts.netloc.endswith(":")
    except ValueError:
        has_port = False
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or not has_port or parts.path.strip("/"):
        raise ValueError(f"expected mqtt://host[:port] or mqtts://host[:port], got {value!r}")
    return value


NOT_IN_LEVEL = "/+#$\0"  # what no topic level of ours holds: a separator, wildcards, $SYS, NUL
_NOT_IN_LEVEL = frozenset(NOT_IN_LEVEL)
TOPIC_LEVEL = "must be one non-empty MQTT topic level without / + # $ or NUL"


def topic_level(value: str) -> str:
    """One MQTT topic level (a site, a node, a gateway id); ValueError naming what it may not hold."""
    if not value or not _NOT_IN_LEVEL.isdisjoint(value):
        raise ValueError(f"{TOPIC_LEVEL}, got {value!r}")
    return value


MAX_NODE_LEVEL_CHARS = 128  # a site or node id: twice a Linux host name (HOST_NAME_MAX), the default id


def node_level_problem(value: str) -> str | None:
    """Why `value` is no site or node id (None: it is one): one topic level, printable, at most
    MAX_NODE_LEVEL_CHARS characters, not starting with _ (the platform's own topics, <root>/_reply/ and
    _gateways/). The box's settings refuse such an id (node_level) and a gateway takes no node by it
    (platform/intake.py): a box with one would serve while no gateway ever saw it. The value itself is
    not in the text: a gateway logs what a stranger's topic holds only shortened."""
    if not value or not _NOT_IN_LEVEL.isdisjoint(value):
        return TOPIC_LEVEL
    if value.startswith("_"):
        return "must not start with _ (reserved for the platform's topics)"
    if len(value) > MAX_NODE_LEVEL_CHARS or not value.isprintable():
        return f"must be at most {MAX_NODE_LEVEL_CHARS} printable characters"
    return None


def node_level(value: str) -> str:
    """A box's site or node id (see node_level_problem); ValueError naming what is wrong with it."""
    problem = node_level_problem(value)
    if problem is not None:
        raise ValueError(f"{problem}, got {value!r}")
    return value


def topic_prefix(value: str) -> str:
    """Topic levels before <site>/<node>/ (pool.topic_root, the gateway's), without empty levels."""
    value = value.strip("/")
    if not value or any(c in value for c in "+#\0") or "//" in value:
        raise ValueError(f"must be topic levels without + # NUL or empty levels, got {value!r}")
    return value


def section(title: str) -> ConfigDict:
    """A settings section's pydantic config: unknown keys refused, defaults validated, `title` in the
    JSON Schema (`appliance config-schema`)."""
    return ConfigDict(extra="forbid", title=title, validate_default=True)
