"""Intel oneDNN (DNNL) execution provider: oneDNN's kernels for x86 CPUs."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from appliance.providers.base import AcceleratorConfig, Builtin, Probe, SessionContext, expect, flag

X86_MACHINES = ("x86_64", "amd64", "i686")


class DNNLConfig(AcceleratorConfig):
    model_config = ConfigDict(extra="forbid", title="oneDNN")

    use_arena: bool = Field(True, description="Allocate from the EP's memory arena (faster, holds memory).")


class DNNL(Builtin):
    name: ClassVar[str] = "dnnl"
    ep_name: ClassVar[str] = "DnnlExecutionProvider"
    uses_host_cores: ClassVar[bool] = True
    config_model: ClassVar[type[BaseModel]] = DNNLConfig
    install_hint: ClassVar[str] = "needs an ONNX Runtime built with --use_dnnl"

    def probe_device(self) -> Probe:
        machine = self.host.machine()
        if machine.lower() not in X86_MACHINES:
            return Probe(False, f"needs an x86 CPU; this is {machine}")
        return Probe(True, details={"machine": machine})

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        return {"use_arena": flag(expect(config, DNNLConfig).use_arena)}
