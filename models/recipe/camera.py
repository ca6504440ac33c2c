"""An 8-bit twin of a shipped model: uint8 pixels (0..255) in, the same outputs out.

Cameras on the line deliver 8-bit pixels. A model that takes them as they are sends a quarter of the bytes
of float32 (150 KB instead of 602 KB for 3x224x224), and bytes are most of what the HTTP front end costs
per request. The twin is the shipped graph with two nodes in front of it (Cast to float, Mul by 1/255), so
no retraining; its golden samples are the parent's inputs rounded to 8 bits, run through the twin as
shipped. The layout stays NCHW: an NHWC input (a Transpose in front) measured 1.6x slower per image with
ONNX Runtime 1.32 on CPU, because the transpose optimiser pushes the layout change into the per-image
normalisation that follows; a client turns an HWC frame into CHW with one numpy transpose.

    .venv/bin/python models/recipe/camera.py surface_defect_224 surface_defect_224_u8
"""

import argparse
import hashlib
import sys
from pathlib import Path

import golden
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
MODELS_DIR = HERE.parent
_FLOAT_IMAGE = "image_f32"


def camera_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model taking `image` as uint8 [N, C, H, W] with values 0..255."""
    graph = model.graph
    (source,) = [i for i in graph.input if i.name == golden.INPUT]
    shape = [d.dim_param or d.dim_value for d in source.type.tensor_type.shape.dim]
    for node in graph.node:
        node.input[:] = [_FLOAT_IMAGE if name == golden.INPUT else name for name in node.input]
    graph.input.remove(source)
    graph.input.insert(0, helper.make_tensor_value_info(golden.INPUT, TensorProto.UINT8, shape))
    graph.initializer.append(numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "pixel_scale"))
    front = [
        helper.make_node("Cast", [golden.INPUT], ["image_cast"], to=TensorProto.FLOAT, name="camera/Cast"),
        helper.make_node("Mul", ["image_cast", "pixel_scale"], [_FLOAT_IMAGE], name="camera/Scale"),
    ]
    for index, node in enumerate(front):
        graph.node.insert(index, node)
    onnx.checker.check_model(model)
    return model


def to_pixels(images: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] to the 8-bit pixels a camera would send."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def derive(parent: str, twin: str, models_dir: Path = MODELS_DIR) -> Path:
    """Write <twin>/1/model.onnx, samples.npz and model.toml from the shipped <parent>."""
    source = models_dir / parent / "1" / "model.onnx"
    target = models_dir / twin / "1" / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(camera_graph(onnx.load(str(source))), str(target))
    with np.load(source.parent / "samples.npz") as samples:
        pixels = to_pixels(samples[f"input__{golden.INPUT}"])
    golden.write_samples(target, pixels)
    manifest = _manifest(models_dir / parent / "model.toml", twin, parent)
    (models_dir / twin / "model.toml").write_text(manifest)
    return target


def _manifest(parent_toml: Path, twin: str, parent: str) -> str:
    """The parent's model.toml with the input described as 8-bit pixels and the twin's own digest."""
    digest = hashlib.sha256((parent_toml.parent.parent / twin / "1" / "model.onnx").read_bytes()).hexdigest()
    lines = []
    for line in parent_toml.read_text().splitlines():
        if line.startswith("# Written by"):
            line = "# Written by models/recipe/camera.py; rebuild rather than edit."
        elif line.startswith("description = "):
            line = (
                f'description = "{parent} taking 8-bit pixels: image is uint8 [N, 3, 224, 224] (0..255), '
                f"a quarter of the bytes of the float input; outputs as {parent}. Built from {parent} "
                f'by models/recipe/camera.py (two nodes in front, no retraining)."'
            )
        elif line.startswith("sha256 = "):
            line = f'sha256 = "{digest}"'
        elif line.startswith("input_range = "):
            line = 'input_range = "[0, 255]"'
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("parent", help="a shipped model taking float [N, C, H, W] images in [0, 1]")
    parser.add_argument("twin", help="name of the camera-frame model to write")
    args = parser.parse_args(argv)
    path = derive(args.parent, args.twin)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
