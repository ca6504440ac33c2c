"""NVIDIA CUDA execution provider: discrete GPUs and Jetson."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.providers import nvidia
from appliance.providers.base import AcceleratorConfig, Builtin, Probe, SessionContext, expect, flag, put


class CUDAConfig(AcceleratorConfig):
    model_config = ConfigDict(extra="forbid", title="CUDA")

    device_id: int = Field(0, ge=0, description="CUDA device ordinal, as CUDA_VISIBLE_DEVICES leaves them.")
    gpu_mem_limit_bytes: int | None = Field(
        None, gt=0, description="Cap on the EP's memory arena; unset lets it grow to the whole GPU."
    )
    arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = Field(
        "kNextPowerOfTwo", description="How the arena grows: in powers of two (fewer, larger) or as asked."
    )
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "EXHAUSTIVE",
        description="How cuDNN picks convolution kernels: EXHAUSTIVE benchmarks them once per shape "
        "(slower first run, fastest after), HEURISTIC guesses, DEFAULT takes the first.",
    )
    cudnn_conv_use_max_workspace: bool = Field(
        True, description="Let cuDNN use as much workspace as the fastest convolution kernel wants."
    )
    use_tf32: bool = Field(
        True, description="Allow TF32 tensor-core math for fp32 MatMul/Conv on Ampere and newer."
    )
    enable_cuda_graph: bool = Field(
        False, description="Capture and replay CUDA graphs; only for models with fixed input shapes."
    )
    prefer_nhwc: bool = Field(False, description="Prefer channels-last kernels where the EP has them.")


class CUDA(Builtin):
    name: ClassVar[str] = "cuda"
    ep_name: ClassVar[str] = "CUDAExecutionProvider"
    config_model: ClassVar[type[BaseModel]] = CUDAConfig
    install_hint: ClassVar[str] = "install onnxruntime-gpu (on Jetson: the JetPack wheel) instead"

    def probe_device(self) -> Probe:
        problem = nvidia.gpu_problem(self.host)
        if problem:
            return Probe(False, f"{self.ep_name} is compiled in but {problem}")
        return Probe(True, details=nvidia.gpu_details(self.host))

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        return cuda_options(expect(config, CUDAConfig))


def cuda_options(config: CUDAConfig) -> dict[str, str]:
    """The CUDA EP's options; TensorRT reuses them for the CUDA EP it hands leftover nodes to."""
    options = {
        "device_id": str(config.device_id),
        "arena_extend_strategy": config.arena_extend_strategy,
        "cudnn_conv_algo_search": config.cudnn_conv_algo_search,
        "cudnn_conv_use_max_workspace": flag(config.cudnn_conv_use_max_workspace),
        "use_tf32": flag(config.use_tf32),
        "enable_cuda_graph": flag(config.enable_cuda_graph),
        "prefer_nhwc": flag(config.prefer_nhwc),
    }
    put(options, "gpu_mem_limit", config.gpu_mem_limit_bytes)
    return options
