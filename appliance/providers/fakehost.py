"""A box described by data: the fake that ships with the Host seam, for tests and dry runs."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StaticHost:
    """A box described by data: the fake that ships with the Host seam (httpx's MockTransport habit).

    `files` maps a path to its text (device nodes map to ""); `libraries` maps a loadable library to the
    values of its int-returning functions; a library not listed fails to load.
    """

    eps: tuple[str, ...] = ("CPUExecutionProvider",)
    all_eps: tuple[str, ...] = ()  # empty: every EP in `eps` plus the usual built-in ones
    version: str = "1.32.0"
    package: str = "onnxruntime"
    cuda_version: str = ""
    os_name: str = "Linux"
    arch: str = "x86_64"
    kernel: str = "6.8.0"
    files: dict[str, str] = field(default_factory=dict)
    libraries: dict[str, dict[str, int]] = field(default_factory=dict)
    distributions: dict[str, str] = field(default_factory=dict)
    plugin_ep_api: bool = True
    ep_devices: dict[str, list[str]] = field(default_factory=dict)
    registered: dict[str, Path] = field(default_factory=dict)

    def available_eps(self) -> list[str]:
        return list(self.eps)

    def known_eps(self) -> list[str]:
        return list(self.all_eps or (*self.eps, *_USUAL_EPS))

    def ort_version(self) -> str:
        return self.version

    def ort_package(self) -> str:
        return self.package

    def ort_cuda_version(self) -> str:
        return self.cuda_version

    def system(self) -> str:
        return self.os_name

    def machine(self) -> str:
        return self.arch

    def kernel_release(self) -> str:
        return self.kernel

    def exists(self, path: str) -> bool:
        return path in self.files or any(f.startswith(path.rstrip("/") + "/") for f in self.files)

    def glob(self, pattern: str) -> list[str]:
        return sorted(f for f in self.files if fnmatch.fnmatchcase(f, pattern))

    def read_text(self, path: str) -> str | None:
        return self.files.get(path)

    def load_library(self, name: str) -> str | None:
        return None if name in self.libraries else f"{name}: cannot open shared object file"

    def library_int(self, name: str, symbol: str) -> int | None:
        return self.libraries.get(name, {}).get(symbol)

    def distribution_version(self, name: str) -> str | None:
        return self.distributions.get(name)

    def preload_cuda(self) -> None:
        return None

    def has_plugin_ep_api(self) -> bool:
        return self.plugin_ep_api

    def register_ep_library(self, name: str, path: Path) -> str | None:
        if not self.plugin_ep_api:
            return f"ONNX Runtime {self.version} cannot load plugin EP libraries (needs 1.22 or newer)"
        if str(path) not in self.files:
            return f"plugin EP library {path} does not exist"
        self.registered[name] = path
        return None

    def ep_device_types(self, ep_name: str) -> list[str]:
        return list(self.ep_devices.get(ep_name, []))


# The EPs ONNX Runtime 1.32 can be built with (its get_all_providers(), less web and mobile ones);
# a StaticHost knows these unless told otherwise.
_USUAL_EPS = (
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "MIGraphXExecutionProvider",
    "OpenVINOExecutionProvider", "DnnlExecutionProvider", "QNNExecutionProvider", "CoreMLExecutionProvider",
    "DmlExecutionProvider", "RknpuExecutionProvider", "XnnpackExecutionProvider", "CANNExecutionProvider",
    "CPUExecutionProvider",
)  # fmt: skip
