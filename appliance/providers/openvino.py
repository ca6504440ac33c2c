"""Intel OpenVINO execution provider: Intel CPUs, integrated and discrete GPUs, and NPUs."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.errors import ProviderUnavailable
from appliance.providers.base import AcceleratorConfig, Builtin, Probe, SessionContext, expect, flag, put
from appliance.providers.caches import compile_cache

INTEL_VENDOR = "0x8086"
GPU_VENDOR_FILES = "/sys/class/drm/renderD*/device/vendor"  # i915/xe render nodes, one per GPU
NPU_VENDOR_FILES = "/sys/class/accel/accel*/device/vendor"  # intel_vpu (Meteor Lake and later NPUs)


class OpenVINOConfig(AcceleratorConfig):
    model_config = ConfigDict(extra="forbid", title="OpenVINO")

    device_type: str | None = Field(
        None,
        description="OpenVINO device: CPU, GPU, GPU.1, NPU, or a composite such as AUTO:GPU,CPU or "
        "HETERO:GPU,CPU. Unset: GPU when an Intel GPU is present, else CPU; NPU only when named, as it "
        "compiles for static shapes.",
    )
    precision: Literal["FP32", "FP16", "ACCURACY"] | None = Field(
        None,
        description="Inference precision; unset takes the device default (FP16 on GPU and NPU, FP32 on "
        "CPU); ACCURACY keeps the model's own precision.",
    )
    num_of_threads: int | None = Field(None, ge=1, description="CPU threads for the CPU device.")
    num_streams: int | None = Field(None, ge=1, description="Parallel inference streams on the device.")
    cache_enable: bool = Field(
        True,
        description="Keep compiled models under the cache directory, keyed by model digest, device, "
        "kernel, OpenVINO and ONNX Runtime versions, so a restart skips the (long, on GPU/NPU) compile.",
    )
    enable_qdq_optimizer: bool = Field(
        False, description="Rewrite QDQ-quantised models for the NPU's int8 path (NPU only)."
    )
    disable_dynamic_shapes: bool | None = Field(
        None, description="Compile for the first shapes seen; unset: the EP decides (always on for NPU)."
    )


class OpenVINO(Builtin):
    name: ClassVar[str] = "openvino"
    ep_name: ClassVar[str] = "OpenVINOExecutionProvider"
    config_model: ClassVar[type[BaseModel]] = OpenVINOConfig
    install_hint: ClassVar[str] = "install onnxruntime-openvino instead"

    def probe_device(self) -> Probe:
        return Probe(True, details={"devices": ", ".join(self.devices()), **self._versions()})

    def devices(self) -> list[str]:
        """OpenVINO devices on this box: from ORT's EP devices when it lists them, else from sysfs."""
        listed = [d for d in ("CPU", "GPU", "NPU") if d in self.host.ep_device_types(self.ep_name)]
        if listed:
            return listed
        found = ["CPU"]
        for device, pattern in (("GPU", GPU_VENDOR_FILES), ("NPU", NPU_VENDOR_FILES)):
            vendors = (self.host.read_text(path) or "" for path in self.host.glob(pattern))
            if any(vendor.strip() == INTEL_VENDOR for vendor in vendors):
                found.append(device)
        return found

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        config = expect(config, OpenVINOConfig)
        present = self.devices()
        device = config.device_type or ("GPU" if "GPU" in present else "CPU")
        wanted = device.split(".")[0]
        if ":" not in device and wanted not in present:
            raise ProviderUnavailable(
                f"OpenVINO device {device!r} is not on this box; found {', '.join(present)}"
            )
        options = {"device_type": device}
        put(options, "precision", config.precision)
        put(options, "num_of_threads", config.num_of_threads)
        put(options, "num_streams", config.num_streams)
        if config.enable_qdq_optimizer:
            options["enable_qdq_optimizer"] = flag(True, "true", "false")
        if config.disable_dynamic_shapes is not None:
            options["disable_dynamic_shapes"] = flag(config.disable_dynamic_shapes, "true", "false")
        if config.cache_enable:
            # The GPU/NPU drivers live in the kernel, so its release stands in for the driver version.
            platform = {
                "ort": self.host.ort_version(),
                **self._versions(),
                "kernel": self.host.kernel_release(),
                "device": device,
            }
            blobs = compile_cache(context.cache_dir, context.model_digest, config, platform)
            if blobs is not None:
                options["cache_dir"] = str(blobs)
        return options

    def _versions(self) -> dict[str, str]:
        openvino = self.host.distribution_version("openvino")
        return {"openvino": openvino} if openvino else {}
