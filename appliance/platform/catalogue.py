"""What buyers may call: a catalogue file pinning model names to files by sha256 (with golden samples,
trusted copies and tolerances), or, with none, every name the nodes offer under one sha256.

One name may stand for several files (an int8 and an fp32 build of the same model): the operator says
so by listing them, and states how far their answers may differ in `tolerances`, keyed by pairs of
"precision/provider class" (`int8/cpu~fp32/cpu`; class cpu, gpu or npu, see `provider_class`).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config_sources import read_toml
from appliance.errors import ConfigError
from appliance.platform.view import NodeView, PoolView

Tolerance = tuple[float, float]  # (atol, rtol)
Files = frozenset[str]  # the sha256 of every file a name may run on
DEFAULT_TOLERANCE: Tolerance = (1e-4, 1e-3)
RECOUNT_S = 1.0
GPU = ("cuda", "tensorrt", "rocm", "migraphx", "directml", "coreml")
NPU = ("openvino", "qnn", "cann", "rknpu", "vitisai", "nnapi")


def provider_class(provider: str) -> str:
    """cpu, gpu or npu: what a provider's arithmetic is like (its name as the birth gives it)."""
    name = provider.lower()
    return "gpu" if name.startswith(GPU) else ("npu" if name.startswith(NPU) else "cpu")


@dataclass(frozen=True, slots=True)
class Entry:
    """One catalogue model: the name buyers call, its files' sha256, its golden samples, trusted copies."""

    name: str
    files: Files
    samples: Path | None = None
    model_files: dict[str, Path] = field(default_factory=dict)  # sha256 -> the trusted copy of that file
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
        self._chosen: dict[str, tuple[float, Files | None]] = {}  # name -> (until, {sha256}), unpinned

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

    def files(self, name: str, view: PoolView) -> Files | None:
        """The files (sha256) jobs for `name` may run on; None when the name is not served."""
        if self.entries is not None:
            entry = self.entries.get(name)
            return entry.files if entry else None
        now_s = time.monotonic()
        until_s, chosen = self._chosen.get(name, (0.0, None))
        if (
            until_s <= now_s or chosen is None
        ):  # a vote over every node offering it: recounted once a second, not per job
            majority = majority_sha256(view.offering(name), name)
            chosen = None if majority is None else frozenset((majority,))  # one set, not one per job
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
    unknown = set(raw) - {"sha256", "samples", "model_files", "tolerances"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    digests = raw.get("sha256")
    digests = [digests] if isinstance(digests, str) else digests
    if not isinstance(digests, list) or not digests or not all(_is_digest(d) for d in digests):
        raise ConfigError(f"{where}.sha256 must be 64 lowercase hex digits, or a list of them")
    model_files: dict[str, Path] = {}
    for value in raw.get("model_files") or []:
        found = _path(path, value)
        assert found is not None
        try:
            digest = hashlib.sha256(found.read_bytes()).hexdigest()
        except OSError as exc:
            raise ConfigError(f"{where}.model_files: {found}: {exc.strerror}") from exc
        if digest not in digests:
            raise ConfigError(
                f"{where}.model_files: {found} has sha256 {digest}, which is not listed in sha256"
            )
        model_files[digest] = found
    tolerances: dict[str, Tolerance] = {}
    for pair, value in (raw.get("tolerances") or {}).items():
        if not (
            isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value)
        ):
            raise ConfigError(f"{where}.tolerances.{pair} must be [atol, rtol]")
        tolerances[pair] = (float(value[0]), float(value[1]))
    return Entry(
        name,
        frozenset(digests),
        samples=_path(path, raw.get("samples")),
        model_files=model_files,
        tolerances=tolerances,
    )


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _path(base: Path, value: Any) -> Path | None:
    if value is None:
        return None
    found = Path(value)
    return found if found.is_absolute() else base.parent / found
