"""ONNX Runtime's CPU execution provider: always present, the last resort of every chain."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

from appliance.providers.base import CPU_EP, Builtin, NoOptions, Probe


class CPU(Builtin):
    name: ClassVar[str] = "cpu"
    ep_name: ClassVar[str] = CPU_EP
    uses_host_cores: ClassVar[bool] = True
    config_model: ClassVar[type[BaseModel]] = NoOptions
    is_default: ClassVar[bool] = True

    def probe(self) -> Probe:
        return Probe(True, details={"machine": self.host.machine()})
