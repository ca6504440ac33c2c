"""Files of the service user's model repository as root reads them: no symlinks, regular files only,
bounded in size.

The repository belongs to the service user (`appliance`), who can put anything there: a symlink to
a root-only file (whose digest would then land in the world-readable snapshot), a FIFO that blocks
open() forever, a sparse file of terabytes that takes root days to hash, an .npz whose header
claims terabytes. The verbs run as root, so they walk from the configured repository root (root's
own setting) one component at a time with O_NOFOLLOW, open without blocking, and refuse anything
that is not a regular file or is larger than a cap.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from appliance.engine.files import Files
from appliance.errors import ApplianceError
from appliance.ota.store import OtaError

MAX_MODEL_BYTES = 2**31 - 1  # model.onnx: protobuf's 2 GiB limit, as the service's (engine/modelfiles.py)
MAX_WEIGHTS_BYTES = 64 << 30  # one external data file beside it
MAX_SAMPLES_BYTES = 256 << 20  # samples.npz on disk, and the arrays it declares, all together
_CHUNK = 1 << 20


class RootFiles(Files):
    """The repository as root's verbs see it (`Repository(root, RootFiles(root))`).

    A symlink counts as present (as a folder or a file) so that the model is not silently something
    else, but walking into it or reading it is an OtaError that names it: the caller leaves that model
    out with the reason. Every read goes through `open_file`.
    """

    def __init__(self, repository: Path) -> None:
        self.repository = repository

    def is_dir(self, path: Path) -> bool:
        return self._kind(path) in (stat.S_IFDIR, stat.S_IFLNK)

    def is_file(self, path: Path) -> bool:
        return self._kind(path) in (stat.S_IFREG, stat.S_IFLNK)

    def iterdir(self, path: Path) -> Iterator[Path]:
        folder = _open_folder(self.repository, _parts(self.repository, path, allow_root=True), path)
        try:
            with os.scandir(folder) as entries:
                names = sorted(entry.name for entry in entries)
        except OSError as exc:
            raise OtaError(f"{path}: cannot be listed ({exc.strerror})") from exc
        finally:
            os.close(folder)
        return iter([path / name for name in names])

    def read(self, path: Path, limit: int) -> bytes:
        fd = open_file(self.repository, path, limit)
        try:
            chunks, size = [], 0
            while size < limit and (chunk := _read(fd, path, min(_CHUNK, limit - size))):
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks)

    def _kind(self, path: Path) -> int | None:
        """The type of `path` itself (S_IFLNK for a link); None if nothing is there. OtaError if a
        folder above it is a symlink."""
        if path == self.repository:  # root's own setting: followed, as root's config names it
            try:
                return stat.S_IFMT(os.stat(path).st_mode)
            except OSError:
                return None
        parent = path.parent
        folder = _open_folder(self.repository, _parts(self.repository, parent, allow_root=True), path)
        try:
            return stat.S_IFMT(os.stat(path.name, dir_fd=folder, follow_symlinks=False).st_mode)
        except OSError:
            return None
        finally:
            os.close(folder)


def open_file(repository: Path, path: Path, max_bytes: int) -> int:
    """A read-only fd of the regular file `path` inside `repository`; OtaError otherwise.

    Every component below `repository` is opened with O_NOFOLLOW (a symlinked folder or file is
    refused, not followed), the file with O_NONBLOCK (a FIFO cannot hold root in open()); the
    caller closes the fd.
    """
    parts = _parts(repository, path, allow_root=False)
    folder = _open_folder(repository, parts[:-1], path)
    try:
        fd = _open_at(folder, parts[-1], os.O_NONBLOCK, path)
    finally:
        os.close(folder)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OtaError(f"{path} is not a regular file; refusing to read it as root")
        if st.st_size > max_bytes:
            raise OtaError(
                f"{path} is {st.st_size} bytes, more than the {max_bytes} bytes root reads from the "
                "service user's model repository"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _parts(repository: Path, path: Path, allow_root: bool) -> tuple[str, ...]:
    try:
        parts = path.relative_to(repository).parts
    except ValueError:
        raise OtaError(f"{path} is not inside the model repository {repository}") from None
    if (not parts and not allow_root) or ".." in parts:
        raise OtaError(f"{path}: not a file inside the model repository {repository}")
    return parts


def _open_folder(repository: Path, parts: tuple[str, ...], path: Path) -> int:
    """An fd of the folder `parts` below `repository`, each component opened with O_NOFOLLOW."""
    try:
        folder = os.open(repository, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OtaError(f"model repository {repository}: cannot be opened ({exc.strerror})") from exc
    try:
        for name in parts:
            below = _open_at(folder, name, os.O_DIRECTORY, path)
            os.close(folder)
            folder = below
    except BaseException:
        os.close(folder)
        raise
    return folder


def _open_at(folder: int, name: str, flags: int, path: Path) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags, dir_fd=folder)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and _is_link_at(folder, name)):
            raise OtaError(
                f"{path}: {name} is a symlink; root does not follow links in the service user's model "
                "repository"
            ) from exc
        if exc.errno == errno.ENOTDIR:
            raise OtaError(f"{path}: {name} is not a folder") from exc
        raise OtaError(f"{path}: cannot be opened ({exc.strerror})") from exc


def _is_link_at(folder: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except OSError:
        return False


def model_digest(repository: Path, path: Path) -> str:
    """The served digest of model.onnx `path` (engine.modelfiles.ModelFiles.digest): model.onnx's
    sha256, or with external data the digest of its listing, every file read as `open_file` allows."""
    from appliance.engine import modelfiles  # parses ONNX (onnxruntime, onnx): only where a verb needs it

    fd = open_file(repository, path, MAX_MODEL_BYTES)
    with os.fdopen(fd, "rb") as stream:
        data = stream.read(MAX_MODEL_BYTES + 1)
    if len(data) > MAX_MODEL_BYTES:
        raise OtaError(f"{path} grew past {MAX_MODEL_BYTES} bytes while root read it")
    try:
        locations = modelfiles.external_locations(data)
    except ApplianceError as exc:
        raise OtaError(str(exc)) from None
    external = [
        (location, digest(repository, path.parent / location, MAX_WEIGHTS_BYTES)) for location in locations
    ]
    return modelfiles.listing_digest(hashlib.sha256(data).hexdigest(), external)


def digest(repository: Path, path: Path, max_bytes: int = MAX_MODEL_BYTES) -> str:
    """sha256 hex of `path` inside `repository`, read as `open_file` allows and never past `max_bytes`
    (a file that grows while being read is refused rather than hashed without end)."""
    fd = open_file(repository, path, max_bytes)
    sha256, size = hashlib.sha256(), 0
    try:
        while chunk := _read(fd, path, _CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise OtaError(f"{path} grew past {max_bytes} bytes while root read it")
            sha256.update(chunk)
    finally:
        os.close(fd)
    return sha256.hexdigest()


def _read(fd: int, path: Path, size: int) -> bytes:
    try:
        return os.read(fd, size)
    except OSError as exc:
        raise OtaError(f"{path}: cannot be read ({exc.strerror})") from exc


def load_npz(repository: Path, path: Path, max_bytes: int = MAX_SAMPLES_BYTES) -> dict[str, np.ndarray]:
    """The arrays of the .npz `path` inside `repository`; ValueError naming what is wrong.

    Each member's .npy header (shape, dtype) is read before its data, and the arrays' declared
    sizes together may not exceed `max_bytes`: np.load would allocate whatever a header claims.
    Object arrays (pickles) are refused.
    """
    try:
        fd = open_file(repository, path, max_bytes)
    except OtaError as exc:
        raise ValueError(str(exc)) from exc
    with os.fdopen(fd, "rb") as stream:
        try:
            if not zipfile.is_zipfile(stream):
                raise ValueError(f"{path} is not an .npz archive (np.savez writes one)")
            with zipfile.ZipFile(stream) as archive:
                return _arrays(archive, path, max_bytes)
        except (OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
            raise ValueError(f"{path} cannot be read as .npz ({exc})") from exc


def _arrays(archive: zipfile.ZipFile, path: Path, max_bytes: int) -> dict[str, np.ndarray]:
    members = archive.infolist()
    if sum(member.file_size for member in members) > max_bytes:
        raise ValueError(f"{path} declares more than {max_bytes} bytes of members; refusing to unpack it")
    arrays, total = {}, 0
    for member in members:
        if not member.filename.endswith(".npy"):
            raise ValueError(f"{path}: member {member.filename!r} is not an .npy array")
        with archive.open(member) as npy:
            shape, dtype = _header(npy, path, member.filename)
            total += math.prod(shape) * dtype.itemsize
            if total > max_bytes:
                raise ValueError(
                    f"{path}: its arrays declare more than {max_bytes} bytes (member {member.filename!r}, "
                    f"shape {shape}, dtype {dtype}); refusing to load them"
                )
        with archive.open(member) as npy:
            arrays[member.filename.removesuffix(".npy")] = np.lib.format.read_array(npy, allow_pickle=False)
    return arrays


def _header(npy: zipfile.ZipExtFile, path: Path, name: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(npy)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(npy)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(npy)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as exc:
        raise ValueError(f"{path}: member {name!r} has no valid .npy header ({exc})") from exc
    if dtype.hasobject:
        raise ValueError(f"{path} holds object arrays; store strings as fixed-width bytes (numpy 'S')")
    return tuple(shape), dtype
