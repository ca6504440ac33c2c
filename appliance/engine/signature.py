"""A model's signature: inputs and outputs from the graph, narrowed by model.toml; batchability."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.engine.manifest import InputOverride
from appliance.errors import ConfigError, InvalidInput, ModelLoadError
from appliance.tensors import DYNAMIC, ONNX_TO_OIP, TensorSpec, oip_datatype


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    is_batchable: bool  # every input has a shared dynamic first dim

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def check(self, inputs: Mapping[str, np.ndarray], max_rows: int | None) -> int:
        """Validate a request's inputs; return its rows (1 when `max_rows` is None: not batched)."""
        expected = {spec.name: spec for spec in self.inputs}
        unknown = [name for name in inputs if name not in expected]
        if unknown:
            raise InvalidInput(
                f"unknown input {unknown[0]!r}; model expects {', '.join(map(repr, expected))}"
            )
        missing = [name for name in expected if name not in inputs]
        if missing:
            raise InvalidInput(
                f"missing input {missing[0]!r}; model expects {', '.join(map(repr, expected))}"
            )
        rows: int | None = None
        for spec in self.inputs:
            array = inputs[spec.name]
            spec.check(oip_datatype(array.dtype), array.shape, max_rows=max_rows)
            if max_rows is None:
                continue
            if rows is None:
                rows = array.shape[0]
            elif array.shape[0] != rows:
                raise InvalidInput(f"input {spec.name!r} has {array.shape[0]} rows; other inputs have {rows}")
        if rows == 0:
            raise InvalidInput("inputs have 0 rows; send at least one")
        return rows or 1

    def check_declared(self, name: str, datatype: str, shape: Sequence[int], max_rows: int | None) -> None:
        """Validate one input as a request declares it, before its data is decoded."""
        for spec in self.inputs:
            if spec.name == name:
                spec.check(datatype, shape, max_rows=max_rows)
                return
        raise InvalidInput(f"unknown input {name!r}; model expects {', '.join(map(repr, self.input_names))}")

    def check_outputs(self, names: Sequence[str]) -> None:
        known = self.output_names
        for name in names:
            if name not in known:
                raise InvalidInput(f"unknown output {name!r}; model has {', '.join(map(repr, known))}")


def _dims(shape: Sequence[Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else DYNAMIC for d in shape)


def _spec(arg: Any) -> TensorSpec:
    datatype = ONNX_TO_OIP.get(arg.type)
    if datatype is None or datatype == "BF16":
        raise ModelLoadError(f"tensor {arg.name!r} has type {arg.type}, which the protocol cannot carry")
    return TensorSpec(arg.name, datatype, _dims(arg.shape))


def read_signature(session: Any, overrides: Mapping[str, InputOverride]) -> Signature:
    """Build the signature from an ORT session's inputs/outputs and the manifest's overrides."""
    raw_inputs = session.get_inputs()
    inputs = [_spec(arg) for arg in raw_inputs]
    names = {spec.name for spec in inputs}
    for name in overrides:
        if name not in names:
            raise ConfigError(f"model.toml narrows input {name!r}, which the graph does not have")
    narrowed = []
    for spec in inputs:
        if spec.name in overrides:
            spec = _narrow(spec, overrides[spec.name].shape)
        narrowed.append(spec)
    first_dims = {
        arg.shape[0] if arg.shape and not isinstance(arg.shape[0], int) else None for arg in raw_inputs
    }
    is_batchable = (
        bool(narrowed)
        and all(spec.shape and spec.shape[0] == DYNAMIC for spec in narrowed)
        and len(first_dims) == 1  # the same symbolic name on every input, or all unnamed
    )
    outputs = tuple(_spec(arg) for arg in session.get_outputs())
    return Signature(tuple(narrowed), outputs, is_batchable)


def _narrow(spec: TensorSpec, shape: list[int]) -> TensorSpec:
    if len(shape) != len(spec.shape) or any(
        graph != DYNAMIC and want != graph for want, graph in zip(shape, spec.shape, strict=True)
    ):
        raise ConfigError(
            f"model.toml shape {shape} for input {spec.name!r} contradicts the graph's {list(spec.shape)}"
        )
    return TensorSpec(spec.name, spec.datatype, tuple(shape))
