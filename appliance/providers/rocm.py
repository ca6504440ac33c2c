"""AMD ROCm execution provider: AMD GPUs, for ONNX Runtime builds that still carry it."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.providers.base import AcceleratorConfig, Builtin, Probe, SessionContext, expect, flag, put
from appliance.providers.checks import first_line, missing_library, missing_nodes
from appliance.providers.host import Host

KFD_NODE = "/dev/kfd"  # the ROCm compute interface every AMD GPU stack needs
AMDGPU_VERSION_FILE = "/sys/module/amdgpu/version"  # present with AMD's packaged (DKMS) driver


class ROCmConfig(AcceleratorConfig):
    model_config = ConfigDict(extra="forbid", title="ROCm")

    device_id: int = Field(0, ge=0, description="HIP device ordinal, as HIP_VISIBLE_DEVICES leaves them.")
    gpu_mem_limit_bytes: int | None = Field(
        None, gt=0, description="Cap on the EP's memory arena; unset lets it grow to the whole GPU."
    )
    arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = Field(
        "kNextPowerOfTwo", description="How the arena grows: in powers of two (fewer, larger) or as asked."
    )
    miopen_conv_exhaustive_search: bool = Field(
        False, description="Benchmark every MIOpen convolution kernel once per shape (slow first run)."
    )
    tunable_op_enable: bool = Field(False, description="Use ORT's tunable kernels where they exist.")
    tunable_op_tuning_enable: bool = Field(
        False, description="Tune those kernels at run time (slow first runs, faster later ones)."
    )


class ROCm(Builtin):
    name: ClassVar[str] = "rocm"
    ep_name: ClassVar[str] = "ROCMExecutionProvider"
    config_model: ClassVar[type[BaseModel]] = ROCmConfig
    install_hint: ClassVar[str] = "use migraphx on AMD GPUs, or an ONNX Runtime ROCm build that has this EP"

    def probe_device(self) -> Probe:
        problem = missing_nodes(self.host, [KFD_NODE], "AMD GPU compute node (amdgpu driver loaded?)")
        problem = problem or missing_library(self.host, ["libamdhip64.so"], "the HIP runtime")
        if problem:
            return Probe(False, f"{self.ep_name} is compiled in but {problem}")
        return Probe(True, details=amd_details(self.host))

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        config = expect(config, ROCmConfig)
        options = {
            "device_id": str(config.device_id),
            "arena_extend_strategy": config.arena_extend_strategy,
            "miopen_conv_exhaustive_search": flag(config.miopen_conv_exhaustive_search),
            "tunable_op_enable": flag(config.tunable_op_enable),
            "tunable_op_tuning_enable": flag(config.tunable_op_tuning_enable),
        }
        put(options, "gpu_mem_limit", config.gpu_mem_limit_bytes)
        return options


def amd_details(host: Host) -> dict[str, str]:
    """What AMD's driver says about itself; MIGraphX keys its compile cache by it."""
    version = first_line(host.read_text(AMDGPU_VERSION_FILE))
    return {"driver": version or f"kernel {host.kernel_release()}"}
