"""The gateway's paho reads a recv's worth at once (link.BufferedReads): every packet whole, in order,
none from a socket it no longer reads, and `buffered()` says when bytes wait that no poller can see."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from appliance.platform.link import READ_BYTES, BufferedReads
from appliance.pool.wire import paho_client


def publish(topic: str, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH at QoS 0, as a broker sends it."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + payload
    length, remaining = bytearray(), len(body)
    while True:
        byte, remaining = remaining % 128, remaining // 128
        length.append(byte | (128 if remaining else 0))
        if not remaining:
            return bytes([0x30]) + bytes(length) + body


@pytest.fixture
def client() -> Iterator[BufferedReads]:
    made = paho_client("reads", mqtt.MQTTv311, kind=BufferedReads)
    made.received = []  # type: ignore[attr-defined]
    made.on_message = lambda _c, _u, message: made.received.append((message.topic, message.payload))  # type: ignore[attr-defined]
    made.pairs = []  # type: ignore[attr-defined]
    yield made
    for sock in made.pairs:  # type: ignore[attr-defined]
        sock.close()


def connect(client: BufferedReads) -> socket.socket:
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client.pairs += [ours, broker]  # type: ignore[attr-defined]
    client._sock = ours  # what paho's connection sets
    return broker


def test_packets_read_in_one_recv_come_out_whole_and_in_order(client: BufferedReads) -> None:
    broker = connect(client)
    big = bytes(range(256)) * (3 * READ_BYTES // 256)  # longer than one recv, its length in 3 bytes
    sent = [("a/1", b"x"), ("a/2", b""), ("b", big), ("a/3", b"y" * 300)]
    broker.sendall(b"".join(publish(topic, payload) for topic, payload in sent))
    for _ in range(100):  # paho reads one packet per loop_read here (nothing in flight)
        client.loop_read()
        if len(client.received) == len(sent) and not client.buffered():  # type: ignore[attr-defined]
            break
    assert client.received == sent  # type: ignore[attr-defined]
    assert not client.buffered()
    assert client.loop_read() == mqtt.MQTT_ERR_SUCCESS  # nothing left: paho's "again", not an error


def test_what_waits_in_the_buffer_is_said_and_never_served_for_another_socket(client: BufferedReads) -> None:
    broker = connect(client)
    broker.sendall(publish("a/1", b"first") + publish("a/2", b"second"))
    client.loop_read()
    assert client.received == [("a/1", b"first")]  # type: ignore[attr-defined]
    assert client.buffered()  # the second is read from the socket already: no poller would say so
    client._in_packet["command"] = 0  # a new connection starts a new packet (paho's reconnect does)
    fresh = connect(client)  # bytes of the old connection are dropped, not parsed as the new one's
    assert not client.buffered()
    fresh.sendall(publish("c/1", b"new"))
    client.loop_read()
    assert client.received == [("a/1", b"first"), ("c/1", b"new")]  # type: ignore[attr-defined]
