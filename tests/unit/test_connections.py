"""ConnectionGate (places in all and per client address, given back on close) and the protocol's timers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from appliance import errors
from appliance.dataplane.outcomes import outcome_of
from appliance.scheduler.queues import Priority
from appliance.server.connections import bounded_protocol
from appliance.server.gate import ConnectionGate
from appliance.settings import ServerSettings


def test_a_peer_at_its_limit_leaves_places_to_others() -> None:
    gate = ConnectionGate(max_connections=3, max_per_peer=2)
    assert gate.admit("10.0.0.1", 1.0) is None
    assert gate.admit("10.0.0.1", 1.0) is None
    refusal = gate.admit("10.0.0.1", 2.0)
    assert isinstance(refusal, errors.ConnectionLimit)
    assert outcome_of(refusal).http_status == 503
    assert refusal.retry_after_s == 2.0
    assert str(refusal) == (
        "too many connections from 10.0.0.1: 2 open, at most 2 per client address "
        "(server.max_connections_per_peer)"
    )
    assert gate.admit("10.0.0.2", 1.0) is None
    assert (
        str(gate.admit("10.0.0.3", 1.0)) == "too many connections: 3 open, at most 3 (server.max_connections)"
    )
    assert gate.open == 3


def test_closed_connections_give_their_places_back() -> None:
    gate = ConnectionGate(max_connections=2, max_per_peer=1)
    for peer in ("10.0.0.1", "10.0.0.2"):
        assert gate.admit(peer, 1.0) is None
    gate.release("10.0.0.1")
    assert gate.peers == 1
    assert gate.admit("10.0.0.3", 1.0) is None
    gate.release("10.0.0.2")
    gate.release("10.0.0.3")
    assert gate.open == gate.peers == 0


class _Transport(asyncio.Transport):
    """What the protocol writes, and an event once it half-closes or closes the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.ended = asyncio.Event()

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written += data

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("10.0.0.1", 40000), "sockname": ("10.0.0.9", 8000)}.get(name, default)

    def is_closing(self) -> bool:
        return self.ended.is_set()

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return 0

    def write_eof(self) -> None:
        self.ended.set()

    def close(self) -> None:
        self.ended.set()

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _app(scope: dict, receive: Callable, send: Callable) -> None:
    while (await receive()).get("more_body"):
        pass


def test_a_timer_armed_for_a_met_deadline_still_ends_a_late_body() -> None:
    """The header deadline's timer fires while the body is read: it re-arms for the body's deadline."""
    counted: list[tuple[str | None, object, BaseException]] = []

    async def scenario() -> bytes:
        config = Config(_app, lifespan="off")
        config.load()
        settings = ServerSettings(header_timeout_s=0.01, body_timeout_s=0.2)
        protocol = bounded_protocol(settings, ConnectionGate.of(settings), lambda *a: counted.append(a))(
            config=config, server_state=ServerState(), app_state={}
        )
        transport = _Transport()
        protocol.connection_made(transport)  # the header deadline's timer: 0.01 s from now
        protocol.data_received(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345")  # headers in time
        async with asyncio.timeout(30):
            await transport.ended.wait()
        protocol.connection_lost(None)
        return bytes(transport.written)

    answer = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert answer.endswith(b'within 0.2 s of its headers (server.body_timeout_s)"}')
    assert [(model, priority, outcome_of(exc).reason) for model, priority, exc in counted] == [
        ("", Priority.LINE.label, "timeout")
    ]


class _Reader(_Transport):
    """A client that takes its answer as `sizes` says: the write buffer's size at each look, the last
    one for good. close() waits for the buffer to empty, as asyncio's does; abort() does not."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self._sizes = sizes
        self.is_aborted = False
        self._is_closing = False
        self.answered = asyncio.Event()

    def write(self, data: bytes) -> None:  # type: ignore[override]
        super().write(data)
        if self.written.endswith(b"ok"):
            self.answered.set()

    def get_write_buffer_size(self) -> int:
        size = self._sizes.pop(0) if len(self._sizes) > 1 else self._sizes[0]
        if self._is_closing and not size:
            self.ended.set()
        return size

    def is_closing(self) -> bool:
        return self._is_closing or self.ended.is_set()

    def close(self) -> None:
        self._is_closing = True
        if not self._sizes[-1] and len(self._sizes) == 1:
            self.ended.set()

    def abort(self) -> None:
        self.is_aborted = True
        self.ended.set()


async def _ok(scope: dict, receive: Callable, send: Callable) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _answered(request: bytes, transport: _Reader, *, stop: str = "") -> _Reader:
    """The connection after `request` is answered, once it has ended: closed or reset. idle_timeout_s
    is 0.01 s; or an hour, and the server stops with drain_timeout_s 0.01 s "before" or "after" the
    answer is written."""

    async def scenario() -> None:
        settings = ServerSettings(idle_timeout_s=3600.0 if stop else 0.01, drain_timeout_s=0.01)
        config = Config(_ok, lifespan="off", timeout_keep_alive=settings.idle_timeout_s)  # as service.py
        config.load()
        protocol = bounded_protocol(settings, ConnectionGate.of(settings), lambda *a: None)(
            config=config, server_state=ServerState(), app_state={}
        )
        protocol.connection_made(transport)
        protocol.data_received(request)
        if stop == "after":
            async with asyncio.timeout(30):
                await transport.answered.wait()
        if stop:
            protocol.shutdown()
        async with asyncio.timeout(30):
            await transport.ended.wait()
        protocol.connection_lost(None)

    asyncio.run(scenario())
    return transport


@pytest.mark.parametrize("connection", [b"keep-alive", b"close"])
def test_a_client_that_takes_none_of_its_answer_is_reset(connection: bytes) -> None:
    """Closing would wait for the unsent bytes forever: idle_timeout_s after the answer with none of them
    taken, the connection is aborted, kept alive or closing alike."""
    request = b"GET /x HTTP/1.1\r\nHost: box\r\nConnection: " + connection + b"\r\n\r\n"
    transport = _answered(request, _Reader([5000]))
    assert transport.written.startswith(b"HTTP/1.1 200 ")
    assert transport.is_aborted


def test_a_client_that_takes_its_answer_slowly_is_not_reset() -> None:
    """Some of the answer taken in each idle_timeout_s is enough (nginx's send_timeout): a slow link is
    served whole, then the idle connection closes."""
    transport = _answered(b"GET /x HTTP/1.1\r\nHost: box\r\n\r\n", _Reader([5000, 5000, 4000, 3000, 2000, 0]))
    assert transport.written.endswith(b"\r\n\r\nok")
    assert not transport.is_aborted


@pytest.mark.parametrize("stop", ["before", "after"])
def test_an_answer_still_going_out_when_the_drain_ends_is_reset(stop: str) -> None:
    """uvicorn stops only once every connection has closed: a client still taking its answer when
    drain_timeout_s is over is reset then, so the stop keeps its deadline."""
    transport = _answered(b"GET /x HTTP/1.1\r\nHost: box\r\n\r\n", _Reader([5000]), stop=stop)
    assert transport.written.startswith(b"HTTP/1.1 200 ")
    assert transport.is_aborted
