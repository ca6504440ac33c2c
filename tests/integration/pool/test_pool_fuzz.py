"""MQTT fuzz of every cmd/ topic: random payloads, properties, reply routes; the line is served at the end.

A seeded generator (POOL_FUZZ_SEED reproduces a run; the seed is in every failure message) publishes
FUZZ_MESSAGES messages to infer/<model>, drain, resume, rebirth and unknown verbs, as MQTT 5 (user
properties, ResponseTopic, CorrelationData, expiry) or 3.1.1 (reply_to and corr_id in the body). Only
what the broker itself would refuse from the fuzzer (NUL and control characters in topics and string
properties) is left out: the node never sees those. Afterwards the node still answers a valid job, line
HTTP inference still answers 200, the node kept its broker connection, it never drained unless remote
control was on, and it never published a message under any node's cmd/ tree.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from pool_brokers import Broker
from pool_recorder import Names, Recorder, ask, assert_line_serves, job, pool_section

from appliance.protocol import codec

FUZZ_MESSAGES = 300
SEED = int(os.environ.get("POOL_FUZZ_SEED", time.time_ns() % 2**32))
MAX_PACKET_BYTES = 64 * 1024

# Characters a broker takes in a topic or string property (no NUL, controls or non-characters; U+FEFF is
# one paho refused, test_pool_hostile.py).
TEXT = string.ascii_letters + string.digits + " -_./$é✓漢\u00a0\ufeff\U0001f600"
HEADER_LENGTHS = ["0", "1", "-1", "²", "٣", " 5", "5 ", "1e3", "0x10", "99999999999999999999", "", "12"]


class Fuzzer:
    """Draws one hostile message at a time for the node `names`, from one seeded generator."""

    def __init__(self, seed: int, names: Names, is_v5: bool) -> None:
        self.rng = random.Random(seed)
        self.names, self.is_v5 = names, is_v5
        other = f"{names.root}/{names.site}/other-node"
        self.good_reply_topics = [names.reply_topic("fuzz"), f"{names.root}/_reply/fuzz/1"]
        self.reply_topics = [
            f"{names.base}/cmd/drain",
            f"{names.base}/cmd/resume",
            f"{names.base}/cmd/infer/batchable",
            f"{other}/cmd/drain",
            f"{names.base}/state",
            f"{names.base}/cmd",
            "$SYS/broker/x",
            "a/+/b",
            "#",
            "",
            "x" * 70_000,
            "r/\u0000",
            "r/\u0001",
            "r/\ufffe",
            "r/\u0085",
        ]

    def text(self, most: int = 24) -> str:
        return "".join(self.rng.choice(TEXT) for _ in range(self.rng.randint(0, most)))

    def value(self, depth: int = 0) -> Any:
        """Any JSON value, nested a little."""
        choices: list[Callable[[], Any]] = [
            lambda: None,
            lambda: self.rng.choice([True, False]),
            lambda: self.rng.randint(-(2**63), 2**64 - 1),
            lambda: self.rng.choice([0.0, -0.0, 1e308, -1e-308, 3.5]),
            lambda: self.text(),
            lambda: self.rng.choice(["nan", "inf", "-inf", "NaN"]),
        ]
        if depth < 3:
            choices += [
                lambda: [self.value(depth + 1) for _ in range(self.rng.randint(0, 4))],
                lambda: {self.text(8): self.value(depth + 1) for _ in range(self.rng.randint(0, 4))},
            ]
        return self.rng.choice(choices)()

    def topic(self) -> str:
        if self.rng.random() < 0.4:
            return f"{self.names.base}/cmd/infer/batchable"
        verb = self.rng.choice(
            ["infer/" + self.text(12), "infer", "infer/", "drain", "resume", "rebirth", "bench", "drain/x",
             self.text(12), "", "infer/batchable/x"]
        )  # fmt: skip
        return f"{self.names.base}/cmd/{verb}"

    def reply_topic(self) -> str:
        """Half the time one the node may answer on, so that fuzzed jobs reach the data plane too."""
        return self.rng.choice(self.good_reply_topics if self.rng.random() < 0.5 else self.reply_topics)

    def job_document(self) -> dict[str, Any]:
        document: dict[str, Any] = orjson.loads(job(binary=False)[0])
        mutations: list[Callable[[], None]] = [
            lambda: document["inputs"][0].update(shape=self.value()),
            lambda: document["inputs"][0].update(shape=[self.rng.randint(-2, 10**12) for _ in range(3)]),
            lambda: document["inputs"][0].update(datatype=self.rng.choice(["BYTES", "FP64", "INT8", "x"])),
            lambda: document["inputs"][0].update(data=self.value()),
            lambda: document["inputs"][0].update(name=self.text()),
            lambda: document.update(inputs=self.value()),
            lambda: document.update(outputs=self.value()),
            lambda: document.update(parameters={"priority": self.value(), "timeout": self.value()}),
            lambda: document.update(id=self.value()),
            lambda: document.update({self.text(8): self.value()}),
        ]
        for mutation in self.rng.sample(mutations, self.rng.randint(0, 3)):
            with contextlib.suppress(AttributeError, IndexError, KeyError, TypeError):
                mutation()  # unless an earlier mutation replaced what this one changes
        return document

    def command_document(self) -> dict[str, Any]:
        keys = ["timeout_s", "reason", self.text(8)]
        document = {key: self.value() for key in self.rng.sample(keys, self.rng.randint(0, 3))}
        if self.rng.random() < 0.5:
            document["timeout_s"] = self.rng.choice(
                [1, 0.01, 3600, 3601, 0, -1, 1e308, "nan", "5", True, None, [5], math.pi]
            )
        return document

    def payload(self, route: dict[str, Any]) -> bytes:
        kind = self.rng.random()
        if kind < 0.15:
            return self.rng.randbytes(self.rng.randint(0, 512))
        if kind < 0.2:
            return b"x" * (MAX_PACKET_BYTES + self.rng.randint(1, 4096))  # over the packet limit
        if kind < 0.3:
            return orjson.dumps(self.value(), option=orjson.OPT_NON_STR_KEYS)
        if kind < 0.45 and self.is_v5:
            encoded = codec.encode_request(
                {"x": np.ones((2, 4), np.float32)}, binary=True, binary_output=True
            )
            return encoded.body()[: self.rng.randint(0, len(encoded.body()))]
        document = self.job_document() if kind < 0.75 else self.command_document()
        return orjson.dumps(document | route, option=orjson.OPT_NON_STR_KEYS)

    def body_route(self) -> dict[str, Any]:
        """reply_to and corr_id in the body: any of the reply topics, NUL and controls included."""
        route: dict[str, Any] = {}
        if self.rng.random() < 0.8:
            route["reply_to"] = self.reply_topic() if self.rng.random() < 0.9 else self.value()
        if self.rng.random() < 0.8:
            route["corr_id"] = self.value()
        return route

    def properties(self) -> dict[str, Any]:
        """MQTT 5 properties: only strings the broker takes from the fuzzer itself."""
        properties: dict[str, Any] = {}
        if self.rng.random() < 0.7:
            topic = self.reply_topic()
            if all(c not in topic for c in "\u0000\u0001\ufffe\u0085") and len(topic) < 65_000:
                properties["response_topic"] = topic
        if self.rng.random() < 0.5:
            properties["correlation"] = self.rng.randbytes(self.rng.randint(0, 64))
        if self.rng.random() < 0.3:
            properties["expiry_s"] = self.rng.randint(1, 100)
        user = {self.text(8): self.text() for _ in range(self.rng.randint(0, 3))}
        if self.rng.random() < 0.5:
            user[codec.HEADER_LENGTH] = self.rng.choice(HEADER_LENGTHS)
        if user:
            properties["user"] = user
        return properties

    def message(self) -> tuple[str, bytes, dict[str, Any]]:
        properties = self.properties() if self.is_v5 else {}
        route = self.body_route() if not properties.get("response_topic") or self.rng.random() < 0.2 else {}
        properties["retain"] = self.rng.random() < 0.03
        return self.topic(), self.payload(route), properties


@pytest.mark.asyncio
@pytest.mark.parametrize("remote_control", [False, True], ids=["remote_control_off", "remote_control_on"])
@pytest.mark.parametrize("mqtt_version", ["5", "3.1.1"])
async def test_fuzzed_commands_never_stop_the_line(
    serve: Callable[..., Any],
    pool_repository: Path,
    broker: Broker,
    names: Names,
    recorder_factory: Any,
    mqtt_version: str,
    remote_control: bool,
) -> None:
    if mqtt_version == "5" and not broker.is_v5:
        pytest.skip("needs an MQTT 5 broker")
    is_v5 = mqtt_version == "5"
    seed = SEED + (2 if is_v5 else 0) + int(remote_control)
    recorder: Recorder = await recorder_factory(broker, names, f"{names.root}/#", is_v5=is_v5)
    pool = pool_section(
        broker,
        names,
        mqtt_version=mqtt_version,
        remote_control=remote_control,
        max_packet_bytes=MAX_PACKET_BYTES,
    )
    with serve(pool_repository, pool=pool) as running:
        birth = await recorder.node("birth")
        fuzzer = Fuzzer(seed, names, is_v5)
        published_commands = 0
        for _ in range(FUZZ_MESSAGES):
            topic, payload, properties = fuzzer.message()
            recorder.publish(topic, payload, **properties)
            published_commands += 1
        if remote_control:  # a fuzzed drain may have been valid: the platform resumes the node
            resumed = await ask(recorder, names, "resume", b"", sender="final-resume")
            assert resumed.document["status"] == 200, (seed, resumed.document)
        body, user = job(binary=is_v5)
        answer = await ask(recorder, names, "infer/batchable", body, user=user, sender="final")
        assert "outputs" in answer.document, (seed, answer.document)
        await assert_line_serves(running.url)
        link = running.service.pool
        assert link.session == birth["session"], f"seed {seed}: the node lost its broker connection"
        assert link.state == "online" and not running.service.hub.is_draining, seed
        if not remote_control:
            drained = [
                m.document for m in recorder.messages if m.kind == "state" and m.document["state"] != "online"
            ]
            assert not drained, (seed, drained)
        on_commands = [m for m in recorder.messages if "/cmd/" in m.topic or m.topic.endswith("/cmd")]
        assert len(on_commands) == published_commands + (2 if remote_control else 1), seed
        events = [m.document for m in recorder.messages if m.kind == "evt"]
        assert len(events) >= FUZZ_MESSAGES // 2, seed  # refusals are reported, not dropped silently
        failed = [e for e in events if e.get("status", 0) >= 500 and e["status"] != 503]
        assert not failed, (seed, failed)  # client input never makes a 5xx other than 503
