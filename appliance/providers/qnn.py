"""Qualcomm QNN execution provider: the Hexagon NPU (HTP) of Snapdragon SoCs, also its GPU and CPU."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.errors import ProviderUnavailable
from appliance.providers.base import AcceleratorConfig, Builtin, Probe, SessionContext, expect, flag
from appliance.providers.checks import missing_library, missing_nodes

# On Linux the HTP is reached through FastRPC; Windows on Snapdragon needs no node.
FASTRPC_NODES = ("/dev/fastrpc-cdsp", "/dev/fastrpc-cdsp-secure", "/dev/adsprpc-smd")
PERFORMANCE_MODES = Literal[
    "default", "burst", "balanced", "high_performance", "high_power_saver", "low_balanced",
    "low_power_saver", "power_saver", "extreme_power_saver", "sustained_high_performance",
]  # fmt: skip


class QNNConfig(AcceleratorConfig):
    model_config = ConfigDict(extra="forbid", title="QNN")

    backend_type: Literal["htp", "gpu", "cpu"] = Field(
        "htp", description="QNN backend: htp (the NPU), gpu (Adreno) or cpu (a reference, for tests)."
    )
    backend_path: Path | None = Field(
        None, description="Path of the QNN backend library; overrides backend_type (e.g. a QNN SDK copy)."
    )
    htp_performance_mode: PERFORMANCE_MODES = Field(
        "sustained_high_performance",
        description="HTP clock/power vote; sustained_high_performance suits a box serving all day.",
    )
    enable_htp_fp16_precision: bool = Field(
        True, description="Run fp32 models in fp16 on the HTP (it has no fp32 math); int8 QDQ needs none."
    )


class QNN(Builtin):
    name: ClassVar[str] = "qnn"
    ep_name: ClassVar[str] = "QNNExecutionProvider"
    config_model: ClassVar[type[BaseModel]] = QNNConfig
    install_hint: ClassVar[str] = "install onnxruntime-qnn instead"

    def probe_device(self) -> Probe:
        library = self._backend_library("htp")
        problem = missing_library(self.host, [library], f"the QNN HTP backend {library}")
        if problem is None and self.host.system() == "Linux":
            problem = missing_nodes(self.host, FASTRPC_NODES, "Hexagon FastRPC device node")
        if problem:
            return Probe(False, f"{self.ep_name} is compiled in but {problem}")
        return Probe(True, details={"backend": library})

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        config = expect(config, QNNConfig)
        options = {
            "htp_performance_mode": config.htp_performance_mode,
            "enable_htp_fp16_precision": flag(config.enable_htp_fp16_precision),
        }
        if config.backend_path is None:
            options["backend_type"] = config.backend_type
        elif not self.host.exists(str(config.backend_path)):
            raise ProviderUnavailable(f"QNN backend library {config.backend_path} does not exist")
        else:
            options["backend_path"] = str(config.backend_path)
        return options

    def _backend_library(self, backend: str) -> str:
        stem = {"htp": "QnnHtp", "gpu": "QnnGpu", "cpu": "QnnCpu"}[backend]
        return f"{stem}.dll" if self.host.system() == "Windows" else f"lib{stem}.so"
