"""Apple CoreML execution provider: the Neural Engine, GPU and CPU of Apple silicon."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.providers.base import AcceleratorConfig, Builtin, Probe, SessionContext, expect, flag
from appliance.providers.caches import compile_cache


class CoreMLConfig(AcceleratorConfig):
    model_config = ConfigDict(extra="forbid", title="CoreML")

    model_format: Literal["MLProgram", "NeuralNetwork"] = Field(
        "MLProgram", description="CoreML model kind: MLProgram (macOS 12+, more ops, fp16) or NeuralNetwork."
    )
    compute_units: Literal["ALL", "CPUAndNeuralEngine", "CPUAndGPU", "CPUOnly"] = Field(
        "ALL", description="Which Apple units CoreML may use."
    )
    require_static_input_shapes: bool = Field(
        False, description="Only take nodes whose inputs have static shapes (dynamic ones run slower)."
    )
    specialization_strategy: Literal["Default", "FastPrediction"] = Field(
        "Default", description="FastPrediction trades a slower first load for lower latency."
    )
    cache_enable: bool = Field(
        True,
        description="Keep compiled CoreML models under the cache directory, keyed by model digest and "
        "ONNX Runtime and OS versions.",
    )


class CoreML(Builtin):
    name: ClassVar[str] = "coreml"
    ep_name: ClassVar[str] = "CoreMLExecutionProvider"
    config_model: ClassVar[type[BaseModel]] = CoreMLConfig
    install_hint: ClassVar[str] = "the onnxruntime wheel for macOS has it"

    def probe_device(self) -> Probe:
        if self.host.system() != "Darwin":
            return Probe(False, f"CoreML runs on macOS only; this is {self.host.system()}")
        return Probe(True, details={"machine": self.host.machine()})

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        config = expect(config, CoreMLConfig)
        options = {
            "ModelFormat": config.model_format,
            "MLComputeUnits": config.compute_units,
            "RequireStaticInputShapes": flag(config.require_static_input_shapes),
            "SpecializationStrategy": config.specialization_strategy,
        }
        if config.cache_enable:
            platform = {"ort": self.host.ort_version(), "os": self.host.kernel_release()}
            models = compile_cache(context.cache_dir, context.model_digest, config, platform)
            if models is not None:
                options["ModelCacheDirectory"] = str(models)
        return options
