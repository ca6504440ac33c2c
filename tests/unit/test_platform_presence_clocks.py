"""Gateway presence without trusting clocks across hosts, and a Last Will for every connection.

Each gateway has its own wall clock (hosts differ, and NTP steps them); liveness goes by this gateway's
monotonic clock, a run's words by its own counter, and a new run is taken when its clock is near ours.
The link signs a Will before every connection (GatewayLink._supervise): each drop's Will counts, and a
replayed Will of an earlier connection does not.
"""

from __future__ import annotations

import logging

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_platform_presence import Clocks as Host

from appliance.platform import presence
from appliance.platform.presence import OFFLINE, ONLINE, Presence
from appliance.pool import signing

ROOT = "ecp/v1"
TOPIC = presence.topic(ROOT, "gw-b")


class Pair:
    """gw-a (observing, on its own host) and gw-b's key; gw-b's runs are made on hosts the test picks."""

    def __init__(
        self, key: Ed25519PrivateKey | None = None, here: Host | None = None, **options: float
    ) -> None:
        self.here = here or Host()
        self.key = key or Ed25519PrivateKey.generate()
        self.a = Presence(
            ROOT,
            "gw-a",
            key=Ed25519PrivateKey.generate(),
            clock_ms=self.here.wall,
            monotonic=self.here.monotonic,
            **options,
        )
        self.a.known({"gw-b": [signing.public_key_text(self.key)]})

    def run_of_b(self, host: Host) -> Presence:
        """A run (process) of gw-b on `host`."""
        return Presence(ROOT, "gw-b", key=self.key, clock_ms=host.wall)

    def hears(self, payload: bytes) -> float:
        self.a.ingest(TOPIC, payload)
        return self.a.share()

    def advance(self, seconds: float, *hosts: Host) -> None:
        for host in (self.here, *hosts):
            host.advance(seconds)


def skew_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "clock" in r.getMessage()
    ]


# Clocks (finding 5)


@pytest.mark.parametrize("behind_s", [31, 45, -45])
def test_a_peer_whose_clock_is_off_by_more_than_the_expiry_is_counted_and_logged_once(
    behind_s: int, caplog: pytest.LogCaptureFixture
) -> None:
    pair = Pair(refresh_s=10.0)
    there = Host(pair.here.ms - behind_s * 1000)
    b = pair.run_of_b(there)
    with caplog.at_level(logging.WARNING, logger="appliance.platform.presence"):
        assert pair.hears(b.document(ONLINE)) == 0.5
        for _ in range(5):  # it keeps refreshing: counted by receive time, whatever its clock says
            pair.advance(10, there)
            pair.a.expire()
            assert pair.hears(b.document(ONLINE)) == 0.5
    (warning,) = skew_warnings(caplog)
    assert "gw-b" in warning and f"{abs(behind_s):.1f} s" in warning and "counted" in warning


def test_a_peer_beyond_the_allowed_skew_is_not_counted_said_once_and_the_skew_is_a_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pair = Pair()
    there = Host(pair.here.ms - 300_000)  # five minutes behind
    b = pair.run_of_b(there)
    with caplog.at_level(logging.WARNING, logger="appliance.platform.presence"):
        assert pair.hears(b.document(ONLINE)) == 1.0
        pair.advance(10, there)
        assert pair.hears(b.document(ONLINE)) == 1.0
    (warning,) = skew_warnings(caplog)
    assert "300.0 s behind" in warning and "not counted" in warning
    tolerant = Pair(max_clock_skew_s=600.0)
    assert tolerant.hears(tolerant.run_of_b(Host(tolerant.here.ms - 300_000)).document(ONLINE)) == 0.5


@pytest.mark.parametrize("is_will_seen", [True, False])
def test_a_restarted_peer_on_a_host_behind_the_old_run_is_counted(is_will_seen: bool) -> None:
    """gw-b's first run was on a host 50 s ahead of the second's (another host, or an NTP step back)."""
    pair = Pair(refresh_s=10.0)
    old_host = Host(pair.here.ms + 40_000)
    old = pair.run_of_b(old_host)
    will = old.document(OFFLINE)
    assert pair.hears(old.document(ONLINE)) == 0.5
    pair.advance(2, old_host)
    if is_will_seen:
        assert pair.hears(will) == 1.0  # it crashed; the broker sent its Will
    new_host = Host(pair.here.ms - 10_000)
    new = pair.run_of_b(new_host)
    new.document(OFFLINE)  # the new run's Will, held by the broker
    assert pair.hears(new.document(ONLINE)) == 0.5
    for _ in range(6):  # past the old run's expiry: the new run's refreshes keep gw-b counted
        pair.advance(10, new_host)
        pair.a.expire()
        assert pair.hears(new.document(ONLINE)) == 0.5


def test_a_peers_clock_stepped_back_within_a_run_changes_nothing() -> None:
    """Within a run its words are ordered by its counter: after a step back its refreshes still count,
    and its clean stop, signed after the step, is taken at once."""
    pair = Pair(refresh_s=10.0)
    there = Host()
    b = pair.run_of_b(there)
    b.document(OFFLINE)  # the Will of its connection
    assert pair.hears(b.document(ONLINE)) == 0.5
    there.ms -= 120_000  # NTP steps gw-b's clock two minutes back
    for _ in range(4):
        pair.advance(10, there)
        pair.a.expire()
        assert pair.hears(b.document(ONLINE)) == 0.5
    assert pair.hears(b.document(OFFLINE)) == 1.0  # a clean stop
    assert pair.a.live() == ["gw-a"]


def test_an_older_runs_words_replayed_do_not_take_a_newer_run_back() -> None:
    pair = Pair()
    there = Host()
    old = pair.run_of_b(there)
    old_online, old_offline = old.document(ONLINE), old.document(OFFLINE)
    pair.advance(5, there)
    new = pair.run_of_b(there)
    new.document(OFFLINE)
    assert pair.hears(new.document(ONLINE)) == 0.5  # gw-a never heard the old run
    for replay in (old_online, old_offline, old_online, old_offline):
        assert pair.hears(replay) == 0.5
    assert pair.hears(new.document(OFFLINE)) == 1.0


def test_a_replayed_online_of_a_run_long_gone_is_not_counted_and_runs_kept_are_bounded() -> None:
    pair = Pair(max_clock_skew_s=60.0)
    there = Host()
    old = pair.run_of_b(there)
    stale = old.document(ONLINE)
    pair.advance(61, there)
    assert pair.hears(stale) == 1.0
    ignored = pair.a.ignored
    for _ in range(3 * presence.RUNS_KEPT):  # many restarts, each a run: a few are remembered
        run = pair.run_of_b(there)
        assert pair.hears(run.document(ONLINE)) == 0.5
        assert pair.hears(run.document(OFFLINE)) == 1.0
    assert pair.a.ignored == ignored
    assert len(pair.a._peers["gw-b"].runs) == presence.RUNS_KEPT


# A Last Will for every connection (finding 6)


def test_the_will_of_every_connection_drop_counts() -> None:
    pair = Pair()
    there = Host()
    b = pair.run_of_b(there)
    for _ in range(4):
        will = b.document(OFFLINE)  # GatewayLink._supervise: a Will before each connection
        pair.advance(0.1, there)
        assert pair.hears(b.document(ONLINE)) == 0.5  # GatewayLink._connected
        pair.advance(5, there)
        assert pair.hears(b.document(ONLINE)) == 0.5  # a refresh
        pair.advance(5, there)
        assert pair.hears(will) == 1.0  # the connection drops: the broker sends its Will


def test_a_replayed_will_of_an_earlier_connection_changes_nothing() -> None:
    pair = Pair()
    there = Host()
    b = pair.run_of_b(there)
    first_will = b.document(OFFLINE)
    assert pair.hears(b.document(ONLINE)) == 0.5
    assert pair.hears(first_will) == 1.0
    pair.advance(30, there)
    b.document(OFFLINE)  # reconnecting: the second connection's Will
    assert pair.hears(b.document(ONLINE)) == 0.5
    assert pair.hears(first_will) == 0.5  # seen before: a replay
    late = Pair(pair.key, pair.here)  # a gateway started after the first drop never saw that Will
    assert late.hears(b.document(ONLINE)) == 0.5
    assert late.hears(first_will) == 0.5
    assert late.hears(first_will) == 0.5


def test_a_replayed_online_of_a_dropped_connection_does_not_bring_its_gateway_back() -> None:
    pair = Pair()
    there = Host()
    b = pair.run_of_b(there)
    will = b.document(OFFLINE)
    first = b.document(ONLINE)
    refresh = b.document(ONLINE)
    for payload in (first, refresh):
        assert pair.hears(payload) == 0.5
    assert pair.hears(will) == 1.0
    for payload in (first, refresh, will):
        assert pair.hears(payload) == 1.0


def test_a_resent_online_of_the_previous_connection_after_reconnecting_changes_nothing() -> None:
    """paho resends a QoS 1 publish not yet acknowledged when the connection dropped, on the next one:
    the previous connection's `online` may come after the new connection's Will and `online`."""
    pair = Pair()
    there = Host()
    b = pair.run_of_b(there)
    first_will = b.document(OFFLINE)
    assert pair.hears(b.document(ONLINE)) == 0.5
    in_flight = b.document(ONLINE)  # a refresh the broker never acknowledged
    assert pair.hears(first_will) == 1.0
    second_will = b.document(OFFLINE)
    assert pair.hears(b.document(ONLINE)) == 0.5
    assert pair.hears(in_flight) == 0.5  # resent on the second connection
    assert pair.hears(second_will) == 1.0  # and the second connection's drop still counts


def test_the_documents_carry_the_run_its_counter_and_the_connection() -> None:
    b = Presence(ROOT, "gw-b", key=Ed25519PrivateKey.generate())
    said = [presence._parse(b.document(state)) for state in (OFFLINE, ONLINE, ONLINE, OFFLINE, ONLINE)]
    assert all(s is not None and s.run == b.run for s in said)
    assert [s.seq for s in said if s] == [1, 2, 3, 4, 5]
    assert [s.connection for s in said if s] == [1, 1, 1, 2, 2]


def test_replays_of_many_older_runs_do_not_push_out_the_live_run() -> None:
    pair = Pair()
    there = Host()
    old_words = []
    for _ in range(2 * presence.RUNS_KEPT):  # runs that came and went, recently
        old = pair.run_of_b(there)
        old_words += [old.document(ONLINE), old.document(OFFLINE)]
    live = pair.run_of_b(there)
    assert pair.hears(live.document(ONLINE)) == 0.5
    for payload in old_words[1::2]:  # every old run's last word, replayed
        assert pair.hears(payload) == 0.5
    assert len(pair.a._peers["gw-b"].runs) == presence.RUNS_KEPT
