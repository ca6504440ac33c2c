"""The gateway's HTTP side: KServe v2 for buyers (index, metadata, infer), the fleet view, /metrics.

Inference is answered by plain ASGI (`BuyerInference`), as on the box (appliance/server/inference.py):
FastAPI's routing, middleware and dependency layers took about a third of the gateway's interpreter
time per job (bench/swarm.py --profile). Everything else goes through FastAPI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance import __version__, errors
from appliance.dataplane import outcomes
from appliance.platform import classes, fleet, forwarding
from appliance.platform.admission import Admission, ReadingBudgetSpent
from appliance.platform.attempts import MAX_REFUSAL_BYTES, Answer, Job
from appliance.platform.buyers import Buyer
from appliance.platform.fleet import Gateway
from appliance.platform.kept import Kept
from appliance.protocol import classification, codec
from appliance.server.body import BodyReceiver, ClientDisconnected, header
from appliance.server.errors import appliance_error_response, error_after_body, error_response, install
from appliance.tensors import DYNAMIC, ShapeLimits, TensorSpec

OPEN_PATHS = ("/v2/health/", "/metrics")
FLEET_PATH = "/v2/pool/nodes"
LIMITS = ShapeLimits()
INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
_HEADER_LENGTH = codec.HEADER_LENGTH.encode()
router = APIRouter()
log = logging.getLogger(__name__)


def create_app(gateway: Gateway) -> BuyerToken:
    app = FastAPI(title="appliance gateway", version=__version__, docs_url=None, redoc_url=None)
    admission = Admission(gateway.settings, gateway.buyers)
    app.state.gateway = gateway
    app.state.fleet = Kept(lambda: orjson.dumps(fleet.nodes(gateway)))
    app.include_router(router)
    install(app, gateway.settings.retry_after_s)
    return BuyerToken(BuyerInference(app, gateway, admission), gateway, admission)


class BuyerToken:
    """Who is calling: the buyer of the bearer token, or for the fleet view an operator (pure ASGI: no
    task group per request)."""

    def __init__(self, app: ASGIApp, gateway: Gateway, admission: Admission) -> None:
        self.app = app
        self.gateway = gateway
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == FLEET_PATH:
            refusal = self.admission.fleet_refusal(dict(scope["headers"]).get(b"authorization"))
            if refusal is not None:
                self.gateway.metrics.refused(outcomes.outcome_of(refusal).reason)
                await appliance_error_response(refusal)(scope, receive, send)
                return
        elif scope["type"] == "http" and not scope["path"].startswith(OPEN_PATHS):
            buyer = self.gateway.buyers.identify(dict(scope["headers"]).get(b"authorization"))
            if buyer is None:
                self.gateway.metrics.refused("unauthorised")
                refusal = errors.Unauthorised("missing or unknown bearer token")
                await appliance_error_response(refusal)(scope, receive, send)
                return
            scope.setdefault("state", {})["buyer"] = buyer
        await self.app(scope, receive, send)


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


@router.get("/v2/health/live")
async def live() -> Response:
    return Response(b'{"live":true}', media_type="application/json")


@router.get("/v2/health/ready")
async def ready(request: Request) -> Response:
    if not _gateway(request).link.connected.is_set():
        return error_response(503, "not connected to the broker", retry_after_s=1.0)
    return Response(b'{"ready":true}', media_type="application/json")


@router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    extensions = ["binary_tensor_data", "classification"]  # classes ranked here: classes.py
    return {"name": "appliance-gateway", "version": __version__, "extensions": extensions}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from appliance.platform.metrics import CONTENT_TYPE

    return Response(_gateway(request).metrics.exposition(), media_type=CONTENT_TYPE)


@router.get(FLEET_PATH)
async def nodes(request: Request) -> Response:
    """The fleet view (operators only: BuyerToken), built at most once per KEEP_FACTOR times its cost."""
    return Response(request.app.state.fleet.get(), media_type="application/json")


@router.post("/v2/repository/index")
async def index(request: Request) -> Response:
    gateway = _gateway(request)
    return Response(orjson.dumps(fleet.index(gateway)), media_type="application/json")


@router.get("/v2/models/{name}")
async def model_metadata(name: str, request: Request) -> Response:
    return _metadata(request, name, None)


@router.get("/v2/models/{name}/versions/{version}")
async def model_version_metadata(name: str, version: str, request: Request) -> Response:
    return _metadata(request, name, version)


def _metadata(request: Request, name: str, version: str | None) -> Response:
    document = fleet.metadata(_gateway(request), name, version)
    return Response(orjson.dumps(document), media_type="application/json")


@router.get("/v2/models/{name}/ready")
async def model_ready(name: str, request: Request) -> Response:
    return _ready(request, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_version_ready(name: str, version: str, request: Request) -> Response:
    return _ready(request, name, version)


def _ready(request: Request, name: str, version: str | None) -> Response:
    document = fleet.metadata(_gateway(request), name, version)
    if document["parameters"]["pool_spare_ips_at_slo"] <= 0:
        return error_response(503, f"no node has spare capacity for model {name!r} now", retry_after_s=1.0)
    return Response(orjson.dumps({"name": name, "ready": True}), media_type="application/json")


class BuyerInference:
    """POST /v2/models/{name}/infer answered here; every other request goes on to `app`."""

    def __init__(self, app: ASGIApp, gateway: Gateway, admission: Admission) -> None:
        self.app = app
        self.gateway = gateway
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = INFER.match(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            message = f"{scope['method']} is not allowed on {scope['path']}; use POST"
            answer = error_response(405, message, headers={"Allow": "POST"})
            await answer(scope, receive, send)
            return
        buyer: Buyer = scope["state"]["buyer"]
        try:
            self.admission.enter(buyer)
        except errors.RateLimited as exc:
            self.gateway.metrics.refused("requests_in_progress")
            await appliance_error_response(exc)(scope, receive, send)  # its body is dropped as it comes
            return
        try:
            await self._infer(scope, receive, send, buyer, match.group(1), match.group(2))
        finally:
            self.admission.leave(buyer)

    async def _infer(
        self, scope: Scope, receive: Receive, send: Send, buyer: Buyer, name: str, version: str | None
    ) -> None:
        body = BodyReceiver(receive)
        deadline = asyncio.get_running_loop().time() + self.gateway.settings.body_timeout_s

        async def read(limit_bytes: int) -> bytes:
            says = f"buyer {buyer.name!r} may send {limit_bytes} bytes"
            return await self.admission.read(scope, body, limit_bytes, deadline=deadline, limit_says=says)

        try:
            length = header(scope, _HEADER_LENGTH)
            answer = await infer(self.gateway, buyer, name, read, length, version=version)
        except ClientDisconnected:
            return
        except errors.RequestTimeout as exc:
            self.gateway.metrics.refused("body_timeout")
            answer = appliance_error_response(exc)
            answer.headers["Connection"] = "close"  # what is still coming is not read
        except errors.ApplianceError as exc:
            if isinstance(exc, ReadingBudgetSpent):
                self.gateway.metrics.refused("reading_budget")
            retry_after_s = self.gateway.settings.retry_after_s
            try:  # a refusal read to the end of its body first (413) does so within the body's time too
                async with asyncio.timeout_at(deadline):
                    answer = await error_after_body(exc, scope, body, retry_after_s)
            except TimeoutError:
                answer = appliance_error_response(exc, retry_after_s)  # with Connection: close
        except Exception as exc:
            log.exception("unexpected error on POST %s", scope["path"])
            answer = error_response(500, f"internal error: {type(exc).__name__}: {exc}")
        await answer(scope, receive, send)


async def infer(
    gateway: Gateway,
    buyer: Buyer,
    name: str,
    read: Any,
    header_length_text: str | None,
    *,
    version: str | None = None,
) -> Response:
    """One buyer job, from admission to the node's answer (`read(limit)` gives the body; `version`, from
    /versions/{v}/infer, must be the one the model's metadata names)."""
    wait_s = gateway.buyers.admit(buyer)
    if wait_s is not None:
        gateway.metrics.refused("rate_limited")
        raise errors.RateLimited(
            f"buyer {buyer.name!r} started more than {buyer.rate_per_s:g} jobs/s (its rate quota)",
            retry_after_s=wait_s,
        )
    files = gateway.catalogue.files(name, gateway.view)
    if files is None:
        raise fleet.not_served(gateway, name)
    if version is not None:
        fleet.check_version(gateway, name, files, version)
    inputs = fleet.signature(gateway, name, files)
    header_length = codec.decimal(header_length_text, "Inference-Header-Content-Length")
    body = await read(min(buyer.max_body_bytes, gateway.max_body_bytes))
    decoded = codec.decode_request(body, header_length, limits=LIMITS, expect=_expectation(name, inputs))
    missing = [spec.name for spec in inputs if spec.name not in decoded.inputs]
    if missing:
        raise errors.InvalidInput(f"model {name!r} needs input(s) {missing}")
    asked = codec.named_once(decoded.outputs)
    rows = _rows(decoded, inputs)
    is_ranked = classification.is_asked(decoded)
    outputs, is_batched = None, False
    asks_json = forwarding.asks_json(decoded)
    if is_ranked or asks_json:  # what the model's answer holds matters here only
        outputs = fleet.outputs(gateway, name, files)
        is_batched = fleet.is_batched(gateway, name, files)
        if is_batched is None:  # births that do not say: an input's open first dimension, as rows count
            is_batched = any(spec.shape and spec.shape[0] == DYNAMIC for spec in inputs)
    ranking = None
    if is_ranked:
        # Nodes compute and sign the tensors (which checks can compare), the gateway ranks them.
        labels = gateway.catalogue.labels(name)
        ranking = classes.planned(name, decoded, inputs, outputs, labels, rows, batches=is_batched)
    forward = forwarding.planned(body, header_length, decoded, outputs, rows, ranking, is_batched=is_batched)
    if forward.is_rewritten:
        body, header_length = await forwarding.sent(body, header_length, decoded, forward)
    job = Job(name, buyer.name, body, header_length, rows, files, outputs=asked)
    job.asks_binary_output = forward.binary_outputs or not asks_json
    started_s = time.perf_counter()
    answer = await gateway.dispatch(job, decoded)
    if answer.status == 200:
        gateway.metrics.answered(name, time.perf_counter() - started_s)
        if forward.is_rewritten:
            return await forwarding.answered(answer, job, decoded, forward)
    return _response(answer, job)


def _expectation(model: str, inputs: list[TensorSpec]) -> codec.Expectation:
    specs = {spec.name: spec for spec in inputs}

    def expect(name: str, datatype: str, shape: list[int]) -> None:
        spec = specs.get(name)
        if spec is None:
            raise errors.InvalidInput(f"model {model!r} has no input {name!r}; it takes {sorted(specs)}")
        spec.check(datatype, shape)

    return expect


def _rows(decoded: codec.InferenceRequest, inputs: list[TensorSpec]) -> int:
    """Rows of a batchable job (its first, dynamic dimension), else 1."""
    for spec in inputs:
        if spec.shape and spec.shape[0] == DYNAMIC:
            array = decoded.inputs[spec.name]
            return max(1, int(array.shape[0])) if array.ndim else 1
    return 1


def _response(answer: Answer, job: Job) -> Response:
    """The node's answer with parameters.pool_node and parameters.pool_job_id added to its JSON header:
    the header verify.check read (a 200), or the refusal answer_of read; neither is parsed again here."""
    node = answer.node.name
    if answer.status != 200:
        if len(answer.payload) > MAX_REFUSAL_BYTES:
            size = len(answer.payload)
            return error_response(answer.status, f"node {node}: its answer of {size} bytes was not read")
        if answer.document is None:
            return error_response(502, f"node {node} sent an answer that is not a JSON object")
        return error_response(answer.status, f"node {node}: {answer.document.get('error', '')}")
    proof = answer.proof
    if proof is None:  # the dispatcher verifies every 200: only a verified header is written on
        return error_response(502, f"node {node} sent an answer that was not verified")
    document = proof.document
    parameters = document.get("parameters") if isinstance(document.get("parameters"), dict) else {}
    # A new dict, in the same key order: the proof's document stays as the node signed it.
    document = {**document, "parameters": {**parameters, "pool_node": node, "pool_job_id": job.id}}
    # NaN or Infinity in tensor data, written as Triton writes them: kept so, not made null
    new_header = _dumps_with_tokens(document) if proof.has_tokens else orjson.dumps(document)
    headers = {}
    media_type = codec.JSON_TYPE
    rest = answer.payload[answer.header_length :] if answer.header_length is not None else b""
    if rest:
        headers[codec.HEADER_LENGTH] = str(len(new_header))
        media_type = codec.BINARY_TYPE
    return Response(new_header + rest, media_type=media_type, headers=headers)


def _dumps_with_tokens(document: Any) -> bytes:
    """JSON with NaN, Infinity and -Infinity tokens (Python's json writes them; orjson writes null), for
    an answer that held them: at most nonfinite.FALLBACK_LIMIT_BYTES, so the slower writer costs little."""
    return json.dumps(document, separators=(",", ":")).encode()
