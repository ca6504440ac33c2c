"""Rockchip RKNPU execution provider: the NPU of Rockchip SoCs, through the rknpu DDK."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

from appliance.providers.base import AcceleratorConfig, Builtin, Probe
from appliance.providers.checks import first_line, missing_library, missing_nodes

DEVICE_NODES = ("/dev/rknpu", "/sys/module/rknpu")
DRIVER_VERSION_FILE = "/sys/module/rknpu/version"


class RKNPU(Builtin):
    name: ClassVar[str] = "rknpu"
    ep_name: ClassVar[str] = "RknpuExecutionProvider"
    config_model: ClassVar[type[BaseModel]] = AcceleratorConfig  # the EP takes no options
    install_hint: ClassVar[str] = "needs an ONNX Runtime built with --use_rknpu against Rockchip's rknpu DDK"

    def probe_device(self) -> Probe:
        problem = missing_nodes(self.host, DEVICE_NODES, "Rockchip NPU (rknpu driver not loaded?)")
        problem = problem or missing_library(self.host, ["librknpu_ddk.so"], "the rknpu DDK")
        if problem:
            return Probe(False, f"{self.ep_name} is compiled in but {problem}")
        driver = first_line(self.host.read_text(DRIVER_VERSION_FILE)) or "unknown"
        return Probe(True, details={"driver": driver})
