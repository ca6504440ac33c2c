"""Signed answers: canonical bytes, tensor digests whatever the encoding, the device key file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import orjson
import pytest

from appliance.errors import ConfigError
from appliance.pool import identity, signing
from appliance.protocol import codec


def statement(**changes: object) -> signing.Statement:
    fields: dict[str, object] = {
        "job_id": "j1", "model_sha256": "a" * 64, "input_sha256": "b" * 64, "output_sha256": "c" * 64,
        "queue_ms": 0.25, "compute_ms": 1.5, "node": "box-12", "session": 42,
    }  # fmt: skip
    fields.update(changes)
    return signing.Statement(**fields)  # type: ignore[arg-type]


def test_the_signed_bytes_are_canonical_and_documented() -> None:
    assert statement().canonical() == (
        b'ecp-answer-v1\n{"compute_ms":1.5,"input_sha256":"' + b"b" * 64 + b'","job_id":"j1","model_sha256":"'
        + b"a" * 64 + b'","node":"box-12","output_sha256":"' + b"c" * 64 + b'","queue_ms":0.25,"session":42}'
    )  # fmt: skip


def test_a_tensor_digest_is_the_same_for_json_and_binary() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    names = np.array([b"a", b"bc"], dtype=object)
    as_json = codec.decode_request(codec.encode_request({"x": x}, binary=False).body())
    binary = codec.encode_request({"x": x}, binary=True)
    as_binary = codec.decode_request(binary.body(), binary.header_length)
    assert signing.tensor_digest(as_json.inputs) == signing.tensor_digest(as_binary.inputs)
    assert signing.tensor_digest({"x": x}) != signing.tensor_digest({"x": x.reshape(4, 3)})  # shape counts
    assert signing.tensor_digest({"x": x}) != signing.tensor_digest({"y": x})  # and the name
    assert signing.tensor_digest({"n": names}) != signing.tensor_digest({"n": names[::-1].copy()})
    # Golden value: a change to the documented layout must be a deliberate, versioned one.
    golden = {"x": np.array([[1.5, -2.0]], np.float32), "n": np.array([b"ab"], dtype=object)}
    assert signing.tensor_digest(golden) == "d5def93cc600d2f3d74174baecadefd4160c2193ab0486974da0469b2638fb86"


def test_signatures_verify_and_any_change_breaks_them(tmp_path: Path) -> None:
    key = identity.device_key(tmp_path)
    public = signing.parse_public_key(signing.public_key_text(key))
    signature = signing.sign(key, statement())
    assert signing.verify(public, statement(), signature)
    for change in ({"job_id": "j2"}, {"output_sha256": "d" * 64}, {"compute_ms": 1.6}, {"session": 43}):
        assert not signing.verify(public, statement(**change), signature)
    other = signing.parse_public_key(signing.public_key_text(identity.device_key(tmp_path / "other")))
    assert not signing.verify(other, statement(), signature)
    assert not signing.verify(public, statement(), "not base64!")
    with pytest.raises(ValueError, match="32 bytes"):
        signing.parse_public_key("ed25519:AAAA")


def test_the_device_key_is_made_once_with_mode_0600_and_credentials_win(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = identity.device_key(state)
    path = state / identity.STATE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = identity.device_key(state)
    assert signing.public_key_text(again) == signing.public_key_text(key)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    identity.write_key(credentials / identity.CREDENTIAL, identity.device_key(tmp_path / "provisioned"))
    from_credentials = identity.device_key(state, credentials)
    assert signing.public_key_text(from_credentials) != signing.public_key_text(key)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="may be read by others"):
        identity.device_key(state)
    (credentials / identity.CREDENTIAL).write_text("garbage")
    with pytest.raises(ConfigError, match="not a readable PEM private key"):
        identity.device_key(state, credentials)


def test_the_proof_rides_at_the_top_of_the_header_whatever_follows_it() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = b'{"model_name":"m","model_version":"1","outputs":[]}'
    proof = {**statement().fields(), "signature": "c2ln"}
    signed = signing.attach(header, proof)
    document = orjson.loads(signed)
    assert document["parameters"]["pool_signature"] == proof
    assert document["model_name"] == "m"
    assert signing.Statement.of(document["parameters"]["pool_signature"]) == statement()
    with pytest.raises(ValueError, match="a response header is a non-empty JSON object"):
        signing.attach(b"{}", proof)
    with pytest.raises(ValueError, match=r"pool_signature.session is '42'; expected <class 'int'>"):
        signing.Statement.of({**proof, "session": "42"})
    with pytest.raises(ValueError, match=r"pool_signature\.queue_ms is True"):
        signing.Statement.of({**proof, "queue_ms": True})
    assert signing.tensor_digest({"x": x}) == signing.tensor_digest({"x": x.copy(order="F")})


def test_the_job_id_is_the_correlation_as_text_else_the_corr_id_else_the_request_id() -> None:
    assert signing.job_id(b"0f3a/1", None, "r") == "0f3a/1"
    assert signing.job_id(b"\xff\x00", None, "r") == "hex:ff00"
    assert signing.job_id(None, 17, "r") == "17"
    assert signing.job_id(None, None, "r") == "r"
    assert signing.job_id(None, None, None) == ""
