"""The gateway's paho reads a recv's worth at once (platform/batched.py): every packet whole, in order,
none from a socket it no longer reads, and `buffered()` says when bytes wait that no poller can see."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from appliance.platform.batched import READ_BYTES, BatchedClient
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
def client() -> Iterator[BatchedClient]:
    made = paho_client("reads", mqtt.MQTTv311, kind=BatchedClient)
    made.received = []  # type: ignore[attr-defined]
    made.on_message = lambda _c, _u, message: made.received.append((message.topic, message.payload))  # type: ignore[attr-defined]
    made.pairs = []  # type: ignore[attr-defined]
    yield made
    for sock in made.pairs:  # type: ignore[attr-defined]
        sock.close()


def connect(client: BatchedClient) -> socket.socket:
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client.pairs += [ours, broker]  # type: ignore[attr-defined]
    client._sock = ours  # what paho's connection sets
    return broker


def test_packets_read_in_one_recv_come_out_whole_and_in_order(client: BatchedClient) -> None:
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


def test_what_waits_in_the_buffer_is_said_and_never_served_for_another_socket(client: BatchedClient) -> None:
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


class Counted:
    """The client's socket, counting sends and taking at most `most` bytes of each (a full buffer)."""

    def __init__(self, sock: socket.socket, most: int = 1 << 20) -> None:
        self.sock, self.most, self.sends = sock, most, 0

    def send(self, data: bytes) -> int:
        self.sends += 1
        return self.sock.send(bytes(data)[: self.most])

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


def queue_publish(client: BatchedClient, topic: str, payload: bytes, qos: int) -> mqtt.MQTTMessageInfo:
    """What paho queues for a publish (MQTT 3.1.1 framing, as `publish` above), to be written later."""
    info = mqtt.MQTTMessageInfo(7)
    packet = bytearray(publish(topic, payload))
    packet[0] |= qos << 1
    if qos:  # a packet identifier after the topic
        at = 2 + 2 + len(topic) + (1 if len(packet) < 130 else 2)
        packet[at:at] = b"\x00\x07"
        packet[1] += 2
    client._packet_queue(mqtt.PUBLISH, packet, 7, qos, info)
    return info


def test_queued_packets_go_in_one_send_in_order_and_a_qos0_publish_is_still_marked_sent(
    client: BatchedClient,
) -> None:
    broker = connect(client)
    client._sock = counted = Counted(client._sock)
    client.on_socket_register_write = lambda *_: None  # an external loop writes (as the gateway's)
    infos = [queue_publish(client, f"j/{i}", b"x" * 100, 1) for i in range(3)]
    infos.append(queue_publish(client, "q0", b"y", 0))  # its on_publish fires once written: alone
    infos.append(queue_publish(client, "j/3", b"z", 1))
    expected = b"".join(bytes(p["packet"]) for p in client._out_packet)
    client.loop_write()
    assert counted.sends == 3  # three joined, the QoS 0 one alone, the last (alone: nothing to join)
    assert broker.recv(65536) == expected
    assert infos[3].is_published()


def test_a_short_send_resumes_where_it_stopped(client: BatchedClient) -> None:
    broker = connect(client)
    client._sock = Counted(client._sock, most=10)
    client.on_socket_register_write = lambda *_: None
    for i in range(5):
        queue_publish(client, f"j/{i}", bytes([i]) * 50, 1)
    expected = b"".join(bytes(p["packet"]) for p in client._out_packet)
    received = b""
    for _ in range(200):
        client.loop_write()
        received += broker.recv(65536)
        if not client.want_write():
            break
    assert received == expected
