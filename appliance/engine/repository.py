"""The model repository on disk: <repo>/<model>/ with model.toml or config.pbtxt and <version>/model.onnx."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from appliance.engine.files import FOLLOW, Files
from appliance.engine.manifest import MANIFEST_NAME, Manifest, read_manifest
from appliance.engine.triton_config import CONFIG_NAME, read_triton_config
from appliance.errors import ApplianceError, ConfigError, ModelLoadError, ModelNotFound

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
SAMPLES_FILE = "samples.npz"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # bounded: a file name has at most 255 bytes


@dataclass(frozen=True, slots=True)
class ModelSource:
    """One model version on disk, with its manifest, ready to load."""

    name: str
    directory: Path
    version: int
    versions: tuple[int, ...]
    manifest: Manifest
    is_bare: bool = False  # <model>/model.onnx with no version folder, served as version 1

    @property
    def version_dir(self) -> Path:
        """<model>/<version>/, or the model folder itself for a bare model.onnx."""
        return self.directory if self.is_bare else self.directory / str(self.version)

    @property
    def path(self) -> Path:
        return self.version_dir / MODEL_FILE

    @property
    def samples_path(self) -> Path:
        return self.version_dir / SAMPLES_FILE


class Repository:
    """Reads a repository folder; it never loads models itself.

    `files` is how it touches the disk: the service follows symlinks; root's OTA verbs pass one that
    follows none (see `appliance.engine.files`).
    """

    def __init__(self, root: Path, files: Files = FOLLOW) -> None:
        self.root = root
        self.files = files
        self._warned: set[str] = set()  # said once: the index route reads every model on each call

    @classmethod
    def open(cls, root: Path) -> Repository:
        """The repository the service serves from; ConfigError if `root` is not a readable folder."""
        if not root.exists():
            raise ConfigError(f"model repository {root} does not exist")
        if not root.is_dir():
            raise ConfigError(f"model repository {root} is not a directory")
        try:
            next(root.iterdir(), None)
        except OSError as exc:
            raise ConfigError(f"model repository {root} cannot be read ({exc.strerror})") from exc
        return cls(root)

    def names(self) -> list[str]:
        """Every folder that looks like a model: a manifest, a config.pbtxt, a model.onnx or a version."""
        files = self.files
        if not files.is_dir(self.root):
            return []
        names = []
        for child in sorted(files.iterdir(self.root)):
            if not _NAME.match(child.name):
                continue
            try:
                looks = files.is_dir(child) and _looks_like_model(files, child)
            except (ApplianceError, OSError):  # cannot look inside: source() gives the reason
                looks = True
            if looks:
                names.append(child.name)
        return names

    def has(self, name: str) -> bool:
        """Whether `name` is a model folder of this repository (without reading its manifest)."""
        if not _NAME.match(name):
            return False
        directory = self.root / name
        try:
            return self.files.is_dir(directory) and _looks_like_model(self.files, directory)
        except OSError:  # there, but unreadable: source() says so
            return True

    def source(self, name: str) -> ModelSource:
        """The version to serve: ModelNotFound if no such folder, ModelLoadError/ConfigError if bad."""
        if not _NAME.match(name):
            raise ModelNotFound(f"model name {name!r} is not valid")
        directory = self.root / name
        files = self.files
        try:
            if not files.is_dir(directory) or not _looks_like_model(files, directory):
                raise ModelNotFound(f"model {name!r} is not in repository {self.root}")
            manifest = self._manifest(name, directory)
            versions = _versions(files, directory)
            is_bare = files.is_file(directory / MODEL_FILE)
        except OSError as exc:  # a folder the service may not read: this model is UNAVAILABLE, not all
            raise ModelLoadError(
                f"model {name!r}: {exc.filename or directory} cannot be read ({exc.strerror})"
            ) from None
        if versions and is_bare:
            self._warn(
                "model %s: %s is ignored; version folders %s are served",
                name,
                directory / MODEL_FILE,
                list(versions),
            )
            is_bare = False
        elif is_bare:
            self._warn(
                "model %s: %s has no version folder; serving it as version 1 (move it to %s)",
                name,
                directory / MODEL_FILE,
                directory / "1" / MODEL_FILE,
            )
            versions = (1,)
        if not versions:
            raise ModelLoadError(f"model {name!r} has no <version>/{MODEL_FILE} under {directory}")
        version = manifest.version or versions[-1]
        if version not in versions:
            raise ModelLoadError(f"model {name!r}: version {version} is pinned; available: {list(versions)}")
        return ModelSource(name, directory, version, versions, manifest, is_bare)

    def index(self) -> dict[str, ModelSource | ApplianceError]:
        """Every model by name: its source, or the error that keeps it from loading."""
        entries: dict[str, ModelSource | ApplianceError] = {}
        for name in self.names():
            try:
                entries[name] = self.source(name)
            except (ModelLoadError, ConfigError) as exc:
                entries[name] = exc
        return entries

    def _manifest(self, name: str, directory: Path) -> Manifest:
        """model.toml if there is one (it wins over config.pbtxt), else what config.pbtxt maps to."""
        config = directory / CONFIG_NAME
        if self.files.is_file(directory / MANIFEST_NAME):
            if self.files.is_file(config):
                self._warn(
                    "model %s: model.toml and %s both present; model.toml wins, %s is ignored",
                    name,
                    config,
                    CONFIG_NAME,
                )
            return read_manifest(directory, self.files)
        if not self.files.is_file(config):
            return Manifest()
        triton = read_triton_config(config, name, self.files)
        if triton.ignored:
            self._warn("model %s: %s fields not honoured: %s", name, config, "; ".join(triton.ignored))
        return triton.manifest

    def _warn(self, message: str, *args: object) -> None:
        text = message % args
        if text not in self._warned:
            if len(self._warned) > 1024:  # files that keep changing: say it again rather than grow
                self._warned.clear()
            self._warned.add(text)
            log.warning("%s", text)


def _looks_like_model(files: Files, directory: Path) -> bool:
    markers = (MANIFEST_NAME, CONFIG_NAME, MODEL_FILE)
    return any(files.is_file(directory / marker) for marker in markers) or bool(_versions(files, directory))


def _versions(files: Files, directory: Path) -> tuple[int, ...]:
    found = []
    for child in files.iterdir(directory):
        if (
            child.name.isascii()
            and child.name.isdigit()
            and int(child.name) > 0
            and files.is_file(child / MODEL_FILE)
        ):
            found.append(int(child.name))
    return tuple(sorted(found))


def file_digest(path: Path) -> str:
    """sha256 hex of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
