"""A model version's files read into memory once: model.onnx and the external data it names, bounded,
checked and digested, so that ONNX Runtime runs on exactly the bytes that were hashed.

ONNX Runtime, given a path, maps a model's external data (`<version>/weights.bin`) from disk and keeps
it mapped while serving: `cp` over the file changes answers live, truncating it makes the next request
fault (SIGBUS, the whole service down). So the session gets model.onnx as bytes and every external file
from memory (SessionOptions.add_external_initializers_from_files_in_memory: ORT copies what it needs while
the session is made, so the buffers can go right after), and ORT is told to look for any other file in
/dev/null, where none can be. (ORT 1.32 could borrow the buffers instead, without a copy, but then they
stay for the session's life beside the pre-packed copy ORT makes of MatMul and Conv weights anyway: twice
the weights for good, where a copy costs them twice only while the session is made.)

The digest covers everything the session reads. Without external data it is sha256(model.onnx), as
`sha256sum model.onnx` prints it. With external data it is the sha256 of what `sha256sum` prints for
model.onnx followed by each external file in byte order of its location, run in the version folder:

    cd <repo>/<model>/<version> && sha256sum model.onnx weights.bin | sha256sum
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import psutil

from appliance.engine.precision import precision_of
from appliance.errors import ModelLoadError

MODEL_NAME = "model.onnx"
# Protobuf cannot parse a message of 2 GiB or more: a larger model.onnx is refused before it is read
# (a sparse file of terabytes would otherwise be hashed for minutes). Weights that large go in external data.
MAX_MODEL_BYTES = 2**31 - 1
NOWHERE = "/dev/null"  # the folder ORT would read any external file we did not hand it from: none exists
_CHUNK = 1 << 20
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_NO_LINK = getattr(os, "O_NOFOLLOW", 0)
_FOLDER = "session.model_external_initializers_file_folder_path"


@dataclass(frozen=True, slots=True)
class ExternalFile:
    """One external data file as read: its location as the model names it, its bytes and their sha256."""

    location: str
    data: memoryview  # read-only; ORT copies from it while a session is made
    sha256: str


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """What a session is made from: model.onnx's bytes (external tensors outside the top-level
    initializers inlined, as ORT takes only those from memory) and the external files."""

    model: bytes
    model_sha256: str
    external: tuple[ExternalFile, ...]
    precision: str  # read from the graph while it was parsed anyway ("unknown" if it could not be)

    @property
    def digest(self) -> str:
        return listing_digest(self.model_sha256, [(item.location, item.sha256) for item in self.external])

    @property
    def described(self) -> str:
        """`model.onnx`, or `model.onnx with weights.bin`: what the digest covers."""
        if not self.external:
            return MODEL_NAME
        return f"{MODEL_NAME} with {', '.join(item.location for item in self.external)}"

    @property
    def external_bytes(self) -> int:
        return sum(len(item.data) for item in self.external)

    def add_to(self, options: ort.SessionOptions) -> ort.SessionOptions:
        """Hand the external files to a session's options (keep `self` until the session is made);
        nothing may be read from the disk."""
        options.add_session_config_entry(_FOLDER, NOWHERE)
        if self.external:
            options.add_external_initializers_from_files_in_memory(
                [item.location for item in self.external],
                [item.data for item in self.external],
                [len(item.data) for item in self.external],
            )
        return options


def listing_digest(model_sha256: str, external: list[tuple[str, str]]) -> str:
    """The digest of model.onnx with its external files, (location, sha256) in location order: what
    `sha256sum model.onnx <files> | sha256sum` prints in the version folder; model.onnx's alone when
    there are none."""
    if not external:
        return model_sha256
    lines = [f"{model_sha256}  {MODEL_NAME}\n", *(f"{sha256}  {location}\n" for location, sha256 in external)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def external_locations(data: bytes) -> list[str]:
    """The external data files model.onnx's bytes name, in order, each checked as read_model checks it
    (ModelLoadError otherwise); none for a model that does not parse (its load says why)."""
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # noqa: BLE001 - not ONNX
        return []
    return sorted({_place(MODEL_NAME, tensor)[0] for tensor, _ in _external_tensors(proto)})


def read_model(path: Path) -> ModelFiles:
    """model.onnx at `path` and its external data, read and checked; ModelLoadError says what is wrong."""
    data = _read_model_bytes(path)
    model_sha256 = hashlib.sha256(data).hexdigest()
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # noqa: BLE001 - not ONNX: ORT's own parser gives the reason the load reports
        return ModelFiles(data, model_sha256, (), "unknown")
    references = list(_external_tensors(proto))
    if not references:
        return ModelFiles(data, model_sha256, (), precision_of(proto))
    wanted = {_place(path.name, tensor)[0] for tensor, _ in references}
    files = {
        location: _read_external(path.parent, location) for location in _bounded(path.parent, sorted(wanted))
    }
    inlined = False
    for tensor, is_initializer in references:
        location, offset, length = _place(path.name, tensor)
        content = files[location].data
        end = len(content) if length is None else offset + length
        if offset > len(content) or end > len(content):
            raise ModelLoadError(
                f"{path.name}: tensor {tensor.name!r} lies at bytes {offset} to {end} of {location}, "
                f"which has {len(content)}"
            )
        if not is_initializer:  # ORT 1.32 takes only the top-level initializers from memory
            tensor.raw_data = bytes(content[offset:end])
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
            inlined = True
    precision = precision_of(proto)
    if inlined:
        data = proto.SerializeToString()
        if len(data) > MAX_MODEL_BYTES:
            raise ModelLoadError(
                f"{path.name}: its external tensors inside subgraphs or attributes would make it larger "
                "than 2 GiB; only top-level initializers may keep that much data in external files"
            )
    return ModelFiles(data, model_sha256, tuple(files[location] for location in sorted(files)), precision)


def _read_model_bytes(path: Path) -> bytes:
    fd = _open_regular(path, MODEL_NAME, follow=True)  # the repository follows links (engine/files.py)
    with os.fdopen(fd, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size > MAX_MODEL_BYTES:
            raise ModelLoadError(_too_large(path, size))
        try:
            data = stream.read(MAX_MODEL_BYTES + 1)
        except OSError as exc:
            raise ModelLoadError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_MODEL_BYTES:  # it grew while read
        raise ModelLoadError(_too_large(path, len(data)))
    return data


def _too_large(path: Path, size: int) -> str:
    return (
        f"{path} has {size} bytes; a model.onnx may have at most {MAX_MODEL_BYTES} (protobuf's 2 GiB "
        "limit): keep large weights in external data files beside it"
    )


def _open_regular(path: Path, what: str, *, follow: bool = False) -> int:
    """An fd of `path` if it is a regular file (a FIFO or device would block or never end); through a
    symbolic link only if `follow`."""
    try:
        fd = os.open(path, _OPEN_FLAGS if follow else _OPEN_FLAGS | _NO_LINK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ModelLoadError(
                f"{what} {path} is a symbolic link; it must be a file in the folder"
            ) from None
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelLoadError(f"{what} {path} is not a regular file")
    return fd


def _external_tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, bool]]:
    """Every tensor of the model that keeps its data in an external file, and whether it is a top-level
    initializer (the only kind ORT takes from memory); subgraphs, attributes and functions included."""
    graphs: list[tuple[onnx.GraphProto, bool]] = [(model.graph, True)]
    nodes = [node for function in model.functions for node in function.node]
    tensors: list[tuple[onnx.TensorProto, bool]] = []
    while graphs or nodes:
        while graphs:
            graph, is_top = graphs.pop()
            tensors += [(tensor, is_top) for tensor in graph.initializer]
            for sparse in graph.sparse_initializer:
                tensors += [(sparse.values, False), (sparse.indices, False)]
            nodes += list(graph.node)
        for node in nodes:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    tensors.append((attribute.t, False))
                tensors += [(tensor, False) for tensor in attribute.tensors]
                sparse = [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
                for item in [*sparse, *attribute.sparse_tensors]:
                    tensors += [(item.values, False), (item.indices, False)]
                if attribute.HasField("g"):
                    graphs.append((attribute.g, False))
                graphs += [(graph, False) for graph in attribute.graphs]
        nodes = []
    for tensor, is_initializer in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor, is_initializer


def _place(model_name: str, tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    """(location, offset, length or None) of an external tensor, the location checked to name a file
    inside the version folder: relative, normalised, no `..`, nothing sha256sum would escape."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    parts = location.split("/")
    if (
        not location
        or location.startswith("/")
        or os.path.normpath(location) != location
        or ".." in parts
        or any(char in location for char in "\\\n\r\0")
    ):
        raise ModelLoadError(
            f"{model_name}: tensor {tensor.name!r} keeps its data at {location!r}; external data must be "
            "a plain relative path inside the version folder"
        )
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else None
    except ValueError:
        offset = length = -1
    if offset < 0 or (length is not None and length < 0):
        raise ModelLoadError(f"{model_name}: tensor {tensor.name!r} has a bad external data offset or length")
    return location, offset, length


def _bounded(folder: Path, locations: list[str]) -> list[str]:
    """`locations`, once their sizes together are known to fit in the memory available now."""
    total = 0
    for location in locations:
        try:
            total += (folder / location).stat().st_size
        except OSError as exc:
            raise ModelLoadError(f"cannot read external data {folder / location}: {exc.strerror}") from exc
    available = psutil.virtual_memory().available
    if total > available:
        raise ModelLoadError(
            f"external data of {folder} has {total} bytes; only {available} bytes of memory are available "
            "to hold it (the service keeps external weights in memory, never mapped from the disk)"
        )
    return locations


def _read_external(folder: Path, location: str) -> ExternalFile:
    """One external file, whole, into memory; it must be a regular file inside `folder`, reached
    through no symbolic link (as ORT requires), and must not change size while it is read."""
    path = folder / location
    fd = _open_regular(path, "external data")
    with os.fdopen(fd, "rb", buffering=0) as stream:
        real = _real_path(fd, path)
        inside = os.path.realpath(folder)
        if os.path.commonpath([real, inside]) != inside:
            raise ModelLoadError(f"external data {path} leads outside {folder}")
        size = os.fstat(fd).st_size
        buffer = bytearray(size)
        view = memoryview(buffer)
        digest = hashlib.sha256()
        done = 0
        try:
            while done < size:
                count = stream.readinto(view[done : done + _CHUNK])
                if not count:
                    break
                digest.update(view[done : done + count])
                done += count
            grew = bool(stream.read(1))
        except OSError as exc:
            raise ModelLoadError(f"cannot read external data {path}: {exc.strerror}") from exc
    if done != size or grew:
        raise ModelLoadError(f"external data {path} changed size while it was read")
    return ExternalFile(location, view.toreadonly(), digest.hexdigest())


def _real_path(fd: int, path: Path) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no procfs: the path as resolved now
        return os.path.realpath(path)
