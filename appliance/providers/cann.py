"""Huawei CANN execution provider: Ascend NPUs (Atlas cards and modules)."""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.providers.base import AcceleratorConfig, Builtin, Probe, SessionContext, expect, flag, put
from appliance.providers.checks import missing_library, missing_nodes

DEVICE_NODES = ("/dev/davinci[0-9]*",)  # one per NPU; /dev/davinci_manager is the driver's control node
DRIVER_VERSION_FILE = "/usr/local/Ascend/driver/version.info"


class CANNConfig(AcceleratorConfig):
    model_config = ConfigDict(extra="forbid", title="CANN")

    device_id: int = Field(0, ge=0, description="Ascend device ordinal (davinci<N>).")
    npu_mem_limit_bytes: int | None = Field(None, gt=0, description="Cap on the EP's memory arena.")
    arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = Field(
        "kNextPowerOfTwo", description="How the arena grows: in powers of two (fewer, larger) or as asked."
    )
    enable_cann_graph: bool = Field(
        True, description="Run the whole graph through CANN's graph engine rather than op by op."
    )
    precision_mode: (
        Literal[
            "force_fp32", "force_fp16", "allow_fp32_to_fp16", "must_keep_origin_dtype", "allow_mix_precision"
        ]
        | None
    ) = Field(None, description="How CANN may lower precision; unset: the EP's default.")
    op_select_impl_mode: Literal["high_precision", "high_performance"] | None = Field(
        None, description="Prefer precise or fast operator implementations; unset: the EP's default."
    )


class CANN(Builtin):
    name: ClassVar[str] = "cann"
    ep_name: ClassVar[str] = "CANNExecutionProvider"
    config_model: ClassVar[type[BaseModel]] = CANNConfig
    install_hint: ClassVar[str] = "install onnxruntime-cann instead"

    def probe_device(self) -> Probe:
        problem = missing_nodes(self.host, DEVICE_NODES, "Ascend NPU device node (driver loaded?)")
        problem = problem or missing_library(self.host, ["libascendcl.so"], "the CANN runtime (set_env.sh?)")
        if problem:
            return Probe(False, f"{self.ep_name} is compiled in but {problem}")
        found = re.search(r"Version=(\S+)", self.host.read_text(DRIVER_VERSION_FILE) or "")
        return Probe(True, details={"driver": found.group(1) if found else "unknown"})

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        config = expect(config, CANNConfig)
        options = {
            "device_id": str(config.device_id),
            "arena_extend_strategy": config.arena_extend_strategy,
            "enable_cann_graph": flag(config.enable_cann_graph),
        }
        put(options, "npu_mem_limit", config.npu_mem_limit_bytes)
        put(options, "precision_mode", config.precision_mode)
        put(options, "op_select_impl_mode", config.op_select_impl_mode)
        return options
