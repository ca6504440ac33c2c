"""What of a node's answer the gateway reads, and how often: a header larger than any honest node
writes is not read at all (Unverified), one no larger is read once (verify.check) and written on for
the buyer from that reading (api._response); a refusal is read only when it is small (answer_of).

Real signatures, the box's own codec writing the answers, and parsers counted rather than timed.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest

from appliance.dataplane import plane
from appliance.platform import api, verify
from appliance.platform.attempts import MAX_REFUSAL_BYTES, Answer, Job, answer_of
from appliance.platform.intake import MAX_TENSOR_NAME_CHARS
from appliance.platform.verify import MAX_ANSWER_JSON_BYTES, MAX_OUTPUTS, Unverified, check
from appliance.platform.view import NodeView
from appliance.pool import identity, signing
from appliance.pool.wire import MAX_JSON_BYTES, MAX_JSON_OUTPUT_ELEMENTS, Inbound
from appliance.protocol import codec, nonfinite

KEY = identity.generate()
JOB_ID = "j/0/nonce"
X = np.arange(4, dtype=np.float32).reshape(1, 4)
INPUT_SHA = signing.tensor_digest({"x": X})
# orjson's longest numbers: what a node writes for the costliest FP64 data (24 characters each)
WIDEST = np.array([-1.0084623976315037e201, -0.000012345678901234568])
# Written as \u0001 by orjson: 6 bytes of JSON a character, the box's reckoning for text
CONTROL = b"\x01"


def node() -> NodeView:
    view = NodeView("s", "n1", needs_key=True, birth={"public_key": signing.public_key_text(KEY)})
    view.trusted_key = view.public_key
    return view


def answered(
    outputs: dict[str, np.ndarray], *, binary: bool = False, request_id: str = "", key: Any = KEY
) -> tuple[bytes, int | None]:
    """A node's signed 200 as the box writes it (codec.encode_response, signing.attach), echoing the
    request's `id`; its outputs as JSON, or as binary tensor data after the header."""
    body = codec.encode_request({"x": X}, binary=False, binary_output=binary, request_id=request_id).body()
    encoded = codec.encode_response(
        model_name="m", model_version="1", request=codec.decode_request(body), outputs=outputs
    )
    statement = signing.Statement(
        JOB_ID, "a" * 64, INPUT_SHA, signing.tensor_digest(outputs), 0.5, 2.0, "n1", 3
    )
    header, *blobs = encoded.parts
    signed = signing.attach(bytes(header), {**statement.fields(), "signature": signing.sign(key, statement)})
    return b"".join([signed, *blobs]), (len(signed) if blobs else None)


def sized(
    outputs: dict[str, np.ndarray], json_bytes: int, *, binary: bool = False
) -> tuple[bytes, int | None]:
    """`answered` with a request id just long enough for a JSON header of exactly `json_bytes`."""
    payload, length = answered(outputs, binary=binary)
    short = length if length is not None else len(payload)
    padding = "i" * (json_bytes - short)  # the id was there, empty
    payload, length = answered(outputs, binary=binary, request_id=padding)
    assert (length if length is not None else len(payload)) == json_bytes
    return payload, length


def checked(payload: bytes, header_length: int | None = None, **kwargs: Any) -> verify.Proof:
    return check(node(), JOB_ID, payload, header_length, input_sha256=INPUT_SHA, files=None, **kwargs)


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many times each parser and decoder the gateway reads answers with is called."""
    calls: Counter[str] = Counter()

    def counted(what: str, function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[what] += 1
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(nonfinite, "loads", counted("nonfinite", nonfinite.loads))
    monkeypatch.setattr(orjson, "loads", counted("orjson", orjson.loads))
    monkeypatch.setattr(json, "loads", counted("json", json.loads))
    monkeypatch.setattr(codec, "_decode_input", counted("decode", codec._decode_input))
    return calls


def test_the_bounds_are_the_boxs_own() -> None:
    """What verify reckons a node writes is what the box's data plane lets it write (the platform
    may not import the data plane, so the text bound is written twice)."""
    assert verify.MAX_JSON_OUTPUT_TEXT_BYTES == plane.MAX_JSON_OUTPUT_TEXT_BYTES
    assert MAX_REFUSAL_BYTES == MAX_JSON_BYTES
    rng = np.random.default_rng(7)
    samples = rng.integers(0, 2**64 - 1, size=100_000, dtype=np.uint64, endpoint=True).view(np.float64)
    written = orjson.dumps(samples[np.isfinite(samples)], option=orjson.OPT_SERIALIZE_NUMPY)
    widest = orjson.dumps(WIDEST, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
    assert max(map(len, written[1:-1].split(b","))) <= verify.MAX_NUMBER_CHARS
    assert {len(text) for text in widest} == {verify.MAX_NUMBER_CHARS}
    assert len(orjson.dumps(np.iinfo(np.int64).min)) < verify.MAX_NUMBER_CHARS


def test_the_largest_answer_a_node_writes_as_json_is_accepted(parses: Counter[str]) -> None:
    """Every element the box answers a stranger with as JSON, each number at its widest, text at the
    most JSON the box writes for it, as many outputs as a model may have with the longest names, and
    the longest id a job's header can carry: verified, its header parsed once."""
    texts = 64
    characters = plane.MAX_JSON_OUTPUT_TEXT_BYTES // plane.JSON_BYTES_PER_CHARACTER // texts
    text = np.array([CONTROL * characters] * texts, dtype=object)
    numbers = np.resize(WIDEST, MAX_JSON_OUTPUT_ELEMENTS - texts)
    assert numbers.size + text.size == MAX_JSON_OUTPUT_ELEMENTS  # what the box writes, no more
    assert texts * characters * plane.JSON_BYTES_PER_CHARACTER <= plane.MAX_JSON_OUTPUT_TEXT_BYTES
    outputs = {"y": numbers, "t": text}
    for i in range(MAX_OUTPUTS - len(outputs)):  # names of 4-byte characters, as many as intake keeps
        outputs[f"{i:03}".ljust(MAX_TENSOR_NAME_CHARS, "\U0001d11e")] = np.zeros((0,), np.float32)
    payload, length = answered(outputs, request_id="i" * (MAX_JSON_BYTES - 200))
    assert length is None and 2 * 2**20 < len(payload) <= MAX_ANSWER_JSON_BYTES
    parses.clear()
    proof = checked(payload, asked=frozenset(outputs))
    assert parses == {"nonfinite": 1, "orjson": 1, "decode": MAX_OUTPUTS}
    np.testing.assert_array_equal(proof.outputs["y"], numbers)
    assert list(proof.outputs["t"]) == list(text)


def test_an_answer_at_the_bound_is_read_one_byte_more_is_not(parses: Counter[str]) -> None:
    """The same signed answer, its header padded to the bound and one byte past it: the first is
    verified, the second is noise (Unverified, held against nobody) and nothing of it is parsed."""
    outputs = {"y": np.ones((1, 4), np.float32)}
    for binary in (False, True):
        payload, length = sized(outputs, MAX_ANSWER_JSON_BYTES, binary=binary)
        assert (length is not None) == binary
        parses.clear()
        assert checked(payload, length).outputs.keys() == {"y"}
        assert parses == {"nonfinite": 1, "orjson": 1, "decode": 1}

        payload, length = sized(outputs, MAX_ANSWER_JSON_BYTES + 1, binary=binary)
        parses.clear()
        with pytest.raises(Unverified, match=f"JSON is {MAX_ANSWER_JSON_BYTES + 1} bytes.*not read"):
            checked(payload, length)
        assert not parses


def test_binary_data_is_not_counted_as_json(parses: Counter[str]) -> None:
    """Binary outputs may be far larger than the JSON bound: only the header counts."""
    y = np.ones((1, MAX_ANSWER_JSON_BYTES // 4 + 1), np.float32)
    payload, length = answered({"y": y}, binary=True)
    assert length is not None and len(payload) > MAX_ANSWER_JSON_BYTES
    parses.clear()
    proof = checked(payload, length)
    assert parses == {"nonfinite": 1, "orjson": 1, "decode": 1}
    np.testing.assert_array_equal(proof.outputs["y"], y)


def test_a_header_length_past_the_answer_is_not_read(parses: Counter[str]) -> None:
    payload, _ = answered({"y": np.ones(4, np.float32)})
    parses.clear()
    with pytest.raises(Unverified, match="cannot be decoded: its header length"):
        checked(payload, len(payload) + 1)
    assert not parses


@pytest.mark.parametrize(
    ("document", "why"),
    [
        (
            {
                "outputs": [
                    {"name": f"o{i}", "datatype": "INT8", "shape": [1], "data": [1]} for i in range(257)
                ]
            },
            f"257 outputs; a node answers at most {MAX_OUTPUTS}",
        ),
        (
            {"outputs": [{"name": "y", "datatype": "INT32", "shape": [32769, 1], "data": [[7]] * 32769}]},
            f"32769 tensor elements as JSON; a node writes at most {MAX_JSON_OUTPUT_ELEMENTS}",
        ),
        (  # few elements at the top level, 300,000 within: counted flat, nested is no node's answer
            {
                "outputs": [
                    {"name": "y", "datatype": "INT32", "shape": [3, 100_000], "data": [[7] * 100_000] * 3}
                ]
            },
            "nested lists; a node writes it flat",
        ),
    ],
)
def test_more_outputs_or_json_elements_than_a_node_writes_are_not_decoded(
    parses: Counter[str], document: dict[str, Any], why: str
) -> None:
    """Within the byte bound, the shapes that cost most to decode (many tiny outputs, many small
    lists) are refused once parsed, before any of them is decoded."""
    payload = orjson.dumps(document)
    assert len(payload) <= MAX_ANSWER_JSON_BYTES
    parses.clear()
    with pytest.raises(Unverified, match=why):
        checked(payload)
    assert parses == {"nonfinite": 1, "orjson": 1}


def test_as_many_outputs_as_a_model_may_have_are_accepted() -> None:
    outputs = {f"o{i:03}": np.full((1,), i, np.int16) for i in range(MAX_OUTPUTS)}
    assert checked(answered(outputs)[0]).outputs.keys() == outputs.keys()


def test_a_refusal_is_read_only_when_small(parses: Counter[str]) -> None:
    attempt = SimpleNamespace(node=NodeView("s", "a"), correlation=JOB_ID.encode(), sent_s=0.0, number=0)

    def refusal(body: bytes, status: str = "503") -> Answer:
        message = Inbound("t", body, correlation=JOB_ID.encode(), user={"status": status})
        return answer_of(message, attempt)  # type: ignore[arg-type]

    small = orjson.dumps({"error": "busy", "status": 503, "retry_after_s": 7})
    parses.clear()
    assert refusal(small).retry_after_s == 7.0 and parses == {"orjson": 1}
    large = orjson.dumps({"error": "busy " * MAX_REFUSAL_BYTES, "status": 503, "retry_after_s": 7})
    parses.clear()
    answer = refusal(large)
    assert (answer.status, answer.retry_after_s, answer.document) == (503, None, None) and not parses

    job = Job("m", "acme", b"", None, 1, None)
    parses.clear()
    small = api._response(refusal(orjson.dumps({"error": "bad input", "status": 400}), "400"), job)
    large = api._response(refusal(large, "400"), job)
    assert parses == {"orjson": 1}  # the small refusal, once
    assert small.status_code == 400 and orjson.loads(small.body)["error"] == "node s/a: bad input"
    assert large.status_code == 400 and "was not read" in orjson.loads(large.body)["error"]


def _as_before(answer: Answer, job: Job) -> bytes:
    """What api._response wrote for a 200 before it took the proof's document: the header parsed
    again, orjson's first and the tokens' reader where orjson refused it."""
    payload = answer.payload
    header = payload[: answer.header_length] if answer.header_length is not None else payload
    rest = payload[answer.header_length :] if answer.header_length is not None else b""
    try:
        document, dumps = orjson.loads(header), orjson.dumps
    except orjson.JSONDecodeError:
        document = nonfinite.loads(header)
        dumps = lambda value: json.dumps(value, separators=(",", ":")).encode()  # noqa: E731
    document["parameters"] = {**document["parameters"], "pool_node": answer.node.name, "pool_job_id": job.id}
    return dumps(document) + rest


@pytest.mark.parametrize("kind", ["json", "binary", "tokens", "text"])
def test_the_buyer_gets_what_it_got_before_without_a_second_parse(parses: Counter[str], kind: str) -> None:
    y = np.array([[0.5, -1.0084623976315037e201, 3.0, 1e-7]], np.float64)
    outputs: dict[str, np.ndarray] = {"y": y}
    if kind == "tokens":
        outputs = {"y": np.array([[np.nan, np.inf, -np.inf, 3.0]], np.float32)}
    if kind == "text":
        outputs = {"t": np.array(['é\x01"\\ ok'.encode(), b"\xe2\x82\xac"], dtype=object), "y": y}
    payload, length = answered(outputs, binary=kind == "binary", request_id="req-\u00e9")
    proof = checked(payload, length)
    assert proof.has_tokens == (kind == "tokens")
    signed = orjson.dumps(proof.document)
    answer = Answer(200, payload, length, node(), 3.0, job_id=JOB_ID, proof=proof)
    job = Job("m", "acme", b"", None, 1, None)
    parses.clear()
    given = api._response(answer, job)
    assert not parses  # written from the document verify read
    assert given.body == _as_before(answer, job)
    assert orjson.dumps(proof.document) == signed  # the proof's document is left as it was
    if kind == "tokens":
        assert b'"data":[NaN,Infinity,-Infinity,3.0]' in given.body
    if kind == "binary":
        assert int(given.headers[codec.HEADER_LENGTH]) < len(given.body)
        assert given.headers["content-type"] == codec.BINARY_TYPE


def test_a_200_that_was_not_verified_is_not_passed_on() -> None:
    payload, length = answered({"y": np.ones(4, np.float32)})
    answer = Answer(200, payload, length, node(), 3.0, job_id=JOB_ID)
    given = api._response(answer, Job("m", "acme", b"", None, 1, None))
    assert given.status_code == 502 and "not verified" in orjson.loads(given.body)["error"]


def test_the_collector_is_paused_while_an_answer_is_parsed_and_only_then() -> None:
    """Many small lists set off a collection every 700 of them while they are parsed; paused, none
    runs until the parse is over (then one may), and the collector is left as it was found."""
    lists = orjson.dumps({"parameters": {"padding": [[7]] * 100_000}, "outputs": []})
    assert len(lists) <= MAX_ANSWER_JSON_BYTES
    collections = []

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        with pytest.raises(Unverified, match="not signed"):
            checked(lists)
        assert gc.isenabled() and len(collections) <= 2, collections
        gc.disable()
        try:
            with pytest.raises(Unverified, match="cannot be decoded"):
                checked(lists[:-1])
            assert not gc.isenabled()
        finally:
            gc.enable()
    finally:
        gc.callbacks.remove(count)


def test_the_outputs_are_digested_only_under_a_signature_that_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Binary data may be as large as a packet: its digest is taken for an answer whose signature holds
    over the digest it claims, never for one signed with another key."""
    digests: list[int] = []
    digest = signing.tensor_digest
    monkeypatch.setattr(signing, "tensor_digest", lambda named: digests.append(len(named)) or digest(named))
    y = np.arange(1 << 20, dtype=np.float32)
    payload, length = answered({"y": y}, binary=True)
    forged, _ = answered({"y": y}, binary=True, key=identity.generate())
    swapped = payload[: len(payload) - 4] + np.float32(-1).tobytes()  # its own signature, other data
    digests.clear()
    with pytest.raises(Unverified, match="bad signature"):
        checked(forged, length)
    assert digests == []
    with pytest.raises(Unverified, match="bad signature"):
        checked(swapped, length)
    assert digests == [1]
    assert checked(payload, length).statement.output_sha256 == digest({"y": y}) and digests == [1, 1]
