"""Golden samples: reading samples.npz, comparing outputs, and timing requests over a mock transport."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from appliance.ota import golden
from appliance.protocol import codec

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def samples(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "samples.npz"
    np.savez(path, **arrays)
    return path


def test_read_samples_splits_inputs_and_outputs(tmp_path: Path) -> None:
    inputs, outputs = golden.read_samples(samples(tmp_path, input__x=X, output__y=X + 1))
    assert list(inputs) == ["x"] and list(outputs) == ["y"]
    np.testing.assert_array_equal(outputs["y"], X + 1)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": X}, r"holds \['x'\]; expected arrays named input__<input> and output__<output>"),
        ({"input__t": np.array([b"a"], dtype=object), "output__n": X}, r"store strings as fixed-width bytes"),
    ],
    ids=["unprefixed", "pickled"],
)
def test_unusable_samples_say_why(tmp_path: Path, arrays: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        golden.read_samples(samples(tmp_path, **arrays))


def test_a_file_that_is_not_npz(tmp_path: Path) -> None:
    path = tmp_path / "samples.npz"
    path.write_bytes(b"PK-but-not-really")
    with pytest.raises(ValueError, match=r"samples.npz is not an \.npz archive \(np.savez writes one\)"):
        golden.read_samples(path)


def test_compare_within_tolerance_and_beyond() -> None:
    assert golden.compare({"y": X}, {"y": X + 1e-6}, atol=1e-5, rtol=0.0) == []
    got = X.copy()
    got[1, 2] += 0.5
    assert golden.compare({"y": X}, {"y": got}, atol=1e-5, rtol=1e-4) == [
        "output 'y': 1 of 8 values differ beyond atol 1e-05 + rtol 0.0001; the largest, 0.5, at index [1, 2]"
    ]


def test_compare_shapes_missing_outputs_integers_and_strings() -> None:
    assert golden.compare({"y": X}, {"y": X.reshape(4, 2)}, atol=0, rtol=0) == [
        "output 'y' has shape [4, 2]; the samples have [2, 4]"
    ]
    assert golden.compare({"y": X}, {"z": X}, atol=0, rtol=0) == [
        "output 'y' is missing from the response, which has ['z']"
    ]
    counts = np.array([1, 2, 3], np.int64)
    assert golden.compare({"n": counts}, {"n": counts + np.array([0, 0, 1])}, atol=1, rtol=1) == [
        "output 'n': 1 of 3 values differ"
    ]
    text = np.array([b"ok", b"caf\xc3\xa9"], dtype="S")
    assert golden.compare({"t": text}, {"t": np.array([b"ok", b"caf\xc3\xa9"], dtype=object)}, 0, 0) == []
    assert golden.compare({"t": text}, {"t": np.array([b"ok", b"cafe"], dtype=object)}, 0, 0) == [
        "output 't': 1 of 2 strings differ from the samples"
    ]


@pytest.mark.parametrize(
    ("http", "url"),
    [
        ({"host": "0.0.0.0", "port": 8000}, "http://127.0.0.1:8000"),
        ({"host": "::", "port": 8000}, "http://[::1]:8000"),
        ({"host": "10.1.2.3", "port": 9000}, "http://10.1.2.3:9000"),
        ({"host": "fd00::5", "port": 9000}, "http://[fd00::5]:9000"),
    ],
)
def test_base_url(http: dict, url: str) -> None:
    assert golden.base_url(http) == url


def answering(outputs: dict[str, np.ndarray], calls: list[httpx.Request]) -> httpx.MockTransport:
    """A service that answers every request with `outputs` as binary tensors."""

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        document = {
            "model_name": "m",
            "outputs": [
                {
                    "name": name,
                    "datatype": "FP32",
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": array.nbytes},
                }
                for name, array in outputs.items()
            ],
        }
        header = httpx.Response(200, json=document).content
        body = header + b"".join(array.tobytes() for array in outputs.values())
        return httpx.Response(200, content=body, headers={codec.HEADER_LENGTH: str(len(header))})

    return httpx.MockTransport(handle)


def test_run_checks_once_then_times(tmp_path: Path) -> None:
    path = samples(tmp_path, input__x=X, output__y=X * 2)
    calls: list[httpx.Request] = []
    with httpx.Client(transport=answering({"y": X * 2}, calls), base_url="http://box") as client:
        run = golden.run(client, "m", path, atol=0, rtol=0, timed_requests=3)
    assert run.is_reproduced and run.median_ms is not None and run.median_ms >= 0
    assert len(calls) == 4
    assert {str(call.url) for call in calls} == {"http://box/v2/models/m/infer"}


def test_run_reports_wrong_outputs_and_refusals(tmp_path: Path) -> None:
    path = samples(tmp_path, input__x=X, output__y=X * 2)
    with httpx.Client(transport=answering({"y": X * 3}, []), base_url="http://box") as client:
        run = golden.run(client, "m", path, atol=0, rtol=0, timed_requests=1)
    assert not run.is_reproduced and run.problems[0].startswith("output 'y': 7 of 8 values differ")

    refusing = httpx.MockTransport(lambda request: httpx.Response(503, json={"error": "draining"}))
    with httpx.Client(transport=refusing, base_url="http://box") as client:
        run = golden.run(client, "m", path, atol=0, rtol=0, timed_requests=1)
    assert run == golden.GoldenRun("m", None, ("golden request answered HTTP 503: draining",))
