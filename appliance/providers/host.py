"""The box as providers see it: ORT's EP lists, files, device nodes and shared libraries."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import platform
import re
import threading
from functools import cache
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Protocol


class Host(Protocol):
    """Every question a probe asks of the box; `fakehost.StaticHost` answers them from data."""

    def available_eps(self) -> list[str]: ...  # EPs the installed ORT can create
    def known_eps(self) -> list[str]: ...  # EPs any build of this ORT version can have
    def ort_version(self) -> str: ...
    def ort_package(self) -> str: ...  # the distribution that installed it, e.g. "onnxruntime-gpu"
    def ort_cuda_version(self) -> str: ...  # CUDA the ORT build targets, "" if none
    def system(self) -> str: ...  # "Linux", "Windows", "Darwin"
    def machine(self) -> str: ...  # "x86_64", "aarch64", "arm64", "AMD64"
    def kernel_release(self) -> str: ...
    def exists(self, path: str) -> bool: ...
    def glob(self, pattern: str) -> list[str]: ...  # sorted
    def read_text(self, path: str) -> str | None: ...  # None when missing or unreadable
    def load_library(self, name: str) -> str | None: ...  # None when it loads, else the loader's error
    def library_int(self, name: str, symbol: str) -> int | None: ...  # an int-returning C function's value
    def distribution_version(self, name: str) -> str | None: ...
    def preload_cuda(self) -> None: ...  # make pip-installed CUDA/cuDNN loadable, where ORT can
    def has_plugin_ep_api(self) -> bool: ...
    def register_ep_library(self, name: str, path: Path) -> str | None: ...  # None when registered
    def ep_device_types(self, ep_name: str) -> list[str]: ...  # ORT's EP devices: "CPU", "GPU", "NPU"


_registered_libraries: dict[str, Path] = {}
_registration_lock = threading.Lock()


class SystemHost:
    """This machine, asked through onnxruntime, the file system and the dynamic loader."""

    def available_eps(self) -> list[str]:
        return list(_ort().get_available_providers())

    def known_eps(self) -> list[str]:
        return list(_ort().get_all_providers())

    def ort_version(self) -> str:
        return str(_ort().__version__)

    def ort_package(self) -> str:
        return "+".join(_ort_distributions()) or str(getattr(_ort(), "package_name", "onnxruntime"))

    def ort_cuda_version(self) -> str:
        return str(getattr(_ort(), "cuda_version", "") or "")

    def system(self) -> str:
        return platform.system()

    def machine(self) -> str:
        return platform.machine()

    def kernel_release(self) -> str:
        return platform.release()

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def glob(self, pattern: str) -> list[str]:
        return sorted(glob.glob(pattern))

    def read_text(self, path: str) -> str | None:
        try:
            return Path(path).read_text(errors="replace")
        except OSError:
            return None

    def load_library(self, name: str) -> str | None:
        try:
            _load(name)
        except OSError as exc:
            return str(exc).strip() or type(exc).__name__
        return None

    def library_int(self, name: str, symbol: str) -> int | None:
        try:
            function = getattr(_load(name), symbol)
        except (OSError, AttributeError):
            return None
        function.restype, function.argtypes = ctypes.c_int, []
        return int(function())

    def distribution_version(self, name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    def preload_cuda(self) -> None:
        preload = getattr(_ort(), "preload_dlls", None)
        if preload is not None and self.ort_cuda_version():
            # "" searches pip's nvidia-* packages first, then the default loader paths; a failure
            # here shows up in the library check that follows, with the loader's own words.
            with contextlib.suppress(OSError, RuntimeError):
                preload(cuda=True, cudnn=True, msvc=False, directory="")

    def has_plugin_ep_api(self) -> bool:
        return hasattr(_ort(), "register_execution_provider_library") and hasattr(_ort(), "get_ep_devices")

    def register_ep_library(self, name: str, path: Path) -> str | None:
        if not self.has_plugin_ep_api():
            return f"ONNX Runtime {self.ort_version()} cannot load plugin EP libraries (needs 1.22 or newer)"
        if not path.is_file():
            return f"plugin EP library {path} does not exist"
        with _registration_lock:
            if _registered_libraries.get(name) == path:
                return None
            try:
                _ort().register_execution_provider_library(name, str(path))
            except Exception as exc:  # noqa: BLE001 - ORT raises pybind types; the text is the reason
                return f"ONNX Runtime refused plugin EP library {path}: {ort_reason(exc)}"
            _registered_libraries[name] = path
        return None

    def ep_device_types(self, ep_name: str) -> list[str]:
        if not hasattr(_ort(), "get_ep_devices"):
            return []
        return [
            str(d.device.type).rsplit(".", 1)[-1] for d in _ort().get_ep_devices() if d.ep_name == ep_name
        ]


def _ort() -> ModuleType:
    import onnxruntime  # on first use, so that importing appliance starts nothing

    return onnxruntime


@cache
def _ort_distributions() -> tuple[str, ...]:
    """Every installed distribution that provides the `onnxruntime` module (more than one is a conflict)."""
    return tuple(sorted(set(metadata.packages_distributions().get("onnxruntime", []))))


def _load(name: str) -> ctypes.CDLL:
    """Load a shared library by name, then from ORT's own directory (where EP wheels ship theirs)."""
    try:
        return ctypes.CDLL(name)
    except OSError:
        bundled = Path(_ort().__file__).parent / "capi" / name
        if not bundled.exists():
            raise
        return ctypes.CDLL(str(bundled))


def ort_reason(exc: BaseException) -> str:
    """ORT's first line without its `[ONNXRuntimeError] : 9 :` prefix; our own messages as they are."""
    text = str(exc).strip() or type(exc).__name__
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : ", "", text.splitlines()[0])[:500]
