"""Where settings come from: TOML file, APPLIANCE_ variables, systemd credentials; errors naming it."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from appliance.errors import ConfigError

ENV_PREFIX = "APPLIANCE_"
ENV_NESTING = "__"
NOT_SETTINGS = frozenset({"APPLIANCE_BIN"})  # the firmware hooks' override of the command to run
SECRETS = {("pool", "password"), ("pool", "username"), ("server", "api_token")}


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from exc


def read_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split(ENV_NESTING)]
        if not all(path):
            raise ConfigError(f"environment variable {name}: empty section name")
        _assign(data, path, _env_value(raw))
    return data


def _env_value(raw: str) -> Any:
    if raw[:1] in "[{":
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def read_credentials(directory: Path) -> dict[str, Any]:
    """Secrets from systemd LoadCredential=: a file named `pool.password` sets pool.password."""
    data: dict[str, Any] = {}
    if not directory.is_dir():
        return data
    for entry in sorted(directory.iterdir()):
        path = tuple(entry.name.split("."))
        if path in SECRETS:
            _assign(data, list(path), entry.read_text().strip())
    return data


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
        else:
            lines.append(f"setting {key!r}{where}: {error['msg']}, got {error.get('input')!r}")
    return "; ".join(lines)


def topic_level(value: str) -> str:
    """One MQTT topic level (a site, a node, a gateway id); ValueError naming what it may not hold."""
    if not value or any(c in value for c in "/+#$\0"):
        raise ValueError(f"must be one non-empty MQTT topic level without / + # $ or NUL, got {value!r}")
    return value


def topic_prefix(value: str) -> str:
    """Topic levels before <site>/<node>/ (pool.topic_root, the gateway's), without empty levels."""
    value = value.strip("/")
    if not value or any(c in value for c in "+#\0") or "//" in value:
        raise ValueError(f"must be topic levels without + # NUL or empty levels, got {value!r}")
    return value
