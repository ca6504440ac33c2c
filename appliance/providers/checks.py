"""Probe checks the provider modules share: is the EP compiled in, which nodes and libraries exist."""

from __future__ import annotations

from collections.abc import Iterable

from appliance.providers.host import Host


def ep_missing(host: Host, ep_name: str, install_hint: str) -> str | None:
    """Why ONNX Runtime cannot offer `ep_name` here, or None when it can."""
    if ep_name in host.available_eps():
        return None
    runtime = f"{host.ort_package()} {host.ort_version()}"
    hint = f"; {install_hint}" if install_hint else ""
    if ep_name not in host.known_eps():
        version = host.ort_version()
        return f"ONNX Runtime {version} does not list {ep_name} among the EPs it can be built with{hint}"
    return f"{ep_name} is not compiled into the installed {runtime}{hint}"


def first_existing(host: Host, paths: Iterable[str]) -> str | None:
    """The first of `paths` (globs allowed) that exists on this box."""
    for path in paths:
        found = host.glob(path) if any(c in path for c in "*?[") else ([path] if host.exists(path) else [])
        if found:
            return found[0]
    return None


def missing_nodes(host: Host, paths: Iterable[str], what: str) -> str | None:
    """None when one of the device nodes exists, else a reason naming every path looked at."""
    paths = list(paths)
    if first_existing(host, paths) is not None:
        return None
    return f"no {what}: none of {', '.join(paths)} exists"


def missing_library(host: Host, names: Iterable[str], what: str) -> str | None:
    """None when one of the libraries loads, else the loader's complaint about each."""
    errors = []
    for name in names:
        error = host.load_library(name)
        if error is None:
            return None
        errors.append(f"{name}: {error}")
    return f"{what} not loadable ({'; '.join(errors)})"


def first_line(text: str | None) -> str | None:
    """The first non-empty line of a file's text, stripped (NUL-terminated device-tree strings too)."""
    for line in (text or "").replace("\x00", "\n").splitlines():
        if line.strip():
            return line.strip()
    return None
