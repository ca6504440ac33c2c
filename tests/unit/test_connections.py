"""ConnectionGate (places in all and per client address, given back on close) and the protocol's timer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from uvicorn.config import Config
from uvicorn.server import ServerState

from appliance import errors
from appliance.dataplane.outcomes import outcome_of
from appliance.scheduler.queues import Priority
from appliance.server.connections import ConnectionGate, bounded_protocol
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
    assert [(model, str(priority), outcome_of(exc).reason) for model, priority, exc in counted] == [
        ("", str(Priority.LINE), "timeout")
    ]
