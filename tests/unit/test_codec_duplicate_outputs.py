"""A response naming an output twice is refused: readers differ on which one counts (tritonclient reads
the first, a dict built in order keeps the last), so a node could have one checked and the other read.
So is a request asking for one twice where only one answer of each name may come (codec.named_once)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from tritonclient.http import InferResult

from appliance.errors import InvalidInput
from appliance.protocol import codec

Y = np.array([[1.0, 3.0, 5.0, 7.0]], dtype=np.float32)


def entry(data: list[float]) -> dict[str, object]:
    return {"name": "y", "datatype": "FP32", "shape": [1, 4], "data": data}


def test_tritonclient_reads_the_first_of_two_outputs_of_one_name() -> None:
    body = orjson.dumps({"outputs": [entry([-666.0] * 4), entry(Y.ravel().tolist())]})
    assert InferResult.from_response_body(body).as_numpy("y").tolist() == [[-666.0] * 4]  # what it shows


def test_an_output_named_twice_in_json_is_invalid_input_naming_it() -> None:
    body = orjson.dumps({"outputs": [entry([-666.0] * 4), entry(Y.ravel().tolist())]})
    with pytest.raises(InvalidInput, match=r"^output 'y' appears more than once in the response$"):
        codec.decode_response(body)


def test_an_output_named_twice_in_binary_is_invalid_input_too() -> None:
    blob = Y.tobytes()
    binary = {"name": "y", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": len(blob)}}
    header = orjson.dumps({"outputs": [binary, binary]})
    with pytest.raises(InvalidInput, match=r"output 'y' appears more than once"):
        codec.decode_response(header + blob + blob, len(header))
    other = {**binary, "name": "z"}
    header = orjson.dumps({"outputs": [binary, other]})  # two names: both decoded, as before
    decoded = codec.decode_response(header + blob + blob, len(header))
    assert sorted(decoded) == ["y", "z"] and decoded["z"].tolist() == Y.tolist()


def test_a_request_asking_for_an_output_twice_is_found_in_one_pass() -> None:
    """A request may name tens of thousands of outputs: the repeat is found without comparing each name
    with every other (that took the gateway's event loop 2.6 s at 10,000 names, 44 s at 40,000)."""
    x = {"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [0.0]}
    names = [{"name": f"o{i}"} for i in range(50_000)]

    def asked(outputs: list[dict[str, str]] | None) -> frozenset[str] | None:
        body = {"inputs": [x]} | ({"outputs": outputs} if outputs is not None else {})
        return codec.named_once(codec.decode_request(orjson.dumps(body)).outputs)

    assert asked(names) == {f"o{i}" for i in range(50_000)}
    with pytest.raises(InvalidInput, match=r"^output 'o7' is requested twice; an answer holds one tensor"):
        asked([*names, {"name": "o7"}])
    assert asked(None) is None
