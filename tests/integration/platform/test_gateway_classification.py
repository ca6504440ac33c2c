"""Triton's classification extension through the pool gateway, on real parts (mosquitto, `appliance serve`
nodes, the gateway): nodes compute, sign and are checked on the raw tensors; the gateway ranks them, with
labels from its catalogue only, and answers as a node asked directly would (tritonclient.http, JSON and
binary). Plus the catalogue's `labels` and the job body a node is sent, on their own."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import modelzoo
import numpy as np
import orjson
import pytest
import tritonclient.http as triton_http
from gateway_harness import (
    WAIT_S,
    Node,
    RunningGateway,
    checks_settled,
    ledger_rows,
    run_gateway,
    run_nodes,
    until,
)
from pool_brokers import Broker
from pool_recorder import Names
from tritonclient.utils import InferenceServerException

from appliance.errors import ConfigError, InvalidInput
from appliance.platform import classes, forwarding
from appliance.platform import receipts as kinds
from appliance.platform.catalogue import MAX_LABEL_CHARS, MAX_LABELS, Catalogue
from appliance.pool import signing
from appliance.protocol import classification, codec
from appliance.tensors import TensorSpec

X = np.array([[1.0, 5.0, 10.0, 4.0], [2.0, 8.0, 0.5, 3.0]], np.float32)  # y = 2x + 1: no two values tie
TOP_2 = [["21.000000:2", "11.000000:1"], ["17.000000:1", "7.000000:3"]]
# In the node's own model.toml: a stranger's word, never in a gateway's answer.
NODE_LABELS = ["node-0", "node-1", "node-2", "node-3"]
CATALOGUE_LABELS = ["cat", "dog", ""]  # index 2: an empty label, index 3: none; both answered without
READY = re.compile(r"ready on (http://[\d.]+:\d+)")


def repository(tmp_path: Path) -> tuple[Path, Path]:
    """batchable (y = 2x + 1 [N, 4], s = sum [N, 1]) with the node's labels, `wide` (y [N, D]: its
    size known only once answered) and `strings` (BYTES); and batchable's file."""
    repo = tmp_path / "repo"
    batching = "[batching]\nmax_batch_size = 8\n"
    labels = f"labels = {json.dumps(NODE_LABELS)}\n"
    path = modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest=labels + batching)
    # Its input narrowed so that it is warmed up and offered; its outputs stay [-1, -1].
    modelzoo.write(repo, "wide", modelzoo.any_width(), manifest="[inputs.x]\nshape = [-1, 300]\n" + batching)
    modelzoo.write(repo, "strings", modelzoo.strings(), manifest=batching)
    return repo, path


def offering(gateway: RunningGateway, node: str, model: str = "batchable") -> Callable[[], Any]:
    return lambda: (gateway.node(node) or {}).get("models", {}).get(model, {}).get("is_offer_usable")


def known(gateway: RunningGateway, node: str, model: str) -> Callable[[], Any]:
    """The node's birth names the model (a BYTES model is never warmed up, so never offered)."""
    return lambda: model in (gateway.node(node) or {}).get("models", {})


def node_url(node: Node) -> str:
    """The node's own HTTP address, from the line it printed when ready (run_nodes waited for it)."""
    return next(m.group(1) for line in node.process.seen if (m := READY.search(line)))


def texts(array: np.ndarray) -> list[Any]:
    """The strings of a BYTES output (tritonclient reads str from JSON, bytes from binary data)."""
    return np.vectorize(lambda t: t if isinstance(t, str) else t.decode(), otypes=[object])(array).tolist()


def unlabelled(rows: list[list[str]]) -> list[list[str]]:
    return [[":".join(text.split(":")[:2]) for text in row] for row in rows]


def infer(
    url: str, model: str, inputs: dict[str, np.ndarray], outputs: dict[str, int], *, binary: bool = True
) -> Any:
    """tritonclient.http's infer (blocking): `outputs` maps each output asked for to its class_count."""
    client = triton_http.InferenceServerClient(url.removeprefix("http://"), network_timeout=WAIT_S)
    try:
        given = []
        for name, array in inputs.items():
            datatype = "BYTES" if array.dtype == object else "FP32"
            given.append(triton_http.InferInput(name, list(array.shape), datatype))
            given[-1].set_data_from_numpy(array, binary_data=binary)
        wanted = [
            triton_http.InferRequestedOutput(name, binary_data=binary, class_count=k)
            for name, k in outputs.items()
        ]
        return client.infer(model, given, outputs=wanted)
    finally:
        client.close()


async def refused(url: str, model: str, inputs: dict[str, np.ndarray], outputs: dict[str, int]) -> str:
    """The message of the 400 the request gets."""
    with pytest.raises(InferenceServerException) as caught:
        await asyncio.to_thread(infer, url, model, inputs, outputs)
    assert caught.value.status() == "400", caught.value
    return caught.value.message()


@pytest.mark.asyncio
async def test_the_gateway_ranks_the_tensors_nodes_computed_and_were_checked_on(
    tmp_path: Path, broker: Broker, names: Names, recorder_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same tritonclient request gets the same classes from the gateway as from a node itself (less
    the node's labels: no catalogue, no labels), JSON and binary, k above the elements answering every
    class (as the box). Each node was sent the request without parameters.classification, signed the raw
    tensors (the receipts' digest), and a second opinion compared those tensors and agreed."""
    repo, _ = repository(tmp_path)
    watcher = await recorder_factory(broker, names, f"{names.root}/{names.site}/+/cmd/#")
    threads: list[int] = []
    real = classification.classified

    def recorded(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(classification, "classified", recorded)
    with (
        run_nodes(tmp_path, repo, broker, names, 2) as nodes,
        run_gateway(broker, names, canary={"second_opinion_probability": 1.0}) as gateway,
    ):
        for node in nodes:
            await until(offering(gateway, node.name), what=f"{node.name} offering")
        asked = 0
        for binary in (False, True):
            for k in (2, 1000):
                args = ("batchable", {"x": X}, {"y": k, "s": 0})
                pooled = await asyncio.to_thread(infer, gateway.url, *args, binary=binary)
                direct = await asyncio.to_thread(infer, node_url(nodes[0]), *args, binary=binary)
                asked += 1
                ranked = texts(pooled.as_numpy("y"))
                assert ranked == unlabelled(texts(direct.as_numpy("y"))), (binary, k)
                assert pooled.get_output("y")["datatype"] == "BYTES"
                for name in ("y", "s"):  # in the encoding asked for
                    assert ("binary_data_size" in pooled.get_output(name).get("parameters", {})) == binary
                assert pooled.get_output("y")["shape"] == [2, min(k, 4)]
                if k == 2:
                    assert ranked == TOP_2
                np.testing.assert_array_equal(pooled.as_numpy("s"), direct.as_numpy("s"))  # not asked: raw
                parameters = pooled.get_response()["parameters"]
                assert set(parameters) == {"pool_node", "pool_job_id"}, parameters
                assert parameters["pool_node"] in {f"{names.site}/{node.name}" for node in nodes}
        assert threads == [gateway.thread.ident] * asked  # small: ranked on the gateway's loop
        monkeypatch.setattr(forwarding, "INLINE_ELEMENTS", 0)  # larger ones go to a worker thread
        pooled = await asyncio.to_thread(infer, gateway.url, "batchable", {"x": X}, {"y": 2})
        assert texts(pooled.as_numpy("y")) == TOP_2
        assert len(threads) == asked + 1 and threads[-1] != gateway.thread.ident
        await checks_settled(gateway)
        rows = ledger_rows(gateway)
        fleet = {node.name: gateway.node(node.name) for node in nodes}
    raw = {"y": X * 2 + 1, "s": X.sum(axis=1, keepdims=True)}
    buyer = [r for r in rows if r["kind"] == kinds.BUYER]
    assert len(buyer) == asked + 1 and {r["verdict"] for r in buyer} == {kinds.ACCEPTED}
    # Break it on purpose: a node that signed the classes would have signed another digest.
    assert {r["output_sha256"] for r in buyer} == {
        signing.tensor_digest(raw),
        signing.tensor_digest({"y": raw["y"]}),  # the last job asked for y alone
    }
    assert {r["input_sha256"] for r in buyer} == {signing.tensor_digest({"x": X})}
    opinions = [r for r in rows if r["kind"] == kinds.SECOND_OPINION]
    assert opinions and {r["verdict"] for r in opinions} == {kinds.AGREED}, opinions
    assert all(node["quarantine"] is None for node in fleet.values()), fleet
    seen = 0
    for _ in range(len(buyer) + len(opinions)):  # every job the nodes were sent, as the broker sent it
        job = await watcher.expect(lambda m: "/cmd/infer/batchable" in m.topic, since=seen)
        seen = watcher.messages.index(job) + 1
        length = job.user.get(codec.HEADER_LENGTH)
        sent = codec.decode_request(job.payload, int(length) if length else None)
        assert not classification.is_asked(sent) and b"classification" not in job.payload
        assert signing.tensor_digest(sent.inputs) == signing.tensor_digest({"x": X})


@pytest.mark.asyncio
async def test_labels_come_from_the_catalogue_never_from_nodes(
    tmp_path: Path, broker: Broker, names: Names
) -> None:
    """The catalogue's labels, appended where it has a non-empty one; the node's own are never used."""
    repo, path = repository(tmp_path)
    catalogue = tmp_path / "catalogue.toml"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    catalogue.write_text(
        f'[models.batchable]\nsha256 = "{digest}"\nlabels = {json.dumps(CATALOGUE_LABELS)}\n'
    )
    with (
        run_nodes(tmp_path, repo, broker, names, 1) as nodes,
        run_gateway(broker, names, catalogue=str(catalogue)) as gateway,
    ):
        await until(offering(gateway, nodes[0].name), what="the node offering")
        for binary in (False, True):
            args = ("batchable", {"x": X}, {"y": 4})
            pooled = await asyncio.to_thread(infer, gateway.url, *args, binary=binary)
            direct = await asyncio.to_thread(infer, node_url(nodes[0]), *args, binary=binary)
            assert texts(direct.as_numpy("y"))[0][0] == "21.000000:2:node-2"  # what the node would say
            assert texts(pooled.as_numpy("y")) == [
                ["21.000000:2", "11.000000:1:dog", "9.000000:3", "3.000000:0:cat"],
                ["17.000000:1:dog", "7.000000:3", "5.000000:0:cat", "2.000000:2"],
            ]


@pytest.mark.asyncio
async def test_what_cannot_be_ranked_is_a_400_and_no_node_is_blamed(
    tmp_path: Path, broker: Broker, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before any node sees the job where the model's declared outputs tell (an output it does
    not have, a BYTES one, a k above 1,000, more classes than a pool answer holds); after the answer
    where only the answer tells (a dynamic output's classes and elements). Never a 500, never a node
    quarantined."""
    repo, _ = repository(tmp_path)
    with run_nodes(tmp_path, repo, broker, names, 1) as nodes, run_gateway(broker, names) as gateway:
        for model in ("batchable", "wide"):
            await until(offering(gateway, nodes[0].name, model), what=f"{model} offered")
        await until(known(gateway, nodes[0].name, "strings"), what="strings known")
        url = gateway.url
        outputs = (await asyncio.to_thread(httpx.get, f"{url}/v2/models/wide")).json()["outputs"]
        assert outputs[0] == {"name": "y", "datatype": "FP32", "shape": [-1, -1]}
        message = await refused(url, "batchable", {"x": X}, {"nope": 1})
        assert "unknown output 'nope'; model 'batchable' has 'y', 's'" in message
        text = np.array([b"a", b"b"], dtype=object)
        message = await refused(url, "strings", {"text": text}, {"echo": 1})
        assert "output 'echo' is BYTES; classification ranks numeric outputs only" in message
        twice = orjson.dumps(  # a node would answer y twice, which no answer may hold: refused here
            {
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X.ravel().tolist()}],
                "outputs": [{"name": "y"}, {"name": "y"}],
            }
        )
        answer = await asyncio.to_thread(httpx.post, f"{url}/v2/models/batchable/infer", content=twice)
        assert answer.status_code == 400 and "output 'y' is requested twice" in answer.json()["error"]
        message = await refused(url, "batchable", {"x": X}, {"y": classification.MAX_CLASSES + 1})
        assert "output 'y' classification must be an integer from 0 to 1000" in message
        monkeypatch.setattr(classes, "MAX_CLASSES", 3)  # 2 rows x 2 classes is over it
        message = await refused(url, "batchable", {"x": X}, {"y": 2})
        assert "would answer 4 classes" in message and "at most 3 through the pool gateway" in message
        monkeypatch.undo()
        before = {
            model: gateway.node(nodes[0].name)["models"][model]["jobs_sent"]
            for model in ("batchable", "strings")
        }
        assert before == {"batchable": 0, "strings": 0}, before  # none of them was sent
        wide = np.arange(600, dtype=np.float32).reshape(2, 300)  # y [N, D]: its size known once answered
        message = await refused(url, "wide", {"x": wide}, {"y": 200})
        assert "would answer 400 classes" in message and "at most 256" in message
        monkeypatch.setattr(classes, "MAX_RANKED_ELEMENTS", 500)
        message = await refused(url, "wide", {"x": wide}, {"y": 1})
        assert "would rank 600 elements" in message and "at most 500 per request" in message
        monkeypatch.undo()
        ranked = await asyncio.to_thread(infer, url, "wide", {"x": wide}, {"y": 1})
        assert texts(ranked.as_numpy("y")) == [["598.000000:299"], ["1198.000000:299"]]
        node = gateway.node(nodes[0].name)
    assert node["quarantine"] is None and node["models"]["wide"]["jobs_answered"] == 3, node


def test_the_catalogue_gives_each_entry_its_labels_and_refuses_bad_ones(tmp_path: Path) -> None:
    path = tmp_path / "catalogue.toml"
    digest = "a" * 64
    path.write_text(
        f'[models.m]\nsha256 = "{digest}"\nlabels = ["ok", "", "čaj: hot"]\n[models.n]\nsha256 = "{digest}"\n'
    )
    catalogue = Catalogue.load(path)
    assert catalogue.labels("m") == ("ok", "", "čaj: hot")
    assert (
        catalogue.labels("n") == () and catalogue.labels("other") == () and Catalogue(None).labels("m") == ()
    )
    too_long = "x" * (MAX_LABEL_CHARS + 1)
    for labels, problem in [
        ('"ok"', r"models\.m\.labels must be a list of at most 100000 strings"),
        ("[1]", r"models\.m\.labels\[0\] is 1; expected a printable string of up to 256"),
        ('["a", "b\\n"]', r"models\.m\.labels\[1\] is 'b\\n'; expected a printable string"),
        (f'["{too_long}"]', r"models\.m\.labels\[0\] is 'xxx"),
        (json.dumps([""] * (MAX_LABELS + 1)), r"labels must be a list of at most 100000 strings"),
    ]:
        path.write_text(f'[models.m]\nsha256 = "{digest}"\nlabels = {labels}\n')
        with pytest.raises(ConfigError, match=problem):
            Catalogue.load(path)


def test_a_node_is_sent_the_request_without_classification_and_the_same_inputs() -> None:
    """Every input goes as binary data written from what the gateway decoded (NaN and Infinity kept),
    so that the node's inputs digest as the job's; an output named twice is sent once; the header
    length is the new header's; parameters nested deeper than orjson writes are a 400."""
    z = np.array([[7, -1]], np.int64)
    document = {
        "id": "r-1",
        "parameters": {"binary_data_output": True, "priority": 0},
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [1, 4],
                "data": [1.5, float("nan"), float("-inf"), 0.1],
            },
            {"name": "z", "datatype": "INT64", "shape": [1, 2], "parameters": {"binary_data_size": 16}},
        ],
        "outputs": [
            {"name": "y", "parameters": {"classification": 2, "binary_data": False}},
            {"name": "y", "parameters": {"classification": 2}},
            {"name": "s"},
        ],
    }
    header = json.dumps(document).encode()  # Python's json writes NaN and -Infinity, as Triton
    body = header + z.tobytes()
    decoded = codec.decode_request(body, len(header))
    sent, length = forwarding.job_body(body, len(header), decoded, forwarding.Forward())
    assert length is not None and sent[length:] == x_and_z(decoded)  # every input as binary data
    job = codec.decode_request(sent, length)
    assert signing.tensor_digest(job.inputs) == signing.tensor_digest(decoded.inputs)
    assert [(o.name, o.binary, o.class_count) for o in job.outputs or []] == [("y", False, 0), ("s", None, 0)]
    assert (job.id, job.parameters) == ("r-1", document["parameters"])
    asked_binary = forwarding.Forward(binary_outputs=True)
    x_only = {**document, "inputs": document["inputs"][:1]}
    alone = json.dumps(x_only).encode()
    json_only, length = forwarding.job_body(alone, None, codec.decode_request(alone), asked_binary)
    job = codec.decode_request(json_only, length)
    assert not classification.is_asked(job) and [o.binary for o in job.outputs or []] == [True, True]
    deep: object = 1
    for _ in range(300):  # the codec reads parameters this deep; orjson writes 254 levels at most
        deep = {"a": deep}
    nested = codec.decode_request(alone)
    with pytest.raises(InvalidInput, match="nested too deeply"):
        forwarding.job_body(
            json.dumps({**document, "inputs": document["inputs"][:1], "parameters": {"d": deep}}).encode(),
            None,
            nested,
            asked_binary,
        )


def x_and_z(decoded: codec.InferenceRequest) -> bytes:
    return decoded.inputs["x"].astype("<f4").tobytes() + decoded.inputs["z"].astype("<i8").tobytes()


def test_a_large_request_header_is_written_again_on_a_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    real = forwarding.job_body

    def recorded(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(forwarding, "job_body", recorded)
    x = np.arange(forwarding.THREAD_HEADER_BYTES // 4, dtype=np.float32).reshape(1, -1)  # over 64 KiB as JSON
    for rows in (x[:, :4], x):
        encoded = codec.encode_request({"x": rows}, binary=False, outputs=["y"])
        document = orjson.loads(encoded.body())
        document["outputs"][0]["parameters"]["classification"] = 1
        body = orjson.dumps(document)
        decoded = codec.decode_request(body)
        sent, length = asyncio.run(forwarding.sent(body, None, decoded, forwarding.Forward()))
        assert (sent, length) == real(body, None, decoded, forwarding.Forward())
    assert threads[0] == threading.get_ident() != threads[1]


def test_classes_known_from_the_declared_shapes_are_bounded_before_dispatch() -> None:
    inputs = [TensorSpec("x", "FP32", (-1, 4))]
    outputs = [
        TensorSpec("y", "FP32", (-1, 1000)),
        TensorSpec("d", "FP32", (-1, -1)),
        TensorSpec("w", "FP32", (-1, 100_000)),
    ]
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 4], "data": []}]}

    def asked(**counts: int) -> codec.InferenceRequest:
        wanted = [{"name": name, "parameters": {"classification": k}} for name, k in counts.items()]
        return codec.decode_request(orjson.dumps({**body, "outputs": wanted}))

    ranking = classes.planned("m", asked(y=16, d=1000), inputs, outputs, ("a",), rows=16)
    assert ranking.is_batched and ranking.labels == ("a",) and set(ranking.outputs) == {"y", "d", "w"}
    with pytest.raises(
        InvalidInput, match=r"would answer 272 classes .* at most 256 through the pool gateway"
    ):
        classes.planned("m", asked(y=17), inputs, outputs, (), rows=16)
    whole = [TensorSpec("x", "FP32", (1, 4))]  # no dynamic first dimension: ranked whole
    assert not classes.planned(
        "m", asked(y=256), whole, [TensorSpec("y", "FP32", (4, 64))], (), rows=1
    ).is_batched
    # The births' max_batch_size decides where they give it, as on the box: 0 ranks whole.
    assert not classes.planned("m", asked(y=1), inputs, outputs, (), rows=1, batches=False).is_batched
    assert classes.planned("m", asked(y=1), whole, outputs, (), rows=1, batches=True).is_batched
    with pytest.raises(InvalidInput, match=r"would rank 1100000 elements .* at most 1000000 per request"):
        classes.planned("m", asked(w=1), inputs, outputs, (), rows=11)
    assert classes.planned("m", asked(y=1), inputs, None, (), rows=1).outputs == {}  # births name none
