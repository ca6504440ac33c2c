"""From a trained net to served files: ONNX export, int8 QDQ quantisation, sample images, model.toml."""

import hashlib
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import surfaces
import torch
from golden import INPUT, OUTPUTS
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from unsigned import unsigned_weights

OPSET = 17  # ONNX Runtime 1.32 runs up to opset 23; 17 keeps older runtimes and TensorRT/OpenVINO EPs happy
PRODUCER = "appliance models/recipe"


@dataclass(frozen=True)
class Manifest:
    """What model.toml says; the keys and meaning are the engine's (see models/README.md)."""

    description: str
    precision: str
    slo_p99_ms: float
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_ms: float
    atol: float
    rtol: float
    parameters: dict[str, float | int | str] = field(default_factory=dict)
    labels: tuple[str, ...] = ("ok", "defect")


class _Served(torch.nn.Module):
    """The net as served: image in, probabilities out (the tracer sees no Python flag)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(image)


def export_onnx(model: torch.nn.Module, channels: int, size_px: int, path: Path) -> None:
    """fp32 ONNX with a dynamic batch dimension named N, through the TorchScript exporter (no onnxscript)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, channels, size_px, size_px)
    with warnings.catch_warnings():
        # torch 2.13 marks the TorchScript exporter deprecated in favour of the dynamo one, which needs
        # onnxscript; this one still exports these plain conv nets exactly and keeps the train extra small.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            _Served(model).eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            do_constant_folding=True,
            dynamic_axes={name: {0: "N"} for name in (INPUT, *OUTPUTS)},
        )
    _stamp(path)


def _stamp(path: Path) -> None:
    """Set the producer so the file says where it came from; the graph is untouched."""
    graph = onnx.load(str(path))
    graph.producer_name, graph.producer_version = PRODUCER, "1"
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


class _Calibration(CalibrationDataReader):
    """Generated images, never the held-out or sample seeds, in batches of 8."""

    def __init__(self, images: np.ndarray) -> None:
        self._batches = iter([{INPUT: images[i : i + 8]} for i in range(0, len(images), 8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantise(fp32_path: Path, int8_path: Path, calibration_images: np.ndarray) -> None:
    """Static 8-bit QDQ: uint8 activations, per-channel symmetric weights stored as uint8 (zero point 128),
    MinMax calibration (deterministic).
    The heads stay fp32: a 1x1 conv and a linear layer cost nothing, and int8 logits coarsen defect_map.
    So does the per-image standardisation in front of the first conv: in uint8, the squared deviations of
    a faint texture (spread 0.03) round to a step or two, and its spread, hence the whole standardised
    image, would come out wrong; in fp32 these few element-wise ops on one image cost next to nothing.
    So does the first convolution, which reads the image: ONNX Runtime's int8 kernels do worst with few
    input channels. SurfaceNet's (one channel) ran about 7 times faster in fp32 (one thread, batch 8: 73
    against 10 microseconds per image), MobileSurfaceNet's (three) made the whole file 5% faster; and
    there is no 8-bit copy of the image to round.
    The spectral whitening of SurfaceNet (nets.Whiten) stays fp32 as well: its matrix products carry a
    spectrum whose bins span many orders of magnitude, which 8 bits cannot hold."""
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        nodes = onnx.load(str(prepared)).graph.node
        first_conv = next(i for i, node in enumerate(nodes) if node.op_type == "Conv")
        standardise = [node.name for node in nodes[: first_conv + 1]]  # and the first convolution
        fp32_parts = [node.name for node in nodes if "/heads/" in node.name or "/whiten/" in node.name]
        quantize_static(
            str(prepared),
            str(int8_path),
            _Calibration(calibration_images),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=list(dict.fromkeys(standardise + fp32_parts)),
        )
    quantised = onnx.load(str(int8_path))
    unsigned_weights(quantised)  # exact on x86 CPUs without VNNI too (unsigned.py says why)
    onnx.save(quantised, str(int8_path))
    _stamp(int8_path)


def sample_images(seed: int, size_px: int, channels: int, count: int = 6) -> np.ndarray:
    """A few golden inputs: alternating ok and defective, one of each texture family among them."""
    return np.stack(
        [
            surfaces.surface(
                seed,
                i,
                size=size_px,
                channels=channels,
                defect=bool(i % 2),
                texture=surfaces.TEXTURES[i % len(surfaces.TEXTURES)],
            ).image
            for i in range(count)
        ]
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _toml_value(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def write_manifest(
    model_dir: Path, manifest: Manifest, model_path: Path, writer: str = "models/recipe/build.py"
) -> Path:
    """<model>/model.toml with the sha256 of the model.onnx just written."""
    lines = [
        f"description = {_toml_value(manifest.description)}",
        f"labels = {_toml_value(manifest.labels)}",
        f"precision = {_toml_value(manifest.precision)}",
        f"sha256 = {_toml_value(sha256(model_path))}",
        f"slo_p99_ms = {manifest.slo_p99_ms!r}",
        "",
        "[batching]",
        f"max_batch_size = {manifest.max_batch_size}",
        f"preferred_batch_sizes = {_toml_value(manifest.preferred_batch_sizes)}",
        f"max_queue_delay_ms = {manifest.max_queue_delay_ms!r}",
        "",
        "[samples]",
        f"atol = {manifest.atol!r}",
        f"rtol = {manifest.rtol!r}",
        "",
        "[parameters]",
        *(f"{key} = {_toml_value(value)}" for key, value in manifest.parameters.items()),
    ]
    path = model_dir / "model.toml"
    path.write_text(f"# Written by {writer}; rebuild rather than edit.\n" + "\n".join(lines) + "\n")
    return path
