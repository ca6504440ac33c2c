"""What buyers may call: a catalogue file pinning model names to sha256 (and golden samples), or, with
none, every name the nodes offer under one sha256."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config_sources import read_toml
from appliance.errors import ConfigError
from appliance.platform.view import NodeView, PoolView

Tolerance = tuple[float, float]  # (atol, rtol)
DEFAULT_TOLERANCE: Tolerance = (1e-4, 1e-3)
RECOUNT_S = 1.0


@dataclass(frozen=True, slots=True)
class Entry:
    """One catalogue model: the name buyers call, the file's sha256, where its golden samples are."""

    name: str
    sha256: str
    samples: Path | None = None
    model_file: Path | None = None  # the trusted copy canary references are computed with
    tolerances: dict[str, Tolerance] = field(default_factory=dict)  # "fp32/cpu~int8/cpu" -> (atol, rtol)

    def tolerance(self, first: str, second: str) -> Tolerance:
        """Tolerance between two answers by their "precision/provider class" (order does not matter)."""
        for key in (f"{first}~{second}", f"{second}~{first}"):
            if key in self.tolerances:
                return self.tolerances[key]
        return self.tolerances.get("default", DEFAULT_TOLERANCE)


class Catalogue:
    """Pinned entries, or (with no file) whatever the pool offers, one sha256 per name."""

    def __init__(self, entries: dict[str, Entry] | None) -> None:
        self.entries = entries
        self._chosen: dict[str, tuple[float, str | None]] = {}  # name -> (until, sha256), unpinned only

    @property
    def is_pinned(self) -> bool:
        return self.entries is not None

    @classmethod
    def load(cls, path: Path | None) -> Catalogue:
        if path is None:
            return cls(None)
        models = read_toml(path).get("models")
        if not isinstance(models, dict):
            raise ConfigError(f"catalogue {path}: expected [models.NAME] tables with sha256")
        return cls({name: _entry(path, name, raw) for name, raw in models.items()})

    def names(self, view: PoolView) -> list[str]:
        """Every model name buyers may call now (pinned ones even while no node offers them)."""
        return sorted(self.entries) if self.entries is not None else view.models()

    def sha256(self, name: str, view: PoolView) -> str | None:
        """The sha256 jobs for `name` must run on; None when the name is not served."""
        if self.entries is not None:
            entry = self.entries.get(name)
            return entry.sha256 if entry else None
        now_s = time.monotonic()
        until_s, chosen = self._chosen.get(name, (0.0, None))
        if (
            until_s <= now_s or chosen is None
        ):  # a vote over every node offering it: recounted once a second, not per job
            chosen = majority_sha256(view.offering(name), name)
            self._chosen[name] = (now_s + RECOUNT_S, chosen)
        return chosen


def majority_sha256(nodes: list[NodeView], name: str) -> str | None:
    """With no catalogue, the sha256 most nodes serve `name` with (ties: the smallest digest), so that
    one name never mixes two different files."""
    counts = Counter(d for node in nodes if (d := node.model_birth(name).get("sha256")))
    if not counts:
        return None
    return min(counts, key=lambda digest: (-counts[digest], digest))


def _entry(path: Path, name: str, raw: Any) -> Entry:
    where = f"catalogue {path}: models.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(raw) - {"sha256", "samples", "model_file", "tolerances"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    digest = raw.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(f"{where}.sha256 must be 64 lowercase hex digits")
    tolerances: dict[str, Tolerance] = {}
    for pair, value in (raw.get("tolerances") or {}).items():
        if not (
            isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value)
        ):
            raise ConfigError(f"{where}.tolerances.{pair} must be [atol, rtol]")
        tolerances[pair] = (float(value[0]), float(value[1]))
    return Entry(
        name,
        digest,
        samples=_path(path, raw.get("samples")),
        model_file=_path(path, raw.get("model_file")),
        tolerances=tolerances,
    )


def _path(base: Path, value: Any) -> Path | None:
    if value is None:
        return None
    found = Path(value)
    return found if found.is_absolute() else base.parent / found
