"""Places for HTTP connections: in all and per client address, taken on accept and given back on close."""

from __future__ import annotations

from appliance import errors
from appliance.settings import ServerSettings


class ConnectionGate:
    """Open connections of one server, in all and per client address. Used on the event loop only."""

    def __init__(self, max_connections: int, max_per_peer: int, section: str = "server") -> None:
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer
        self.section = section  # where the two limits are set, for refusals to name them
        self.open = 0
        self.lingering = 0  # refused connections still open to deliver their answer
        self.stop_by: float | None = None  # loop time by which a stopping server closes every connection
        self._by_peer: dict[str, int] = {}

    @classmethod
    def of(cls, server: ServerSettings) -> ConnectionGate:
        return cls(server.max_connections, server.max_connections_per_peer)

    def admit(self, peer: str, retry_after_s: float) -> errors.ConnectionLimit | None:
        """Take a place for a connection from `peer`, or return why there is none."""
        from_peer = self._by_peer.get(peer, 0)
        if from_peer >= self.max_per_peer:
            return errors.ConnectionLimit(
                f"too many connections from {peer}: {from_peer} open, at most {self.max_per_peer} "
                f"per client address ({self.section}.max_connections_per_peer)",
                retry_after_s=retry_after_s,
            )
        if self.open >= self.max_connections:
            return errors.ConnectionLimit(
                f"too many connections: {self.open} open, at most {self.max_connections} "
                f"({self.section}.max_connections)",
                retry_after_s=retry_after_s,
            )
        self.open += 1
        self._by_peer[peer] = from_peer + 1
        return None

    def release(self, peer: str) -> None:
        self.open -= 1
        left = self._by_peer[peer] - 1
        if left:
            self._by_peer[peer] = left
        else:
            del self._by_peer[peer]

    @property
    def peers(self) -> int:
        """Client addresses with connections open (an address leaves no entry once they close)."""
        return len(self._by_peer)
