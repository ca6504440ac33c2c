"""Microsoft DirectML execution provider: any DirectX 12 GPU or NPU on Windows."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.providers.base import AcceleratorConfig, Builtin, Probe, SessionContext, expect


class DirectMLConfig(AcceleratorConfig):
    model_config = ConfigDict(extra="forbid", title="DirectML")

    device_id: int = Field(0, ge=0, description="DXGI adapter index, in the order Windows lists them.")
    performance_preference: Literal["default", "high_performance", "minimum_power"] = Field(
        "high_performance", description="Which adapter Windows prefers when several match."
    )
    device_filter: Literal["gpu", "npu", "any"] = Field(
        "gpu", description="Adapter kinds to consider: GPUs, NPUs or both."
    )


class DirectML(Builtin):
    name: ClassVar[str] = "directml"
    ep_name: ClassVar[str] = "DmlExecutionProvider"
    config_model: ClassVar[type[BaseModel]] = DirectMLConfig
    install_hint: ClassVar[str] = "install onnxruntime-directml (Windows) instead"

    def probe_device(self) -> Probe:
        if self.host.system() != "Windows":
            return Probe(False, f"DirectML runs on Windows only; this is {self.host.system()}")
        return Probe(True)

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        # ORT itself turns off memory patterns and parallel execution for DirectML sessions.
        config = expect(config, DirectMLConfig)
        return {
            "device_id": str(config.device_id),
            "performance_preference": config.performance_preference,
            "device_filter": config.device_filter,
        }
