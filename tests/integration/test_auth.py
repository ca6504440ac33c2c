"""server.api_token: `Authorization: Bearer <token>` on every HTTP route but health and /metrics.

The routes are test_http_fuzz.ROUTES, which test_every_route_is_fuzzed keeps equal to what the server
serves: a route added later is covered here without anyone remembering to.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import modelzoo
import numpy as np
import pytest
from services import make_settings, run_service
from test_http_fuzz import ROUTES

from appliance.protocol import codec

TOKEN = "s3cret-t0ken"
OPEN_PREFIXES = ("/v2/health/", "/metrics")  # what a load balancer and Prometheus reach without one
WRONG = [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": TOKEN},  # no scheme
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("auth")
    repo = tmp / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable())
    modelzoo.write(repo, "fixed", modelzoo.fixed_batch())  # the one the repository routes load and unload
    settings = make_settings(tmp, repo, server={"api_token": TOKEN}, scheduler={"instances": 1})
    with run_service(settings) as running:
        yield running


def _request(method: str, template: str) -> tuple[str, str, bytes, dict[str, str]]:
    name = "fixed" if template.endswith(("/load", "/unload")) else "batchable"
    path = template.replace("{name}", name).replace("{version}", "1")
    if not path.endswith("/infer"):
        return method, path, b"", {}
    encoded = codec.encode_request({"x": np.ones((1, 4), np.float32)})
    return method, path, encoded.body(), {codec.HEADER_LENGTH: str(encoded.header_length)}


def _unauthorised(client: httpx.Client) -> float:
    """Every refusal counted as `unauthorised` so far, whatever the model label."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("appliance_refusals_total{") and 'reason="unauthorised"' in line
    )


@pytest.mark.parametrize(("method", "template"), ROUTES, ids=[f"{m} {t}" for m, t in ROUTES])
def test_every_route_but_health_and_metrics_needs_the_token(guarded: Any, method: str, template: str) -> None:
    method, path, body, headers = _request(method, template)
    is_open = path.startswith(OPEN_PREFIXES)
    with httpx.Client(base_url=guarded.url, timeout=60.0) as client:
        before = _unauthorised(client)
        for wrong in WRONG:
            response = client.request(method, path, content=body, headers={**headers, **wrong})
            if is_open:
                assert response.status_code != 401, (path, wrong)
                continue
            assert response.status_code == 401, (path, wrong, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json() == {"error": "missing or wrong bearer token (server.api_token)"}
        assert _unauthorised(client) - before == (0 if is_open else len(WRONG))  # each refusal counted once
        authorised = client.request(
            method, path, content=body, headers={**headers, "Authorization": f"Bearer {TOKEN}"}
        )
        assert authorised.status_code != 401, (path, authorised.text)
        if path.endswith("/infer"):
            assert authorised.status_code == 200, authorised.text


def test_a_refused_model_request_is_counted_under_its_model(guarded: Any) -> None:
    with httpx.Client(base_url=guarded.url, timeout=60.0) as client:
        _, path, body, headers = _request("POST", "/v2/models/{name}/infer")
        assert client.post(path, content=body, headers=headers).status_code == 401
        text = client.get("/metrics").text
        stats = client.get("/v2/models/batchable/stats", headers={"Authorization": f"Bearer {TOKEN}"}).json()[
            "model_stats"
        ][0]
    assert 'appliance_refusals_total{model="batchable",priority="line",reason="unauthorised"}' in text
    assert stats["refusals"]["line"]["unauthorised"] >= 1
