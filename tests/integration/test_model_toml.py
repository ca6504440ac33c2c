"""model.toml against a running service: `version` pins a version other than the highest, and
`[inputs.<name>] shape` narrows dimensions the graph leaves open."""

from __future__ import annotations

import httpx
import modelzoo
import numpy as np
import pytest

from appliance.protocol import codec


def _infer(client: httpx.Client, model: str, x: np.ndarray, version: str | None = None) -> httpx.Response:
    route = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return client.post(
        route, content=codec.encode_request({"x": x}, binary=False, binary_output=False).body()
    )


def _versions(repo, name: str) -> None:
    """Versions 1, 2 and 3 of `name`, each computing y = <version> * 10 * x."""
    for version in (1, 2, 3):
        modelzoo.write(repo, name, modelzoo.batchable(scale=10.0 * version, offset=0.0), version=version)


def test_a_pinned_version_is_served_instead_of_the_highest(serve, tmp_path) -> None:
    repo = tmp_path / "repo"
    _versions(repo, "pinned")
    (repo / "pinned" / "model.toml").write_text("version = 2\n")
    _versions(repo, "latest")
    x = np.ones((1, 4), np.float32)
    with serve(repo) as running, httpx.Client(base_url=running.url, timeout=60.0) as client:
        pinned = _infer(client, "pinned", x).json()
        latest = _infer(client, "latest", x).json()
        metadata = client.get("/v2/models/pinned").json()
        by_version = _infer(client, "pinned", x, version="2")
        unserved = _infer(client, "pinned", x, version="3")
        index = {m["name"]: m for m in client.post("/v2/repository/index").json()}
    assert (pinned["model_version"], pinned["outputs"][0]["data"]) == ("2", [20.0] * 4)
    assert (latest["model_version"], latest["outputs"][0]["data"]) == ("3", [30.0] * 4)
    assert "2" in metadata["versions"]
    assert by_version.status_code == 200
    assert unserved.status_code == 404
    assert unserved.json()["error"] == "model 'pinned' version 3 is not served; serving version 2"
    assert index["pinned"]["version"] == "2" and index["latest"]["version"] == "3"


def test_a_pinned_version_that_is_not_there_makes_only_that_model_unavailable(serve, tmp_path) -> None:
    repo = tmp_path / "repo"
    _versions(repo, "pinned")
    (repo / "pinned" / "model.toml").write_text("version = 7\n")
    _versions(repo, "latest")
    with (
        serve(repo, server={"strict_readiness": False}) as running,
        httpx.Client(base_url=running.url, timeout=60.0) as client,
    ):
        refused = _infer(client, "pinned", np.ones((1, 4), np.float32))
        served = _infer(client, "latest", np.ones((1, 4), np.float32))
    assert refused.status_code == 503 and "UNAVAILABLE" in refused.json()["error"]
    assert "7" in refused.json()["error"]
    assert served.status_code == 200


def test_input_narrowing_fixes_the_open_dimensions(serve, tmp_path) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "narrowed", modelzoo.any_width(), manifest="[inputs.x]\nshape = [-1, 4]\n")
    modelzoo.write(repo, "open", modelzoo.any_width())
    with serve(repo) as running, httpx.Client(base_url=running.url, timeout=60.0) as client:
        narrowed = client.get("/v2/models/narrowed").json()["inputs"]
        opened = client.get("/v2/models/open").json()["inputs"]
        config = client.get("/v2/models/narrowed/config").json()
        fits = _infer(client, "narrowed", np.ones((3, 4), np.float32))
        wrong = _infer(client, "narrowed", np.ones((1, 5), np.float32))
        anything = _infer(client, "open", np.ones((1, 5), np.float32))
        profiles = {
            name: client.get(f"/v2/models/{name}/stats").json()["model_stats"][0]["latency_profile"][
                "observations"
            ]
            for name in ("narrowed", "open")
        }
    assert narrowed == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert opened == [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}]
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}]
    assert fits.status_code == 200 and fits.json()["outputs"][1]["data"] == [4.0, 4.0, 4.0]
    assert wrong.status_code == 400
    assert wrong.json()["error"].startswith("input 'x' has shape [1, 5]; model expects [N, 4]")
    assert anything.status_code == 200  # the graph alone takes any width
    # Narrowed, the model can be warmed up (and its latency profile seeded) before it is ready.
    assert profiles["narrowed"] > 0 and profiles["open"] == 0


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (
            "[inputs.x]\nshape = [-1, 4, 4]\n",
            "model.toml shape [-1, 4, 4] for input 'x' contradicts the graph's",
        ),
        ("[inputs.z]\nshape = [-1, 4]\n", "model.toml narrows input 'z', which the graph does not have"),
    ],
)
def test_a_narrowing_that_contradicts_the_graph_makes_the_model_unavailable(
    serve, tmp_path, manifest: str, message: str
) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "narrowed", modelzoo.any_width(), manifest=manifest)
    modelzoo.write(repo, "other", modelzoo.batchable())
    with (
        serve(repo, server={"strict_readiness": False}) as running,
        httpx.Client(base_url=running.url, timeout=60.0) as client,
    ):
        index = {m["name"]: m for m in client.post("/v2/repository/index").json()}
    assert index["narrowed"]["state"] == "UNAVAILABLE" and message in index["narrowed"]["reason"]
    assert index["other"]["state"] == "READY"
