"""Canary material, tolerances, the catalogue's files and the gateway's verification of an answer."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from appliance.errors import ConfigError, InvalidInput, NoPoolCapacity
from appliance.platform import catalogue as catalogues
from appliance.platform.catalogue import Catalogue, provider_class
from appliance.platform.checks import Checks, compare
from appliance.platform.fleet import signature
from appliance.platform.golden import Golden, References
from appliance.platform.ledger_cli import parse_time
from appliance.platform.settings import CanarySettings
from appliance.platform.verify import Refused, check
from appliance.platform.view import NodeView, PoolView
from appliance.pool import identity, signing
from appliance.protocol import codec
from appliance.tensors import TensorSpec

MODELS = Path(__file__).resolve().parents[2] / "models"
INT8, FP32 = MODELS / "surface_defect/1/model.onnx", MODELS / "surface_defect_fp32/1/model.onnx"
SAMPLES = MODELS / "surface_defect/1/samples.npz"
# What the README and tests/integration/platform/checks_fixtures.py state for this model.
TOLERANCES = {"int8~fp32": (0.2, 0.0), "int8~int8": (0.02, 0.0)}


def test_canaries_are_drawn_afresh_perturbed_and_within_the_golden_range() -> None:
    golden = Golden(SAMPLES)
    rng = np.random.default_rng(1)
    first, second = golden.draw(3, rng, 0.01)["image"], golden.draw(3, rng, 0.01)["image"]
    source = golden.inputs["image"]
    assert first.shape == (3, *source.shape[1:]) and first.dtype == source.dtype
    assert not np.array_equal(first, second)
    assert not any(
        np.array_equal(row, golden_row) for row in first for golden_row in source
    )  # never a sample
    assert source.min() <= first.min() and first.max() <= source.max()
    nearest = min(float(np.abs(first[0] - golden_row).mean()) for golden_row in source)
    assert nearest < 0.01 * float(source.std()) * 2  # lightly: still the golden image, to the model
    assert golden.draw(10, rng, 0.01)["image"].shape[0] == 10  # more rows than samples: repeats, perturbed


def test_int8_and_fp32_agree_within_the_stated_tolerance_with_margin_and_not_within_a_tight_one() -> None:
    golden, references, rng = Golden(SAMPLES), References(), np.random.default_rng(3)
    worst = 0.0
    for rows in (1, 2, 4, 8):
        inputs = golden.draw(rows, rng, 0.01)
        int8, fp32 = references.run(INT8, inputs), references.run(FP32, inputs)
        assert compare(fp32, int8, *TOLERANCES["int8~fp32"]) == []
        assert compare(references.run(INT8, inputs), int8, *TOLERANCES["int8~int8"]) == []
        worst = max(worst, *(float(np.abs(int8[k] - fp32[k]).max()) for k in int8))
    assert worst * 2 <= TOLERANCES["int8~fp32"][0], (
        f"int8 and fp32 differ by up to {worst}: widen the tolerance"
    )
    # Break it: the tolerance of two runs of one file is too tight for two files, and says where.
    [problem, *_] = compare(fp32, int8, 1e-6, 0.0)
    assert (
        problem.startswith("output 'defect_prob'") and "values differ beyond atol 1e-06 + rtol 0" in problem
    )


def test_a_catalogue_name_may_list_several_files_with_checked_trusted_copies(tmp_path: Path) -> None:
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (INT8, FP32)]
    path = tmp_path / "catalogue.toml"
    path.write_text(
        f'[models.surface_defect]\nsha256 = ["{digests[0]}", "{digests[1]}"]\n'
        f'model_files = ["{INT8}", "{FP32}"]\n'
        '[models.surface_defect.tolerances]\n"int8/cpu~fp32/cpu" = [0.2, 0]\n'
    )
    entry = Catalogue.load(path).entries["surface_defect"]  # type: ignore[index]
    assert entry.files == frozenset(digests) and entry.model_files == dict(
        zip(digests, (INT8, FP32), strict=True)
    )
    assert entry.tolerance("fp32/cpu", "int8/cpu") == (0.2, 0.0)
    path.write_text(f'[models.surface_defect]\nsha256 = "{digests[0]}"\nmodel_files = ["{FP32}"]\n')
    with pytest.raises(ConfigError, match=f"{FP32} has sha256 {digests[1]}, which is not listed in sha256"):
        Catalogue.load(path)
    assert (provider_class("cuda"), provider_class("tensorrt"), provider_class("openvino")) == (
        "gpu",
        "gpu",
        "npu",
    )
    assert provider_class("cpu") == provider_class("xnnpack") == "cpu"


def signed_answer(key: object, *, job_id: str = "j/0", sha: str = "a" * 64) -> tuple[bytes, int | None, str]:
    x, y = np.arange(4, dtype=np.float32).reshape(1, 4), np.ones((1, 4), np.float32)
    body = codec.encode_request({"x": x}, binary=False, binary_output=False).body()
    request = codec.decode_request(body)
    encoded = codec.encode_response(model_name="m", model_version="1", request=request, outputs={"y": y})
    digests = signing.tensor_digest({"x": x}), signing.tensor_digest({"y": y})
    statement = signing.Statement(job_id, sha, *digests, 0.1, 1.0, "n1", 3)
    proof = {**statement.fields(), "signature": signing.sign(key, statement)}  # type: ignore[arg-type]
    return signing.attach(encoded.body(), proof), None, signing.tensor_digest({"x": x})


def test_the_gateway_verifies_what_it_received_against_the_pinned_key() -> None:
    key = identity.generate()
    node = NodeView("s", "n1", needs_key=True, birth={"public_key": signing.public_key_text(key)})
    node.trusted_key = node.public_key
    payload, length, input_sha = signed_answer(key)
    proof = check(node, "j/0", payload, length, input_sha256=input_sha, files=frozenset({"a" * 64}))
    assert proof.statement.session == 3 and proof.outputs["y"].shape == (1, 4)
    cases = {
        "another job id": (payload, "j/1", input_sha, None),
        "another input": (payload, "j/0", "0" * 64, None),
        "a changed output": (payload.replace(b"1.0", b"2.0"), "j/0", input_sha, None),
        "another file": (payload, "j/0", input_sha, frozenset({"b" * 64})),
    }
    for what, (body, job_id, digest, files) in cases.items():
        with pytest.raises(Refused) as refused:
            check(node, job_id, body, None, input_sha256=digest, files=files)
        assert ("another file" in what) == ("not one the job may run on" in str(refused.value)), what
    unsigned = orjson.dumps({"model_name": "m", "outputs": []})
    with pytest.raises(Refused, match=r"the answer is not signed \(no parameters.pool_signature\)"):
        check(node, "j/0", unsigned, None, input_sha256=input_sha, files=None)
    node.trusted_key = signing.public_key_text(identity.generate())  # a key other than the one pinned
    with pytest.raises(Refused, match="bad signature"):
        check(node, "j/0", payload, None, input_sha256=input_sha, files=None)
    assert node.refusal("m", 0.0) == "its device key is not the one the ledger pinned (or not checked yet)"


def test_ledger_times_are_iso_8601_and_utc_unless_they_say_otherwise() -> None:
    assert parse_time("2025-06-01T00:00:00Z", "--since") == 1748736000000
    assert parse_time("2025-06-01", "--since") == 1748736000000
    assert parse_time("2025-06-01T02:00:00+02:00", "--since") == 1748736000000
    assert parse_time(None, "--since") is None
    with pytest.raises(InvalidInput, match=r"--until 'yesterday': expected an ISO 8601 time such as"):
        parse_time("yesterday", "--until")


def test_an_answer_that_cannot_be_checked_is_refused_not_raised() -> None:
    key = identity.generate()
    node = NodeView("s", "n1", needs_key=True, birth={"public_key": signing.public_key_text(key)})
    node.trusted_key = node.public_key
    payload, _, input_sha = signed_answer(key)
    hostile = [b"[]", b'{"outputs": 5}', b'{"outputs": ["x"]}', b'{"outputs": [{"name": 1}]}', b"\xff"]
    for body in [*hostile, payload[:-1]]:
        with pytest.raises(Refused, match="the answer cannot be decoded"):
            check(node, "j/0", body, None, input_sha256=input_sha, files=None)
    with pytest.raises(Refused, match="cannot be decoded"):
        check(node, "j/0", payload, 10**6, input_sha256=input_sha, files=None)  # a header length past it
    node.trusted_key = "ed25519:not-base64!!"  # as a key pinned on first sight once was
    with pytest.raises(Refused, match="n1's device key cannot verify anything: public key is not base64"):
        check(node, "j/0", payload, None, input_sha256=input_sha, files=None)


def described_by(
    view: PoolView, name: str, datatype: str, *, key: bool = True, offers: bool = True, version: str = "1"
) -> NodeView:
    """A node serving model m (file a*64) whose birth says its input x is `datatype`."""
    inputs = [{"name": "x", "datatype": datatype, "shape": [-1, 4]}]
    entry = {"sha256": "a" * 64, "version": version, "inputs": inputs}
    birth = {"session": 1, "seq": 0, "models": {"m": entry}}
    if key:
        birth["public_key"] = signing.public_key_text(identity.generate())
    view.ingest(f"ecp/v1/s/{name}/birth", orjson.dumps(birth), 0.0)
    view.ingest(f"ecp/v1/s/{name}/state", orjson.dumps({"session": 1, "seq": 1, "state": "online"}), 0.0)
    report = {"spare_ips_at_slo": 100.0 if offers else 0.0, "accepts_pool_jobs": offers, "slo_p99_ms": 50}
    document = {"session": 1, "seq": 2, "valid_for_s": 60, "models": {"m": report}}
    view.ingest(f"ecp/v1/s/{name}/capacity", orjson.dumps(document), 0.0)
    node = view.get("s", name)
    assert node is not None
    node.trusted_key = node.public_key  # as Trust pins a key on first sight
    return node


def test_what_buyers_must_send_is_what_most_nodes_in_good_standing_say() -> None:
    view, now = PoolView("ecp/v1", needs_key=True), [1.0]
    gateway = SimpleNamespace(view=view, catalogue=Catalogue(None, clock=lambda: now[0]))

    def told() -> list[str]:
        files = gateway.catalogue.files("m", view)
        return [spec.datatype for spec in signature(gateway, "m", files)]  # type: ignore[arg-type]

    # Strangers heard before the honest node: one without a key, one quarantined, one taking no jobs.
    described_by(view, "keyless", "INT8", key=False)
    described_by(view, "quarantined", "INT8").quarantine = "canary failed on model 'm'"
    described_by(view, "idle", "INT8", offers=False)
    honest = described_by(view, "honest", "FP32")
    assert told() == ["FP32"] and signature(gateway, "m", frozenset({"a" * 64})) == [  # type: ignore[arg-type]
        TensorSpec("x", "FP32", (-1, 4))
    ]
    # With no offer anywhere, the idle node and the honest one tie: what buyers were told stands...
    honest.capacity["models"]["m"]["accepts_pool_jobs"] = False  # type: ignore[index]
    now[0] += catalogues.RECOUNT_S
    assert told() == ["FP32"]
    # ...and with nothing told before, the node heard of first decides (here the idle one), until more
    # nodes in good standing say otherwise.
    gateway.catalogue = Catalogue(None, clock=lambda: now[0])
    assert told() == ["INT8"]
    described_by(view, "second", "FP32", offers=False)
    now[0] += catalogues.RECOUNT_S
    assert told() == ["FP32"]  # two against one
    # With no node in good standing left the name stays known, but nobody describes it: 503, not 404.
    for node in view.nodes():
        node.quarantine = node.quarantine or "its device key changed"
    now[0] += catalogues.RECOUNT_S
    files = gateway.catalogue.files("m", view)
    assert files == frozenset({"a" * 64})
    with pytest.raises(NoPoolCapacity, match=r"no node serves model 'm' with sha256 a{64} now"):
        signature(gateway, "m", files)  # type: ignore[arg-type]


def test_where_all_agree_buyers_are_told_the_first_offering_nodes_entry() -> None:
    """One signature among the nodes in good standing (the common case, counted without asking every
    node for its offer): what buyers are told is still the entry of the first node that offers."""
    view = PoolView("ecp/v1", needs_key=True)
    catalogue = Catalogue(None, clock=lambda: 1.0)
    described_by(view, "idle", "FP32", offers=False, version="7")
    described_by(view, "busy", "FP32", version="8")
    described_by(view, "later", "FP32", version="9")
    files = catalogue.files("m", view)
    assert files == frozenset({"a" * 64})
    told = catalogue.described("m", files, view)
    assert told is not None and told["version"] == "8"


def test_a_node_born_again_is_counted_by_its_new_birth() -> None:
    """Each node's signature is made once per birth: a new birth (a reconnect, an OTA) must replace it."""
    view, now = PoolView("ecp/v1", needs_key=True), [1.0]
    gateway = SimpleNamespace(view=view, catalogue=Catalogue(None, clock=lambda: now[0]))
    files = frozenset({"a" * 64})
    nodes = [described_by(view, name, "INT8") for name in ("one", "two", "three")]
    assert [spec.datatype for spec in signature(gateway, "m", files)] == ["INT8"]  # type: ignore[arg-type]
    assert [node.signature("m") for node in nodes] == [nodes[0].signature("m")] * 3
    for node in nodes[:2]:  # two of three born again with an FP32 input, in a later session
        birth = {
            "session": 2,
            "public_key": node.public_key,
            "models": {
                "m": {"sha256": "a" * 64, "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]}
            },
        }
        assert view.ingest(f"ecp/v1/s/{node.node}/birth", orjson.dumps(birth), 0.0) is node
        view.ingest(
            f"ecp/v1/s/{node.node}/state", orjson.dumps({"session": 2, "seq": 1, "state": "online"}), 0.0
        )
        document = {
            "session": 2,
            "seq": 2,
            "valid_for_s": 60,
            "models": {"m": {"spare_ips_at_slo": 100.0, "accepts_pool_jobs": True}},
        }
        view.ingest(f"ecp/v1/s/{node.node}/capacity", orjson.dumps(document), 0.0)
    now[0] += catalogues.RECOUNT_S
    assert [spec.datatype for spec in signature(gateway, "m", files)] == ["FP32"]  # type: ignore[arg-type]
    assert b"FP32" in nodes[0].signature("m") and b"INT8" in nodes[2].signature("m")  # type: ignore[operator]


def test_names_no_node_serves_are_never_kept_and_the_rest_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    view, now = PoolView("ecp/v1"), [1.0]
    catalogue = Catalogue(None, clock=lambda: now[0])
    for _ in range(10_000):  # what GET /v2/models/<anything> asks the catalogue
        assert catalogue.files(uuid.uuid4().hex, view) is None
    assert not catalogue._chosen
    monkeypatch.setattr(catalogues, "MAX_KEPT", 8)
    models = {f"m{index}": {"sha256": "a" * 64, "inputs": []} for index in range(20)}
    view.ingest("ecp/v1/s/a/birth", orjson.dumps({"session": 1, "models": models}), 0.0)
    capacity = {"session": 1, "valid_for_s": 60, "models": {name: {} for name in models}}
    view.ingest("ecp/v1/s/a/capacity", orjson.dumps(capacity), 0.0)
    for name in models:
        files = catalogue.files(name, view)
        assert files == frozenset({"a" * 64}) and catalogue.described(name, files, view) == models[name]
    assert len(catalogue._chosen) == len(catalogue._described) == 8


@pytest.mark.asyncio
async def test_the_recheck_loop_outlives_a_node_whose_offer_cannot_be_read() -> None:
    view = PoolView("ecp/v1")
    broken, fine = described_by(view, "broken", "FP32"), described_by(view, "fine", "FP32")
    for node in (broken, fine):
        node.quarantine = "canary failed on model 'm'"
    assert broken.capacity is not None  # what ingest refuses now, put there past it: the loop must not care
    broken.capacity["models"]["m"] = [1]
    rechecked: list[str] = []
    both_rounds = asyncio.Event()

    async def canary(model: str, rows: int, buyer: str, *, target: NodeView, **_: object) -> None:
        rechecked.append(target.node)
        if len(rechecked) == 2:
            both_rounds.set()

    dispatcher = SimpleNamespace(credit=SimpleNamespace(clock=lambda: 1.0))
    trust = SimpleNamespace(view=view, records={})
    checks = Checks(CanarySettings(recheck_interval_s=0.01), Catalogue(None), dispatcher, None, trust)  # type: ignore[arg-type]
    checks.golden = {"m": None}  # type: ignore[dict-item]
    checks.canary = canary  # type: ignore[assignment,method-assign]
    loop = asyncio.create_task(checks.recheck_forever())
    async with asyncio.timeout(10):
        await both_rounds.wait()
    assert rechecked == ["fine", "fine"] and not loop.done()
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop


@pytest.mark.asyncio
async def test_a_referee_judges_only_the_outputs_the_buyer_asked_for() -> None:
    """Regression: a trusted run gives every output, an answer only those asked for; the tie-break held
    the rest against both nodes ("shape None") and quarantined honest ones."""
    failed: list[str] = []
    trust = SimpleNamespace(fail=lambda node, why: failed.append(node.name))
    checks = Checks(CanarySettings(), Catalogue(None), None, None, trust)  # type: ignore[arg-type]
    trusted = {"prob": np.array([[0.9]], np.float32), "map": np.zeros((1, 4), np.float32)}
    checks.references = SimpleNamespace(run=lambda path, inputs: trusted)  # type: ignore[assignment]
    entry = SimpleNamespace(model_files={"f" * 64: Path("m.onnx")}, tolerance=lambda *_: (0.01, 0.0))

    def answered(name: str, prob: float) -> object:
        node = SimpleNamespace(name=name, model_birth=lambda model: {"precision": "fp32", "provider": "cpu"})
        statement = SimpleNamespace(model_sha256="f" * 64)
        outputs = {"prob": np.array([[prob]], np.float32)}
        return SimpleNamespace(
            node=node, job_id=f"{name}/0", proof=SimpleNamespace(statement=statement, outputs=outputs)
        )

    answers = (answered("honest", 0.9), answered("liar", 0.1))
    verdict, detail = await checks._referee(entry, "m", {}, answers, ["prob differs"], frozenset({"prob"}))  # type: ignore[arg-type]
    assert verdict == "disagreed" and failed == ["liar"] and detail.endswith("wrong by a trusted run: liar")
