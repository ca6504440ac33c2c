"""Provider chains on real ONNX Runtime sessions: fallbacks, their record, and models of every precision."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from pydantic import BaseModel

from appliance.engine.model import LoadedModel
from appliance.engine.repository import Repository
from appliance.errors import ModelLoadError, ProviderUnavailable
from appliance.providers.base import AcceleratorConfig, Probe, SessionContext
from appliance.providers.cpu import CPU
from appliance.providers.fakehost import StaticHost
from appliance.providers.registry import Registry
from appliance.providers.selection import Fallback, Placement, open_session
from appliance.settings import ModelSettings

SHAPE = (2, 3, 8, 8)  # N, C, H, W
RNG_SEED = 7


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def conv_model(path: Path, precision: str = "fp32", io: str = "fp32") -> Path:
    """x [N,3,8,8] -> Relu(Conv 3x3, 4 channels) -> y; fp16 weights and compute when asked."""
    rng = np.random.default_rng(RNG_SEED)
    is_fp16 = precision == "fp16"
    dtype, elem = (np.float16, TensorProto.FLOAT16) if is_fp16 else (np.float32, TensorProto.FLOAT)
    weights = numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(dtype), "w")
    bias = numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(dtype), "b")
    io_elem = TensorProto.FLOAT16 if io == "fp16" else TensorProto.FLOAT
    nodes, source, sink = [], "x", "y"
    if io_elem != elem:  # fp16 compute behind fp32 inputs and outputs
        nodes.append(helper.make_node("Cast", ["x"], ["x16"], to=elem))
        source, sink = "x16", "y16"
    nodes += [
        helper.make_node("Conv", [source, "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], [sink]),
    ]
    if io_elem != elem:
        nodes.append(helper.make_node("Cast", ["y16"], ["y"], to=io_elem))
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", io_elem, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", io_elem, ["N", 4, 8, 8])],
        [weights, bias],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def bf16_model(path: Path) -> Path:
    """A precision the CPU EP has no kernel for: Relu on bfloat16."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu_bf16")],
        "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N", 4])],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


class Calibration(CalibrationDataReader):
    def __init__(self) -> None:
        rng = np.random.default_rng(RNG_SEED + 1)
        self._batches = iter([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(16)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def int8_model(path: Path, quant_format: QuantFormat) -> Path:
    source = conv_model(path.with_name("fp32-source.onnx"))
    quantize_static(
        str(source),
        str(path),
        Calibration(),
        quant_format=quant_format,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return path


MODELS: dict[str, Callable[[Path], Path]] = {
    "fp32": lambda path: conv_model(path),
    "fp16-fp32-io": lambda path: conv_model(path, "fp16", io="fp32"),
    "fp16-fp16-io": lambda path: conv_model(path, "fp16", io="fp16"),
    "int8-qdq": lambda path: int8_model(path, QuantFormat.QDQ),
    "int8-qoperator": lambda path: int8_model(path, QuantFormat.QOperator),
}


@pytest.fixture(scope="module")
def registry() -> Registry:
    """The real registry: built-ins plus the test plugins installed from tests/fixtures/fake_provider."""
    registry = Registry.discover()
    if "fake" not in registry.names:
        pytest.fail("no test plugins: tests/conftest.py puts tests/fixtures/fake_provider on sys.path")
    return registry


def context_for(path: Path, tmp_path: Path) -> SessionContext:
    return SessionContext(path.stem, hashlib.sha256(path.read_bytes()).hexdigest(), tmp_path / "cache")


def load(
    path: Path, tmp_path: Path, registry: Registry, chain: list[str], **raw: dict[str, object]
) -> Placement:
    return open_session(
        path,
        chain=chain,
        registry=registry,
        configs=registry.configs(raw),
        context=context_for(path, tmp_path),
        session_options=ort.SessionOptions,
    )


def run(placement: Placement, x: np.ndarray) -> np.ndarray:
    feed_type = np.float16 if placement.session.get_inputs()[0].type == "tensor(float16)" else np.float32
    return placement.session.run(None, {"x": x.astype(feed_type)})[0].astype(np.float32)


# --- precision ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_precision_loads_on_cpu_and_matches_fp32(kind: str, tmp_path: Path, registry: Registry) -> None:
    x = np.random.default_rng(RNG_SEED + 2).standard_normal(SHAPE).astype(np.float32)
    reference = run(load(conv_model(tmp_path / "reference.onnx"), tmp_path, registry, ["cpu"]), x)
    placement = load(MODELS[kind](tmp_path / f"{kind}.onnx"), tmp_path, registry, ["cpu"])
    assert placement.provider == "cpu"
    assert placement.fallbacks == []
    assert placement.nodes.get("CPUExecutionProvider", 0) > 0
    tolerance = 0.1 * float(np.abs(reference).max()) if kind.startswith("int8") else 2e-2
    np.testing.assert_allclose(run(placement, x), reference, atol=tolerance)


def test_a_precision_no_provider_can_run_fails_naming_the_op(tmp_path: Path, registry: Registry) -> None:
    model = bf16_model(tmp_path / "bf16.onnx")
    with pytest.raises(ModelLoadError) as caught:
        load(model, tmp_path, registry, ["fake", "cpu"], fake={"fail_session": False})
    message = str(caught.value)
    assert message.startswith("model 'bf16': no provider could load it: fake: NOT_IMPLEMENTED")
    assert message.count("Could not find an implementation for Relu(14) node with name 'relu_bf16'") == 2


class AzureOnly:
    """An accelerator-shaped provider whose EP (ORT's Azure EP) runs none of a model's nodes."""

    name: ClassVar[str] = "nodeless"
    ep_name: ClassVar[str] = "AzureExecutionProvider"
    config_model: ClassVar[type[BaseModel]] = AcceleratorConfig
    is_default: ClassVar[bool] = False

    def probe(self) -> Probe:
        return Probe(True)

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        return {}

    def library_path(self) -> Path | None:
        return None


needs_azure_ep = pytest.mark.skipif(
    "AzureExecutionProvider" not in ort.get_available_providers(),
    reason="this onnxruntime has no AzureExecutionProvider to stand in for an EP lacking kernels",
)


@needs_azure_ep
def test_an_ep_that_may_not_hand_nodes_to_cpu_falls_back_with_ort_reason(tmp_path: Path) -> None:
    registry = Registry([AzureOnly(), CPU()])
    model = conv_model(tmp_path / "fp16.onnx", "fp16")
    placement = load(model, tmp_path, registry, ["nodeless", "cpu"], nodeless={"allow_cpu_fallback": False})
    assert placement.provider == "cpu"
    [fallback] = placement.fallbacks
    assert (fallback.provider, fallback.stage) == ("nodeless", "session")
    assert "fallback to CPU EP has been explicitly disabled" in fallback.reason


@needs_azure_ep
def test_an_ep_that_takes_no_node_is_skipped_unless_it_is_the_last_resort(tmp_path: Path) -> None:
    registry = Registry([AzureOnly(), CPU()])
    model = conv_model(tmp_path / "m.onnx")
    placement = load(model, tmp_path, registry, ["nodeless", "cpu"])
    assert placement.provider == "cpu"
    assert placement.fallbacks[0].stage == "no_nodes"
    assert placement.fallbacks[0].reason.startswith("AzureExecutionProvider took none of the model's")
    last_resort = load(model, tmp_path, registry, ["nodeless"])
    assert last_resort.provider == "nodeless"
    assert last_resort.nodes == {"CPUExecutionProvider": sum(last_resort.nodes.values())}


# --- fallback and its record ----------------------------------------------------------------------


def test_a_provider_whose_session_creation_fails_falls_back(tmp_path: Path, registry: Registry) -> None:
    placement = load(conv_model(tmp_path / "m.onnx"), tmp_path, registry, ["fake", "cpu"])
    assert placement.provider == "cpu"
    assert placement.ep_name == "CPUExecutionProvider"
    [fallback] = placement.fallbacks
    assert (fallback.provider, fallback.stage) == ("fake", "session")
    assert fallback.reason.startswith("INVALID_ARGUMENT : Conflicting session configuration")
    record = placement.record()
    assert record["fallbacks"] == [{"provider": "fake", "stage": "session", "reason": fallback.reason}]
    assert placement.summary().startswith("cpu (CPUExecutionProvider: ")


@pytest.mark.parametrize("fake_takes_it", [False, True], ids=["fake-refuses", "fake-takes"])
def test_a_model_toml_provider_order_replaces_the_global_one_for_that_model(
    tmp_path: Path, registry: Registry, fake_takes_it: bool
) -> None:
    repo = tmp_path / "repo"
    for name in ("own_order", "global_order"):
        (repo / name / "1").mkdir(parents=True)
        conv_model(repo / name / "1" / "model.onnx")
    (repo / "own_order" / "model.toml").write_text('providers = ["fake", "cpu"]\n')
    settings = ModelSettings(providers=["cpu"])  # appliance.toml: [models] providers = ["cpu"]
    configs = registry.configs({"fake": {"fail_session": not fake_takes_it}})

    def placed(name: str) -> Placement:
        source = Repository(repo).source(name)
        loaded = LoadedModel.load(
            source,
            registry=registry,
            settings=settings,
            provider_configs=configs,
            cache_dir=tmp_path / "cache",
            threads_per_call=1,
        )
        return loaded.placement

    own, other = placed("own_order"), placed("global_order")
    if fake_takes_it:
        assert (own.provider, own.fallbacks) == ("fake", [])
    else:
        assert own.provider == "cpu"
        assert [(f.provider, f.stage) for f in own.fallbacks] == [("fake", "session")]
    assert (other.provider, other.fallbacks) == ("cpu", [])  # the global order, which never names fake


def test_the_fake_provider_takes_the_model_when_configured_to(tmp_path: Path, registry: Registry) -> None:
    model = conv_model(tmp_path / "m.onnx", "fp16", io="fp16")
    placement = load(model, tmp_path, registry, ["fake", "cpu"], fake={"fail_session": False})
    assert (placement.provider, placement.fallbacks) == ("fake", [])


def test_unavailable_and_broken_providers_are_skipped_with_their_probe_reasons(
    tmp_path: Path, registry: Registry
) -> None:
    if registry.probe("cuda").available:
        pytest.skip("this box has a usable CUDA provider")
    placement = load(conv_model(tmp_path / "m.onnx"), tmp_path, registry, ["cuda", "broken", "cpu"])
    assert placement.provider == "cpu"
    assert placement.fallbacks == [
        Fallback("cuda", registry.probe("cuda").reason, "unavailable"),
        Fallback("broken", registry.probe("broken").reason, "unavailable"),
    ]


def test_every_reason_is_in_the_error_when_no_provider_takes_the_model(
    tmp_path: Path, registry: Registry
) -> None:
    with pytest.raises(ModelLoadError, match=r"model 'm': no provider could load it: fake: INVALID_ARGUMENT"):
        load(conv_model(tmp_path / "m.onnx"), tmp_path, registry, ["fake"])
    with pytest.raises(ModelLoadError, match="the provider chain is empty"):
        load(tmp_path / "m.onnx", tmp_path, registry, [])


def test_a_missing_model_file_stops_at_the_first_provider(tmp_path: Path, registry: Registry) -> None:
    model = conv_model(tmp_path / "m.onnx")
    placement_context = context_for(model, tmp_path)
    model.unlink()
    with pytest.raises(ModelLoadError) as caught:
        open_session(
            model,
            chain=["fake", "cpu"],
            registry=registry,
            configs=registry.configs({"fake": {"fail_session": False}}),
            context=placement_context,
        )
    assert "fake: NO_SUCHFILE" in str(caught.value)
    assert "cpu:" not in str(caught.value)


def test_a_provider_whose_options_refuse_this_load_is_skipped(tmp_path: Path) -> None:
    class NoDevice(CPU):
        name: ClassVar[str] = "nodevice"

        def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
            raise ProviderUnavailable("OpenVINO device 'NPU' is not on this box; found CPU")

    registry = Registry([NoDevice(), CPU()])
    placement = load(conv_model(tmp_path / "m.onnx"), tmp_path, registry, ["nodevice", "cpu"])
    assert placement.fallbacks == [
        Fallback("nodevice", "OpenVINO device 'NPU' is not on this box; found CPU", "options")
    ]


def test_each_provider_gets_its_own_cache_directory_under_the_root(tmp_path: Path) -> None:
    seen: list[SessionContext] = []

    class Recording(CPU):
        def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
            seen.append(context)
            return {}

    model = conv_model(tmp_path / "m.onnx")
    load(model, tmp_path, Registry([Recording()]), ["cpu"])
    assert [c.cache_dir for c in seen] == [tmp_path / "cache" / "cpu"]


def test_a_session_that_fails_verification_falls_back(tmp_path: Path, registry: Registry) -> None:
    tried: list[list[str]] = []

    def warm_up(session: ort.InferenceSession) -> None:
        tried.append(session.get_providers())
        if len(tried) == 1:
            raise RuntimeError("CUDA error: out of memory")

    model = conv_model(tmp_path / "m.onnx")
    placement = open_session(
        model,
        chain=["fake", "cpu"],
        registry=registry,
        configs=registry.configs({"fake": {"fail_session": False}}),
        context=context_for(model, tmp_path),
        verify=warm_up,
    )
    assert placement.provider == "cpu"
    assert placement.fallbacks == [Fallback("fake", "CUDA error: out of memory", "verify")]


def test_a_plugin_ep_library_session_is_built_on_its_ep_devices(tmp_path: Path) -> None:
    library = tmp_path / "libcpu_ep.so"

    class DeviceCPU(CPU):
        """The CPU EP reached through ORT's EP-device API, as a plugin EP library would be."""

        name: ClassVar[str] = "devicecpu"

        def library_path(self) -> Path | None:
            return library

    host = StaticHost(files={str(library): ""}, ep_devices={"CPUExecutionProvider": ["CPU"]})
    registry = Registry([DeviceCPU(host)], host=host)
    placement = load(conv_model(tmp_path / "m.onnx"), tmp_path, registry, ["devicecpu"])
    assert placement.provider == "devicecpu"
    assert host.registered == {"devicecpu": library}


def test_a_plugin_ep_library_onnx_runtime_refuses_is_unavailable_with_its_words(tmp_path: Path) -> None:
    library = tmp_path / "libnot_an_ep.so"
    library.write_text("not a shared library")

    class Refused(CPU):
        name: ClassVar[str] = "refused"
        ep_name: ClassVar[str] = "RefusedExecutionProvider"

        def library_path(self) -> Path | None:
            return library

    probe = Registry([Refused(), CPU()]).probe("refused")  # the real host: ORT really tries to load it
    assert not probe.available
    assert probe.reason.startswith(f"ONNX Runtime refused plugin EP library {library}: FAIL : Failed to load")


@pytest.mark.gpu
def test_cuda_runs_the_model_for_real(tmp_path: Path, registry: Registry) -> None:
    if not registry.probe("cuda").available:
        pytest.skip(f"no usable CUDA provider: {registry.probe('cuda').reason}")
    x = np.random.default_rng(RNG_SEED + 3).standard_normal(SHAPE).astype(np.float32)
    model = conv_model(tmp_path / "m.onnx")
    placement = load(model, tmp_path, registry, ["cuda", "cpu"])
    assert placement.provider == "cuda", placement.summary()
    assert placement.nodes.get("CUDAExecutionProvider", 0) > 0
    np.testing.assert_allclose(run(placement, x), run(load(model, tmp_path, registry, ["cpu"]), x), atol=1e-3)
