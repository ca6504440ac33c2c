"""Repositories, catalogues and buyer requests for the checks tests: the bundled surface_defect model as
int8 and as fp32, and a cheat that answers in the right shapes without running the model."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from appliance.platform.golden import Golden
from appliance.protocol import codec

MODELS = Path(__file__).resolve().parents[3] / "models"
INT8 = MODELS / "surface_defect" / "1" / "model.onnx"
FP32 = MODELS / "surface_defect_fp32" / "1" / "model.onnx"
SAMPLES = MODELS / "surface_defect" / "1" / "samples.npz"
NAME = "surface_defect"
DISHONEST = Path(__file__).resolve().parent / "dishonest"
# Measured with ONNX Runtime on this machine's CPU over perturbed golden rows (see the README's
# "Tolerances"): int8 against fp32 differs by up to 0.02 in defect_prob and 0.075 in defect_map.
TOLERANCES = {
    "int8/cpu~int8/cpu": [0.02, 0.0],
    "fp32/cpu~fp32/cpu": [0.001, 0.001],
    "int8/cpu~fp32/cpu": [0.2, 0.0],
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def repository(tmp_path: Path, kind: str) -> Path:
    """A repository serving `surface_defect` from the int8 file, the fp32 file, or the cheat."""
    repo = tmp_path / f"repo-{kind}" / NAME
    (repo / "1").mkdir(parents=True)
    manifest = (MODELS / ("surface_defect_fp32" if kind == "fp32" else NAME) / "model.toml").read_text()
    if kind == "cheat":  # it says it is the int8 file (LIE_SHA256); no manifest digest to contradict it
        manifest = "\n".join(line for line in manifest.splitlines() if not line.startswith("sha256"))
        onnx.save(cheat(), repo / "1" / "model.onnx")
    else:
        shutil.copy(FP32 if kind == "fp32" else INT8, repo / "1" / "model.onnx")
    (repo / "model.toml").write_text(manifest)
    return repo.parent


def cheat() -> onnx.ModelProto:
    """The signature of surface_defect, computed for nothing: the image's mean and 8x8 average pools."""
    shape = numpy_helper.from_array(np.array([-1, 1], np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Reshape", ["mean", "shape"], ["defect_prob"]),
            helper.make_node("AveragePool", ["image"], ["defect_map"], kernel_shape=[8, 8], strides=[8, 8]),
        ],
        "cheat",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 128, 128])],
        [
            helper.make_tensor_value_info("defect_prob", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("defect_map", TensorProto.FLOAT, ["N", 1, 16, 16]),
        ],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def catalogue(tmp_path: Path, *files: Path) -> Path:
    """A catalogue listing `files` under surface_defect, with trusted copies, samples and tolerances."""
    digests = ", ".join(f'"{sha256(f)}"' for f in files)
    copies = ", ".join(f'"{f}"' for f in files)
    lines = [
        f"[models.{NAME}]",
        f"sha256 = [{digests}]",
        f"model_files = [{copies}]",
        f'samples = "{SAMPLES}"',
    ]
    lines += [f"[models.{NAME}.tolerances]", *(f'"{k}" = {v}' for k, v in TOLERANCES.items())]
    path = tmp_path / "catalogue.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def request(rng: np.random.Generator, rows: int = 1) -> tuple[bytes, dict[str, str]]:
    """A buyer's binary request: golden images, perturbed (as a camera would never repeat itself)."""
    inputs = Golden(SAMPLES).draw(rows, rng, 0.02)
    encoded = codec.encode_request(inputs, binary=True, binary_output=True)
    return encoded.body(), {codec.HEADER_LENGTH: str(encoded.header_length)}
