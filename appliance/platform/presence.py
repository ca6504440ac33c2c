"""Gateway presence: each instance announces itself (retained, with a Last Will) and takes 1/N of offers."""

from __future__ import annotations

import threading
import time

import orjson

ONLINE, OFFLINE = "online", "offline"


def topic(root: str, gateway_id: str = "+") -> str:
    """<root>/_gateways/<id>: two levels under the root, so no node topic filter ever matches it."""
    return f"{root}/_gateways/{gateway_id}"


def document(gateway_id: str, state: str) -> bytes:
    return orjson.dumps({"gateway": gateway_id, "state": state, "ts_ms": int(time.time() * 1000)})


class Presence:
    """Live gateways by id, this one always counted; `ingest` runs on the gateway's event loop (the lock
    keeps reads from other threads safe)."""

    def __init__(self, root: str, own_id: str) -> None:
        self.root = root
        self.own_id = own_id
        self._states: dict[str, str] = {}
        self._share = 1.0  # kept with _states: dispatch reads it for every node it weighs
        self._lock = threading.Lock()

    def ingest(self, topic_name: str, payload: bytes) -> bool:
        """Take a presence message; True when it was one (whatever it said)."""
        prefix = f"{self.root}/_gateways/"
        if not topic_name.startswith(prefix):
            return False
        gateway_id = topic_name[len(prefix) :]
        state = OFFLINE
        if payload:
            try:
                found = orjson.loads(payload)
            except orjson.JSONDecodeError:
                found = None
            if isinstance(found, dict) and found.get("state") == ONLINE:
                state = ONLINE
        with self._lock:
            self._states[gateway_id] = state
            others = sum(1 for g, seen in self._states.items() if seen == ONLINE and g != self.own_id)
            self._share = 1.0 / (1 + others)
        return True

    def live(self) -> list[str]:
        with self._lock:
            others = {g for g, state in self._states.items() if state == ONLINE and g != self.own_id}
        return sorted({self.own_id, *others})

    def share(self) -> float:
        """This gateway's share of every node's offer: 1/N of the live gateways."""
        return self._share
