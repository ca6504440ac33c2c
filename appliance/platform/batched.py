"""paho for the gateway's link, with fewer system calls: reads served from one recv, writes joined.

paho reads a packet with a recv for its first byte, one per byte of its length and one for the rest,
and ends each read with a recv that raises BlockingIOError; it writes each queued packet with a send of
its own. At the gateway that was about nine recv and two send calls per job (a report, an answer and
PUBACKs in; the job and a PUBACK out), and every send to the broker on this loopback woke it at once.
`BatchedClient` hands paho its reads from one recv of up to READ_BYTES (the link reads on while
`buffered()`: the poller cannot see those bytes) and sends what is queued in one send of up to
WRITE_BYTES. Both only where paho's own handling stays whole: bytes read from one socket are never
served for another (a reconnection), and only packets paho does nothing more with once written are
joined (not a QoS 0 PUBLISH, whose on_publish fires then, nor a DISCONNECT, which closes the socket).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import DISCONNECT, PUBLISH

READ_BYTES = 65536  # one recv's worth
WRITE_BYTES = 65536  # queued packets joined into one send, at most (one may be larger alone)


class BatchedClient(mqtt.Client):
    """paho's Client with its reads buffered and its queued packets sent together (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read = b""
        self._read_at = 0
        self._read_from: object = None

    def _sock_recv(self, bufsize: int) -> bytes:
        data, at = self._read, self._read_at
        if at >= len(data) or self._read_from is not self._sock:
            data = super()._sock_recv(max(bufsize, READ_BYTES))
            if len(data) <= bufsize:  # all of it asked for (or the end of the stream): nothing kept
                self._read, self._read_at = b"", 0
                return data
            self._read, self._read_from, at = data, self._sock, 0
        self._read_at = at + bufsize
        return data[at : at + bufsize]

    def buffered(self) -> bool:
        """Bytes read from the socket and not yet handed to paho."""
        return self._read_at < len(self._read) and self._read_from is self._sock

    def _packet_write(self) -> mqtt.MQTTErrorCode:
        _join_queued(self._out_packet)
        return super()._packet_write()


def _join_queued(queued: deque[Any]) -> None:
    """Replace the packets at the head of paho's queue that need nothing once written by one packet
    holding their bytes (what is left of the first, which a short send may have begun), up to
    WRITE_BYTES; paho then writes it as any other, resuming after a short send."""
    if len(queued) < 2:
        return
    packets = []
    size = 0
    while queued and size < WRITE_BYTES and _needs_nothing_after(queued[0]):
        packets.append(queued.popleft())
        size += packets[-1]["to_process"]
    if len(packets) == 1:
        queued.appendleft(packets[0])
    elif packets:
        data = b"".join(memoryview(packet["packet"])[packet["pos"] :] for packet in packets)
        queued.appendleft(
            {
                "command": 0,
                "mid": 0,
                "qos": 0,
                "pos": 0,
                "to_process": len(data),
                "packet": data,
                "info": None,
            }
        )


def _needs_nothing_after(packet: dict[str, Any]) -> bool:
    command = packet["command"] & 0xF0
    return command != DISCONNECT and not (command == PUBLISH and packet["qos"] == 0)
