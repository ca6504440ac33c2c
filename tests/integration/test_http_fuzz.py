"""Hypothesis over every HTTP route, inference included: no 5xx but 503, and the server alive after.

Requests are drawn from the route templates (valid and invented model names and versions), valid
KServe documents mutated field by field (names, datatypes, shapes up to 70 dimensions and 1e10
elements, data of the wrong kind, binary parts that do not add up, parameters), raw bytes, deep
nesting, and hostile header values. One server takes them all, as a box on the line would.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import modelzoo
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from services import make_settings, run_service

from appliance.protocol import codec

EXAMPLES = 1000  # the issue asks for at least 1,000 per CI run
SERVED = ["batchable", "fixed", "scalar", "strings", "mixed", "half", "gather"]
ALL_NAMES = [*SERVED, "corrupt", "unknown_op", "bad_digest", "missing_weights", "future_opset"]
DATATYPES = ["BOOL", "UINT8", "INT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "BF16", "fp32", ""]
# Every route the server has, as (method, template); test_every_route_is_fuzzed keeps it complete.
ROUTES = [
    ("GET", "/v2"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2/models/{name}"),
    ("GET", "/v2/models/{name}/versions/{version}"),
    ("GET", "/v2/models/{name}/ready"),
    ("GET", "/v2/models/{name}/versions/{version}/ready"),
    ("GET", "/v2/models/{name}/config"),
    ("GET", "/v2/models/{name}/versions/{version}/config"),
    ("GET", "/v2/models/{name}/stats"),
    ("GET", "/v2/models/{name}/versions/{version}/stats"),
    ("GET", "/v2/models/stats"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/{name}/load"),
    ("POST", "/v2/repository/models/{name}/unload"),
    ("GET", "/metrics"),
    ("GET", "/capacity"),
    ("POST", "/v2/models/{name}/infer"),
    ("POST", "/v2/models/{name}/versions/{version}/infer"),
    ("GET", "/v2/systemsharedmemory/status"),
    ("GET", "/v2/systemsharedmemory/region/{name}/status"),
    ("POST", "/v2/systemsharedmemory/region/{name}/register"),
    ("POST", "/v2/systemsharedmemory/unregister"),
    ("POST", "/v2/systemsharedmemory/region/{name}/unregister"),
    ("GET", "/v2/cudasharedmemory/status"),
    ("GET", "/v2/cudasharedmemory/region/{name}/status"),
    ("POST", "/v2/cudasharedmemory/region/{name}/register"),
    ("POST", "/v2/cudasharedmemory/unregister"),
    ("POST", "/v2/cudasharedmemory/region/{name}/unregister"),
]
INFER_WEIGHT = 12  # inference is the route that decodes bodies: most examples go there


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("fuzz")
    repo = modelzoo.standard_repository(tmp / "repo")
    settings = make_settings(
        tmp,
        repo,
        server={"max_body_bytes": 4 * 1024 * 1024, "strict_readiness": False},
        scheduler={"instances": 1},
    )
    with run_service(settings) as running:
        yield running


@pytest.fixture(scope="module")
def fuzz_client(fuzz_server: Any) -> Iterator[httpx.Client]:
    """One client (making one loads the CA store: three quarters of the fuzz's time when made per example)
    that opens a fresh connection per request, so no example meets a connection an earlier one left."""
    fresh = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=fuzz_server.url, timeout=60.0, limits=fresh) as client:
        yield client


def _shape() -> st.SearchStrategy[Any]:
    dims = st.one_of(st.integers(0, 8), st.sampled_from([10**10, 2**31, 2**63, -1]), st.just(1.5))
    return st.one_of(
        st.lists(dims, max_size=6),
        st.lists(st.integers(1, 2), min_size=17, max_size=70),
        st.just([0, 10**10, 10**10]),
        st.text(max_size=5),
        st.none(),
    )


def _data() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(2**70), 2**70),
        st.booleans(),
        st.text(max_size=8),
        st.none(),
    )
    return st.one_of(
        st.lists(scalars, max_size=16),
        st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=12),
        scalars,
    )


def _parameters() -> st.SearchStrategy[Any]:
    values = st.one_of(st.integers(-5, 2**40), st.booleans(), st.text(max_size=4), st.none(), st.floats())
    keys = st.sampled_from(
        ["binary_data_size", "priority", "timeout", "binary_data", "binary_data_output", "x"]
    )
    return st.one_of(st.dictionaries(keys, values, max_size=3), st.text(max_size=3), st.none())


@st.composite
def _inference_body(draw: st.DrawFn, model: str) -> tuple[bytes, dict[str, bytes]]:
    """A KServe body for `model`: sometimes valid, mostly one mutation away from it."""
    kind = draw(st.sampled_from(["valid", "mutated", "mutated", "mutated", "binary", "raw", "deep"]))
    if kind == "raw":
        return draw(st.binary(max_size=256)), _maybe_header_length(draw)
    if kind == "deep":
        depth = draw(st.integers(100, 5000))
        return b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}", {}
    arrays = _valid_inputs(model, draw(st.integers(1, 3)))
    binary = kind == "binary"
    encoded = codec.encode_request(arrays, binary=binary, binary_output=draw(st.booleans()))
    if kind == "valid":
        headers = {}
        if encoded.header_length is not None:
            headers[codec.HEADER_LENGTH] = str(encoded.header_length).encode()
        return encoded.body(), headers
    header_length = encoded.header_length if encoded.header_length is not None else len(encoded.body())
    document = orjson.loads(encoded.parts[0])
    blobs = b"".join(bytes(part) for part in encoded.parts[1:])
    target = draw(st.sampled_from(["document", "input", "input", "output", "binary"]))
    if target == "document":
        key = draw(st.sampled_from(["inputs", "outputs", "parameters", "id"]))
        document[key] = draw(st.one_of(_data(), _parameters()))
    elif target == "input" and document.get("inputs"):
        entry = document["inputs"][0]
        key = draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters"]))
        entry[key] = draw(
            {
                "name": st.one_of(
                    st.sampled_from(["x", "a", "idx", "text", "x "]), st.text(max_size=4), st.none()
                ),
                "datatype": st.sampled_from(DATATYPES),
                "shape": _shape(),
                "data": _data(),
                "parameters": _parameters(),
            }[key]
        )
    elif target == "output":
        document["outputs"] = draw(
            st.lists(
                st.fixed_dictionaries({"name": st.text(max_size=4), "parameters": _parameters()}), max_size=2
            )
        )
    else:
        blobs = draw(st.binary(max_size=64))
    header = json.dumps(document).encode()  # the standard library writes any int, and NaN
    headers = {codec.HEADER_LENGTH: str(len(header)).encode()} if blobs else {}
    if draw(st.integers(0, 9)) == 0:
        headers = _maybe_header_length(draw) or {codec.HEADER_LENGTH: str(header_length).encode()}
    return header + blobs, headers


def _maybe_header_length(draw: st.DrawFn) -> dict[str, bytes]:
    value = draw(
        st.one_of(
            st.none(),
            st.sampled_from([b"\xc2\xb2", b"-1", b"99999999999999999999999", b"", b"1 2", b"0x10", b"1e3"]),
            st.integers(0, 300).map(lambda n: str(n).encode()),
        )
    )
    return {} if value is None else {codec.HEADER_LENGTH: value}


def _valid_inputs(model: str, rows: int) -> dict[str, np.ndarray]:
    return {
        "batchable": {"x": np.ones((rows, 4), np.float32)},
        "fixed": {"x": np.ones((1, 3), np.float32)},
        "scalar": {"x": np.array(2.0, np.float32)},
        "strings": {"text": np.array([b"a"] * rows, dtype=object)},
        "mixed": {
            "a": np.ones((rows, 2), np.int64),
            "b": np.ones((rows, 2), np.float32),
            "m": np.ones((rows, 2), np.bool_),
        },
        "half": {"x": np.ones((rows, 2), np.float16)},
        "gather": {"idx": np.zeros((rows, 1), np.int64)},
    }.get(model, {"x": np.ones((rows, 4), np.float32)})


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, bytes]]:
    weights = [INFER_WEIGHT if path.endswith("/infer") else 1 for _, path in ROUTES]
    choices = [route for route, weight in zip(ROUTES, weights, strict=True) for _ in range(weight)]
    method, template = draw(st.sampled_from(choices))
    name = draw(
        st.one_of(
            st.sampled_from(ALL_NAMES),
            st.sampled_from(["nosuch", "..", "%2e%2e", "a" * 300, "%00", "batchable%2Finfer"]),
            st.text(
                alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/?#%"),
                min_size=1,
                max_size=12,
            ),
        )
    )
    if template.endswith(("/load", "/unload")) and draw(st.integers(0, 3)):
        name = draw(st.sampled_from(["nosuch", "corrupt", "zzz"]))  # keep the served models mostly served
    version = draw(st.one_of(st.just("1"), st.sampled_from(["2", "0", "-1", "01", "²", "1e3"])))
    path = template.replace("{name}", name).replace("{version}", version)
    method = draw(st.sampled_from([method, method, method, "PUT", "DELETE"]))
    body, headers = (b"", {})
    if path.endswith("/infer"):
        body, headers = draw(_inference_body(name if name in SERVED else "batchable"))
    elif method == "POST":
        body = draw(st.one_of(st.just(b""), st.binary(max_size=64)))
    if draw(st.integers(0, 19)) == 0:
        headers = {**headers, "content-type": draw(st.sampled_from([b"text/plain", b"\xff\xfe", b""]))}
    return method, path, body, headers


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same requests every CI run; a failure reproduces
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(request=requests())
def test_no_request_gets_a_5xx_but_503(
    fuzz_client: httpx.Client, request: tuple[str, str, bytes, dict[str, bytes]]
) -> None:
    method, path, body, headers = request
    response = fuzz_client.request(method, path, content=body, headers=headers)
    assert response.status_code < 500 or response.status_code == 503, (response.status_code, response.text)
    if response.status_code >= 400:
        assert isinstance(response.json()["error"], str) and response.json()["error"]
    if response.status_code == 503:
        assert int(response.headers["retry-after"]) >= 1


def test_the_server_serves_after_the_fuzz(fuzz_server: Any) -> None:
    """Runs after the fuzz (same module, same server): alive, every served model answers."""
    with httpx.Client(base_url=fuzz_server.url, timeout=60.0) as client:
        assert client.get("/v2/health/live").status_code == 200
        for name in SERVED:
            client.post(f"/v2/repository/models/{name}/load")  # the fuzz may have unloaded it
            encoded = codec.encode_request(_valid_inputs(name, 1), binary=True)
            headers = {codec.HEADER_LENGTH: str(encoded.header_length)}
            response = client.post(f"/v2/models/{name}/infer", content=encoded.body(), headers=headers)
            assert response.status_code == 200, (name, response.text)
        metrics = client.get("/metrics").text
    refused = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("appliance_refusals_total{")
    )
    assert refused > EXAMPLES / 4 and not math.isnan(refused)  # the fuzz was refused, and counted


def test_every_route_is_fuzzed(fuzz_server: Any) -> None:
    fastapi_app = fuzz_server.service.app
    while not hasattr(fastapi_app, "openapi"):
        fastapi_app = fastapi_app.app  # through the bearer check and the inference route
    paths = fastapi_app.openapi()["paths"]
    served = {(method.upper(), path) for path, methods in paths.items() for method in methods}
    assert served <= set(ROUTES), f"routes without fuzz: {sorted(served - set(ROUTES))}"
