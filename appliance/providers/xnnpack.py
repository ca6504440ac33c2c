"""XNNPACK execution provider: hand-tuned float and int8 kernels for Arm (and x86) CPUs."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from appliance.providers.base import AcceleratorConfig, Builtin, SessionContext, expect, put


class XNNPACKConfig(AcceleratorConfig):
    model_config = ConfigDict(extra="forbid", title="XNNPACK")

    intra_op_num_threads: int | None = Field(
        None, ge=1, description="Threads of XNNPACK's own pool; unset: the EP's default."
    )


class XNNPACK(Builtin):
    name: ClassVar[str] = "xnnpack"
    ep_name: ClassVar[str] = "XnnpackExecutionProvider"
    uses_host_cores: ClassVar[bool] = True
    config_model: ClassVar[type[BaseModel]] = XNNPACKConfig
    install_hint: ClassVar[str] = "needs an ONNX Runtime built with --use_xnnpack"

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        options: dict[str, str] = {}
        put(options, "intra_op_num_threads", expect(config, XNNPACKConfig).intra_op_num_threads)
        return options

    def session_config(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        # XNNPACK brings its own thread pool; ORT's spinning workers would only compete with it.
        return {"session.intra_op.allow_spinning": "0"}
