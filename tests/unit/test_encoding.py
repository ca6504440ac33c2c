"""server/encoding.py and read_body's `coding`: gzip and deflate bodies inflated as they come, under the
body's limit counted in inflated bytes; a zip bomb stops one byte past it, with the event loop free."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Awaitable, Callable

import pytest

from appliance.errors import InvalidInput, RequestTooLarge
from appliance.server import encoding
from appliance.server.body import read_body
from appliance.server.encoding import Inflater, UnsupportedEncoding, coding_of

BODY = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}' * 50
LIMIT_SAYS = "the limit is what the test says"


def scope(*encodings: bytes, length: int | None = None) -> dict[str, object]:
    headers = [(b"host", b"box"), *((b"content-encoding", value) for value in encodings)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "headers": headers}


def receiver(data: bytes, chunk_bytes: int) -> Callable[[], Awaitable[dict[str, object]]]:
    """An ASGI receive giving `data` in chunks of `chunk_bytes`."""
    chunks = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    return receive


def inflate(data: bytes, coding: str, limit_bytes: int = 1 << 20, chunk_bytes: int = 4096) -> bytes:
    async def run() -> bytes:
        inflater = Inflater(coding, limit_bytes, LIMIT_SAYS)
        for i in range(0, len(data), chunk_bytes):
            await inflater.feed(data[i : i + chunk_bytes])
        return inflater.finish()

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ((), None),
        ((b"identity",), None),
        ((b"",), None),
        ((b"gzip",), "gzip"),
        ((b"GZip",), "gzip"),
        ((b"x-gzip",), "gzip"),
        ((b"deflate",), "deflate"),
        ((b" gzip , identity",), "gzip"),
        ((b"identity", b"deflate"), "deflate"),
    ],
)
def test_the_coding_is_read_from_every_content_encoding_header(
    headers: tuple[bytes, ...], expected: str
) -> None:
    assert coding_of(scope(*headers)) == expected


@pytest.mark.parametrize(
    "headers", [(b"br",), (b"gzip, deflate",), (b"gzip", b"gzip"), (b"zstd",), (b"compress",)]
)
def test_any_other_coding_or_more_than_one_is_unsupported_naming_what_is(headers: tuple[bytes, ...]) -> None:
    with pytest.raises(UnsupportedEncoding) as refused:
        coding_of(scope(*headers))
    assert isinstance(refused.value, InvalidInput)
    assert "is not supported" in str(refused.value) and encoding.ACCEPT_ENCODING in str(refused.value)


def test_a_long_unsupported_coding_is_cut_in_the_refusal() -> None:
    with pytest.raises(UnsupportedEncoding) as refused:
        coding_of(scope(b"x" * 10_000))
    assert len(str(refused.value)) < 200


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096, 1 << 20])
def test_gzip_and_deflate_inflate_whatever_the_chunks(chunk_bytes: int) -> None:
    assert inflate(gzip.compress(BODY), "gzip", chunk_bytes=chunk_bytes) == BODY
    assert inflate(zlib.compress(BODY), "deflate", chunk_bytes=chunk_bytes) == BODY


def test_either_wrapper_is_taken_under_either_name_as_triton_takes_it() -> None:
    assert inflate(zlib.compress(BODY), "gzip") == BODY
    assert inflate(gzip.compress(BODY), "deflate") == BODY


def test_a_body_larger_than_the_limit_once_inflated_is_refused() -> None:
    with pytest.raises(RequestTooLarge, match=f"too large once inflated \\(gzip\\): {LIMIT_SAYS}"):
        inflate(gzip.compress(BODY), "gzip", limit_bytes=len(BODY) - 1)
    assert inflate(gzip.compress(BODY), "gzip", limit_bytes=len(BODY)) == BODY


def test_a_zip_bomb_is_inflated_no_further_than_one_byte_past_the_limit() -> None:
    bomb = gzip.compress(bytes(256 << 20))  # 256 MiB of zeros in about 250 KiB
    limit_bytes = 1 << 20
    inflater = Inflater("gzip", limit_bytes, LIMIT_SAYS)

    async def run() -> None:
        await inflater.feed(bomb)

    with pytest.raises(RequestTooLarge):
        asyncio.run(run())
    assert inflater.size == limit_bytes + 1


def test_inflating_a_chunk_lets_the_event_loop_run_between_steps() -> None:
    """A 64 KiB chunk of zeros inflates to 64 MiB: done in one call it holds the loop for tens of ms.
    Others run between steps of at most STEP_BYTES out."""
    chunk = zlib.compress(bytes(16 << 20))
    ticks = 0

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    async def run() -> bytes:
        stop = asyncio.Event()
        task = asyncio.create_task(ticker(stop))
        await asyncio.sleep(0)
        inflater = Inflater("deflate", 32 << 20, LIMIT_SAYS)
        await inflater.feed(chunk)
        stop.set()
        await task
        return inflater.finish()

    assert len(asyncio.run(run())) == 16 << 20
    assert ticks >= (16 << 20) // encoding.STEP_BYTES - 1


@pytest.mark.parametrize(
    ("data", "coding", "says"),
    [
        (b"this is not gzip at all", "gzip", "request body is not valid gzip data (Content-Encoding)"),
        (gzip.compress(BODY)[:-20], "gzip", "request body ends before its gzip stream does"),
        (b"", "deflate", "request body ends before its deflate stream does"),
        (
            zlib.compress(BODY) + b"tail",
            "deflate",
            "request body has bytes after the end of its deflate stream",
        ),
        (gzip.compress(BODY) + gzip.compress(BODY), "gzip", "bytes after the end of its gzip stream"),
        (zlib.compress(BODY, wbits=-15), "deflate", "not valid deflate data"),  # raw deflate: no wrapper
    ],
)
def test_a_stream_that_is_corrupt_truncated_or_followed_by_more_is_invalid(
    data: bytes, coding: str, says: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        inflate(data, coding)
    assert not isinstance(refused.value, RequestTooLarge)
    assert says in str(refused.value)


def test_read_body_inflates_its_coding_and_bounds_the_bytes_received_too() -> None:
    compressed = gzip.compress(BODY)

    async def read(data: bytes, limit_bytes: int, chunk_bytes: int = 10, **kwargs: object) -> bytes:
        return await read_body(
            scope(length=len(data)), receiver(data, chunk_bytes), limit_bytes, coding="gzip", **kwargs
        )

    assert asyncio.run(read(compressed, len(BODY))) == BODY
    with pytest.raises(RequestTooLarge, match="once inflated"):
        asyncio.run(read(compressed, len(BODY) - 1, model="m"))
    with pytest.raises(RequestTooLarge, match=f"request body of {len(compressed)} bytes is too large"):
        asyncio.run(read(compressed, len(compressed) - 1))


def test_read_body_without_a_coding_hands_back_the_chunk_it_received() -> None:
    async def read() -> bytes:
        return await read_body(scope(length=len(BODY)), receiver(BODY, len(BODY)), len(BODY))

    assert asyncio.run(read()) is BODY


@pytest.mark.asyncio
async def test_compressed_bodies_being_read_share_one_budget_of_inflated_bytes() -> None:
    """A few KB of gzip per body, each never finished, must not hold a body limit of memory apiece: the
    bodies being read share server.max_inflating_bytes, and a refused or finished one gives its bytes back."""
    budget = encoding.InflatingBudget(300_000, retry_after_s=2.0)
    packed = gzip.compress(b" " * 200_000)
    stalled = asyncio.Event()

    async def never_ends() -> dict[str, object]:
        if stalled.is_set():
            await asyncio.Event().wait()
        stalled.set()
        return {"type": "http.request", "body": packed, "more_body": True}

    gz = scope(b"gzip")
    held = asyncio.create_task(read_body(gz, never_ends, 1 << 20, coding="gzip", budget=budget))
    await stalled.wait()
    while budget.taken_bytes < 200_000:
        await asyncio.sleep(0)
    with pytest.raises(
        encoding.InflationBudgetSpent, match=r"server\.max_inflating_bytes \(300000\)"
    ) as spent:
        await read_body(gz, receiver(packed, 4096), 1 << 20, coding="gzip", budget=budget)
    assert spent.value.retry_after_s == 2.0 and budget.taken_bytes == 200_000  # the refused one gave back
    assert await read_body(scope(), receiver(b"x" * 250_000, 4096), 1 << 20, budget=budget) == b"x" * 250_000
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    assert budget.taken_bytes == 0
    small = gzip.compress(BODY)
    assert await read_body(gz, receiver(small, 100), 1 << 20, coding="gzip", budget=budget) == BODY
    assert budget.taken_bytes == 0
