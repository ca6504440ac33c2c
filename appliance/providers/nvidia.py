"""What an NVIDIA box tells without CUDA: GPU device nodes, driver version, GPU models, CUDA libraries."""

from __future__ import annotations

import re

from appliance.providers.checks import first_line, missing_library, missing_nodes
from appliance.providers.host import Host

# dGPUs and Jetson Thor expose /dev/nvidia<N>; Jetson Xavier/Orin (nvgpu driver) expose the others.
GPU_NODES = ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0/ctrl")
DRIVER_VERSION_FILE = "/proc/driver/nvidia/version"
TEGRA_RELEASE_FILE = "/etc/nv_tegra_release"  # Jetson: the L4T release stands in for the driver
GPU_INFO_FILES = "/proc/driver/nvidia/gpus/*/information"
DEVICE_TREE_MODEL = "/proc/device-tree/model"


def driver_version(host: Host) -> str | None:
    text = host.read_text(DRIVER_VERSION_FILE) or ""
    found = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
    if found:
        return found.group(1)
    tegra = re.search(r"R(\d+)\D+REVISION:\s*([\d.]+)", host.read_text(TEGRA_RELEASE_FILE) or "")
    return f"l4t-{tegra.group(1)}.{tegra.group(2)}" if tegra else None


def gpu_models(host: Host) -> list[str]:
    models = []
    for path in host.glob(GPU_INFO_FILES):
        found = re.search(r"^Model:\s*(.+)$", host.read_text(path) or "", re.MULTILINE)
        if found:
            models.append(found.group(1).strip())
    if not models and host.exists(TEGRA_RELEASE_FILE):
        model = first_line(host.read_text(DEVICE_TREE_MODEL))
        models = [model] if model else []
    return models


def cuda_libraries(host: Host) -> tuple[str, str]:
    """The CUDA runtime and cuDNN this ORT build links against, as the loader names them."""
    major = (host.ort_cuda_version() or "12").split(".")[0]
    if host.system() == "Windows":
        return f"cudart64_{major}.dll", "cudnn64_9.dll"
    return f"libcudart.so.{major}", "libcudnn.so.9"


def gpu_problem(host: Host) -> str | None:
    """Why the CUDA stack cannot run here (no GPU node, runtime or cuDNN missing), or None."""
    if host.system() == "Linux":
        missing = missing_nodes(host, GPU_NODES, "NVIDIA GPU device node (driver not loaded?)")
        if missing:
            return missing
    host.preload_cuda()
    for library in cuda_libraries(host):
        missing = missing_library(host, [library], library)
        if missing:
            return f"{missing}; install the CUDA {host.ort_cuda_version() or '12'} runtime and cuDNN 9"
    return None


def gpu_details(host: Host) -> dict[str, str]:
    details = {"driver": driver_version(host) or "unknown"}
    models = gpu_models(host)
    if models:
        details["gpus"] = ", ".join(models)
    if host.ort_cuda_version():
        details["cuda"] = host.ort_cuda_version()
    return details
