"""Arm NN execution provider: Arm's inference engine on Cortex-A CPUs, for ORT builds that carry it."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

from appliance.providers.acl import arm_only
from appliance.providers.base import AcceleratorConfig, Builtin, Probe


class ArmNN(Builtin):
    name: ClassVar[str] = "armnn"
    ep_name: ClassVar[str] = "ArmNNExecutionProvider"
    uses_host_cores: ClassVar[bool] = True
    config_model: ClassVar[type[BaseModel]] = AcceleratorConfig  # the EP takes no options from Python
    install_hint: ClassVar[str] = (
        "needs an ONNX Runtime built with --use_armnn; acl or xnnpack serve the same CPUs"
    )

    def probe_device(self) -> Probe:
        return arm_only(self.host.machine())
