"""A model's signature: inputs and outputs from the graph, narrowed by model.toml; batchability."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.engine.manifest import InputOverride
from appliance.errors import ConfigError, InvalidInput, ModelLoadError
from appliance.tensors import DYNAMIC, ONNX_TO_OIP, TensorSpec, oip_datatype

Place = tuple[str, int]  # an input's name and one of its axes


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    is_batchable: bool  # every input has a shared dynamic first dim
    # Symbolic dimensions the graph names in more than one place (input_ids and attention_mask share
    # "seq"): each name with its places. TensorSpec keeps -1 for them (the KServe metadata reports -1);
    # the runtime fails (a 500) on unequal sizes, so `check` refuses them first, with a 400.
    shared_dims: tuple[tuple[str, tuple[Place, ...]], ...] = ()

    @property
    def has_open_shapes(self) -> bool:
        """Whether a client chooses some input dimension besides the batch's (a -1 the graph leaves open):
        then a size the graph cannot compute with is the request's, not the model's, fault."""
        first = 1 if self.is_batchable else 0
        return any(DYNAMIC in spec.shape[first:] for spec in self.inputs)

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
        self._check_shared_dims(inputs)
        return rows or 1

    def _check_shared_dims(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Within one request only: requests are batched together only with equal non-batch shapes
        (the batcher's groups), and a batched first dim is the same concatenated total on every input."""
        for dim, places in self.shared_dims:
            (first, first_axis), *others = places
            size = inputs[first].shape[first_axis]
            for name, axis in others:
                if inputs[name].shape[axis] != size:
                    where = (
                        f"input {name!r} axes {first_axis} and {axis}"
                        if name == first
                        else f"inputs {first!r} and {name!r}"
                    )
                    raise InvalidInput(
                        f"{where} share dimension {dim!r}: {size} and {inputs[name].shape[axis]}"
                    )

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
    if datatype is None:
        raise ModelLoadError(f"tensor {arg.name!r} has type {arg.type}, which the protocol cannot carry")
    if datatype == "BF16":  # the protocol has BF16; numpy has no such type to decode it into
        raise ModelLoadError(f"tensor {arg.name!r} is BF16, which this server does not serve (no numpy bf16)")
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
    shared_dims = _shared_dims(raw_inputs)
    is_batchable = (
        bool(narrowed)
        and all(spec.shape and spec.shape[0] == DYNAMIC for spec in narrowed)
        and len(first_dims) == 1  # the same symbolic name on every input, or all unnamed
        # and nowhere but first: concatenating rows would leave another axis named the same behind
        and all(axis == 0 for name, places in shared_dims if name in first_dims for _, axis in places)
    )
    outputs = tuple(_spec(arg) for arg in session.get_outputs())
    return Signature(tuple(narrowed), outputs, is_batchable, shared_dims)


def _shared_dims(raw_inputs: Sequence[Any]) -> tuple[tuple[str, tuple[Place, ...]], ...]:
    """The symbolic dimension names the graph's inputs use more than once, with their places."""
    places: dict[str, list[Place]] = {}
    for arg in raw_inputs:
        for axis, dim in enumerate(arg.shape or ()):
            if isinstance(dim, str) and dim:
                places.setdefault(dim, []).append((arg.name, axis))
    return tuple((dim, tuple(found)) for dim, found in places.items() if len(found) > 1)


def _narrow(spec: TensorSpec, shape: list[int]) -> TensorSpec:
    if len(shape) != len(spec.shape) or any(
        graph != DYNAMIC and want != graph for want, graph in zip(shape, spec.shape, strict=True)
    ):
        raise ConfigError(
            f"model.toml shape {shape} for input {spec.name!r} contradicts the graph's {list(spec.shape)}"
        )
    return TensorSpec(spec.name, spec.datatype, tuple(shape))


def example_feed(
    signature: Signature, rows: int | None, *, open_as: int | None = None
) -> dict[str, np.ndarray] | None:
    """Zeros (empty strings) for every input, `rows` rows if batched; a dimension still open is
    `open_as`, or where that is None the size is unknown and there is no feed (None)."""
    feed = {}
    for spec in signature.inputs:
        dims = list(spec.shape)
        if rows is not None:
            dims[0] = rows
        if DYNAMIC in dims:
            if open_as is None:
                return None
            dims = [open_as if dim == DYNAMIC else dim for dim in dims]
        if spec.datatype == "BYTES":
            feed[spec.name] = np.full(tuple(dims), "", dtype=object)
        else:
            feed[spec.name] = np.zeros(tuple(dims), dtype=spec.dtype)
    return feed
