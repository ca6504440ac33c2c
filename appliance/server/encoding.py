"""Request bodies sent in a Content-Encoding (gzip, deflate), inflated as they arrive under the body's limit.

Triton inflates a request body before parsing it, and tritonclient's `request_compression_algorithm`
sends `gzip` (gzip.compress) or `deflate` (zlib.compress: the zlib wrapper RFC 9110 means by deflate).
As Triton does (zlib's automatic header detection, windowBits 15 | 32), either wrapper is taken under
either name. A raw deflate stream without a wrapper is refused, as Triton refuses it: tritonclient
sends none.

The body's limit holds for the inflated bytes: zlib is never asked for more than one byte past it, so a
body that inflates a thousandfold is refused with 413 after limit + 1 bytes. Inflating runs on the event
loop a step at a time (STEP_BYTES in, at most STEP_BYTES out), letting other tasks run between steps as
reading a body that large uncompressed would between its chunks.
"""

from __future__ import annotations

import asyncio
import zlib

from starlette.types import Scope

from appliance.errors import InvalidInput, Overloaded, RequestTooLarge, UnsupportedEncoding

CODINGS = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}  # RFC 9110 §8.4.1.3: x-gzip is gzip
ACCEPT_ENCODING = "gzip, deflate"  # what a 415 lists (RFC 9110 §12.5.3: Accept-Encoding in a response)
# zlib's output and input per step. A step of the most compressible data (zeros, 1000:1) took 0.2 ms on
# the 2-core dev box (zlib 1.2.13), one of random floats less; a larger output step holds the loop
# longer, a larger input step makes each step copy more of what is left of its input (unconsumed_tail).
STEP_BYTES = 64 * 1024
_ZLIB_OR_GZIP = zlib.MAX_WBITS | 32


def coding_of(scope: Scope) -> str | None:
    """The coding an HTTP request's body is in, from its Content-Encoding header(s): "gzip",
    "deflate", or None for none (absent, empty or `identity`). UnsupportedEncoding for any other coding
    and for several (`gzip, gzip`): one layer is what clients send, and each layer could multiply the
    work a body costs."""
    for key, _ in scope["headers"]:
        if key == b"content-encoding":
            break
    else:
        return None  # the usual case, as cheap as one pass over the headers
    text = b",".join(v for k, v in scope["headers"] if k == b"content-encoding").decode("latin-1")
    codings = [token.strip().lower() for token in text.split(",")]
    codings = [coding for coding in codings if coding and coding != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in CODINGS:
        return CODINGS[codings[0]]
    shown = text if len(text) <= 80 else f"{text[:77]}..."
    raise UnsupportedEncoding(
        f"Content-Encoding {shown!r} is not supported: send the body as it is (identity) or in one of "
        f"{ACCEPT_ENCODING}"
    )


class InflationBudgetSpent(Overloaded):
    """The compressed bodies being read hold server.max_inflating_bytes inflated: 503, try again."""


class InflatingBudget:
    """What the compressed bodies being read have inflated to, all of them together (event loop only).

    Each body is bounded by its limit, but a few KB of gzip can become that limit: without a bound over
    all of them, a client holding a hundred such bodies open, each never finished, holds a hundred limits
    of the box's memory for the price of a few hundred KB sent."""

    def __init__(self, limit_bytes: int, retry_after_s: float = 1.0) -> None:
        self.limit_bytes = limit_bytes
        self.retry_after_s = retry_after_s
        self.taken_bytes = 0

    def take(self, size: int) -> None:
        if self.taken_bytes + size > self.limit_bytes:
            raise InflationBudgetSpent(
                f"compressed request bodies being read have inflated to {self.taken_bytes} bytes; {size} "
                f"more would pass server.max_inflating_bytes ({self.limit_bytes}): try again",
                retry_after_s=self.retry_after_s,
            )
        self.taken_bytes += size

    def give(self, size: int) -> None:
        self.taken_bytes -= size


class Inflater:
    """One request body's coding undone as its chunks come: `feed` each, then `finish` for the body.

    RequestTooLarge as soon as the inflated bytes pass `limit_bytes` (`limit_says` words the limit, as
    body.read_body's refusal does); InvalidInput for a stream zlib cannot read, one that ends early and
    bytes after its end (a second gzip member included: no client sends one, and each costs a new
    zlib stream). With a `budget`, what it inflates is taken from it as it comes (InflationBudgetSpent
    once spent) until `release()`, which the reader calls however the body ends."""

    def __init__(
        self, coding: str, limit_bytes: int, limit_says: str, budget: InflatingBudget | None = None
    ) -> None:
        self.coding = coding
        self.limit_bytes = limit_bytes
        self.limit_says = limit_says
        self.budget = budget
        self.size = 0
        self._held = 0
        self._pieces: list[bytes] = []
        self._zlib = zlib.decompressobj(_ZLIB_OR_GZIP)

    async def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk)
        for start in range(0, len(view), STEP_BYTES):
            if self._zlib.eof:
                raise self._after_end()
            data: bytes | memoryview = view[start : start + STEP_BYTES]
            while True:
                wanted = min(STEP_BYTES, self.limit_bytes + 1 - self.size)
                try:
                    piece = self._zlib.decompress(data, wanted)
                except zlib.error as exc:
                    raise InvalidInput(
                        f"request body is not valid {self.coding} data (Content-Encoding): {exc}"
                    ) from None
                self.size += len(piece)
                if self.size > self.limit_bytes:
                    raise RequestTooLarge(
                        f"request body is too large once inflated ({self.coding}): {self.limit_says}"
                    )
                if self.budget is not None:
                    self.budget.take(len(piece))
                    self._held += len(piece)
                self._pieces.append(piece)
                if self._zlib.eof:
                    if self._zlib.unused_data:
                        raise self._after_end()
                    break
                data = self._zlib.unconsumed_tail
                if not data and len(piece) < wanted:
                    break
                await asyncio.sleep(0)  # more output is due from this step's input: others run first

    def finish(self) -> bytes:
        """The inflated body; InvalidInput when the stream has not ended (a truncated body)."""
        if not self._zlib.eof:
            raise InvalidInput(
                f"request body ends before its {self.coding} stream does: truncated, or not {self.coding}"
            )
        return self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)

    def release(self) -> None:
        """Give back to the budget what this body took (once read, it is the request's, which the data
        plane bounds; refused, it is dropped)."""
        if self.budget is not None:
            self.budget.give(self._held)
        self._held = 0

    def _after_end(self) -> InvalidInput:
        return InvalidInput(f"request body has bytes after the end of its {self.coding} stream")
