"""Provider registry, probes, options and cache keys on boxes simulated through the Host seam."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from appliance.errors import ConfigError, ProviderUnavailable
from appliance.providers import report
from appliance.providers.base import AcceleratorConfig, Probe, Provider, SessionContext
from appliance.providers.caches import keyed_dir
from appliance.providers.cuda import CUDAConfig
from appliance.providers.fakehost import StaticHost
from appliance.providers.openvino import OpenVINO, OpenVINOConfig
from appliance.providers.registry import BUILTINS, Registry
from appliance.providers.tensorrt import TensorRT, TensorRTConfig

DIGEST = hashlib.sha256(b"model").hexdigest()
REQUIRED = {
    "cpu", "cuda", "tensorrt", "openvino", "rocm", "migraphx", "directml", "coreml", "qnn", "cann",
    "xnnpack", "acl", "armnn", "rknpu", "dnnl",
}  # fmt: skip
NVIDIA_FILES = {
    "/dev/nvidia0": "",
    "/proc/driver/nvidia/version": "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22\n",
    "/proc/driver/nvidia/gpus/0000:01:00.0/information": "Model: \t\t NVIDIA RTX A2000\nIRQ: 16\n",
}
CUDA_LIBRARIES: dict[str, dict[str, int]] = {
    "libcudart.so.12": {},
    "libcudnn.so.9": {},
    "libnvinfer.so.10": {"getInferLibVersion": 100900},
}


@pytest.fixture
def fake_plugin() -> None:
    """The test plugins come from a real distribution installed into the venv (see its pyproject)."""
    try:
        metadata.distribution("appliance-fake-provider")
    except metadata.PackageNotFoundError:
        pytest.fail("no test plugins: tests/conftest.py puts tests/fixtures/fake_provider on sys.path")


def gpu_box(**changes: Any) -> StaticHost:
    """An x86 box with an NVIDIA dGPU and onnxruntime-gpu (CUDA 12.8, TensorRT 10.9)."""
    box: dict[str, Any] = {
        "eps": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
        "package": "onnxruntime-gpu",
        "cuda_version": "12.8",
        "files": dict(NVIDIA_FILES),
        "libraries": dict(CUDA_LIBRARIES),
    }
    return StaticHost(**(box | changes))


def intel_box(*, npu: bool = False) -> StaticHost:
    """An Intel iGPU box (and NPU if asked) with onnxruntime-openvino."""
    files = {"/sys/class/drm/renderD128/device/vendor": "0x8086\n", "/dev/dri/renderD128": ""}
    if npu:
        files["/sys/class/accel/accel0/device/vendor"] = "0x8086\n"
    eps = ("OpenVINOExecutionProvider", "CPUExecutionProvider")
    versions = {"openvino": "2025.3.0"}
    return StaticHost(eps=eps, package="onnxruntime-openvino", files=files, distributions=versions)


def context(tmp_path: Path) -> SessionContext:
    return SessionContext("detector", DIGEST, tmp_path / "cache")


def everything_box() -> StaticHost:
    """Every EP compiled in and every device node and library present (no real box is like this)."""
    files = {
        **NVIDIA_FILES,
        "/dev/kfd": "",
        "/dev/davinci0": "",
        "/dev/rknpu": "",
        "/dev/fastrpc-cdsp": "",
        "/sys/class/drm/renderD128/device/vendor": "0x8086",
    }
    libraries = {
        **CUDA_LIBRARIES,
        **{n: {} for n in ("libamdhip64.so", "libascendcl.so", "librknpu_ddk.so", "libQnnHtp.so")},
    }
    eps = tuple(cls.ep_name for cls in BUILTINS)
    return StaticHost(eps=eps, all_eps=eps, files=files, libraries=libraries)


# --- the registry and its built-ins ---------------------------------------------------------------


def test_builtins_cover_every_required_accelerator() -> None:
    assert {cls.name for cls in BUILTINS} >= REQUIRED
    assert all(isinstance(cls(StaticHost()), Provider) for cls in BUILTINS)


def test_a_bare_cpu_box_lists_every_accelerator_as_unavailable_with_its_reason() -> None:
    registry = Registry.discover(StaticHost())
    for cls in BUILTINS:
        probe = registry.probe(cls.name)
        assert probe.available is (cls.name == "cpu"), cls.name
        assert probe.available or cls.ep_name in probe.reason
    assert registry.probe("cuda").reason == (
        "CUDAExecutionProvider is not compiled into the installed onnxruntime 1.32.0; "
        "install onnxruntime-gpu (on Jetson: the JetPack wheel) instead"
    )
    assert "does not list ROCMExecutionProvider" in registry.probe("rocm").reason


def test_cuda_on_a_gpu_box_reports_driver_and_gpu() -> None:
    probe = Registry.discover(gpu_box()).probe("cuda")
    assert probe == Probe(True, "", {"driver": "550.54.14", "gpus": "NVIDIA RTX A2000", "cuda": "12.8"})


def test_cuda_compiled_in_but_no_gpu_node_says_which_nodes_are_missing() -> None:
    files = {k: v for k, v in NVIDIA_FILES.items() if k != "/dev/nvidia0"}
    probe = Registry.discover(gpu_box(files=files)).probe("cuda")
    assert not probe.available
    assert probe.reason.startswith("CUDAExecutionProvider is compiled in but no NVIDIA GPU device node")
    assert "/dev/nvidia0" in probe.reason


def test_cuda_without_its_runtime_library_names_the_library() -> None:
    libraries = {k: v for k, v in CUDA_LIBRARIES.items() if k != "libcudart.so.12"}
    probe = Registry.discover(gpu_box(libraries=libraries)).probe("cuda")
    assert not probe.available
    assert "libcudart.so.12 not loadable" in probe.reason


def test_jetson_is_recognised_by_its_nvgpu_node_and_l4t_release() -> None:
    files = {
        "/dev/nvhost-ctrl-gpu": "",
        "/etc/nv_tegra_release": "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic\n",
        "/proc/device-tree/model": "NVIDIA Jetson Orin Nano Developer Kit\x00",
    }
    probe = Registry.discover(gpu_box(files=files, arch="aarch64")).probe("cuda")
    assert probe.available
    assert probe.details["driver"] == "l4t-36.4.3"
    assert probe.details["gpus"] == "NVIDIA Jetson Orin Nano Developer Kit"


def test_tensorrt_needs_libnvinfer_and_reports_its_version() -> None:
    assert Registry.discover(gpu_box()).probe("tensorrt").details["tensorrt"] == "10.9.0"
    libraries = {k: v for k, v in CUDA_LIBRARIES.items() if k != "libnvinfer.so.10"}
    probe = Registry.discover(gpu_box(libraries=libraries)).probe("tensorrt")
    assert not probe.available
    assert "TensorRT not loadable (libnvinfer.so.10" in probe.reason


def test_openvino_finds_intel_gpu_and_npu_and_ignores_other_vendors() -> None:
    host = intel_box(npu=True)
    host.files["/sys/class/drm/renderD129/device/vendor"] = "0x1002\n"  # an AMD card beside it
    details = Registry.discover(host).probe("openvino").details
    assert details == {"devices": "CPU, GPU, NPU", "openvino": "2025.3.0"}
    assert OpenVINO(StaticHost(eps=("OpenVINOExecutionProvider",))).devices() == ["CPU"]


def test_openvino_prefers_ort_ep_device_list_when_it_has_one() -> None:
    host = intel_box()
    host.ep_devices["OpenVINOExecutionProvider"] = ["CPU", "NPU"]
    assert OpenVINO(host).devices() == ["CPU", "NPU"]


def test_openvino_options_default_to_the_gpu_with_a_keyed_compile_cache(tmp_path: Path) -> None:
    options = OpenVINO(intel_box()).ort_options(OpenVINOConfig(), context(tmp_path))
    assert options["device_type"] == "GPU"
    cache = Path(options["cache_dir"])
    assert cache.is_dir()
    assert cache.parent == tmp_path / "cache" / DIGEST[:16]
    for part in ("ort-1.32.0", "openvino-2025.3.0", "kernel-6.8.0", "device-gpu"):
        assert part in cache.name


def test_openvino_device_that_is_not_there_refuses_with_what_is(tmp_path: Path) -> None:
    with pytest.raises(ProviderUnavailable, match=r"device 'NPU' is not on this box; found CPU, GPU$"):
        OpenVINO(intel_box()).ort_options(OpenVINOConfig(device_type="NPU"), context(tmp_path))
    composite = OpenVINOConfig(device_type="AUTO:NPU,CPU")  # OpenVINO itself picks among those
    assert OpenVINO(intel_box()).ort_options(composite, context(tmp_path))["device_type"] == "AUTO:NPU,CPU"


@pytest.mark.parametrize(
    ("name", "host", "expected"),
    [
        ("rknpu", StaticHost(eps=("RknpuExecutionProvider",), arch="aarch64"), "/dev/rknpu"),
        ("cann", StaticHost(eps=("CANNExecutionProvider",), arch="aarch64"), "/dev/davinci[0-9]*"),
        ("qnn", StaticHost(eps=("QNNExecutionProvider",), arch="aarch64"), "libQnnHtp.so"),
        ("migraphx", StaticHost(eps=("MIGraphXExecutionProvider",)), "/dev/kfd"),
        ("coreml", StaticHost(eps=("CoreMLExecutionProvider",)), "CoreML runs on macOS only; this is Linux"),
        ("directml", StaticHost(eps=("DmlExecutionProvider",)), "DirectML runs on Windows only"),
        ("acl", StaticHost(eps=("ACLExecutionProvider",)), "needs an Arm CPU; this is x86_64"),
        ("dnnl", StaticHost(eps=("DnnlExecutionProvider",), arch="aarch64"), "needs an x86 CPU"),
    ],
)
def test_compiled_in_ep_without_its_hardware_says_what_is_missing(
    name: str, host: StaticHost, expected: str
) -> None:
    probe = Registry.discover(host).probe(name)
    assert not probe.available
    assert expected in probe.reason


def test_ascend_box_reports_its_driver() -> None:
    host = StaticHost(
        eps=("CANNExecutionProvider", "CPUExecutionProvider"),
        files={"/dev/davinci0": "", "/usr/local/Ascend/driver/version.info": "Version=24.1.rc2\n"},
        libraries={"libascendcl.so": {}},
    )
    assert Registry.discover(host).probe("cann") == Probe(True, "", {"driver": "24.1.rc2"})


# --- options, configs and caches ------------------------------------------------------------------


@pytest.mark.parametrize("cls", BUILTINS, ids=lambda cls: cls.name)
def test_every_builtin_probes_and_builds_string_options(cls: type[Any], tmp_path: Path) -> None:
    host = everything_box()
    host.os_name = {"coreml": "Darwin", "directml": "Windows"}.get(cls.name, "Linux")
    host.arch = "aarch64" if cls.name in {"acl", "armnn"} else "x86_64"
    provider = cls(host)
    assert provider.probe().available, provider.probe().reason
    options = provider.ort_options(provider.config_model(), context(tmp_path))
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in options.items()), options


@pytest.mark.parametrize("cls", BUILTINS, ids=lambda cls: cls.name)
def test_every_config_option_is_described(cls: type[Any]) -> None:
    for field_name, field in cls.config_model.model_fields.items():
        assert field.description, f"{cls.name}.{field_name} has no description"


def test_tensorrt_engine_cache_is_keyed_by_model_driver_runtime_gpu_and_options(tmp_path: Path) -> None:
    def engine_dir(host: StaticHost, config: TensorRTConfig) -> Path:
        return Path(TensorRT(host).ort_options(config, context(tmp_path))["trt_engine_cache_path"])

    base = engine_dir(gpu_box(), TensorRTConfig())
    assert base.parent == tmp_path / "cache" / DIGEST[:16]
    assert base.name.startswith("ort-1.32.0_trt-10.9.0_driver-550.54.14_gpu-nvidia-rtx-a2000_cfg-")
    updated_files = dict(NVIDIA_FILES) | {"/proc/driver/nvidia/version": "Kernel Module  555.42.02  x\n"}
    assert engine_dir(gpu_box(files=updated_files), TensorRTConfig()) != base
    assert engine_dir(gpu_box(version="1.33.0"), TensorRTConfig()) != base
    assert engine_dir(gpu_box(), TensorRTConfig(fp16_enable=True)) != base


def test_tensorrt_options_and_cuda_for_the_rest(tmp_path: Path) -> None:
    tensorrt = TensorRT(gpu_box())
    options = tensorrt.ort_options(TensorRTConfig(engine_cache_enable=False), context(tmp_path))
    assert "trt_engine_cache_path" not in options
    assert options["trt_fp16_enable"] == "0"
    assert Path(options["trt_timing_cache_path"]).parent == tmp_path / "cache" / "timing"
    assert tensorrt.extra_eps(TensorRTConfig(device_id=1), context(tmp_path))[0][0] == "CUDAExecutionProvider"
    assert tensorrt.extra_eps(TensorRTConfig(cuda_for_rest=False), context(tmp_path)) == []


def test_an_unwritable_cache_builds_without_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING):
        options = TensorRT(gpu_box()).ort_options(TensorRTConfig(), context(tmp_path))
    assert "trt_engine_cache_enable" not in options
    assert "building without it" in caplog.text


def test_cache_key_rejects_something_that_is_not_a_digest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a sha256 hex string"):
        keyed_dir(tmp_path, "../../etc", {"ort": "1.32.0"})


def test_configs_validate_each_provider_section() -> None:
    registry = Registry.discover(StaticHost())
    configs = registry.configs({"cuda": {"device_id": 1, "gpu_mem_limit_bytes": 2**30}})
    assert configs["cuda"] == CUDAConfig(device_id=1, gpu_mem_limit_bytes=2**30)
    assert isinstance(configs["openvino"], OpenVINOConfig)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"gpu": {}}, "setting 'providers.gpu': unknown provider; known: tensorrt, cuda"),
        ({"cuda": {"device_id": "first"}}, "setting 'providers.cuda.device_id': Input should be a valid int"),
        ({"cuda": {"gpu_mem_limit": 1}}, "unknown setting 'providers.cuda.gpu_mem_limit'; cuda takes: "),
        ({"openvino": {"precision": "INT4"}}, "setting 'providers.openvino.precision'"),
    ],
)
def test_invalid_provider_settings_name_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Registry.discover(StaticHost()).configs(raw)
    assert message in str(caught.value)


# --- plugins, chains and the default order --------------------------------------------------------


def test_entry_point_plugins_are_listed_with_their_distribution(fake_plugin: None) -> None:
    registry = Registry.discover(StaticHost())
    assert registry.source("fake") == "plugin:appliance-fake-provider"
    assert registry.probe("fake").available
    assert registry.source("cuda") == "builtin"


def test_a_plugin_that_cannot_import_is_unavailable_with_its_reason(fake_plugin: None) -> None:
    registry = Registry.discover(StaticHost())
    probe = registry.probe("broken")
    assert not probe.available
    assert "ModuleNotFoundError: No module named 'appliance_fake_missing_sdk'" in probe.reason
    assert registry.source("broken") == "plugin:appliance-fake-provider"
    with pytest.raises(ProviderUnavailable, match=r"'broken': plugin appliance_fake_provider\.broken:Broken"):
        registry.get("broken")


def test_chain_rejects_unknown_duplicate_and_empty_preferences() -> None:
    registry = Registry.discover(StaticHost())
    with pytest.raises(ConfigError, match=r"unknown provider 'cudaa'; known: tensorrt, cuda, "):
        registry.chain(["cudaa", "cpu"])
    with pytest.raises(ConfigError, match=r"provider 'cpu' is listed 2 times"):
        registry.chain(["cpu", "cpu"])
    with pytest.raises(ConfigError, match="preference is empty"):
        registry.chain([])
    assert registry.chain(["broken", "cuda", "cpu"]) == ["broken", "cuda", "cpu"]  # kept, skipped at load


def test_default_order_takes_available_accelerators_then_cpu_but_never_tensorrt() -> None:
    host = gpu_box(eps=("TensorrtExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider",
                        "CPUExecutionProvider"))  # fmt: skip
    host.files |= intel_box().files
    registry = Registry.discover(host)
    assert registry.probe("tensorrt").available
    assert registry.chain(None) == ["cuda", "openvino", "cpu"]
    assert Registry.discover(StaticHost()).chain(None) == ["cpu"]


class PluginEP:
    """A provider backed by an ORT plugin EP library, as a vendor package would ship it."""

    name: ClassVar[str] = "contoso"
    ep_name: ClassVar[str] = "ContosoExecutionProvider"
    config_model: ClassVar[type[BaseModel]] = AcceleratorConfig
    is_default: ClassVar[bool] = True
    library = Path("/opt/contoso/libcontoso_ep.so")

    def probe(self) -> Probe:
        return Probe(True, details={"npu": "contoso"})

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        return {}

    def library_path(self) -> Path | None:
        return self.library


def test_a_plugin_ep_library_is_registered_before_its_probe() -> None:
    host = StaticHost(files={str(PluginEP.library): ""}, ep_devices={"ContosoExecutionProvider": ["NPU"]})
    registry = Registry([PluginEP()], host=host)
    assert registry.probe("contoso").available
    assert host.registered == {"contoso": PluginEP.library}


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        (StaticHost(), "plugin EP library /opt/contoso/libcontoso_ep.so does not exist"),
        (StaticHost(plugin_ep_api=False), "cannot load plugin EP libraries (needs 1.22 or newer)"),
        (StaticHost(files={str(PluginEP.library): ""}), "offers no device for ContosoExecutionProvider"),
    ],
)
def test_a_plugin_ep_library_that_cannot_serve_says_why(host: StaticHost, reason: str) -> None:
    probe = Registry([PluginEP()], host=host).probe("contoso")
    assert not probe.available
    assert reason in probe.reason


def test_a_probe_that_crashes_means_unavailable() -> None:
    class Crashing(PluginEP):
        name: ClassVar[str] = "crashing"

        def library_path(self) -> Path | None:
            return None

        def probe(self) -> Probe:
            raise RuntimeError("sdk exploded")

    probe = Registry([Crashing()]).probe("crashing")
    assert probe == Probe(False, "probe failed: RuntimeError: sdk exploded")


# --- `appliance providers` ------------------------------------------------------------------------


def test_inventory_lists_every_provider_runtime_and_order(fake_plugin: None) -> None:
    host = gpu_box()
    inventory = report.inventory(Registry.discover(host), ["tensorrt", "cuda", "openvino", "cpu"], host)
    json.dumps(inventory)  # JSON-ready
    assert inventory["ort_version"] == "1.32.0"
    assert inventory["ort_package"] == "onnxruntime-gpu"
    assert inventory["order"] == ["tensorrt", "cuda", "openvino", "cpu"]
    assert inventory["usable"] == ["tensorrt", "cuda", "cpu"]
    rows = {row["name"]: row for row in inventory["providers"]}
    assert set(rows) >= REQUIRED | {"fake", "broken"}
    assert rows["tensorrt"] | {"details": {}} == {
        "name": "tensorrt", "ep_name": "TensorrtExecutionProvider", "available": True, "reason": "",
        "details": {}, "is_default": False, "source": "builtin",
    }  # fmt: skip
    assert rows["broken"]["source"] == "plugin:appliance-fake-provider"
    table = report.format_table(inventory)
    assert "ONNX Runtime 1.32.0 (package onnxruntime-gpu)" in table
    assert "order (from models.providers): tensorrt -> cuda -> openvino -> cpu" in table
    assert "only when listed in models.providers" in table


def test_inventory_flags_side_by_side_packages_and_a_bad_order() -> None:
    host = StaticHost(package="onnxruntime+onnxruntime-gpu")
    inventory = report.inventory(Registry.discover(host), ["cuda", "gpu"], host)
    assert "uninstall all but one" in inventory["warning"]
    assert inventory["order"] == []
    assert "unknown provider 'gpu'" in inventory["order_error"]


def test_cli_run_prints_json_and_fails_on_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)

    settings = SimpleNamespace(models=SimpleNamespace(providers=None), providers={})
    assert report.run(parser.parse_args(["--json"]), settings) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["order"][-1] == "cpu"
    settings.providers = {"cpu": {"threads": 2}}
    assert report.run(parser.parse_args([]), settings) == 2
    assert "unknown setting 'providers.cpu.threads'" in capsys.readouterr().err
    assert report.run(parser.parse_args(["--schema"]), settings) == 0
    schemas = json.loads(capsys.readouterr().out)
    assert schemas["cuda"]["properties"]["gpu_mem_limit_bytes"]["description"]
    assert "broken" not in schemas
