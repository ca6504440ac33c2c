"""MQTT wire details shared by the node and the platform tools: broker URLs, TLS, messages, properties."""

from __future__ import annotations

import copy
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MalformedPacket, Properties, VariableByteIntegers, readInt16

from appliance.errors import ConfigError
from appliance.settings import PoolSettings

HEADER_LENGTH = "inference-header-content-length"  # user property: JSON header size of a binary body
STATUS = "status"  # user property on job responses: the HTTP-like status, "200" on success

# What a node takes of a job as JSON (pool/jobs.py), on this module so that a gateway knows it without
# importing the box.
# The most bytes of JSON a job may carry: its whole body, or the header its binary tensor data follows.
# A JSON parse (orjson, simdjson: C code) holds the GIL from start to end, on a worker thread as on the
# event loop, so the line's requests wait while it runs. Decoding 64 KiB of numbers costs about 1.5 ms,
# 5-6 ms shaped for the slowest paths (nested lists, BYTES, thousands of requested outputs; 10-14 ms on
# a busy box), and numbers cost 20-27 ms a MiB beyond (2 shared cores of an EPYC VM). Larger tensors
# travel as binary data, decoded as a view of the payload whatever its size. A job with more JSON is
# refused (413) before anything of it is parsed.
MAX_JSON_BYTES = 64 * 1024
# The most tensor elements a job's answer carries as JSON text (more are asked for binary): writing
# them holds the GIL as parsing does, about 1.5 ms for 32768 FP32 values, 10 ms for as many BYTES.
MAX_JSON_OUTPUT_ELEMENTS = 32 * 1024


@dataclass(frozen=True, slots=True)
class Broker:
    host: str
    port: int
    is_tls: bool

    @classmethod
    def parse(cls, url: str) -> Broker:
        """mqtt://host[:port] (1883) or mqtts://host[:port] (8883); ConfigError naming the URL otherwise."""
        parts = urlsplit(url)
        if "@" in parts.netloc:  # said without the URL, which holds a password
            raise ConfigError(
                "broker URL: credentials in it are not used; give them as pool.username and "
                "pool.password (gateway.username and gateway.password on the platform)"
            )
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or port == -1 or parts.path.strip("/"):
            raise ConfigError(f"broker URL {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
        is_tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if is_tls else 1883), is_tls)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.is_tls else 'mqtt'}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Security:
    """TLS context and credentials, checked once so a bad file fails at start-up with its name."""

    context: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: PoolSettings, broker: Broker) -> Security:
        password = settings.password.get_secret_value() if settings.password else None
        return cls.build(
            broker, settings.username, password, settings.ca_file, settings.cert_file, settings.key_file
        )

    @classmethod
    def build(
        cls,
        broker: Broker,
        username: str | None,
        password: str | None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> Security:
        context = None
        if broker.is_tls:
            try:
                context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"pool.ca_file {ca_file}: not a readable CA bundle ({exc})") from exc
            if cert_file is not None:
                try:
                    context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigError(
                        f"pool.cert_file {cert_file} / pool.key_file {key_file}: cannot be loaded ({exc})"
                    ) from exc
        elif ca_file or cert_file:
            raise ConfigError(f"pool.ca_file/cert_file are set but broker {broker} is not mqtts://")
        return cls(context, username, password)

    def apply(self, client: mqtt.Client) -> None:
        if self.context is not None:
            client.tls_set_context(self.context)
        if self.username is not None or self.password is not None:
            client.username_pw_set(self.username, self.password)


@dataclass(slots=True)
class Inbound:
    """A received message with the MQTT 5 properties we use (None/empty on 3.1.1)."""

    topic: str
    payload: bytes
    is_retained: bool = False
    response_topic: str | None = None
    correlation: bytes | None = None
    expiry_s: int | None = None
    user: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Outbound:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    expiry_s: int | None = None
    correlation: bytes | None = None
    response_topic: str | None = None
    content_type: str | None = None
    user: dict[str, str] = field(default_factory=dict)


def inbound(message: mqtt.MQTTMessage) -> Inbound:
    properties = getattr(message, "properties", None)
    found = Inbound(message.topic, bytes(message.payload), bool(message.retain))
    if properties is not None:
        found.response_topic = getattr(properties, "ResponseTopic", None)
        found.correlation = getattr(properties, "CorrelationData", None)
        found.expiry_s = getattr(properties, "MessageExpiryInterval", None)
        found.user = dict(getattr(properties, "UserProperty", None) or [])
    return found


class _Filters(MQTTMatcher):
    """paho's per-filter callbacks. paho looks for matching ones in every message it receives, with a
    recursive closure that refers to itself: a reference cycle per message (more objects the deeper
    its topic), left to the garbage collector, whose collections then stop the loop. Nothing here
    registers a per-filter callback (everything goes to `on_message`), so the search is skipped while
    there is none (tests/integration/pool/test_mqtt_garbage.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.is_empty = True

    def __setitem__(self, key: str, value: object) -> None:
        self.is_empty = False
        super().__setitem__(key, value)

    def iter_match(self, topic: str) -> Iterator[object]:
        return iter(()) if self.is_empty else super().iter_match(topic)


C = TypeVar("C", bound=mqtt.Client)


def paho_client(client_id: str, protocol: int, *, kind: type[C] = mqtt.Client, **options: object) -> C:
    """A paho client (callback API 2) that leaves no garbage per received message (`_Filters`);
    `kind`: a subclass of paho's Client to make instead."""
    client = kind(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **options)  # type: ignore[arg-type]
    client._on_message_filtered = _Filters()
    return client


class FastProperties(Properties):
    """paho's MQTT 5 properties, same behaviour, a fraction of the cost. paho builds two 27- and
    28-entry tables for every Properties and finds each name by stripping the spaces from every name
    in turn: decoding one received message's properties took 40 of the 60 us paho spends on it
    (a gateway receives a report and an answer per job). Here the tables are paho's own, built once
    and shared, and names are looked up in a dict; what is rarely set (range-checked values, names
    that do not apply to the packet) goes through paho's own checks. `install()` makes paho decode
    received PUBLISH packets with it (tests/unit/test_pool_settings_and_view.py compares both ways)."""

    def __init__(self, packetType: int) -> None:
        object.__setattr__(self, "packetType", packetType)
        object.__setattr__(self, "types", _TABLES.types)
        object.__setattr__(self, "names", _TABLES.names)
        object.__setattr__(self, "properties", _TABLES.properties)

    def getIdentFromName(self, compressedName: str) -> int:
        return _IDENTS.get(compressedName, -1)

    def getNameFromIdent(self, identifier: int) -> str | None:
        return _NAMES.get(identifier)

    def clear(self) -> None:
        for name in [name for name in self.__dict__ if name in _IDENTS]:
            object.__delattr__(self, name)

    def pack(self) -> bytes:
        """paho's bytes, written straight for what jobs and answers carry (expiry, content type,
        response topic, correlation data, user properties): paho's pack looks up each of its 27 names
        and writes each value through four calls, 44 us a job at the gateway (bench/swarm.py
        --profile). Any other property set: paho's own."""
        values = self.__dict__
        if not _PACKED.issuperset(name for name in values if name in _IDENTS):
            return super().pack()
        parts = []
        if (expiry := values.get("MessageExpiryInterval")) is not None:
            parts.append(b"\x02" + _INT32.pack(expiry))
        if (content_type := values.get("ContentType")) is not None:
            parts.append(b"\x03" + _utf8(content_type))
        if (topic := values.get("ResponseTopic")) is not None:
            parts.append(b"\x08" + _utf8(topic))
        if (correlation := values.get("CorrelationData")) is not None:
            parts.append(b"\x09" + _INT16.pack(len(correlation)) + correlation)
        for key, value in values.get("UserProperty", ()):
            parts.append(b"\x26" + _utf8(key) + _utf8(value))
        packed = b"".join(parts)
        return VariableByteIntegers.encode(len(packed)) + packed

    def readProperty(self, buffer: bytes, type: int, propslen: int) -> tuple[Any, int]:
        """paho's, with strings read as MQTT 5 has them: U+FEFF is a character like any other, never
        stripped or refused [MQTT-1.5.4-3]. paho called a string holding one malformed and hung up before
        acknowledging the message; the broker (which forwards it) then delivered the same job again at
        every reconnect, for as long as the session lived: one message took a node out of the pool."""
        if type == _TEXT:
            return _read_text(buffer, propslen)
        if type == _TEXT_PAIR:
            key, used = _read_text(buffer, propslen)
            value, more = _read_text(buffer[used:], propslen - used)
            return (key, value), used + more
        return super().readProperty(buffer, type, propslen)

    def __setattr__(self, name: str, value: Any) -> None:
        compressed = name.replace(" ", "")
        identifier = _IDENTS.get(compressed)
        if (
            identifier is None
            or self.packetType not in _TABLES.properties[identifier][1]
            or (compressed in _RANGE_CHECKED and not isinstance(value, list))
        ):
            super().__setattr__(name, value)  # paho's checks, and its errors
            return
        if self.allowsMultiple(compressed):  # paho's own list (lists of values)
            value = value if isinstance(value, list) else [value]
            if compressed in self.__dict__:
                value = self.__dict__[compressed] + value
        object.__setattr__(self, compressed, value)


def _utf8(text: str | bytes) -> bytes:
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    return _INT16.pack(len(data)) + data  # struct.error past 65,535 bytes, as paho's


def _read_text(buffer: bytes, limit: int) -> tuple[str, int]:
    """A length-prefixed UTF-8 string and the bytes it took. What the broker has already checked (valid
    UTF-8, no NUL) is not checked again; bytes that are not UTF-8 are replaced, not raised on, so that
    no string a peer wrote can make the client hang up (the routes refuse what they cannot use)."""
    if limit < 2:
        raise MalformedPacket("Not enough data to read string length")
    length = readInt16(buffer)
    if length > limit - 2:
        raise MalformedPacket("Length delimited string too long")
    return bytes(buffer[2 : 2 + length]).decode("utf-8", errors="replace"), length + 2


_TABLES = Properties(PacketTypes.PUBLISH)
_TEXT, _TEXT_PAIR = _TABLES.types.index("UTF-8 Encoded String"), _TABLES.types.index("UTF-8 String Pair")
_IDENTS = {name.replace(" ", ""): identifier for name, identifier in _TABLES.names.items()}
_NAMES = {identifier: name for name, identifier in _TABLES.names.items()}
_PACKED = frozenset(
    {"MessageExpiryInterval", "ContentType", "ResponseTopic", "CorrelationData", "UserProperty"}
)
_INT16, _INT32 = struct.Struct("!H"), struct.Struct("!L")  # paho's writeInt16, writeInt32
_RANGE_CHECKED = frozenset({
    "ReceiveMaximum", "TopicAlias", "TopicAliasMaximum", "MaximumPacketSize", "SubscriptionIdentifier",
    "RequestResponseInformation", "RequestProblemInformation", "PayloadFormatIndicator",
})  # fmt: skip


def install() -> None:
    """Received PUBLISH (and CONNACK) properties decoded with FastProperties. paho decodes them in
    its `_packet` module; where a paho release moves that, nothing changes but the speed."""
    try:
        from paho.mqtt import _packet
    except ImportError:
        return
    if getattr(_packet, "Properties", None) is Properties:
        _packet.Properties = FastProperties


install()
_PUBLISH = FastProperties(PacketTypes.PUBLISH)


def publish_properties(message: Outbound) -> Properties:
    """The message's MQTT 5 properties. paho builds its property tables anew for each Properties and
    checks each assignment against them (about 30 us a message, more than the rest of a publish): this
    copies an empty PUBLISH set, sharing its tables, and fills it with values of the types paho's
    checks would have passed (test_pool_settings_and_view packs both ways and compares)."""
    properties = copy.copy(_PUBLISH)
    values = properties.__dict__
    if message.expiry_s is not None:
        values["MessageExpiryInterval"] = max(1, int(message.expiry_s))
    if message.correlation is not None:
        values["CorrelationData"] = bytes(message.correlation)
    if message.response_topic is not None:
        values["ResponseTopic"] = str(message.response_topic)
    if message.content_type is not None:
        values["ContentType"] = str(message.content_type)
    if message.user:
        values["UserProperty"] = [(str(key), str(value)) for key, value in message.user.items()]
    return properties
