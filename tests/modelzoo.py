"""Tiny ONNX models built with the onnx helper API for tests: each shape of model the server must handle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, initializers=(), opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def batchable(scale: float = 2.0, offset: float = 1.0) -> onnx.ModelProto:
    """x: FP32 [N, 4] -> y = x * scale + offset [N, 4] (2x + 1 unless told), s = sum(x, axis 1) [N, 1]."""
    two = numpy_helper.from_array(np.array(scale, np.float32), "two")
    one = numpy_helper.from_array(np.array(offset, np.float32), "one")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    return _model(
        [
            helper.make_node("Mul", ["x", "two"], ["x2"]),
            helper.make_node("Add", ["x2", "one"], ["y"]),
            helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 1]),
        ],
        [two, one, axes],
    )


def any_width() -> onnx.ModelProto:
    """x: FP32 [N, D] (both dynamic) -> y = x * 2 [N, D], s = sum(x, axis 1) [N, 1]."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    return _model(
        [
            helper.make_node("Mul", ["x", "two"], ["y"]),
            helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "D"])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "D"]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 1]),
        ],
        [two, axes],
    )


def paired() -> onnx.ModelProto:
    """ids, mask: FP32 [batch, seq] (input_ids / attention_mask: one symbolic "seq" on both) ->
    out = ids * mask [batch, seq]. The runtime fails (not a clean refusal) when the two seqs differ."""
    shape = ["batch", "seq"]
    return _model(
        [helper.make_node("Mul", ["ids", "mask"], ["out"])],
        [
            helper.make_tensor_value_info("ids", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, shape),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
    )


def fixed_batch() -> onnx.ModelProto:
    """x: FP32 [1, 3] -> y = -x."""
    return _model(
        [helper.make_node("Neg", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )


def scalar() -> onnx.ModelProto:
    """x: FP32 [] (rank 0) -> y = x * x."""
    return _model(
        [helper.make_node("Mul", ["x", "x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )


def strings() -> onnx.ModelProto:
    """text: BYTES [N] -> echo: BYTES [N] (Identity), n: INT64 [1] (its length)."""
    return _model(
        [
            helper.make_node("Identity", ["text"], ["echo"]),
            helper.make_node("Shape", ["text"], ["n"]),
        ],
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
        [
            helper.make_tensor_value_info("echo", TensorProto.STRING, ["N"]),
            helper.make_tensor_value_info("n", TensorProto.INT64, [1]),
        ],
    )


def mixed() -> onnx.ModelProto:
    """a: INT64 [N, 2], b: FP32 [N, 2], m: BOOL [N, 2] -> c = where(m, a + b, 0) FP32, k = a * 3 INT64."""
    three = numpy_helper.from_array(np.array(3, np.int64), "three")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    return _model(
        [
            helper.make_node("Cast", ["a"], ["af"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["af", "b"], ["sum"]),
            helper.make_node("Where", ["m", "sum", "zero"], ["c"]),
            helper.make_node("Mul", ["a", "three"], ["k"]),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.INT64, ["N", 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("m", TensorProto.BOOL, ["N", 2]),
        ],
        [
            helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("k", TensorProto.INT64, ["N", 2]),
        ],
        [three, zero],
    )


def half() -> onnx.ModelProto:
    """x: FP16 [N, 2] -> y = x + x FP16."""
    return _model(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 2])],
    )


def gather() -> onnx.ModelProto:
    """idx: INT64 [N, 1] -> row of a 3-row table; an index out of range fails at run time."""
    table = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "table")
    return _model(
        [helper.make_node("Gather", ["table", "idx"], ["row"], axis=0)],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("row", TensorProto.FLOAT, ["N", 1, 2])],
        [table],
    )


def unknown_op() -> onnx.ModelProto:
    model = batchable()
    model.graph.node[0].op_type = "NoSuchOperator"
    return model


def future_opset() -> onnx.ModelProto:
    model = batchable()
    model.opset_import[0].version = 99
    return model


def write(
    repo: Path, name: str, model: onnx.ModelProto | bytes, *, version: int = 1, manifest: str = ""
) -> Path:
    """Write <repo>/<name>/<version>/model.onnx (and model.toml if given); return the model path."""
    directory = repo / name / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    if manifest:
        (repo / name / "model.toml").write_text(manifest)
    return path


def write_external_data_missing(repo: Path, name: str) -> Path:
    """A model whose weights live in an external file that is not there."""
    directory = repo / name / "1"
    directory.mkdir(parents=True, exist_ok=True)
    weights = numpy_helper.from_array(np.ones((64, 4), np.float32), "w")
    model = _model(
        [helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        [weights],
    )
    path = directory / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    (directory / "weights.bin").unlink()
    return path


def standard_repository(repo: Path) -> Path:
    """A repository with every kind of model the server must serve or refuse."""
    write(
        repo, "batchable", batchable(), manifest="[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 1.0\n"
    )
    write(repo, "fixed", fixed_batch())
    write(repo, "scalar", scalar())
    write(repo, "strings", strings())
    write(repo, "mixed", mixed())
    write(repo, "half", half())
    write(repo, "gather", gather())
    write(repo, "corrupt", b"this is not an onnx file")
    write(repo, "unknown_op", unknown_op())
    write(repo, "future_opset", future_opset())
    write_external_data_missing(repo, "missing_weights")
    write(repo, "bad_digest", batchable(), manifest=f'sha256 = "{"0" * 64}"\n')
    return repo


# A batch of `heavy()` that takes about 1 s on two cores: surely still running when a test looks, and
# far above a watchdog's hang limit. The manifest lets it through as one batch, one instance.
HEAVY_ROWS = 4096
HEAVY_MANIFEST = """
slo_p99_ms = 600000.0
instances = 1
[batching]
max_batch_size = 4096
preferred_batch_sizes = [1]
"""


def heavy(layers: int = 64, width: int = 512) -> onnx.ModelProto:
    """x: FP32 [N, width] through `layers` MatMul+Relu layers: a model slow enough to queue behind."""
    rng = np.random.default_rng(0)
    nodes, initializers = [], []
    previous = "x"
    for index in range(layers):
        weight = numpy_helper.from_array(
            (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{index}"
        )
        initializers.append(weight)
        nodes.append(helper.make_node("MatMul", [previous, f"w{index}"], [f"m{index}"]))
        output = "y" if index == layers - 1 else f"r{index}"
        nodes.append(helper.make_node("Relu", [f"m{index}"], [output]))
        previous = output
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        initializers,
    )
