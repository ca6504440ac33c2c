"""NVIDIA TensorRT execution provider: the fastest NVIDIA path, used only when asked for."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from appliance.providers import nvidia
from appliance.providers.base import AcceleratorConfig, Builtin, Probe, SessionContext, expect, flag, put
from appliance.providers.caches import compile_cache, fingerprint_name, prepared
from appliance.providers.checks import missing_library
from appliance.providers.cuda import CUDAConfig, cuda_options


class TensorRTConfig(AcceleratorConfig):
    model_config = ConfigDict(extra="forbid", title="TensorRT")

    device_id: int = Field(0, ge=0, description="CUDA device ordinal, as CUDA_VISIBLE_DEVICES leaves them.")
    fp16_enable: bool = Field(
        False,
        description="Let TensorRT build fp16 kernels (about twice as fast on tensor cores); check accuracy "
        "against the model's samples.npz before turning it on.",
    )
    int8_enable: bool = Field(
        False, description="Let TensorRT build int8 kernels; the model must carry its scales (QDQ)."
    )
    max_workspace_size_bytes: int | None = Field(
        None, gt=0, description="Scratch memory TensorRT may use while building; unset: its default."
    )
    builder_optimization_level: int = Field(
        3, ge=0, le=5, description="0-5: higher searches longer at build time for faster engines."
    )
    min_subgraph_size: int = Field(
        1, ge=1, description="Smallest group of nodes worth a TensorRT engine; smaller groups go to CUDA."
    )
    engine_cache_enable: bool = Field(
        True,
        description="Keep built engines under the cache directory, keyed by model digest, driver, TensorRT "
        "and ONNX Runtime versions and GPU, so a restart loads in seconds instead of rebuilding.",
    )
    timing_cache_enable: bool = Field(
        True, description="Keep TensorRT's kernel timing cache (shared by models on this GPU) on disk."
    )
    dla_enable: bool = Field(False, description="Run on a Jetson Deep Learning Accelerator core.")
    dla_core: int = Field(0, ge=0, description="Which DLA core, when dla_enable is true.")
    cuda_for_rest: bool = Field(
        True, description="Run nodes TensorRT cannot take on the CUDA EP rather than on the CPU."
    )


class TensorRT(Builtin):
    name: ClassVar[str] = "tensorrt"
    ep_name: ClassVar[str] = "TensorrtExecutionProvider"
    config_model: ClassVar[type[BaseModel]] = TensorRTConfig
    # Opt-in: a first build takes minutes and a lot of GPU memory per model (Frigate's reasoning too).
    is_default: ClassVar[bool] = False
    install_hint: ClassVar[str] = "install onnxruntime-gpu instead, and TensorRT 10"

    def probe_device(self) -> Probe:
        problem = nvidia.gpu_problem(self.host) or missing_library(self.host, [self._library()], "TensorRT")
        if problem:
            return Probe(False, f"{self.ep_name} is compiled in but {problem}")
        return Probe(True, details={**nvidia.gpu_details(self.host), "tensorrt": self._version()})

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        config = expect(config, TensorRTConfig)
        options = {
            "device_id": str(config.device_id),
            "trt_fp16_enable": flag(config.fp16_enable),
            "trt_int8_enable": flag(config.int8_enable),
            "trt_builder_optimization_level": str(config.builder_optimization_level),
            "trt_min_subgraph_size": str(config.min_subgraph_size),
            "trt_dla_enable": flag(config.dla_enable),
            "trt_dla_core": str(config.dla_core),
        }
        put(options, "trt_max_workspace_size", config.max_workspace_size_bytes)
        platform = {
            "ort": self.host.ort_version(),
            "trt": self._version(),
            "driver": nvidia.driver_version(self.host),
            "gpu": ",".join(nvidia.gpu_models(self.host)) or None,
        }
        if config.engine_cache_enable:
            engines = compile_cache(context.cache_dir, context.model_digest, config, platform)
            if engines is not None:
                options |= {"trt_engine_cache_enable": "1", "trt_engine_cache_path": str(engines)}
        if config.timing_cache_enable:
            del platform["ort"]  # timings belong to the GPU and TensorRT, whatever the model
            timing = context.cache_dir / "timing" / fingerprint_name(platform)
            if prepared(timing) is not None:
                options |= {"trt_timing_cache_enable": "1", "trt_timing_cache_path": str(timing)}
        return options

    def extra_eps(self, config: BaseModel, context: SessionContext) -> list[tuple[str, dict[str, str]]]:
        config = expect(config, TensorRTConfig)
        if not config.cuda_for_rest or "CUDAExecutionProvider" not in self.host.available_eps():
            return []
        return [("CUDAExecutionProvider", cuda_options(CUDAConfig(device_id=config.device_id)))]

    def _library(self) -> str:
        return "nvinfer_10.dll" if self.host.system() == "Windows" else "libnvinfer.so.10"

    def _version(self) -> str:
        encoded = self.host.library_int(self._library(), "getInferLibVersion")  # e.g. 100900 for 10.9.0
        if encoded is None:
            return "unknown"
        return f"{encoded // 10000}.{encoded // 100 % 100}.{encoded % 100}"
