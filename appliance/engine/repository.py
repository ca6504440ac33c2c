"""The model repository on disk: <repo>/<model>/ with model.toml or config.pbtxt and <version>/model.onnx."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.engine.files import FOLLOW, Files
from appliance.engine.manifest import MANIFEST_NAME, Manifest, parse_manifest, read_manifest_bytes
from appliance.engine.triton_config import CONFIG_NAME, parse_triton_config, read_config_bytes
from appliance.errors import ApplianceError, ConfigError, ModelLoadError, ModelNotFound

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
SAMPLES_FILE = "samples.npz"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # bounded: a file name has at most 255 bytes
MAX_VERSION = 2**63 - 1  # Triton's versions are int64; a longer folder name is no version
# Parsed manifests and configs kept by content (repository._Parsed): the index route reads every model's
# on each call, and config.pbtxt's parser costs about 1 s per MiB. Bounded in entries and in the bytes
# they were parsed from, so a repository whose files keep changing cannot grow it.
CACHE_ENTRIES = 256
CACHE_BYTES = 16 * 1024 * 1024


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
        self._parsed = _Parsed()
        self._lock = threading.Lock()  # index() runs on a worker thread while a load reads a source

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
            versions, odd = _versions(files, directory)
            is_bare = files.is_file(directory / MODEL_FILE)
        except OSError as exc:  # a folder the service may not read: this model is UNAVAILABLE, not all
            raise ModelLoadError(
                f"model {name!r}: {exc.filename or directory} cannot be read ({exc.strerror})"
            ) from None
        if odd:
            self._warn(
                "model %s: version folders %s under %s are ignored: a version is a positive integer "
                "without leading zeros, at most %d (Triton ignores them too)",
                name,
                [_shortened(folder) for folder in odd],
                directory,
                MAX_VERSION,
            )
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
            shown = ", ".join(_shortened(folder) for folder in odd)
            ignored = f" (ignored: {shown}: not a version number as written)" if odd else ""
            raise ModelLoadError(f"model {name!r} has no <version>/{MODEL_FILE} under {directory}{ignored}")
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
            except ModelNotFound:  # gone since names() listed it
                continue
            except ApplianceError as exc:
                entries[name] = exc
        return entries

    def _manifest(self, name: str, directory: Path) -> Manifest:
        """model.toml if there is one (it wins over config.pbtxt), else what config.pbtxt maps to.

        Each is read every time (a few KiB) and parsed only when its bytes changed since."""
        config = directory / CONFIG_NAME
        path = directory / MANIFEST_NAME
        if self.files.is_file(path):
            if self.files.is_file(config):
                self._warn(
                    "model %s: model.toml and %s both present; model.toml wins, %s is ignored",
                    name,
                    config,
                    CONFIG_NAME,
                )
            raw = read_manifest_bytes(path, self.files)
            manifest, _ = self._parsed.get(path, raw, lambda: (parse_manifest(raw, path), ()))
            return manifest
        if not self.files.is_file(config):
            return Manifest()
        raw = read_config_bytes(config, self.files)

        def parse() -> tuple[Manifest, tuple[str, ...]]:
            triton = parse_triton_config(raw, config, name)
            return triton.manifest, triton.ignored

        manifest, ignored = self._parsed.get(config, raw, parse)
        if ignored:
            self._warn("model %s: %s fields not honoured: %s", name, config, "; ".join(ignored))
        return manifest

    def _warn(self, message: str, *args: object) -> None:
        text = message % args
        with self._lock:
            if text in self._warned:
                return
            if len(self._warned) > 1024:  # files that keep changing: say it again rather than grow
                self._warned.clear()
            self._warned.add(text)
        log.warning("%s", text)


_Result = tuple[Manifest, tuple[str, ...]]  # the manifest and the config.pbtxt fields not honoured


class _Parsed:
    """What each manifest or config parsed to (or the ConfigError it raised), by path and content.

    Keyed by a digest of the bytes rather than by mtime, size and inode: an update that keeps all three
    (rsync -t, a copy within one mtime tick) still reads as the new file, and it needs no stat, which
    root's no-follow `Files` would have to provide too. Thread-safe; parsing happens outside the lock.
    """

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[str, bytes], tuple[_Result | str, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, path: Path, raw: bytes, parse: Callable[[], _Result]) -> _Result:
        key = (str(path), hashlib.blake2b(raw, digest_size=16).digest())
        with self._lock:
            if (found := self._entries.get(key)) is not None:
                self._entries.move_to_end(key)
        if found is None:
            try:
                outcome: _Result | str = parse()
            except ConfigError as exc:
                outcome = str(exc)
            found = (outcome, len(raw))
            self._keep(key, found)
        outcome = found[0]
        if isinstance(outcome, str):
            raise ConfigError(outcome)  # a new one each time: a raised exception keeps its traceback
        manifest, ignored = outcome
        return manifest.model_copy(deep=True), ignored  # the caller's own: nothing shares a cached one

    def _keep(self, key: tuple[str, bytes], entry: tuple[_Result | str, int]) -> None:
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = entry
            self._bytes += entry[1]
            while len(self._entries) > CACHE_ENTRIES or self._bytes > CACHE_BYTES:
                _, (_, size) = self._entries.popitem(last=False)
                self._bytes -= size


def _looks_like_model(files: Files, directory: Path) -> bool:
    markers = (MANIFEST_NAME, CONFIG_NAME, MODEL_FILE)
    return any(files.is_file(directory / marker) for marker in markers) or any(_versions(files, directory))


def _versions(files: Files, directory: Path) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The versions of a model folder, and the names of folders holding a model.onnx that look like one
    but are not: `007` (the load would read `7/`), `0`, or a number past int64. Triton ignores those too."""
    found, odd = [], []
    for child in files.iterdir(directory):
        name = child.name
        if not (name.isascii() and name.isdigit()) or not files.is_file(child / MODEL_FILE):
            continue
        if name.startswith("0") or len(name) > len(str(MAX_VERSION)) or int(name) > MAX_VERSION:
            odd.append(name)
        else:
            found.append(int(name))
    return tuple(sorted(found)), tuple(sorted(odd))


def _shortened(folder: str) -> str:
    return folder if len(folder) <= 24 else f"{folder[:20]}... ({len(folder)} digits)"


def file_digest(path: Path) -> str:
    """sha256 hex of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
