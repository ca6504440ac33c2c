"""Which numeric precision a model's weights are stored in: int8, fp16 or fp32."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import onnx

log = logging.getLogger(__name__)

_QUANTISED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeLinear",
}
_BY_TYPE = {
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "int8",
    onnx.TensorProto.FLOAT16: "fp16",
    onnx.TensorProto.BFLOAT16: "bf16",
    onnx.TensorProto.FLOAT: "fp32",
    onnx.TensorProto.DOUBLE: "fp64",
}


def detect_precision(path: Path) -> str:
    """The precision holding most weight elements; int8 whenever the graph is quantised."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - ORT already loaded it; this is only a label
        log.debug("precision of %s unknown: %s", path, exc)
        return "unknown"
    return precision_of(model)


def precision_of(model: onnx.ModelProto) -> str:
    """detect_precision of a model already parsed (the engine parses model.onnx once, from memory)."""
    if any(node.op_type in _QUANTISED_OPS for node in model.graph.node):
        return "int8"
    weights: Counter[str] = Counter()
    for tensor in model.graph.initializer:
        if tensor.data_type in _BY_TYPE:
            weights[_BY_TYPE[tensor.data_type]] += max(1, _elements(tensor.dims))
    if not weights:  # no numeric weights: the inputs say what the graph computes in
        for value in model.graph.input:
            elem_type = value.type.tensor_type.elem_type
            if elem_type in _BY_TYPE:
                weights[_BY_TYPE[elem_type]] += 1
    return weights.most_common(1)[0][0] if weights else "fp32"


def _elements(dims: list[int]) -> int:
    count = 1
    for dim in dims:
        count *= dim
    return count
