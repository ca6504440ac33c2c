"""The gateway's bounds on what a request holds (places, bytes being read, time), the fleet view's door
and its keeping, the buyers file's and settings' new keys, and golden samples nodes may hold."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests_support import buyers_file

from appliance import errors
from appliance.platform.admission import Admission, ReadingBudgetSpent
from appliance.platform.buyers import Buyers, token_digest
from appliance.platform.golden import exposure
from appliance.platform.kept import KEEP_FACTOR, Kept
from appliance.platform.settings import GatewaySettings, PlatformSettings

MODELS = Path(__file__).resolve().parents[2] / "models"
INT8, SAMPLES = MODELS / "surface_defect/1/model.onnx", MODELS / "surface_defect/1/samples.npz"


def admission(buyers: Buyers, **settings: Any) -> Admission:
    return Admission(GatewaySettings(**settings), buyers)


def bearer(token: str) -> bytes:
    return f"Bearer {token}".encode()


def test_a_buyer_has_so_many_places_its_entry_or_the_default(tmp_path: Path) -> None:
    path = buyers_file(tmp_path, acme="max_requests_in_progress = 2", beta="")
    buyers = Buyers.load(path, rate_per_s=50, max_body_bytes=1000)
    acme, beta = buyers.identify(bearer("acme-secret")), buyers.identify(bearer("beta-secret"))
    assert acme is not None and beta is not None
    door = admission(buyers, default_max_requests_in_progress=3)
    door.enter(acme)
    door.enter(acme)
    with pytest.raises(errors.RateLimited, match=r"buyer 'acme' has 2 requests in progress") as refused:
        door.enter(acme)
    assert refused.value.retry_after_s == 1.0
    for _ in range(3):
        door.enter(beta)  # the others' places are their own
    with pytest.raises(errors.RateLimited):
        door.enter(beta)
    door.leave(acme)
    door.enter(acme)
    assert (door.in_progress("acme"), door.in_progress("beta")) == (2, 3)
    buyers_file(tmp_path, acme="max_requests_in_progress = 0")
    with pytest.raises(
        errors.ConfigError, match=r"buyers\.acme\.max_requests_in_progress must be an integer"
    ):
        Buyers.load(path, rate_per_s=50, max_body_bytes=1000)


def test_the_fleet_view_is_for_operators(tmp_path: Path) -> None:
    ops = [token_digest("ops-secret")]
    closed = Buyers.load(buyers_file(tmp_path, acme=""), rate_per_s=50, max_body_bytes=1000)
    door = admission(closed, operator_token_sha256=ops)
    assert door.fleet_refusal(bearer("ops-secret")) is None
    assert isinstance(door.fleet_refusal(bearer("acme-secret")), errors.Forbidden)
    assert isinstance(door.fleet_refusal(bearer("nobody")), errors.Unauthorised)
    assert isinstance(door.fleet_refusal(None), errors.Unauthorised)
    # With buyers and no operator listed, no one; with no buyers file either, every caller (no token is
    # asked anywhere); with no buyers file and an operator listed, the operator only.
    assert isinstance(admission(closed).fleet_refusal(bearer("acme-secret")), errors.Forbidden)
    open_door = Buyers.load(None, rate_per_s=50, max_body_bytes=1000)
    assert admission(open_door).fleet_refusal(None) is None
    assert isinstance(admission(open_door, operator_token_sha256=ops).fleet_refusal(None), errors.Forbidden)
    assert admission(open_door, operator_token_sha256=ops).fleet_refusal(bearer("ops-secret")) is None


def test_operator_tokens_are_sha256_digests() -> None:
    digest = token_digest("ops-secret")
    environ = {"APPLIANCE_GATEWAY__OPERATOR_TOKEN_SHA256": f'["{digest}"]'}
    assert PlatformSettings.load(None, environ=environ).gateway.operator_token_sha256 == [digest]
    one = PlatformSettings.load(None, environ={}, overrides={"gateway": {"operator_token_sha256": digest}})
    assert one.gateway.operator_token_sha256 == [digest]
    with pytest.raises(errors.ConfigError, match=r"gateway\.operator_token_sha256.*not a sha256 digest"):
        PlatformSettings.load(None, environ={}, overrides={"gateway": {"operator_token_sha256": ["ops"]}})


class Body:
    """An ASGI receive giving `chunks` in turn, the last one ending the body unless `stalls`: then it
    says more is coming and waits for ever after it."""

    def __init__(self, *chunks: bytes, stalls: bool = False) -> None:
        self.chunks: Iterator[bytes] = iter(chunks)
        self.left = len(chunks)
        self.stalls = stalls

    async def __call__(self) -> dict[str, Any]:
        chunk = next(self.chunks, None)
        if chunk is None:
            await asyncio.Event().wait()
        self.left -= 1
        return {"type": "http.request", "body": chunk, "more_body": self.stalls or self.left > 0}


def scope(content_length: int | None = None) -> dict[str, Any]:
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    return {"type": "http", "headers": headers}


@pytest.mark.asyncio
async def test_bodies_being_read_stay_within_the_budget_declared_or_chunked() -> None:
    door = admission(Buyers.load(None, rate_per_s=50, max_body_bytes=1000), max_reading_bytes=1000)
    far = asyncio.get_running_loop().time() + 3600

    async def read(receive: Body, length: int | None) -> bytes:
        return await door.read(scope(length), receive, 10_000, deadline=far, limit_says="-")

    held = asyncio.create_task(read(Body(b"a" * 10, stalls=True), 900))  # declared 900, sends 10 and stalls
    while door.reading.taken_bytes != 900:
        await asyncio.sleep(0)
    with pytest.raises(ReadingBudgetSpent, match=r"gateway\.max_reading_bytes") as refused:
        await read(Body(b"b" * 200), 200)
    assert refused.value.retry_after_s == 1.0
    with pytest.raises(ReadingBudgetSpent):  # chunked: counted as it comes, refused once past
        await read(Body(b"c" * 60, b"c" * 60, b"c" * 60), None)
    assert door.reading.taken_bytes == 900  # what the refused ones had taken is back
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    assert door.reading.taken_bytes == 0
    assert await read(Body(b"d" * 600, b"d" * 400), None) == b"d" * 1000
    assert await read(Body(b"e" * 1000), 1000) == b"e" * 1000
    assert door.reading.taken_bytes == 0


@pytest.mark.asyncio
async def test_a_compressed_body_holds_its_whole_limit_of_the_budget() -> None:
    """What a gzip body inflates to is known only once inflated: 20 bytes may become the buyer's whole
    limit in memory, so it takes that limit of the budget, not the bytes it declares."""
    door = admission(Buyers.load(None, rate_per_s=50, max_body_bytes=1000), max_reading_bytes=1000)
    far = asyncio.get_running_loop().time() + 3600
    packed = gzip.compress(b"z" * 600)
    gzipped = {"type": "http", "headers": [(b"content-encoding", b"gzip")]}
    held = asyncio.create_task(
        door.read(gzipped, Body(packed[:5], stalls=True), 600, deadline=far, limit_says="-")
    )
    while door.reading.taken_bytes != 600:
        await asyncio.sleep(0)
    with pytest.raises(ReadingBudgetSpent):
        await door.read(gzipped, Body(packed), 600, deadline=far, limit_says="-")
    assert await door.read(scope(400), Body(b"p" * 400), 600, deadline=far, limit_says="-") == b"p" * 400
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    assert await door.read(gzipped, Body(packed), 600, deadline=far, limit_says="-") == b"z" * 600
    assert door.reading.taken_bytes == 0


@pytest.mark.asyncio
async def test_a_body_not_in_by_its_deadline_is_a_timeout_and_gives_its_bytes_back() -> None:
    door = admission(Buyers.load(None, rate_per_s=50, max_body_bytes=1000), body_timeout_s=7.0)
    now = asyncio.get_running_loop().time()
    with pytest.raises(errors.RequestTimeout, match=r"within 7 s of its headers \(gateway\.body_timeout_s\)"):
        await door.read(scope(100), Body(b"x" * 10, stalls=True), 1000, deadline=now, limit_says="-")
    assert door.reading.taken_bytes == 0


def test_the_fleet_view_is_rebuilt_only_once_older_than_its_cost_allows() -> None:
    now = [0.0]
    built: list[int] = []

    def build() -> bytes:
        now[0] += 0.1  # building takes 0.1 s
        built.append(1)
        return str(len(built)).encode()

    kept = Kept(build, clock=lambda: now[0])
    assert kept.get() == b"1" and kept.get() == b"1"  # kept: costs nothing
    now[0] += 0.1 * KEEP_FACTOR - 0.01
    assert kept.get() == b"1" and len(built) == 1
    now[0] += 0.02
    assert kept.get() == b"2" and kept.builds == 2


def test_golden_samples_every_box_holds_are_named(tmp_path: Path) -> None:
    digest = hashlib.sha256(INT8.read_bytes()).hexdigest()
    why = exposure(SAMPLES, [digest])
    assert why is not None and "every box installed from the package holds" in why
    # The same samples outside the package, beside the model file they go with: a model repository's
    # layout, as boxes are given it.
    repo = tmp_path / "repo" / "surface_defect" / "1"
    repo.mkdir(parents=True)
    shutil.copy(SAMPLES, repo / "samples.npz")
    shutil.copy(INT8, repo / "model.onnx")
    why = exposure(repo / "samples.npz", [digest], bundled=tmp_path / "none")
    assert why is not None and "beside" in why and "ota verify" in why
    assert exposure(repo / "samples.npz", ["0" * 64], bundled=tmp_path / "none") is None
    # Samples of the operator's own, never shipped: no sign of exposure.
    with np.load(SAMPLES) as archive:
        images = archive["input__image"]
    secret = tmp_path / "secret.npz"
    np.savez(secret, input__image=np.clip(images[::-1] * 0.9 + 0.05, 0, 1))
    assert exposure(secret, [digest]) is None
