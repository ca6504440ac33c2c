"""Receiving MQTT messages leaves nothing for the cycle collector.

paho looks for per-filter callbacks in every message it receives with a recursive closure that refers
to itself: a few objects of cyclic garbage per message. On the gateway (1,000 received a second)
that made the collector run tens of times a second and, every few seconds, stop the event loop for a
full collection of 15-30 ms (bench/swarm.py). `wire.paho_client` skips the search while no per-filter
callback exists, which is always here.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from pool_brokers import Broker

from appliance.pool.wire import paho_client

MESSAGES = 300


@contextmanager
def collector_paused() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def garbage_from_receiving(broker: Broker, make: Callable[[], mqtt.Client]) -> int:
    """Objects the cycle collector finds after `MESSAGES` messages reached a client made by `make`."""
    received = threading.Event()
    count = 0

    def on_message(_c: Any, _u: Any, _m: mqtt.MQTTMessage) -> None:
        nonlocal count
        count += 1
        if count == MESSAGES:
            received.set()

    subscribed = threading.Event()
    receiver = make()
    receiver.on_message = on_message
    receiver.on_subscribe = lambda *_: subscribed.set()
    receiver.on_connect = lambda client, *_: client.subscribe("garbage/#", qos=0)
    receiver.connect("127.0.0.1", broker.port)
    receiver.loop_start()
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=receiver.protocol)
    try:
        assert subscribed.wait(10), "no SUBACK"
        sender.connect("127.0.0.1", broker.port)
        sender.loop_start()
        for n in range(5):  # paho's and the sockets' one-time state, before counting
            sender.publish(f"garbage/warm/{n}", b"x")
        with collector_paused():
            for n in range(MESSAGES - 5):
                sender.publish(f"garbage/a/{n % 7}", b"payload")
            assert received.wait(10), f"{count} of {MESSAGES} messages arrived"
            return gc.collect()
    finally:
        for client in (sender, receiver):
            client.disconnect()
            client.loop_stop()


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311])
def test_receiving_leaves_no_cyclic_garbage(broker: Broker, protocol: int) -> None:
    if protocol == mqtt.MQTTv5 and not broker.is_v5:
        pytest.skip(f"{broker.kind} speaks MQTT 3.1.1 only")
    found = garbage_from_receiving(broker, lambda: paho_client("garbage-test", protocol))
    assert found < MESSAGES // 10, f"{found} objects of cyclic garbage for {MESSAGES} messages"


def test_a_plain_paho_client_does_leave_garbage(broker: Broker) -> None:
    """The control: what the test above would see without `paho_client` (if paho fixes its search,
    this fails, and `wire._Filters` can go)."""
    protocol = mqtt.MQTTv5 if broker.is_v5 else mqtt.MQTTv311
    found = garbage_from_receiving(
        broker, lambda: mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plain", protocol=protocol)
    )
    assert found >= MESSAGES, f"only {found} objects of cyclic garbage for {MESSAGES} messages"
