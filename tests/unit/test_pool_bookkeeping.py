"""The pool link's bookkeeping, with fake clocks: session counter, outbox, report cadence, backoff,
sender rates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.pool.cadence import ReportCadence
from appliance.pool.client import Backoff, packet_bytes
from appliance.pool.outbox import POISON_STRIKES, Outbox
from appliance.pool.senders import SenderRates
from appliance.pool.session import FILE_NAME, SessionCounter
from appliance.pool.wire import Outbound, publish_properties


def test_session_rises_only_when_spent_and_survives_restarts(tmp_path: Path) -> None:
    counter = SessionCounter(tmp_path / "state")
    assert counter.take() == 1
    assert counter.take() == 1  # an attempt the broker never accepted does not spend it
    counter.spend()
    assert counter.take() == 2
    counter.spend()
    assert SessionCounter(tmp_path / "state").take() == 3  # a restart continues from the file
    assert (tmp_path / "state" / FILE_NAME).read_text() == "3\n"
    assert [p.name for p in (tmp_path / "state").iterdir()] == [FILE_NAME]  # no temporary left behind


@pytest.mark.parametrize("content", [b"garbage", b"\xff\xfe", b""])
def test_session_file_that_cannot_be_read_still_rises(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / FILE_NAME).write_bytes(content)
    assert SessionCounter(tmp_path).take() > 1_000_000_000  # continues from wall-clock seconds
    assert "pool session file" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_session_file(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    path.write_text("5\n")
    path.chmod(0)
    assert SessionCounter(tmp_path).take() > 1_000_000_000


def message(index: int) -> Outbound:
    return Outbound(f"t/{index}", b"x")


def test_outbox_keeps_order_and_resends_what_was_not_acknowledged() -> None:
    outbox = Outbox(limit=10)
    for index in range(3):
        outbox.put(message(index))
    taken = [outbox.take() for _ in range(3)]
    for mid, sent in enumerate(taken, start=1):
        assert sent is not None
        outbox.sent(mid, sent)
    assert outbox.acknowledged(1) and not outbox.acknowledged(99)
    outbox.put(message(3))
    outbox.connection_lost()  # mids 2 and 3 may never have arrived
    assert [m.topic for m in iter(outbox.take, None)] == ["t/1", "t/2", "t/3"]
    assert outbox.is_empty and outbox.take_dropped() == 0


def test_outbox_is_bounded_and_counts_what_it_dropped() -> None:
    outbox = Outbox(limit=2)
    for index in range(5):
        outbox.put(message(index))
    assert len(outbox) == 2 and outbox.dropped == 3
    assert [m.topic for m in iter(outbox.take, None)] == ["t/3", "t/4"]  # the newest are kept
    assert outbox.take_dropped() == 3 and outbox.take_dropped() == 0


def test_put_back_keeps_the_front() -> None:
    outbox = Outbox(limit=5)
    outbox.put(message(1))
    first = outbox.take()
    assert first is not None and not outbox.is_waiting
    outbox.put(message(2))
    outbox.put_back(first)
    assert [m.topic for m in iter(outbox.take, None)] == ["t/1", "t/2"]


def test_cadence_reports_every_interval_with_jitter() -> None:
    draws = iter([0.0, 1.0, 0.5])
    cadence = ReportCadence(30.0, 0.2, rng=lambda: next(draws))
    spare = {"m": 100.0}
    assert cadence.is_due(0.0, spare)  # nothing published yet
    cadence.published(0.0, spare)  # jitter draw 0.0: next due at 27 s
    assert not cadence.is_due(26.9, spare) and cadence.is_due(27.0, spare)
    cadence.published(27.0, spare)  # draw 1.0: next at 27 + 33
    assert not cadence.is_due(59.9, spare) and cadence.is_due(60.0, spare)


def test_cadence_reports_at_once_on_a_big_change_but_not_in_a_flood() -> None:
    cadence = ReportCadence(10.0, 0.2, rng=lambda: 0.5)
    cadence.published(0.0, {"m": 100.0})
    assert not cadence.is_due(5.0, {"m": 85.0})  # 15%: wait for the interval
    assert cadence.is_due(5.0, {"m": 75.0})  # 25%
    assert not cadence.is_due(0.5, {"m": 10.0})  # within a tenth of an interval of the last report
    assert cadence.is_due(2.0, {"m": 100.0, "new": 0.0})  # a model came
    cadence.published(5.0, {"m": 0.0})
    assert cadence.is_due(7.0, {"m": 0.5})  # from none to some is always news
    assert not cadence.is_due(7.0, {"m": 0.0})
    cadence.forget()
    assert cadence.is_due(7.0, {"m": 0.0})


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    backoff = Backoff(1.0, 8.0, rng=lambda: 1.0)
    assert [backoff.next_s() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    backoff.reset()
    low = Backoff(1.0, 8.0, rng=lambda: 0.0)
    assert [low.next_s() for _ in range(3)] == [0.5, 1.0, 2.0]  # at least half the step


def send_all(outbox: Outbox, first_mid: int) -> list[Outbound]:
    """Take every waiting message and record it as sent, as the link's flush does."""
    sent = list(iter(outbox.take, None))
    for mid, message in enumerate(sent, start=first_mid):
        outbox.sent(mid, message)
    return sent


def test_a_message_in_flight_at_two_lost_connections_in_a_row_is_dropped() -> None:
    assert POISON_STRIKES == 2
    outbox = Outbox(limit=10)
    for index in range(3):
        outbox.put(message(index))
    send_all(outbox, 1)
    assert outbox.connection_lost() is None  # the first time, everything is sent again
    send_all(outbox, 10)
    poison = outbox.connection_lost()  # t/0 was the oldest in flight both times: the broker hangs up on it
    assert poison is not None and poison.topic == "t/0"
    assert [m.topic for m in send_all(outbox, 20)] == ["t/1", "t/2"]  # the others keep their order
    assert outbox.acknowledged(20) and outbox.acknowledged(21) and outbox.is_empty


def test_strikes_need_the_same_oldest_message_in_a_row() -> None:
    outbox = Outbox(limit=10)
    for index in range(2):
        outbox.put(message(index))
    send_all(outbox, 1)
    assert outbox.connection_lost() is None  # first strike for t/0
    send_all(outbox, 10)
    assert outbox.acknowledged(10)  # t/0 got through after all
    assert outbox.connection_lost() is None  # t/1 is the oldest in flight for the first time
    assert outbox.connection_lost() is None  # nothing was in flight: the row is broken
    send_all(outbox, 20)
    assert outbox.connection_lost() is None  # a first strike again
    send_all(outbox, 30)
    poison = outbox.connection_lost()
    assert poison is not None and poison.topic == "t/1" and outbox.is_empty


def test_a_refused_message_is_returned_once_and_forgotten() -> None:
    outbox = Outbox(limit=10)
    outbox.put(message(0))
    send_all(outbox, 1)
    refused = outbox.acknowledged(1)
    assert refused is not None and refused.topic == "t/0" and outbox.acknowledged(1) is None


def test_backoff_keeps_growing_while_connections_die_at_once() -> None:
    backoff = Backoff(1.0, 8.0, rng=lambda: 1.0, stable_s=30.0)
    delays = []
    for _ in range(4):
        backoff.connection_ended(0.01)  # the broker accepted us, then hung up at once
        delays.append(backoff.next_s())
    assert delays == [1.0, 2.0, 4.0, 8.0]
    backoff.connection_ended(30.0)  # a connection that held through the keep-alive interval
    assert backoff.next_s() == 1.0


def test_sender_rates_with_a_fake_clock() -> None:
    now = [0.0]
    rates = SenderRates(2.0, max_senders=3, clock=lambda: now[0])
    assert rates.admit("a") is None and rates.admit("a") is None  # a burst of one second's worth
    assert rates.admit("a") == pytest.approx(0.5)
    now[0] = 0.25
    assert rates.admit("a") == pytest.approx(0.25)  # refused jobs take nothing
    now[0] = 0.5
    assert rates.admit("a") is None
    assert rates.admit("b") is None  # senders are counted apart


def test_slow_rates_allow_one_job_then_wait() -> None:
    now = [0.0]
    rates = SenderRates(0.01, clock=lambda: now[0])
    assert rates.admit("a") is None
    assert rates.admit("a") == pytest.approx(100.0)


def test_long_sender_names_are_tracked_by_a_digest_of_bounded_size() -> None:
    """Regression: 1,024 senders of 64 KB each held 64 MB of names; a long name is still one sender."""
    now = [0.0]
    rates = SenderRates(1.0, clock=lambda: now[0])
    long = "a/" + "x" * 65_000
    assert rates.admit(long) is None
    assert rates.admit(long) is not None  # the same sender: its bucket is spent
    assert rates.admit(long[:-1] + "y") is None  # another one
    for index in range(2000):
        rates.admit(f"{index}/" + "z" * 65_000)
    assert len(rates) == 1024 and sum(len(key) for key in rates._buckets) <= 1024 * 128


def test_only_a_bounded_number_of_senders_is_tracked() -> None:
    now = [0.0]
    rates = SenderRates(1.0, max_senders=3, clock=lambda: now[0])
    assert rates.admit("a") is None
    assert rates.admit("a") is not None
    for sender in ("b", "c", "d"):
        rates.admit(sender)
    assert len(rates) == 3  # "a" was the least recently seen and is forgotten
    assert rates.admit("a") is None
    for index in range(10_000):
        rates.admit(f"forged-{index}")
    assert len(rates) == 3


def test_packet_bytes_counts_the_whole_publish_packet() -> None:
    small = Outbound("a/b", b"12345")
    # fixed header 1 + length 1; topic 2 + 3; packet id 2; payload 5 (MQTT 5: + 1 property length byte)
    assert packet_bytes(small, None) == 14
    assert packet_bytes(small, publish_properties(small)) == 15
    larger = Outbound("a/b", b"x" * 200)
    assert packet_bytes(larger, None) == 1 + 2 + 2 + 3 + 2 + 200  # a two-byte remaining length
    with_properties = Outbound("a/b", b"", correlation=b"c", expiry_s=5)
    # properties: length 1, CorrelationData 1 + 2 + 1, MessageExpiryInterval 1 + 4
    assert packet_bytes(with_properties, publish_properties(with_properties)) == 1 + 1 + 2 + 3 + 2 + 10
