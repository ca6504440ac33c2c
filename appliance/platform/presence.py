"""Gateway presence: each instance announces itself (retained, signed, refreshed) and takes 1/N of offers.

Anyone who may publish under `<root>/_gateways/` could otherwise set every gateway's share: a flood of
`online`s under made-up ids shrinks it towards 0 (the market stops selling), and an `offline` under a live
peer's id grows it past its due (two gateways book the same capacity). So a presence counts only when
it is signed (Ed25519, CONTEXT and the sorted JSON of `gateway`, `state`, `ts_ms`, `run`, `seq`,
`connection`) with a key the shared ledger lists for that gateway id (the `gateways` table every gateway
registers its key in at start) and its `gateway` is the id in its topic.

Wall clocks are compared only where nothing else can be: hosts' clocks differ, and step. Within a run
(one process, `run` random) messages are ordered by `seq`, which rises with every one it signs; a
gateway is live while one of its runs said `online` less than EXPIRY_ROUNDS refreshes ago by this
gateway's monotonic clock. A run not seen before is taken only if its `ts_ms` is within
`max_clock_skew_s` of this gateway's clock (a replay of a long-dead run's words is not); one further
off is logged, once per peer. Each run is judged on its own words, so an older run's `offline`, replayed,
cannot take a newer run's `online` back. `connection` rises with every `offline` a run signs: the Last
Will the link signs before each connection, and the last word of a clean stop. A Will is signed before
the `online`s of its connection (a lower `seq`), so it is taken when it names the connection of the
run's latest `online`, once: the Will of any connection drop counts, and a replayed Will of an earlier
connection does not. At most `max_gateways` gateways are counted, this one included, so the share is
never below 1/max_gateways. Gateways that do not share a ledger do not count each other.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.errors import ApplianceError
from appliance.pool import signing
from appliance.pool.wire import Outbound

log = logging.getLogger(__name__)

ONLINE, OFFLINE = "online", "offline"
CONTEXT = b"ecp-presence-v2\n"  # v1 had no seq and connection: neither version takes the other's
REFRESH_S = 10.0  # a gateway re-announces itself this often
EXPIRY_ROUNDS = 3  # a gateway not heard from for this many refreshes is no longer counted
MAX_GATEWAYS = 64  # gateways counted at most, this one included (gateway.max_gateways)
MAX_PAYLOAD_BYTES = 1024  # a presence is ~250 bytes; a larger one is not parsed
KEYS_READ_MIN_S = 1.0  # signers the ledger did not list make it be read again, at most this often
MAX_UNKNOWN = 64  # presences from signers not yet known, kept to be taken once the ledger lists them
MAX_CLOCK_SKEW_S = 60.0  # a new run counts if its clock is this close to ours (presence_max_clock_skew_s)
RUNS_KEPT = 4  # runs remembered per gateway (each restart is a new run)


def topic(root: str, gateway_id: str = "+") -> str:
    """<root>/_gateways/<id>: two levels under the root, so no node topic filter ever matches it."""
    return f"{root}/_gateways/{gateway_id}"


@dataclass(slots=True)
class _Run:
    """What one run (process) of a gateway said last."""

    seq: int  # the highest `seq` taken from it
    connection: int  # the connection its latest message belongs to
    state: str
    until_s: float  # monotonic: online until then unless it refreshes
    heard_s: float  # monotonic: when a message of it was last taken
    will_connection: int = -1  # the connection whose Last Will was taken


@dataclass(slots=True)
class _Peer:
    runs: dict[str, _Run] = field(default_factory=dict)
    is_counted: bool = False  # one of its runs is online (kept with Presence._online)


@dataclass(frozen=True, slots=True)
class _Said:
    gateway: str
    state: str
    ts_ms: int
    run: str
    seq: int
    connection: int
    signature: bytes

    def fields(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway,
            "state": self.state,
            "ts_ms": self.ts_ms,
            "run": self.run,
            "seq": self.seq,
            "connection": self.connection,
        }

    def signed_bytes(self) -> bytes:
        return CONTEXT + orjson.dumps(self.fields(), option=orjson.OPT_SORT_KEYS)


class Presence:
    """Live gateways by id, this one always counted; `ingest` runs on the gateway's event loop (the lock
    keeps reads from other threads safe)."""

    def __init__(
        self,
        root: str,
        own_id: str,
        *,
        key: Ed25519PrivateKey | None = None,
        max_gateways: int = MAX_GATEWAYS,
        refresh_s: float = REFRESH_S,
        max_clock_skew_s: float = MAX_CLOCK_SKEW_S,
        clock_ms: Callable[[], int] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.own_id = own_id
        self.key = key
        self.max_gateways = max(1, max_gateways)
        self.refresh_s = refresh_s
        self.expiry_s = refresh_s * EXPIRY_ROUNDS
        self.max_clock_skew_s = max_clock_skew_s
        self.run = secrets.token_hex(8)  # this instance: its words are ordered by _seq, not by clocks
        self._seq = 0  # rises with every presence signed
        self._connection = 0  # rises with every `offline` signed (module docstring)
        self.ignored = 0  # presence messages not counted (unsigned, unknown signer, stale...), for /metrics
        self._clock_ms = clock_ms or _now_ms
        self._monotonic = monotonic
        self._prefix = f"{root}/_gateways/"
        self._keys: dict[str, list[Ed25519PublicKey]] = {}
        self._peers: dict[str, _Peer] = {}
        self._online = 0  # peers counted now (kept with _peers: no count over them per message)
        self._share = 1.0  # kept with _online: dispatch reads it for every node it weighs
        self._unknown: dict[str, bytes] = {}  # signer id -> its latest presence, until the ledger lists it
        self._warned: set[str] = set()  # unknown signers named in the log (at most MAX_UNKNOWN)
        self._skewed: set[str] = set()  # peers whose clock was logged as far from ours (at most MAX_UNKNOWN)
        self._wake: asyncio.Event | None = None  # refresh_forever's: keys to read, or peers to greet
        self._is_keys_wanted = False
        self._is_greeting_due = False
        self._lock = threading.Lock()

    def document(self, state: str) -> bytes:
        """This gateway's presence, signed with its key when it has one. An `offline` is the Last Will
        of the connection about to be made (the link signs one before each) or the last word of a clean
        stop: what this gateway says after it belongs to a new connection."""
        if state == OFFLINE:
            self._connection += 1
        self._seq += 1
        said = _Said(self.own_id, state, self._clock_ms(), self.run, self._seq, self._connection, b"")
        if self.key is None:
            return orjson.dumps(said.fields())
        signature = base64.b64encode(self.key.sign(said.signed_bytes())).decode("ascii")
        return orjson.dumps({**said.fields(), "signature": signature})

    def known(self, keys: Mapping[str, Iterable[str]]) -> None:
        """The gateways' keys as the ledger lists them (id -> every key it has had); presences that were
        waiting for their signer to be listed are taken now."""
        parsed: dict[str, list[Ed25519PublicKey]] = {}
        for gateway_id, texts in keys.items():
            for text in texts:
                with contextlib.suppress(ValueError):
                    parsed.setdefault(gateway_id, []).append(signing.parse_public_key(text))
        self._keys = parsed
        waiting = [(gid, payload) for gid, payload in self._unknown.items() if gid in parsed]
        for gateway_id, payload in waiting:
            del self._unknown[gateway_id]
            self._take(gateway_id, payload)

    def ingest(self, topic_name: str, payload: bytes) -> bool:
        """Take a presence message; True when it was one (whatever it said, counted or not)."""
        if not topic_name.startswith(self._prefix):
            return False
        gateway_id = topic_name[len(self._prefix) :]
        if gateway_id != self.own_id:  # this gateway is always counted, whatever is said under its id
            self._take(gateway_id, payload)
        return True

    def _take(self, gateway_id: str, payload: bytes) -> None:
        said = _parse(payload)
        if said is None or said.gateway != gateway_id:
            self.ignored += 1
            return
        keys = self._keys.get(gateway_id)
        if keys is None:
            self.ignored += 1
            if len(self._unknown) >= MAX_UNKNOWN and gateway_id not in self._unknown:
                del self._unknown[next(iter(self._unknown))]
            self._unknown[gateway_id] = payload
            self._want(keys=True)
            return
        if not _verifies(keys, said):
            self.ignored += 1
            self._want(keys=True)  # perhaps a key it registered since
            return
        peer = self._peers.get(gateway_id)
        run = peer.runs.get(said.run) if peer is not None else None
        now_s = self._monotonic()
        if run is None:
            if not self._is_clock_near(gateway_id, said):
                self.ignored += 1  # a replay of a run long gone, or a clock too far from ours (logged)
                return
            if peer is None:
                peer = self._peers[gateway_id] = _Peer()
            if len(peer.runs) >= RUNS_KEPT:  # an offline run goes first, then the least recently heard
                del peer.runs[min(peer.runs, key=lambda name: _keeping(peer.runs[name]))]
            run = peer.runs[said.run] = _Run(said.seq - 1, said.connection, OFFLINE, now_s, now_s)
        if said.seq > run.seq:
            run.seq, run.connection, run.heard_s = said.seq, said.connection, now_s
            if said.state == ONLINE:
                run.state, run.until_s = ONLINE, now_s + self.expiry_s
            else:
                run.state, run.will_connection = OFFLINE, said.connection
        elif _is_will(run, said):
            run.state, run.will_connection, run.heard_s = OFFLINE, said.connection, now_s
        else:
            self.ignored += 1  # said before what was taken from this run already: a replay
            return
        self._recount(gateway_id, peer)

    def _is_clock_near(self, gateway_id: str, said: _Said) -> bool:
        """Whether a run not seen before may be taken: its `ts_ms` within max_clock_skew_s of this
        gateway's clock. A peer's clock off by more than half of that is logged once."""
        behind_s = (self._clock_ms() - said.ts_ms) / 1000
        is_near = abs(behind_s) <= self.max_clock_skew_s
        is_news = gateway_id not in self._skewed and len(self._skewed) < MAX_UNKNOWN
        if abs(behind_s) > self.max_clock_skew_s / 2 and is_news:
            self._skewed.add(gateway_id)
            log.warning(
                "gateway %r's clock is %.1f s %s this gateway's (gateway.presence_max_clock_skew_s "
                "is %g s): %s; keep the gateways' clocks in sync (NTP)",
                gateway_id[:100],
                abs(behind_s),
                "behind" if behind_s > 0 else "ahead of",
                self.max_clock_skew_s,
                "counted" if is_near else "not counted (both gateways may book the same capacity)",
            )
        return is_near

    def _recount(self, gateway_id: str, peer: _Peer) -> None:
        is_counted = any(run.state == ONLINE for run in peer.runs.values())
        if peer.is_counted == is_counted:
            return
        with self._lock:
            peer.is_counted = is_counted
            self._online += 1 if is_counted else -1
            self._share = 1.0 / min(1 + self._online, self.max_gateways)
        state = ONLINE if is_counted else OFFLINE
        log.info("gateway %s is %s: this gateway's share is now %.4f", gateway_id, state, self._share)
        if is_counted:
            self._want(greeting=True)  # a gateway that just started counts this one at once

    def expire(self) -> None:
        """Stop counting gateways not heard from for EXPIRY_ROUNDS refreshes."""
        now_s = self._monotonic()
        for gateway_id, peer in list(self._peers.items()):
            for run in peer.runs.values():
                if run.state == ONLINE and run.until_s <= now_s:
                    run.state = OFFLINE
            self._recount(gateway_id, peer)

    def live(self) -> list[str]:
        """This gateway and the others counted (at most max_gateways in all)."""
        with self._lock:
            others = sorted(g for g, peer in self._peers.items() if peer.is_counted)
        return sorted([self.own_id, *others[: self.max_gateways - 1]])

    def share(self) -> float:
        """This gateway's share of every node's offer: 1/N of the live gateways."""
        return self._share

    def _want(self, *, keys: bool = False, greeting: bool = False) -> None:
        self._is_keys_wanted |= keys
        self._is_greeting_due |= greeting
        if self._wake is not None:
            self._wake.set()

    async def refresh_forever(
        self,
        publish: Callable[[Outbound], None],
        read_keys: Callable[[], Awaitable[Mapping[str, Iterable[str]]]],
    ) -> None:
        """Re-announce this gateway every refresh_s (and at once, at most every KEYS_READ_MIN_S, when a
        peer comes online, so that a gateway just started counts this one), stop counting peers that
        stopped, and read the gateways' keys again every round and when an unknown signer appears."""
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        while True:
            self._announce(publish)
            self.expire()
            await self._read_keys(read_keys)
            round_ends = loop.time() + self.refresh_s
            while (left := round_ends - loop.time()) > 0:
                try:
                    async with asyncio.timeout(left):  # not wait_for: on 3.11 it may swallow a cancel
                        await self._wake.wait()
                except TimeoutError:
                    break
                await asyncio.sleep(KEYS_READ_MIN_S)  # what came meanwhile is handled together
                self._wake.clear()
                if self._is_keys_wanted:
                    await self._read_keys(read_keys)
                if self._is_greeting_due:
                    self._announce(publish)

    def _announce(self, publish: Callable[[Outbound], None]) -> None:
        self._is_greeting_due = False
        message = Outbound(
            topic(self.root, self.own_id),
            self.document(ONLINE),
            retain=True,
            expiry_s=int(self.expiry_s),
        )
        try:
            publish(message)
        except ApplianceError as exc:  # not connected: the link announces it again on connecting
            log.debug("gateway presence not refreshed: %s", exc)

    async def _read_keys(self, read_keys: Callable[[], Awaitable[Mapping[str, Iterable[str]]]]) -> None:
        self._is_keys_wanted = False
        try:
            keys = await read_keys()
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.warning("ledger: cannot read the gateways' keys: %s", exc)
            return
        self.known(keys)
        for gateway_id in self._unknown:
            if gateway_id not in self._warned and len(self._warned) < MAX_UNKNOWN:
                self._warned.add(gateway_id)
                log.warning(
                    "gateway %r announces itself but its key is not in this gateway's ledger: it is not "
                    "counted (gateways on one broker share one ledger, or they book nodes twice)",
                    gateway_id[:100],
                )


def _is_will(run: _Run, said: _Said) -> bool:
    """An online run's Last Will: an `offline` signed before the `online`s of its connection (so not
    newer by `seq`), naming the connection of the latest `online`, taken once."""
    return (
        said.state == OFFLINE
        and run.state == ONLINE
        and said.connection == run.connection
        and said.connection > run.will_connection
    )


def _keeping(run: _Run) -> tuple[bool, float]:
    """How much a run is worth remembering: an online one more than any offline one, then by recency."""
    return (run.state == ONLINE, run.heard_s)


def _parse(payload: bytes) -> _Said | None:
    if not payload or len(payload) > MAX_PAYLOAD_BYTES:
        return None
    try:
        found: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(found, dict):
        return None
    gateway, state, ts_ms, run, seq, connection, signature = (
        found.get(name) for name in ("gateway", "state", "ts_ms", "run", "seq", "connection", "signature")
    )
    if not (isinstance(gateway, str) and isinstance(run, str) and isinstance(signature, str)):
        return None
    if state not in (ONLINE, OFFLINE) or not all(_is_int(value) for value in (ts_ms, seq, connection)):
        return None
    try:
        raw = base64.b64decode(signature, validate=True)
    except (ValueError, binascii.Error):
        return None
    return _Said(gateway, state, ts_ms, run, seq, connection, raw)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _verifies(keys: list[Ed25519PublicKey], said: _Said) -> bool:
    signed = said.signed_bytes()
    for key in keys:
        try:
            key.verify(said.signature, signed)
        except InvalidSignature:
            continue
        return True
    return False


def _now_ms() -> int:
    return int(time.time() * 1000)
