"""Arm Compute Library execution provider: NEON/SVE kernels on Arm Cortex-A and Neoverse CPUs."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from appliance.providers.base import AcceleratorConfig, Builtin, Probe, SessionContext, expect, flag

ARM_MACHINES = ("aarch64", "arm64", "armv7l", "armv8l")


class ACLConfig(AcceleratorConfig):
    model_config = ConfigDict(extra="forbid", title="ACL")

    enable_fast_math: bool = Field(
        False, description="Let ACL use faster, less exact MatMul/Conv kernels (e.g. bf16 or Winograd)."
    )


class ACL(Builtin):
    name: ClassVar[str] = "acl"
    ep_name: ClassVar[str] = "ACLExecutionProvider"
    uses_host_cores: ClassVar[bool] = True
    config_model: ClassVar[type[BaseModel]] = ACLConfig
    install_hint: ClassVar[str] = "needs an ONNX Runtime built with --use_acl, on Arm"

    def probe_device(self) -> Probe:
        return arm_only(self.host.machine())

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        return {"enable_fast_math": flag(expect(config, ACLConfig).enable_fast_math, "true", "false")}


def arm_only(machine: str) -> Probe:
    if machine.lower() not in ARM_MACHINES:
        return Probe(False, f"needs an Arm CPU; this is {machine}")
    return Probe(True, details={"machine": machine})
