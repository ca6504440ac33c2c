"""AMD MIGraphX execution provider: AMD GPUs (Radeon, Instinct, Ryzen AI iGPUs) through ROCm."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from appliance.providers.base import AcceleratorConfig, Builtin, Probe, SessionContext, expect, flag, put
from appliance.providers.caches import compile_cache
from appliance.providers.checks import missing_nodes
from appliance.providers.rocm import KFD_NODE, amd_details


class MIGraphXConfig(AcceleratorConfig):
    model_config = ConfigDict(extra="forbid", title="MIGraphX")

    device_id: int = Field(0, ge=0, description="HIP device ordinal, as HIP_VISIBLE_DEVICES leaves them.")
    fp16_enable: bool = Field(
        False, description="Compile fp32 models to fp16; faster, check accuracy against samples.npz first."
    )
    int8_enable: bool = Field(False, description="Compile int8 kernels; the model must carry its scales.")
    exhaustive_tune: bool = Field(False, description="Tune every kernel while compiling (much slower).")
    mem_limit_bytes: int | None = Field(None, gt=0, description="Cap on the EP's memory arena.")
    cache_enable: bool = Field(
        True,
        description="Keep compiled programs under the cache directory, keyed by model digest, driver and "
        "ONNX Runtime version; the first compile of a model can take minutes.",
    )


class MIGraphX(Builtin):
    name: ClassVar[str] = "migraphx"
    ep_name: ClassVar[str] = "MIGraphXExecutionProvider"
    config_model: ClassVar[type[BaseModel]] = MIGraphXConfig
    install_hint: ClassVar[str] = "install onnxruntime-migraphx (AMD's ROCm wheel) instead"

    def probe_device(self) -> Probe:
        problem = missing_nodes(self.host, [KFD_NODE], "AMD GPU compute node (amdgpu driver loaded?)")
        if problem:
            return Probe(False, f"{self.ep_name} is compiled in but {problem}")
        return Probe(True, details=amd_details(self.host))

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        config = expect(config, MIGraphXConfig)
        options = {
            "device_id": str(config.device_id),
            "migraphx_fp16_enable": flag(config.fp16_enable),
            "migraphx_int8_enable": flag(config.int8_enable),
            "migraphx_exhaustive_tune": flag(config.exhaustive_tune),
        }
        put(options, "migraphx_mem_limit", config.mem_limit_bytes)
        if config.cache_enable:
            platform = {"ort": self.host.ort_version(), **amd_details(self.host)}
            programs = compile_cache(context.cache_dir, context.model_digest, config, platform)
            if programs is not None:
                options["migraphx_model_cache_dir"] = str(programs)
        return options
