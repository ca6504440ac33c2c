"""The model repository on disk: <repo>/<model>/[model.toml] and <repo>/<model>/<version>/model.onnx."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from appliance.engine.manifest import MANIFEST_NAME, Manifest, read_manifest
from appliance.errors import ApplianceError, ConfigError, ModelLoadError, ModelNotFound

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
SAMPLES_FILE = "samples.npz"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, slots=True)
class ModelSource:
    """One model version on disk, with its manifest, ready to load."""

    name: str
    directory: Path
    version: int
    versions: tuple[int, ...]
    manifest: Manifest

    @property
    def path(self) -> Path:
        return self.directory / str(self.version) / MODEL_FILE

    @property
    def samples_path(self) -> Path:
        return self.directory / str(self.version) / SAMPLES_FILE


class Repository:
    """Reads a repository folder; it never loads models itself."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        """Every folder that looks like a model: it has a manifest or a numeric version folder."""
        if not self.root.is_dir():
            return []
        names = []
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and _NAME.match(child.name) and _looks_like_model(child):
                names.append(child.name)
        return names

    def has(self, name: str) -> bool:
        """Whether `name` is a model folder of this repository (without reading its manifest)."""
        if not _NAME.match(name):
            return False
        directory = self.root / name
        return directory.is_dir() and _looks_like_model(directory)

    def source(self, name: str) -> ModelSource:
        """The version to serve: ModelNotFound if no such folder, ModelLoadError/ConfigError if bad."""
        if not _NAME.match(name):
            raise ModelNotFound(f"model name {name!r} is not valid")
        directory = self.root / name
        if not directory.is_dir() or not _looks_like_model(directory):
            raise ModelNotFound(f"model {name!r} is not in repository {self.root}")
        manifest = read_manifest(directory)
        versions = _versions(directory)
        if not versions:
            raise ModelLoadError(f"model {name!r} has no <version>/{MODEL_FILE} under {directory}")
        version = manifest.version or versions[-1]
        if version not in versions:
            raise ModelLoadError(
                f"model {name!r}: model.toml pins version {version}; available: {list(versions)}"
            )
        return ModelSource(name, directory, version, versions, manifest)

    def index(self) -> dict[str, ModelSource | ApplianceError]:
        """Every model by name: its source, or the error that keeps it from loading."""
        entries: dict[str, ModelSource | ApplianceError] = {}
        for name in self.names():
            try:
                entries[name] = self.source(name)
            except (ModelLoadError, ConfigError) as exc:
                entries[name] = exc
        return entries


def _looks_like_model(directory: Path) -> bool:
    return (directory / MANIFEST_NAME).is_file() or bool(_versions(directory))


def _versions(directory: Path) -> tuple[int, ...]:
    found = []
    for child in directory.iterdir():
        if child.name.isdigit() and int(child.name) > 0 and (child / MODEL_FILE).is_file():
            found.append(int(child.name))
    return tuple(sorted(found))


def file_digest(path: Path) -> str:
    """sha256 hex of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
