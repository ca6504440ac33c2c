"""Models whose weights live in an external data file beside model.onnx, and how installers pin them."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def external_model(directory: Path, weight: float = 2.0, width: int = 4) -> Path:
    """x: FP32 [N, width] -> y = x * w, with w (width values of `weight`) in <directory>/weights.bin."""
    directory.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.full((width,), weight, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = directory / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    return path


def set_weights(directory: Path, weight: float, width: int = 4) -> None:
    """Rewrite weights.bin in place (as `cp` does: same inode), model.onnx untouched."""
    (directory / "weights.bin").write_bytes(np.full((width,), weight, np.float32).tobytes())


def sha256sum_of_sha256sum(directory: Path, names: list[str]) -> str:
    """`cd directory && sha256sum NAMES | sha256sum`, as an installer pins it (Python where no coreutils)."""
    if shutil.which("sha256sum"):
        listing = subprocess.run(["sha256sum", *names], cwd=directory, capture_output=True, check=True).stdout
    else:
        listing = "".join(
            f"{hashlib.sha256((directory / n).read_bytes()).hexdigest()}  {n}\n" for n in names
        ).encode()
    return hashlib.sha256(listing).hexdigest()
